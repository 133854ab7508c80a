//! all-MiniLM-L6-v2 sentence embeddings with candle's BERT, and the relevance reward.
//!
//! The model is sentence-transformers' `all-MiniLM-L6-v2` (Reimers & Gurevych 2019,
//! Sentence-BERT, arXiv:1908.10084; weights from Wang et al. 2020, MiniLM,
//! arXiv:2002.10957): a 6-layer BERT with 384 dimensions. sentence-transformers runs three
//! modules on it (`modules.json`): the transformer, mean pooling over the attention mask
//! (`1_Pooling/config.json`: `pooling_mode_mean_tokens`), and L2 normalisation. It truncates
//! inputs at `max_seq_length` = 256 word pieces (`sentence_bert_config.json`), **not** at the
//! 128 written in `tokenizer.json`, and pads each batch to its longest member. This file
//! does the same, so that its embeddings match the Python ones (cosine ≥ 0.999; the test
//! `tests/minilm_e2e.rs` checks it against a fixture made by sentence-transformers itself).
//!
//! ## Batching
//! A forward pass costs about the batch's longest sequence times its size, so
//! [`MiniLmEmbedder::embed`] sorts the texts by token count, runs them in chunks of
//! [`MiniLmEmbedder::batch_size`] (default 16: measured ≈79 sentences/s at 16 × 40 tokens on
//! two cores), and puts the results back in input order. The sort is by (length, index), so
//! the same texts always form the same batches: same input, same output bytes.

use crate::{check_scores, quote, Reward, RewardError};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::{Tokenizer, TruncationParams};

/// Dimension of all-MiniLM-L6-v2's embeddings.
pub const MINILM_DIM: usize = 384;

/// Default truncation when a model directory has no `sentence_bert_config.json`.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// A loaded sentence-embedding model: BERT + mean pooling + L2 normalisation, as in
/// sentence-transformers (Reimers & Gurevych 2019, arXiv:1908.10084, §3 "MEAN strategy").
///
/// ```text
/// e(x) = u / max(‖u‖₂, 1e-12),   u = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)
/// ```
/// where `h_t` is BERT's last hidden state at token `t` and `m_t` the attention mask.
pub struct MiniLmEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    max_seq_length: usize,
    hidden_size: usize,
    batch_size: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for MiniLmEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLmEmbedder")
            .field("dir", &self.dir)
            .field("max_seq_length", &self.max_seq_length)
            .field("hidden_size", &self.hidden_size)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

fn failed(reward: &str, message: impl std::fmt::Display) -> RewardError {
    RewardError::Failed {
        reward: reward.to_string(),
        message: message.to_string(),
    }
}

/// A model directory that is not what it should be: the caller's input.
fn invalid(reward: &str, message: impl std::fmt::Display) -> RewardError {
    RewardError::Invalid {
        reward: reward.to_string(),
        message: message.to_string(),
    }
}

const EMBEDDER: &str = "minilm";

impl MiniLmEmbedder {
    /// Load from a directory holding `config.json`, `model.safetensors` and `tokenizer.json`
    /// (and optionally `sentence_bert_config.json` for `max_seq_length`; default 256).
    ///
    /// # Errors
    /// [`RewardError::Invalid`] naming the missing or malformed file.
    pub fn load(dir: &Path) -> Result<Self, RewardError> {
        let file = |name: &str| -> Result<PathBuf, RewardError> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(invalid(
                    EMBEDDER,
                    format!("model file {} is missing", p.display()),
                ))
            }
        };
        let config_path = file("config.json")?;
        let weights_path = file("model.safetensors")?;
        let tokenizer_path = file("tokenizer.json")?;
        let config_text = std::fs::read_to_string(&config_path).map_err(|e| {
            invalid(
                EMBEDDER,
                format!("cannot read {}: {e}", config_path.display()),
            )
        })?;
        let config: Config = serde_json::from_str(&config_text).map_err(|e| {
            invalid(
                EMBEDDER,
                format!("{} is not a BERT config: {e}", config_path.display()),
            )
        })?;
        let max_seq_length = read_max_seq_length(dir)?;
        if max_seq_length > config.max_position_embeddings {
            return Err(invalid(
                EMBEDDER,
                format!(
                    "max_seq_length {max_seq_length} exceeds the model's {} positions",
                    config.max_position_embeddings
                ),
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            invalid(
                EMBEDDER,
                format!("cannot load tokenizer {}: {e}", tokenizer_path.display()),
            )
        })?;
        // sentence-transformers truncates at max_seq_length and pads to the batch's longest;
        // we pad ourselves, per sorted chunk.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| invalid(EMBEDDER, format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        // Check the file before mmap-ing it: candle's error for a truncated file is terse.
        check_safetensors(&weights_path)?;
        // SAFETY: the file is memory-mapped read-only; tilt never writes to it while loaded
        // (it is replaced only by an atomic rename of a new directory).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &device) }
                .map_err(|e| {
                invalid(
                    EMBEDDER,
                    format!("cannot map {}: {e}", weights_path.display()),
                )
            })?;
        let model = BertModel::load(vb, &config).map_err(|e| {
            invalid(
                EMBEDDER,
                format!("{} is not a BERT model: {e}", weights_path.display()),
            )
        })?;
        tracing::debug!(dir = %dir.display(), max_seq_length, "loaded MiniLM");
        Ok(Self {
            model,
            tokenizer,
            device,
            max_seq_length,
            hidden_size: config.hidden_size,
            batch_size: 16,
            dir: dir.to_path_buf(),
        })
    }

    /// Load the default model (all-MiniLM-L6-v2), fetching it on first use.
    ///
    /// # Errors
    /// [`RewardError::Failed`] if the fetch or the load fails (a damaged cache is not the
    /// caller's input: `tilt models fetch` checks and repairs it).
    pub fn load_default() -> Result<Self, RewardError> {
        Self::load_default_with(&tilt_assets::LogProgress::default())
    }

    /// [`Self::load_default`], reporting a first-use fetch to `progress`.
    ///
    /// # Errors
    /// As [`Self::load_default`].
    pub fn load_default_with(
        progress: &dyn tilt_assets::FetchProgress,
    ) -> Result<Self, RewardError> {
        let dir =
            tilt_assets::default_reward_dir_with(progress).map_err(|e| failed(EMBEDDER, e))?;
        Self::load(&dir).map_err(|e| match e {
            RewardError::Invalid { reward, message } => RewardError::Failed {
                reward,
                message: format!("the cached default model is damaged: {message}"),
            },
            other => other,
        })
    }

    /// Set how many texts one forward pass takes (default 16; at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How many texts one forward pass takes.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Word pieces kept per text (longer texts are truncated, as in sentence-transformers).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Embedding dimension (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.hidden_size
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files whose bytes determine the embeddings.
    pub fn artifacts(&self) -> Vec<PathBuf> {
        ["config.json", "model.safetensors", "tokenizer.json"]
            .iter()
            .map(|f| self.dir.join(f))
            .chain(Some(self.dir.join("sentence_bert_config.json")).filter(|p| p.is_file()))
            .collect()
    }

    /// Unit-norm embeddings of `texts`, in order (each of length [`Self::dim`]).
    ///
    /// # Errors
    /// [`RewardError::Failed`] if tokenisation or the forward pass fails.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, RewardError> {
        let encoded = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (encoded[i].len(), i));
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in padded_batches(&order, |i| encoded[i].len(), self.batch_size) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let vectors = self
                .embed_ids(&rows)
                .map_err(|e| failed(EMBEDDER, format!("forward pass: {e}")))?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

impl MiniLmEmbedder {
    /// How many word pieces the model sees for each text: `[CLS]`, the text's pieces and
    /// `[SEP]`, truncated at [`Self::max_seq_length`] (sentence-transformers' count).
    ///
    /// # Errors
    /// [`RewardError::Failed`] if tokenisation fails.
    pub fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>, RewardError> {
        Ok(self.token_ids(texts)?.iter().map(Vec::len).collect())
    }

    /// Each text's token ids, as the model sees them.
    fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, RewardError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|enc| enc.get_ids().to_vec())
                    .map_err(|e| failed(EMBEDDER, format!("cannot tokenise text {i}: {e}")))
            })
            .collect()
    }
}

/// Split `order` (indices sorted by ascending length) into consecutive batches of at most
/// `batch_size`, also closing a batch before padding would more than double its work
/// (`count × longest > 2 × Σ lengths`): seven short texts and one of 256 tokens run as two
/// passes (7×21 + 256 positions) rather than one of 8×256.
fn padded_batches(
    order: &[usize],
    len: impl Fn(usize) -> usize,
    batch_size: usize,
) -> Vec<&[usize]> {
    let mut batches = Vec::new();
    let (mut start, mut total) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        let l = len(i).max(1);
        let count = k - start;
        if count > 0 && (count == batch_size || (count + 1) * l > 2 * (total + l)) {
            batches.push(&order[start..k]);
            start = k;
            total = 0;
        }
        total += l;
    }
    if start < order.len() {
        batches.push(&order[start..]);
    }
    batches
}

impl MiniLmEmbedder {
    /// One padded forward pass over token-id rows; mean pooling; L2 normalisation.
    fn embed_ids(&self, rows: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let batch = rows.len();
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; batch * seq];
        let mut mask = vec![0u32; batch * seq];
        for (b, r) in rows.iter().enumerate() {
            ids[b * seq..b * seq + r.len()].copy_from_slice(r);
            mask[b * seq..b * seq + r.len()]
                .iter_mut()
                .for_each(|m| *m = 1);
        }
        let ids = Tensor::from_vec(ids, (batch, seq), &self.device)?; // (B, T)
        let mask = Tensor::from_vec(mask, (batch, seq), &self.device)?; // (B, T)
        let type_ids = ids.zeros_like()?; // (B, T)
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?; // (B, T, D)
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?; // (B, D)
        let counts = mask_f.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (B, 1)
        let mean = summed.broadcast_div(&counts)?; // (B, D)
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?; // (B, 1)
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

fn read_max_seq_length(dir: &Path) -> Result<usize, RewardError> {
    let path = dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(DEFAULT_MAX_SEQ_LENGTH);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| invalid(EMBEDDER, format!("cannot read {}: {e}", path.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid(EMBEDDER, format!("{} is not JSON: {e}", path.display())))?;
    match value.get("max_seq_length") {
        None => Ok(DEFAULT_MAX_SEQ_LENGTH),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 2)
            .map(|n| n as usize)
            .ok_or_else(|| {
                invalid(
                    EMBEDDER,
                    format!(
                        "{}: max_seq_length must be an integer ≥ 2, got {v}",
                        path.display()
                    ),
                )
            }),
    }
}

/// Parse a safetensors file's header and check that every tensor's data lies inside the
/// file, so that a truncated or corrupt file gets an error naming it.
fn check_safetensors(path: &Path) -> Result<(), RewardError> {
    use std::io::Read;
    let bad = |m: String| {
        invalid(
            EMBEDDER,
            format!("{} is not a valid safetensors file: {m}", path.display()),
        )
    };
    let mut f = std::fs::File::open(path)
        .map_err(|e| invalid(EMBEDDER, format!("cannot open {}: {e}", path.display())))?;
    let file_len = f
        .metadata()
        .map_err(|e| invalid(EMBEDDER, format!("cannot stat {}: {e}", path.display())))?
        .len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len8);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} exceeds the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?;
        if end > data_len {
            return Err(bad(format!(
                "tensor {name} ends at byte {end} of the data, which has only {data_len} (truncated?)"
            )));
        }
    }
    Ok(())
}

/// Relevance reward: cosine similarity between the MiniLM embedding of the response and
/// that of a target text, by default the prompt itself.
///
/// ```text
/// r(x, y) = ⟨e(y), e(t)⟩ ∈ [-1, 1],   t = target if given, else x
/// ```
/// (embeddings are unit-norm, so the dot product is the cosine; Reimers & Gurevych 2019,
/// arXiv:1908.10084, §3 uses cosine similarity between sentence embeddings).
///
/// Each distinct target text in a batch is embedded once; targets and responses go through
/// the model together, in [`MiniLmEmbedder::embed`]'s sorted batches.
#[derive(Debug, Clone)]
pub struct MiniLmRelevance {
    embedder: Arc<MiniLmEmbedder>,
    target: Option<String>,
}

impl MiniLmRelevance {
    /// Relevance to `target`, or to each pair's prompt when `target` is `None`.
    pub fn new(embedder: Arc<MiniLmEmbedder>, target: Option<String>) -> Self {
        Self { embedder, target }
    }

    /// The fixed target text, if any.
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }
}

/// Dot product of two equal-length vectors, accumulated in f64.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum::<f64>() as f32
}

impl Reward for MiniLmRelevance {
    fn name(&self) -> String {
        match &self.target {
            None => "minilm-relevance".to_string(),
            Some(t) => format!("minilm-relevance(target={})", quote(t)),
        }
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let name = self.name();
        // Texts to embed: distinct targets first, then the responses.
        let mut target_index: HashMap<&str, usize> = HashMap::new();
        let mut texts: Vec<&str> = Vec::new();
        let mut pair_target = Vec::with_capacity(pairs.len());
        for (prompt, _) in pairs {
            let t = self.target.as_deref().unwrap_or(prompt);
            let idx = *target_index.entry(t).or_insert_with(|| {
                texts.push(t);
                texts.len() - 1
            });
            pair_target.push(idx);
        }
        let first_response = texts.len();
        texts.extend(pairs.iter().map(|(_, r)| *r));
        let emb = self.embedder.embed(&texts).map_err(|e| e.renamed(&name))?;
        let scores = pair_target
            .iter()
            .enumerate()
            .map(|(i, &t)| dot(&emb[first_response + i], &emb[t]))
            .collect();
        check_scores(&name, pairs.len(), scores)
    }

    fn artifacts(&self) -> Vec<PathBuf> {
        self.embedder.artifacts()
    }
}

#[cfg(test)]
mod tests {
    use super::padded_batches;

    #[test]
    fn batches_respect_size_and_padding_waste() {
        let lens = [9, 10, 13, 14, 19, 21, 2, 256];
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&i| (lens[i], i));
        let b = padded_batches(&order, |i| lens[i], 16);
        assert_eq!(b, vec![&[6, 0, 1, 2, 3, 4, 5][..], &[7][..]]);
        let b = padded_batches(&order, |i| lens[i], 3);
        assert_eq!(b.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![3, 3, 2]);
        let uniform = [40usize; 40];
        let order: Vec<usize> = (0..40).collect();
        let b = padded_batches(&order, |i| uniform[i], 16);
        assert_eq!(
            b.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![16, 16, 8]
        );
        assert!(padded_batches(&[], |_| 1, 16).is_empty());
    }
}
