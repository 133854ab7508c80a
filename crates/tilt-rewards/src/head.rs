//! A small trained head (linear or one-hidden-layer MLP) over MiniLM embeddings.
//!
//! Users bring their own reward by training a head on MiniLM embeddings in any framework
//! and saving it as a safetensors file. The format is fixed and checked on load, so that a
//! wrong file fails with a message naming the tensor, not with a garbage score.
//!
//! ## File format (safetensors, all tensors `F32`)
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `weight` | `[out, k]` | output layer |
//! | `bias` | `[out]` | output layer bias |
//! | `hidden.weight` (optional) | `[h, d]` | hidden layer; then `k = h` |
//! | `hidden.bias` (with `hidden.weight`) | `[h]` | hidden layer bias |
//!
//! The input `z` has `d` features (`k = d` without a hidden layer):
//! - `d = 384`: the unit-norm MiniLM embedding of the response, `e(y)`;
//! - `d = 768`: the concatenation `[e(x), e(y)]` of prompt and response embeddings.
//!
//! ```text
//! a = ReLU(W_h z + b_h)       (only with a hidden layer; else a = z)
//! o = W a + b                 (o ∈ R^out)
//! score = o_0                                     if out = 1 (regression)
//! score = o_c − log Σ_j exp(o_j)   (nats, ≤ 0)    if out > 1 (classifier)
//! ```
//! For a classifier, the score is the log-probability of class `c`, where `c` is the
//! safetensors metadata entry `"positive_class"` (a decimal index) if present, else the last
//! class `out − 1` (so a binary classifier saved as [bad, good] scores log P(good)). The
//! log-probability, not the probability, keeps differences between good responses visible
//! (P = 0.999 vs 0.99999 is −1e-3 vs −1e-5 nats) and is what a reward tilt
//! `exp(r/β)` wants: with `r = log P(c|y)` and β = 1 the tilt is proportional to `P(c|y)`.
//!
//! PyTorch example: `safetensors.torch.save_file({"weight": lin.weight, "bias": lin.bias},
//! "head.safetensors", metadata={"positive_class": "1"})`.

use crate::minilm::{dot, MiniLmEmbedder, MINILM_DIM};
use crate::{check_scores, quote, Reward, RewardError};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A tensor read from a head file: its shape and its values.
type Loaded = (Vec<usize>, Vec<f32>);

/// A tensor shape as `[2, 384]`.
fn shape(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// A dense layer `o = W z + b`, row-major `W` of shape `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
struct Dense {
    out: usize,
    inp: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    fn forward(&self, z: &[f32]) -> Vec<f32> {
        (0..self.out)
            .map(|o| dot(&self.weight[o * self.inp..(o + 1) * self.inp], z) + self.bias[o])
            .collect()
    }
}

/// What the head's input is, decided by its input width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInput {
    /// `e(y)`: the response's embedding (384 features).
    Response,
    /// `[e(x), e(y)]`: prompt and response embeddings concatenated (768 features).
    PromptAndResponse,
}

/// A validated head loaded from safetensors (format in the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    hidden: Option<Dense>,
    output: Dense,
    positive_class: usize,
    path: PathBuf,
}

impl Head {
    /// Load and validate a head file.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] naming the file and the problem: missing or unreadable, not
    /// safetensors, a missing or unexpected tensor, a wrong dtype or shape, non-finite
    /// weights, a bad `positive_class`.
    pub fn load(path: &Path) -> Result<Self, RewardError> {
        let name = format!("head:{}", path.display());
        let bad = |m: String| RewardError::Invalid {
            reward: name.clone(),
            message: m,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let known = ["weight", "bias", "hidden.weight", "hidden.bias"];
        if let Some(other) = st.names().into_iter().find(|n| !known.contains(n)) {
            return Err(bad(format!(
                "unexpected tensor {} (a head has weight, bias, and optionally hidden.weight, hidden.bias)",
                quote(other)
            )));
        }
        let tensor = |t: &str| -> Result<Option<Loaded>, RewardError> {
            let view = match st.tensor(t) {
                Ok(v) => v,
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
                Err(e) => return Err(bad(format!("tensor {t}: {e}"))),
            };
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor {t} has dtype {}, expected F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("tensor {t} has a non-finite value at {i}")));
            }
            Ok(Some((view.shape().to_vec(), data)))
        };
        let need = |t: &str| -> Result<Loaded, RewardError> {
            tensor(t)?.ok_or_else(|| bad(format!("missing tensor {}", quote(t))))
        };
        let dense =
            |w: Loaded, b: Loaded, wname: &str, bname: &str| -> Result<Dense, RewardError> {
                let [out, inp] = w.0[..] else {
                    return Err(bad(format!(
                        "tensor {wname} has shape {}, expected 2 dimensions [out, in]",
                        shape(&w.0)
                    )));
                };
                if b.0 != [out] {
                    return Err(bad(format!(
                        "tensor {bname} has shape {}, expected [{out}] to match {wname} {}",
                        shape(&b.0),
                        shape(&w.0)
                    )));
                }
                if out == 0 || inp == 0 {
                    return Err(bad(format!(
                        "tensor {wname} is empty: shape {}",
                        shape(&w.0)
                    )));
                }
                Ok(Dense {
                    out,
                    inp,
                    weight: w.1,
                    bias: b.1,
                })
            };
        let output = dense(need("weight")?, need("bias")?, "weight", "bias")?;
        let hidden = match (tensor("hidden.weight")?, tensor("hidden.bias")?) {
            (None, None) => None,
            (Some(w), Some(b)) => Some(dense(w, b, "hidden.weight", "hidden.bias")?),
            (Some(_), None) => return Err(bad("missing tensor \"hidden.bias\"".into())),
            (None, Some(_)) => return Err(bad("missing tensor \"hidden.weight\"".into())),
        };
        let input_width = match &hidden {
            Some(h) => {
                if output.inp != h.out {
                    return Err(bad(format!(
                        "tensor weight takes {} inputs but hidden.weight gives {}",
                        output.inp, h.out
                    )));
                }
                h.inp
            }
            None => output.inp,
        };
        if input_width != MINILM_DIM && input_width != 2 * MINILM_DIM {
            let which = if hidden.is_some() {
                "hidden.weight"
            } else {
                "weight"
            };
            return Err(bad(format!(
                "tensor {which} takes {input_width} inputs; a head over MiniLM takes {MINILM_DIM} (response) or {} (prompt ++ response)",
                2 * MINILM_DIM
            )));
        }
        let positive_class = match metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("positive_class"))
        {
            None => output.out - 1,
            Some(s) => match s.trim().parse::<usize>() {
                Ok(c) if c < output.out => c,
                _ => {
                    return Err(bad(format!(
                        "metadata positive_class = {} is not a class index below {}",
                        quote(s),
                        output.out
                    )))
                }
            },
        };
        Ok(Self {
            hidden,
            output,
            positive_class,
            path: path.to_path_buf(),
        })
    }

    /// What the head reads (decided by its input width).
    pub fn input(&self) -> HeadInput {
        let width = self.hidden.as_ref().map_or(self.output.inp, |h| h.inp);
        if width == MINILM_DIM {
            HeadInput::Response
        } else {
            HeadInput::PromptAndResponse
        }
    }

    /// Number of outputs: 1 for a regression head, the number of classes otherwise.
    pub fn outputs(&self) -> usize {
        self.output.out
    }

    /// The class whose log-probability a classifier head scores.
    pub fn positive_class(&self) -> usize {
        self.positive_class
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The head's score on one input vector `z` (formula in the [module docs](self)).
    ///
    /// # Errors
    /// [`RewardError::Failed`] if `z` has the wrong length.
    pub fn apply(&self, z: &[f32]) -> Result<f32, RewardError> {
        let width = self.hidden.as_ref().map_or(self.output.inp, |h| h.inp);
        if z.len() != width {
            return Err(RewardError::Failed {
                reward: format!("head:{}", self.path.display()),
                message: format!("input has {} features, the head takes {width}", z.len()),
            });
        }
        let a = match &self.hidden {
            Some(h) => h.forward(z).into_iter().map(|v| v.max(0.0)).collect(),
            None => z.to_vec(),
        };
        let o = self.output.forward(&a);
        if o.len() == 1 {
            return Ok(o[0]);
        }
        let max = o.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum: f64 = o
            .iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln();
        Ok((f64::from(o[self.positive_class] - max) - log_sum) as f32)
    }
}

/// A reward computed by a [`Head`] over MiniLM embeddings.
#[derive(Debug, Clone)]
pub struct HeadReward {
    embedder: Arc<MiniLmEmbedder>,
    head: Head,
}

impl HeadReward {
    /// Combine an embedder and a head.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] if the embedder's dimension is not the head's.
    pub fn new(embedder: Arc<MiniLmEmbedder>, head: Head) -> Result<Self, RewardError> {
        if embedder.dim() != MINILM_DIM {
            return Err(RewardError::Invalid {
                reward: format!("head:{}", head.path.display()),
                message: format!(
                    "the embedder gives {} features, the head expects MiniLM's {MINILM_DIM}",
                    embedder.dim()
                ),
            });
        }
        Ok(Self { embedder, head })
    }

    /// The head.
    pub fn head(&self) -> &Head {
        &self.head
    }
}

impl Reward for HeadReward {
    fn name(&self) -> String {
        format!("head:{}", self.head.path.display())
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let name = self.name();
        let rename = |e: RewardError| e.renamed(&name);
        let scores = match self.head.input() {
            HeadInput::Response => {
                let texts: Vec<&str> = pairs.iter().map(|(_, r)| *r).collect();
                let emb = self.embedder.embed(&texts).map_err(rename)?;
                emb.iter()
                    .map(|e| self.head.apply(e))
                    .collect::<Result<Vec<_>, _>>()?
            }
            HeadInput::PromptAndResponse => {
                // Each distinct prompt is embedded once (best-of-n repeats one prompt n times).
                let mut prompt_index: std::collections::HashMap<&str, usize> =
                    std::collections::HashMap::new();
                let mut texts: Vec<&str> = Vec::new();
                let mut pair_prompt = Vec::with_capacity(pairs.len());
                for (prompt, _) in pairs {
                    let idx = *prompt_index.entry(prompt).or_insert_with(|| {
                        texts.push(prompt);
                        texts.len() - 1
                    });
                    pair_prompt.push(idx);
                }
                let first_response = texts.len();
                texts.extend(pairs.iter().map(|(_, r)| *r));
                let emb = self.embedder.embed(&texts).map_err(rename)?;
                pair_prompt
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let z: Vec<f32> = emb[p]
                            .iter()
                            .chain(&emb[first_response + i])
                            .copied()
                            .collect();
                        self.head.apply(&z)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        check_scores(&name, pairs.len(), scores)
    }

    fn artifacts(&self) -> Vec<PathBuf> {
        let mut a = self.embedder.artifacts();
        a.push(self.head.path.clone());
        a
    }
}
