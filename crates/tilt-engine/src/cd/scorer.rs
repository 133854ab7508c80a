//! Prefix scorers: V(x, y_{<t}) from the policy's last hidden state at the prefix's last
//! position (arXiv 2310.17022 §3, "prefix scorer"; docs/theory.md).
//!
//! A scorer file is a safetensors file of `f32` tensors:
//!
//! ```text
//! feature_mean [d]   feature_std [d]          standardisation: u = (h − mean) / std
//! linear:  linear.weight [d]   linear.bias [1]                 V = w·u + b
//! mlp:     mlp.w1 [H, d]  mlp.b1 [H]  mlp.w2 [H]  mlp.b2 [1]   V = w2·tanh(W1 u + b1) + b2
//! ```
//!
//! The kind is told by which tensors are present. Loading validates everything once (names,
//! dtypes, shapes, finiteness, std > 0), so a loaded head cannot produce NaN from its own
//! weights; the hidden size is checked against the policy before decoding starts.

use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A prefix scorer V(x, y_{<t}): the expected final reward of continuing the prefix with the
/// reference policy, read from the policy's hidden state at the prefix's last position
/// (arXiv 2310.17022 §2, V* of the base policy).
pub trait PrefixScorer: Send + Sync {
    /// A name for errors, logs and manifests (e.g. the scorer file's path).
    fn name(&self) -> String;
    /// The length of the hidden states it reads.
    fn hidden_size(&self) -> usize;
    /// V for each hidden state of a batch of prefixes, in order.
    ///
    /// # Errors
    /// A hidden state of the wrong length or with a non-finite entry.
    fn score(&self, hidden: &[&[f32]]) -> Result<Vec<f64>>;
}

/// Check a batch of hidden states against the expected size and for finiteness.
fn check_hidden(name: &str, expected: usize, hidden: &[&[f32]]) -> Result<()> {
    for (i, h) in hidden.iter().enumerate() {
        if h.len() != expected {
            return Err(EngineError::invalid(
                format!("scorer {name}"),
                format!(
                    "hidden state {i} has length {}, the scorer reads {expected}",
                    h.len()
                ),
            ));
        }
        if let Some(j) = h.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::invalid(
                format!("scorer {name}"),
                format!("hidden state {i} has a non-finite entry at {j}"),
            ));
        }
    }
    Ok(())
}

/// A scorer that gives every prefix the same value. Under it cd-token samples from p itself
/// (restricted to the top-k) and cd-block is plain sampling: the control case of the tests.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantScorer {
    /// The value of every prefix.
    pub value: f64,
    /// The hidden size it accepts.
    pub hidden_size: usize,
}

impl PrefixScorer for ConstantScorer {
    fn name(&self) -> String {
        format!("constant({})", self.value)
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn score(&self, hidden: &[&[f32]]) -> Result<Vec<f64>> {
        check_hidden(&self.name(), self.hidden_size, hidden)?;
        Ok(vec![self.value; hidden.len()])
    }
}

/// A weighted sum of prefix scorers, V = Σᵢ wᵢ·Vᵢ, summed term by term in the listed order
/// (so the same hidden states give the same bits). Controlled decoding for several rewards
/// at once: Vᵢ estimates E[rᵢ | prefix] under p, so Σᵢ wᵢ·Vᵢ estimates the value of the
/// weighted reward Σᵢ wᵢ·rᵢ by linearity of expectation (arXiv 2310.17022,
/// multi-objective CD; docs/theory.md §8). One term of
/// weight 1 gives the scorer's own values bit for bit.
#[derive(Clone)]
pub struct WeightedSum {
    terms: Vec<(String, f64, std::sync::Arc<dyn PrefixScorer>)>,
}

/// One term's value at one prefix, as reported per output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScorerValue {
    /// The scorer's name in the engine.
    pub name: String,
    /// Its weight in the sum.
    pub weight: f64,
    /// Its value Vᵢ at the output's last drawn token (reward units).
    pub value: f64,
}

impl WeightedSum {
    /// The sum of `terms` (name, weight, scorer), all reading the same hidden size.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `scorer`: no term, a non-finite weight, or two
    /// scorers that read different hidden sizes.
    pub fn new(terms: Vec<(String, f64, std::sync::Arc<dyn PrefixScorer>)>) -> Result<Self> {
        let Some((_, _, first)) = terms.first() else {
            return Err(EngineError::invalid("scorer", "a sum of no scorers"));
        };
        let d = first.hidden_size();
        for (name, w, s) in &terms {
            if !w.is_finite() {
                return Err(EngineError::invalid(
                    "scorer",
                    format!("scorer {name:?} has weight {w}; a weight must be finite"),
                ));
            }
            if s.hidden_size() != d {
                return Err(EngineError::invalid(
                    "scorer",
                    format!(
                        "scorer {name:?} reads hidden states of size {}, the first reads {d}",
                        s.hidden_size()
                    ),
                ));
            }
        }
        Ok(WeightedSum { terms })
    }

    /// The one scorer `s` (named `name`) with weight 1.
    pub fn single(name: impl Into<String>, s: std::sync::Arc<dyn PrefixScorer>) -> Self {
        WeightedSum {
            terms: vec![(name.into(), 1.0, s)],
        }
    }

    /// The terms' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.terms.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    /// Each term's value at each hidden state: `values[i][j]` is term i at state j.
    ///
    /// # Errors
    /// As [`PrefixScorer::score`]; a non-finite value names its scorer.
    pub fn parts(&self, hidden: &[&[f32]]) -> Result<Vec<Vec<f64>>> {
        self.terms
            .iter()
            .map(|(name, _, s)| {
                let v = s.score(hidden)?;
                if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                    return Err(EngineError::invalid(
                        format!("scorer {name}"),
                        format!("a non-finite value {} at prefix {j}", v[j]),
                    ));
                }
                Ok(v)
            })
            .collect()
    }

    /// Each term's value at one hidden state, with its name and weight.
    ///
    /// # Errors
    /// As [`WeightedSum::parts`].
    pub fn values_at(&self, hidden: &[f32]) -> Result<Vec<ScorerValue>> {
        let parts = self.parts(&[hidden])?;
        Ok(self
            .terms
            .iter()
            .zip(parts)
            .map(|((name, weight, _), v)| ScorerValue {
                name: name.clone(),
                weight: *weight,
                value: v[0],
            })
            .collect())
    }
}

impl PrefixScorer for WeightedSum {
    fn name(&self) -> String {
        match &self.terms[..] {
            [(name, w, _)] if *w == 1.0 => name.clone(),
            terms => terms
                .iter()
                .map(|(n, w, _)| format!("{w}·{n}"))
                .collect::<Vec<_>>()
                .join(" + "),
        }
    }
    fn hidden_size(&self) -> usize {
        self.terms[0].2.hidden_size()
    }
    fn score(&self, hidden: &[&[f32]]) -> Result<Vec<f64>> {
        if let [(_, w, s)] = &self.terms[..] {
            if *w == 1.0 {
                return s.score(hidden);
            }
        }
        let parts = self.parts(hidden)?;
        let mut total = vec![0.0; hidden.len()];
        for (j, t) in total.iter_mut().enumerate() {
            let mut acc = self.terms[0].1 * parts[0][j];
            for (i, (_, w, _)) in self.terms.iter().enumerate().skip(1) {
                acc += w * parts[i][j];
            }
            *t = acc;
        }
        if let Some(j) = total.iter().position(|x| !x.is_finite()) {
            return Err(EngineError::invalid(
                "scorer",
                format!(
                    "the weighted sum {} overflows at prefix {j}; use smaller weights",
                    self.name()
                ),
            ));
        }
        Ok(total)
    }
}

/// Per-feature standardisation u = (h − mean) / std, fitted on the training prefixes.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    /// Feature means, length d.
    pub mean: Vec<f32>,
    /// Feature standard deviations (> 0), length d.
    pub std: Vec<f32>,
}

impl Standardizer {
    fn apply(&self, h: &[f32]) -> Vec<f64> {
        h.iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(&x, (&m, &s))| (x as f64 - m as f64) / s as f64)
            .collect()
    }
}

/// A linear head V = w·u + b on standardised hidden states u.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    /// Standardisation of the hidden state.
    pub standardizer: Standardizer,
    /// Weights, length d.
    pub weight: Vec<f32>,
    /// Bias.
    pub bias: f32,
}

impl LinearHead {
    fn value(&self, h: &[f32]) -> f64 {
        let u = self.standardizer.apply(h);
        u.iter()
            .zip(&self.weight)
            .map(|(a, &w)| a * w as f64)
            .sum::<f64>()
            + self.bias as f64
    }
}

/// A two-layer head V = w2·tanh(W1 u + b1) + b2 on standardised hidden states u.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpHead {
    /// Standardisation of the hidden state.
    pub standardizer: Standardizer,
    /// First layer, H rows of length d (row-major).
    pub w1: Vec<Vec<f32>>,
    /// First bias, length H.
    pub b1: Vec<f32>,
    /// Second layer, length H.
    pub w2: Vec<f32>,
    /// Output bias.
    pub b2: f32,
}

impl MlpHead {
    fn value(&self, h: &[f32]) -> f64 {
        let u = self.standardizer.apply(h);
        let mut out = self.b2 as f64;
        for ((row, &b), &w2) in self.w1.iter().zip(&self.b1).zip(&self.w2) {
            let pre: f64 = row.iter().zip(&u).map(|(&w, a)| w as f64 * a).sum::<f64>() + b as f64;
            out += w2 as f64 * pre.tanh();
        }
        out
    }
}

/// A trained scorer head, loaded from (or saved to) a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub enum ScorerHead {
    /// A linear head.
    Linear(LinearHead),
    /// A two-layer tanh MLP head.
    Mlp(MlpHead),
}

/// Tensor names of a scorer file.
pub mod names {
    /// Feature means `[d]`.
    pub const FEATURE_MEAN: &str = "feature_mean";
    /// Feature standard deviations `[d]`.
    pub const FEATURE_STD: &str = "feature_std";
    /// Linear weights `[d]`.
    pub const LINEAR_WEIGHT: &str = "linear.weight";
    /// Linear bias `[1]`.
    pub const LINEAR_BIAS: &str = "linear.bias";
    /// MLP first layer `[H, d]`.
    pub const MLP_W1: &str = "mlp.w1";
    /// MLP first bias `[H]`.
    pub const MLP_B1: &str = "mlp.b1";
    /// MLP second layer `[H]`.
    pub const MLP_W2: &str = "mlp.w2";
    /// MLP output bias `[1]`.
    pub const MLP_B2: &str = "mlp.b2";
}

struct TensorFile<'a> {
    path: &'a str,
    tensors: HashMap<String, Tensor>,
}

impl TensorFile<'_> {
    fn bad(&self, problem: impl Into<String>) -> EngineError {
        EngineError::bad_file(format!("scorer file {}", self.path), problem)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.bad(format!("missing tensor {name:?}")))?;
        if t.dtype() != DType::F32 {
            return Err(self.bad(format!(
                "tensor {name:?} has dtype {:?}, expected f32",
                t.dtype()
            )));
        }
        if t.dims() != shape {
            return Err(self.bad(format!(
                "tensor {name:?} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.bad(format!("tensor {name:?}: {e}")))?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(format!("tensor {name:?} has a non-finite entry at {i}")));
        }
        Ok(v)
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| self.bad(format!("missing tensor {name:?}")))
    }
}

impl ScorerHead {
    /// Load and validate a scorer file (format in the module docs).
    ///
    /// # Errors
    /// [`EngineError::BadFile`] naming the file and the missing tensor, wrong dtype, wrong
    /// shape, non-finite entry or non-positive standard deviation.
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bad = |problem: String| EngineError::bad_file(format!("scorer file {shown}"), problem);
        if !path.is_file() {
            return Err(bad("no such file".into()));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let file = TensorFile {
            path: &shown,
            tensors,
        };
        let mean_dims = file.dims(names::FEATURE_MEAN)?;
        let [d] = mean_dims[..] else {
            return Err(file.bad(format!(
                "tensor {:?} has shape {mean_dims:?}, expected [hidden_size]",
                names::FEATURE_MEAN
            )));
        };
        if d == 0 {
            return Err(file.bad("hidden size 0"));
        }
        let mean = file.get(names::FEATURE_MEAN, &[d])?;
        let std = file.get(names::FEATURE_STD, &[d])?;
        if let Some(i) = std.iter().position(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(file.bad(format!(
                "tensor {:?} entry {i} is {}, must be > 0",
                names::FEATURE_STD,
                std[i]
            )));
        }
        let standardizer = Standardizer { mean, std };
        let has_linear = file.tensors.contains_key(names::LINEAR_WEIGHT);
        let has_mlp = file.tensors.contains_key(names::MLP_W1);
        match (has_linear, has_mlp) {
            (true, true) => Err(file.bad(format!(
                "holds both {:?} and {:?}; a scorer is either linear or MLP",
                names::LINEAR_WEIGHT,
                names::MLP_W1
            ))),
            (false, false) => Err(file.bad(format!(
                "missing tensors: neither {:?} (linear head) nor {:?} (MLP head)",
                names::LINEAR_WEIGHT,
                names::MLP_W1
            ))),
            (true, false) => {
                let weight = file.get(names::LINEAR_WEIGHT, &[d])?;
                let bias = file.get(names::LINEAR_BIAS, &[1])?[0];
                Ok(ScorerHead::Linear(LinearHead {
                    standardizer,
                    weight,
                    bias,
                }))
            }
            (false, true) => {
                let w1_dims = file.dims(names::MLP_W1)?;
                let h = match w1_dims[..] {
                    [h, dd] if dd == d && h > 0 => h,
                    _ => {
                        return Err(file.bad(format!(
                            "tensor {:?} has shape {w1_dims:?}, expected [H, {d}] with H > 0 \
                             (hidden size {d} from {:?})",
                            names::MLP_W1,
                            names::FEATURE_MEAN
                        )))
                    }
                };
                let w1 = file.get(names::MLP_W1, &[h, d])?;
                let b1 = file.get(names::MLP_B1, &[h])?;
                let w2 = file.get(names::MLP_W2, &[h])?;
                let b2 = file.get(names::MLP_B2, &[1])?[0];
                Ok(ScorerHead::Mlp(MlpHead {
                    standardizer,
                    w1: w1.chunks(d).map(<[f32]>::to_vec).collect(),
                    b1,
                    w2,
                    b2,
                }))
            }
        }
    }

    /// The bytes of the safetensors file [`ScorerHead::load`] reads (deterministic: the same
    /// head gives the same bytes).
    ///
    /// # Errors
    /// [`EngineError::Internal`] naming the first non-finite parameter: a head that diverged
    /// in training is never written.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let st = self.standardizer();
        let d = st.mean.len();
        let mut tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
            (names::FEATURE_MEAN, vec![d], st.mean.clone()),
            (names::FEATURE_STD, vec![d], st.std.clone()),
        ];
        match self {
            ScorerHead::Linear(l) => {
                tensors.push((names::LINEAR_WEIGHT, vec![d], l.weight.clone()));
                tensors.push((names::LINEAR_BIAS, vec![1], vec![l.bias]));
            }
            ScorerHead::Mlp(m) => {
                let h = m.w1.len();
                tensors.push((
                    names::MLP_W1,
                    vec![h, d],
                    m.w1.iter().flatten().copied().collect(),
                ));
                tensors.push((names::MLP_B1, vec![h], m.b1.clone()));
                tensors.push((names::MLP_W2, vec![h], m.w2.clone()));
                tensors.push((names::MLP_B2, vec![1], vec![m.b2]));
            }
        }
        if let Some((name, i, v)) = tensors.iter().find_map(|(name, _, v)| {
            v.iter()
                .position(|x| !x.is_finite())
                .map(|i| (name, i, v[i]))
        }) {
            return Err(EngineError::Internal(format!(
                "scorer tensor {name:?} entry {i} is {v}: the head is not finite and is not written"
            )));
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(name, shape, v)| {
                let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name.to_string(), shape, b)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .map(|v| (name.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Internal(format!("scorer tensors: {e}")))?;
        safetensors::serialize(views, None)
            .map_err(|e| EngineError::Internal(format!("scorer file: {e}")))
    }

    /// Save in the format [`ScorerHead::load`] reads (with the process's usual file mode).
    ///
    /// # Errors
    /// As [`ScorerHead::to_bytes`]; [`EngineError::Io`] when the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| EngineError::io(path.display(), e))
    }

    /// The head's standardisation.
    pub fn standardizer(&self) -> &Standardizer {
        match self {
            ScorerHead::Linear(l) => &l.standardizer,
            ScorerHead::Mlp(m) => &m.standardizer,
        }
    }

    /// `"linear"` or `"mlp"`.
    pub fn kind(&self) -> &'static str {
        match self {
            ScorerHead::Linear(_) => "linear",
            ScorerHead::Mlp(_) => "mlp",
        }
    }

    fn value(&self, h: &[f32]) -> f64 {
        match self {
            ScorerHead::Linear(l) => l.value(h),
            ScorerHead::Mlp(m) => m.value(h),
        }
    }
}

impl PrefixScorer for ScorerHead {
    fn name(&self) -> String {
        format!("{}-head", self.kind())
    }
    fn hidden_size(&self) -> usize {
        self.standardizer().mean.len()
    }
    fn score(&self, hidden: &[&[f32]]) -> Result<Vec<f64>> {
        check_hidden(&self.name(), self.hidden_size(), hidden)?;
        Ok(hidden.iter().map(|h| self.value(h)).collect())
    }
}

/// A scorer head together with the file it came from (so that errors name the file).
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerFile {
    /// Where it was loaded from.
    pub path: std::path::PathBuf,
    /// The head.
    pub head: ScorerHead,
}

impl ScorerFile {
    /// Load and validate (see [`ScorerHead::load`]).
    ///
    /// # Errors
    /// As [`ScorerHead::load`].
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            head: ScorerHead::load(path)?,
        })
    }
}

impl PrefixScorer for ScorerFile {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn hidden_size(&self) -> usize {
        self.head.hidden_size()
    }
    fn score(&self, hidden: &[&[f32]]) -> Result<Vec<f64>> {
        check_hidden(&self.name(), self.hidden_size(), hidden)?;
        Ok(hidden.iter().map(|h| self.head.value(h)).collect())
    }
}
