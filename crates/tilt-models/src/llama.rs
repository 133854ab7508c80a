//! The Llama architecture (Touvron et al. 2023, [arXiv:2302.13971]) from GGUF files, with a
//! public, forkable KV cache and a forward batched across sequences.
//!
//! [arXiv:2302.13971]: https://arxiv.org/abs/2302.13971
//!
//! It follows candle's `quantized_llama` (and llama.cpp) for the GGUF conventions — tensor
//! names, interleaved rotary embeddings on the Q/K rows as GGUF stores them (llama.cpp's
//! converter permutes HF's rows so that rotating pairs `(2i, 2i+1)` equals HF's
//! `rotate_half`), tied embeddings when `output.weight` is absent — and differs from it
//! where tilt needs something else:
//!
//! - **Weights stay in the file's quantised format.** The matrix products
//!   (`matmul.rs`) read Q4_1 and Q8_0 blocks directly and dequantise them exactly
//!   in registers, multiplying with f32 activations. A small model on a CPU is bound by
//!   the bytes of weights each step reads: the shipped SmolLM2-135M is ≈100 MB a step this
//!   way, 540 MB dequantised to f32. Measured on 2 AVX2 cores, 64-token prompt: the f32
//!   copy with the `gemm` crate decoded 19 tok/s for one sequence and 116 tok/s aggregated
//!   for 16; candle's quantised matmul has no SIMD kernel for Q4_1 and took 2.7 s for the
//!   prefill (`docs/speed.md` has these figures). Formats without a kernel here are
//!   dequantised to f32 at load and take the same code path.
//! - **The cache is a value, one per sequence, and cloning it forks it.** A
//!   [`LlamaCache`] holds a shared, immutable prefix (`Arc`) and a private suffix: a
//!   prompt is prefilled once, and N clones share its keys and values, so prefill time does
//!   not grow with N and a fork copies only the generated suffix.
//! - **The forward is batched over sequences of different lengths.** The dense layers (the
//!   fused QKV projection, the output projection, the fused gate/up projection, the down
//!   projection, the LM head) run as one `(rows, d)` matrix product over all new tokens of
//!   all sequences; attention then runs per row over that row's own sequence
//!   (prefix + suffix), with grouped-query heads reading their shared K/V head in place
//!   (no repeat) and keys appended in place (no concatenation of the whole cache per step).
//!   For a 135M model much of a step is per-operation overhead, so the hot loops work on
//!   plain `f32` slices with preallocated buffers.
//!
//! Determinism: every output element of a matrix product is one fixed sequence of
//! operations (see `matmul.rs`), attention and the element-wise steps work one row
//! at a time, so a sequence's log-probs and hidden states are bit-identical whatever the
//! thread count, whatever other sequences share its batch, and whether its tokens came one
//! at a time or in one prefill. The tests check this bit for bit.

use std::sync::Arc;

use rayon::prelude::*;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
use crate::matmul::Linear;
use crate::profile::{time, Phase};
use crate::tokenizer::GgufTokenizer;
use crate::{ModelError, Policy, StepOutput, TokenId};

/// Hyper-parameters of a Llama model, from GGUF metadata (`llama.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab_size: usize,
    /// Model width d (`llama.embedding_length`).
    pub hidden_size: usize,
    /// Width of the gated MLP (`llama.feed_forward_length`).
    pub intermediate_size: usize,
    /// Number of transformer blocks (`llama.block_count`).
    pub n_layers: usize,
    /// Query heads (`llama.attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`llama.attention.head_count_kv`; grouped-query attention when fewer
    /// than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head (d / n_heads).
    pub head_dim: usize,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f32,
    /// RoPE base θ (`llama.rope.freq_base`, default 10000).
    pub rope_freq_base: f32,
    /// Longest context (`llama.context_length`).
    pub context_length: usize,
}

/// The `llama.*` metadata keys [`LlamaConfig::from_gguf`] knows, and what it does with
/// each; any other `llama.*` key is refused.
const LLAMA_KEYS: &[(&str, &str)] = &[
    ("llama.context_length", "read: the longest context"),
    ("llama.embedding_length", "read: the model width"),
    ("llama.block_count", "read: the number of blocks"),
    ("llama.feed_forward_length", "read: the MLP width"),
    ("llama.attention.head_count", "read: query heads"),
    ("llama.attention.head_count_kv", "read: key/value heads"),
    (
        "llama.attention.layer_norm_rms_epsilon",
        "read: RMSNorm epsilon",
    ),
    ("llama.rope.freq_base", "read: RoPE base"),
    ("llama.rope.dimension_count", "must equal the head width"),
    ("llama.attention.key_length", "must equal the head width"),
    ("llama.attention.value_length", "must equal the head width"),
    (
        "llama.vocab_size",
        "must equal the rows of token_embd.weight",
    ),
    (
        "llama.rope.scaling.type",
        "must be none (or linear with factor 1)",
    ),
    ("llama.rope.scaling.factor", "must be 1 (or 0: unset)"),
    ("llama.rope.scale_linear", "must be 1 (or 0: unset)"),
    ("llama.rope.scaling.attn_factor", "must be 1"),
    ("llama.expert_count", "must be 0 (no mixture of experts)"),
    (
        "llama.expert_used_count",
        "must be 0 (no mixture of experts)",
    ),
    (
        "llama.rope.scaling.original_context_length",
        "ignored: used only by RoPE scaling, which is refused",
    ),
    ("llama.rope.scaling.finetuned", "ignored: informational"),
    ("llama.tensor_data_layout", "ignored: informational"),
];

/// The tensors of one block, all `.weight`.
const BLOCK_TENSORS: &[&str] = &[
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

impl LlamaConfig {
    /// Read the configuration from `gguf`'s metadata and tensor shapes.
    ///
    /// Everything a Llama file can declare is either implemented or refused, so that a file
    /// never loads as a different model than it describes: every `llama.*` key must be one
    /// tilt knows (see `LLAMA_KEYS` in the source: read, checked to be neutral, or
    /// informational), and every tensor one it uses (`token_embd`, `output_norm`,
    /// optionally `output`, and the nine weights of each block below `llama.block_count`).
    /// Biases, mixture-of-experts tensors, RoPE frequency factors (`rope_freqs.weight`,
    /// Llama 3.1), RoPE scaling (`rope.scaling.*` other than none), partial rotary
    /// dimensions, key/value widths other than the head width, split files and adapters
    /// are all refused.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedArchitecture`] for a file that is not a Llama model;
    /// [`ModelError::BadFile`] naming the file and the key or tensor concerned for
    /// missing or inconsistent hyper-parameters, and for any of the features above.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        gguf.require_llama()?;
        let bad = |problem: String| ModelError::BadFile {
            path: gguf.path().display().to_string(),
            problem,
        };
        if gguf.has("split.count") {
            let n = gguf.uint("split.count")?;
            if n > 1 {
                return Err(bad(format!(
                    "split.count = {n}: this file is one part of a model split into {n} files; \
                     merge them first (llama.cpp's llama-gguf-split --merge)"
                )));
            }
        }
        if gguf.has("general.type") {
            let t = gguf.string("general.type")?;
            if t != "model" {
                return Err(bad(format!(
                    "general.type = \"{}\": not a model (a LoRA adapter or a vocabulary?); \
                     tilt loads whole models",
                    t.escape_default()
                )));
            }
        }
        if let Some(key) = gguf
            .keys_with_prefix("llama.")
            .into_iter()
            .find(|k| !LLAMA_KEYS.iter().any(|(known, _)| known == k))
        {
            return Err(bad(format!(
                "metadata key {key} is not one tilt's Llama implements; it may change the \
                 model, so the file is refused rather than run as a different model"
            )));
        }
        let hidden_size = gguf.positive("llama.embedding_length")?;
        let n_heads = gguf.positive("llama.attention.head_count")?;
        let n_kv_heads = if gguf.has("llama.attention.head_count_kv") {
            gguf.positive("llama.attention.head_count_kv")?
        } else {
            n_heads
        };
        if hidden_size % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(bad(format!(
                "embedding length {hidden_size}, {n_heads} query heads and {n_kv_heads} \
                 key/value heads do not divide evenly"
            )));
        }
        let head_dim = hidden_size / n_heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head width {head_dim} is odd; RoPE needs pairs"
            )));
        }
        for key in ["llama.attention.key_length", "llama.attention.value_length"] {
            if gguf.has(key) {
                let k = gguf.positive(key)?;
                if k != head_dim {
                    return Err(bad(format!(
                        "{key} = {k} differs from embedding/heads = {head_dim} (not supported)"
                    )));
                }
            }
        }
        if gguf.has("llama.rope.dimension_count") {
            let r = gguf.positive("llama.rope.dimension_count")?;
            if r != head_dim {
                return Err(bad(format!(
                    "llama.rope.dimension_count = {r} differs from the head width {head_dim} \
                     (partial rotary embeddings are not supported)"
                )));
            }
        }
        // RoPE scaling. llama.cpp scales linearly by `factor` when a factor is given without
        // a type; a factor of 0 means unset, 1 changes nothing.
        let scaling_type = if gguf.has("llama.rope.scaling.type") {
            Some(gguf.string("llama.rope.scaling.type")?)
        } else {
            None
        };
        if let Some(t) = scaling_type.filter(|t| !matches!(*t, "none" | "linear")) {
            return Err(bad(format!(
                "llama.rope.scaling.type = \"{}\": RoPE scaling is not supported",
                t.escape_default()
            )));
        }
        if scaling_type != Some("none") {
            for key in ["llama.rope.scaling.factor", "llama.rope.scale_linear"] {
                if gguf.has(key) {
                    let f = gguf.float(key)?;
                    if f != 0.0 && f != 1.0 {
                        return Err(bad(format!(
                            "{key} = {f}: linear RoPE scaling is not supported"
                        )));
                    }
                }
            }
        }
        if gguf.has("llama.rope.scaling.attn_factor") {
            let f = gguf.float("llama.rope.scaling.attn_factor")?;
            if f != 1.0 {
                return Err(bad(format!(
                    "llama.rope.scaling.attn_factor = {f}: scaled rotary embeddings are not \
                     supported"
                )));
            }
        }
        for key in ["llama.expert_count", "llama.expert_used_count"] {
            if gguf.has(key) {
                let n = gguf.uint(key)?;
                if n > 0 {
                    return Err(bad(format!(
                        "{key} = {n}: mixture-of-experts models are not supported"
                    )));
                }
            }
        }
        if gguf.has_tensor("rope_freqs.weight") {
            return Err(bad(
                "rope_freqs.weight (Llama 3.1 RoPE frequency factors) is not supported".into(),
            ));
        }
        let n_layers = gguf.positive("llama.block_count")?;
        for name in gguf.tensor_names() {
            if let Some(problem) = unused_tensor(name, n_layers) {
                return Err(bad(format!("tensor {name} {problem}")));
            }
        }
        let embd = gguf.tensor_shape("token_embd.weight")?;
        if embd.len() != 2 || embd[1] != hidden_size {
            return Err(bad(format!(
                "token_embd.weight has shape {}, expected [vocab, {hidden_size}]",
                crate::gguf::shape_text(&embd)
            )));
        }
        if gguf.has("llama.vocab_size") {
            let v = gguf.positive("llama.vocab_size")?;
            if v != embd[0] {
                return Err(bad(format!(
                    "llama.vocab_size = {v} but token_embd.weight has {} rows",
                    embd[0]
                )));
            }
        }
        let rope_freq_base = if gguf.has("llama.rope.freq_base") {
            gguf.float("llama.rope.freq_base")? as f32
        } else {
            10000.0
        };
        if rope_freq_base <= 1.0 {
            return Err(bad(format!(
                "llama.rope.freq_base = {rope_freq_base} must exceed 1"
            )));
        }
        let rms_norm_eps = gguf.float("llama.attention.layer_norm_rms_epsilon")? as f32;
        if rms_norm_eps < 0.0 {
            return Err(bad(format!("RMSNorm epsilon {rms_norm_eps} is negative")));
        }
        Ok(Self {
            vocab_size: embd[0],
            hidden_size,
            intermediate_size: gguf.positive("llama.feed_forward_length")?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_freq_base,
            context_length: gguf.positive("llama.context_length")?,
        })
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Keys and values of consecutive positions, every layer. Row layout per layer:
/// `(len, n_kv_heads * head_dim)`, keys already rotated.
#[derive(Debug, Clone, Default)]
struct KvBlock {
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvBlock {
    fn empty(n_layers: usize) -> Self {
        Self {
            len: 0,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
        }
    }
}

/// The KV cache of one sequence: a shared prefix and a private suffix. `clone()` forks
/// it, sharing the prefix and copying the suffix.
#[derive(Debug, Clone)]
pub struct LlamaCache {
    prefix: Arc<KvBlock>,
    suffix: KvBlock,
}

impl LlamaCache {
    /// Number of positions in the cache.
    pub fn len(&self) -> usize {
        self.prefix.len + self.suffix.len
    }

    /// Whether the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of positions in the shared (`Arc`) prefix.
    pub fn shared_len(&self) -> usize {
        self.prefix.len
    }

    /// Move every position into the shared prefix, so that later forks copy nothing.
    /// When no other cache shares the prefix the suffix is appended to it in place;
    /// otherwise this costs one copy of the prefix. Call it before forking a sequence many
    /// times (e.g. after extending it by a block).
    pub fn share(&mut self) {
        if self.suffix.len == 0 {
            return;
        }
        let n_layers = self.suffix.k.len();
        let suffix = std::mem::replace(&mut self.suffix, KvBlock::empty(n_layers));
        if self.prefix.len == 0 {
            self.prefix = Arc::new(suffix);
            return;
        }
        let merged = Arc::make_mut(&mut self.prefix);
        for l in 0..n_layers {
            merged.k[l].extend_from_slice(&suffix.k[l]);
            merged.v[l].extend_from_slice(&suffix.v[l]);
        }
        merged.len += suffix.len;
    }

    /// Key and value rows of layer `layer` for positions `0..n` (n ≤ len), as two
    /// contiguous segments (prefix, suffix) of `(rows, kv_dim)` row-major data.
    #[inline]
    fn kv_segments(&self, layer: usize, n: usize, kv_dim: usize) -> [(&[f32], &[f32]); 2] {
        let p = n.min(self.prefix.len);
        let s = n - p;
        [
            (
                &self.prefix.k[layer][..p * kv_dim],
                &self.prefix.v[layer][..p * kv_dim],
            ),
            (
                &self.suffix.k[layer][..s * kv_dim],
                &self.suffix.v[layer][..s * kv_dim],
            ),
        ]
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Vec<f32>,
    /// Rows: Wq (q_dim), Wk (kv_dim), Wv (kv_dim).
    wqkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    /// Rows: W_gate (ffn), W_up (ffn).
    w_gate_up: Linear,
    w_down: Linear,
}

/// Which positions of a forward produce a [`StepOutput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// Only the last new position of each sequence.
    Last,
    /// Every new position.
    All,
}

/// Llama weights (f32) with a thread pool; the forward runs over caches passed in.
pub struct Llama {
    cfg: LlamaConfig,
    /// Token embeddings, `(vocab, d)`; also the LM head when they are tied (SmolLM2).
    embed: Linear,
    /// The LM head when the file has one (`output.weight`).
    lm_head: Option<Linear>,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    pool: rayon::ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("cfg", &self.cfg)
            .field("threads", &self.threads)
            .finish()
    }
}

impl Llama {
    /// Load the weights of `gguf` (Q4_1 and Q8_0 matrices kept as they are, others
    /// dequantised to f32; see `matmul.rs`) and make a pool of `threads` threads
    /// (0: [`crate::threads::num_threads`]).
    ///
    /// # Errors
    /// As [`LlamaConfig::from_gguf`]; a missing tensor or one of the wrong shape.
    pub fn load(gguf: &mut GgufFile, threads: usize) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        let threads = if threads == 0 {
            crate::threads::num_threads()
        } else {
            threads
        };
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let embed = linear(gguf, "token_embd.weight", cfg.vocab_size, d)?;
        let lm_head = if gguf.has_tensor("output.weight") {
            Some(linear(gguf, "output.weight", cfg.vocab_size, d)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}.weight");
            let mut m = |s: &str, out: usize, inp: usize| linear(gguf, &name(s), out, inp);
            let wqkv = Linear::stack(vec![
                m("attn_q", qd, d)?,
                m("attn_k", kvd, d)?,
                m("attn_v", kvd, d)?,
            ])?;
            let wo = m("attn_output", d, qd)?;
            let w_gate_up = Linear::stack(vec![m("ffn_gate", f, d)?, m("ffn_up", f, d)?])?;
            let w_down = m("ffn_down", d, f)?;
            blocks.push(Block {
                attn_norm: gguf.tensor_f32(&name("attn_norm"), &[d])?,
                wqkv,
                wo,
                ffn_norm: gguf.tensor_f32(&name("ffn_norm"), &[d])?,
                w_gate_up,
                w_down,
            });
        }
        let final_norm = gguf.tensor_f32("output_norm.weight", &[d])?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tilt-llama-{i}"))
            .build()
            .map_err(|e| ModelError::Internal(format!("cannot start {threads} threads: {e}")))?;
        let matrices = blocks
            .iter()
            .flat_map(|b| [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down])
            .chain(std::iter::once(&embed))
            .chain(lm_head.as_ref());
        let weight_bytes: usize = matrices.clone().map(Linear::bytes).sum();
        let mut formats: Vec<&str> = matrices.map(Linear::format).collect();
        formats.sort_unstable();
        formats.dedup();
        tracing::info!(
            path = %gguf.path().display(),
            layers = cfg.n_layers,
            d,
            vocab = cfg.vocab_size,
            threads,
            weight_mb = weight_bytes / 1_000_000,
            formats = formats.join(","),
            "loaded Llama weights"
        );
        Ok(Self {
            cfg,
            embed,
            lm_head,
            blocks,
            final_norm,
            pool,
            threads,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The number of threads of this model's pool.
    pub fn num_threads(&self) -> usize {
        self.threads
    }

    /// What one step's matrix products cost, for the physical limits of a step: (bytes of
    /// weights they read, which every step reads once whatever the batch; multiply-adds per
    /// row). The output layer is counted; embedding lookups (one row each) and attention
    /// (which grows with the context) are not.
    pub fn step_footprint(&self) -> (usize, usize) {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let matrices = self
            .blocks
            .iter()
            .flat_map(|b| [&b.wqkv, &b.wo, &b.w_gate_up, &b.w_down])
            .chain(std::iter::once(head));
        matrices.fold((0, 0), |(bytes, macs), m| {
            (bytes + m.bytes(), macs + m.out() * m.inp())
        })
    }

    /// Run `f` on this model's thread pool (what the benches use to time the pool itself).
    pub fn install<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.pool.install(f)
    }

    /// An empty cache.
    pub fn new_cache(&self) -> LlamaCache {
        LlamaCache {
            prefix: Arc::new(KvBlock::empty(self.cfg.n_layers)),
            suffix: KvBlock::empty(self.cfg.n_layers),
        }
    }

    /// Append `tokens[i]` (possibly several tokens, possibly none) to `caches[i]` for every
    /// i in one batched forward; return, per sequence, the outputs at the positions chosen
    /// by `outputs` (none for a sequence given no token).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for unequal lengths, a token outside the vocabulary or
    /// a context overflow; the caches are unchanged then.
    pub fn forward(
        &self,
        caches: &mut [LlamaCache],
        tokens: &[&[TokenId]],
        outputs: Outputs,
    ) -> Result<Vec<Vec<StepOutput>>, ModelError> {
        let cfg = &self.cfg;
        if caches.len() != tokens.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} caches but {} token lists",
                caches.len(),
                tokens.len()
            )));
        }
        let mut rows: Vec<Row> = Vec::new();
        for (s, (cache, toks)) in caches.iter().zip(tokens).enumerate() {
            if let Some(&t) = toks.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::InvalidInput(format!(
                    "token {t} (sequence {s}) is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            let len = cache.len();
            if len + toks.len() > cfg.context_length {
                return Err(ModelError::InvalidInput(format!(
                    "context overflow: sequence {s} has {len} tokens, {} more would exceed the \
                     context length {}",
                    toks.len(),
                    cfg.context_length
                )));
            }
            rows.extend(toks.iter().enumerate().map(|(i, &t)| (s, len + i, t)));
        }
        if rows.is_empty() {
            return Ok(vec![Vec::new(); caches.len()]);
        }
        self.pool
            .install(|| self.forward_rows(caches, tokens, &rows, outputs))
    }

    fn forward_rows(
        &self,
        caches: &mut [LlamaCache],
        tokens: &[&[TokenId]],
        rows: &[Row],
        outputs: Outputs,
    ) -> Result<Vec<Vec<StepOutput>>, ModelError> {
        let cfg = &self.cfg;
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let qkv_w = qd + 2 * kvd;
        let n = rows.len();
        let eps = cfg.rms_norm_eps;
        // The row-wise regions run on the pool unless the threads adapted down to one
        // (see `crate::threads`); either way each row is computed by one task.
        let parallel = crate::threads::region_threads(self.threads) > 1;

        let half = hd / 2;
        let (mut h, cos, sin) = time(Phase::Embed, 0, || {
            // Residual stream h: (n, d), starting from the token embeddings.
            let mut h = vec![0f32; n * d];
            for (r, &(_, _, t)) in rows.iter().enumerate() {
                let t = t as usize;
                self.embed.dequantize_row(t, &mut h[r * d..(r + 1) * d]);
            }
            // RoPE angles per row: cos/sin (n, hd/2), θ_i = base^(-2i/hd) (arXiv:2104.09864).
            let mut cos = vec![0f32; n * half];
            let mut sin = vec![0f32; n * half];
            for (r, &(_, pos, _)) in rows.iter().enumerate() {
                for i in 0..half {
                    let inv_freq =
                        1.0 / (cfg.rope_freq_base as f64).powf(2.0 * i as f64 / hd as f64);
                    let angle = pos as f64 * (inv_freq as f32) as f64;
                    cos[r * half + i] = angle.cos() as f32;
                    sin[r * half + i] = angle.sin() as f32;
                }
            }
            (h, cos, sin)
        });
        let mut xn = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * qkv_w];
        let mut attn = vec![0f32; n * qd];
        let mut gate_up = vec![0f32; n * 2 * f];
        let mut act = vec![0f32; n * f];

        for (l, blk) in self.blocks.iter().enumerate() {
            // Attention sub-block.
            time(Phase::Norm, 0, || {
                rms_norm(&h, &blk.attn_norm, eps, &mut xn)
            });
            time(Phase::QkvMatmul, 0, || {
                blk.wqkv.matmul(&xn, n, &mut qkv, false) // (n, qd + 2 kvd)
            })?;
            time(Phase::RopeAndCache, 0, || {
                for r in 0..n {
                    let row = &mut qkv[r * qkv_w..(r + 1) * qkv_w];
                    let (c, s) = (
                        &cos[r * half..(r + 1) * half],
                        &sin[r * half..(r + 1) * half],
                    );
                    for head in row[..qd + kvd].chunks_exact_mut(hd) {
                        rope_interleaved(head, c, s);
                    }
                }
                for (r, &(s, _, _)) in rows.iter().enumerate() {
                    let row = &qkv[r * qkv_w..(r + 1) * qkv_w];
                    let suffix = &mut caches[s].suffix;
                    suffix.k[l].extend_from_slice(&row[qd..qd + kvd]);
                    suffix.v[l].extend_from_slice(&row[qd + kvd..]);
                }
            });
            {
                let caches: &[LlamaCache] = caches;
                let qkv = &qkv;
                let body = |(r, (out, &(s, pos, _))): (usize, (&mut [f32], &Row))| {
                    let q = &qkv[r * qkv_w..r * qkv_w + qd];
                    attend(cfg, &caches[s], l, pos, q, out);
                };
                time(Phase::Attention, u64::from(parallel), || {
                    if parallel {
                        attn.par_chunks_mut(qd)
                            .zip(rows.par_iter())
                            .enumerate()
                            .for_each(body)
                    } else {
                        attn.chunks_mut(qd).zip(rows).enumerate().for_each(body)
                    }
                });
            }
            time(Phase::OutMatmul, 0, || {
                blk.wo.matmul(&attn, n, &mut h, true)
            })?; // h += attn Woᵀ

            // Gated MLP (SwiGLU, arXiv:2002.05202): h += W_down (silu(W_gate x) ⊙ W_up x).
            time(Phase::Norm, 0, || rms_norm(&h, &blk.ffn_norm, eps, &mut xn));
            time(Phase::GateUpMatmul, 0, || {
                blk.w_gate_up.matmul(&xn, n, &mut gate_up, false) // (n, 2f)
            })?;
            let body = |(a, gu): (&mut [f32], &[f32])| {
                let (g, u) = gu.split_at(f);
                crate::vecmath::silu_mul(g, u, a);
            };
            time(Phase::Silu, u64::from(parallel), || {
                if parallel {
                    act.par_chunks_mut(f)
                        .zip(gate_up.par_chunks(2 * f))
                        .for_each(body)
                } else {
                    act.chunks_mut(f).zip(gate_up.chunks(2 * f)).for_each(body)
                }
            });
            time(Phase::DownMatmul, 0, || {
                blk.w_down.matmul(&act, n, &mut h, true)
            })?;
        }
        for (cache, toks) in caches.iter_mut().zip(tokens) {
            cache.suffix.len += toks.len();
        }

        // Outputs: final norm, LM head, log-softmax, for the chosen rows.
        let mut picked: Vec<usize> = Vec::new();
        for (r, &(s, pos, _)) in rows.iter().enumerate() {
            let last = pos + 1 == caches[s].len();
            if outputs == Outputs::All || last {
                picked.push(r);
            }
        }
        let m = picked.len();
        let mut hidden = vec![0f32; m * d];
        for (i, &r) in picked.iter().enumerate() {
            hidden[i * d..(i + 1) * d].copy_from_slice(&h[r * d..(r + 1) * d]);
        }
        let mut normed = vec![0f32; m * d];
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.out();
        let mut logits = vec![0f32; m * vocab];
        time(Phase::LmHead, 0, || {
            rms_norm(&hidden, &self.final_norm, eps, &mut normed);
            head.matmul(&normed, m, &mut logits, false)
        })?;
        let mut out: Vec<Vec<StepOutput>> = vec![Vec::new(); caches.len()];
        let body = |(lg, hn): (&[f32], &[f32])| StepOutput {
            log_probs: crate::vecmath::log_softmax(lg),
            hidden: hn.to_vec(),
        };
        let results: Vec<StepOutput> = time(Phase::LogSoftmax, u64::from(parallel), || {
            if parallel {
                logits
                    .par_chunks(vocab)
                    .zip(normed.par_chunks(d))
                    .map(body)
                    .collect()
            } else {
                logits
                    .chunks(vocab)
                    .zip(normed.chunks(d))
                    .map(body)
                    .collect()
            }
        });
        for (&r, res) in picked.iter().zip(results) {
            out[rows[r].0].push(res);
        }
        Ok(out)
    }
}

/// (sequence, position, token) of a new row of a forward.
type Row = (usize, usize, TokenId);

/// Why tensor `name` is not one a Llama of `n_layers` blocks uses (`None`: it is).
fn unused_tensor(name: &str, n_layers: usize) -> Option<String> {
    if matches!(
        name,
        "token_embd.weight" | "output_norm.weight" | "output.weight"
    ) {
        return None;
    }
    let what = "is not part of the Llama tilt runs (no biases, experts or other extra \
                weights are implemented); the file is refused rather than run without it";
    let Some(rest) = name.strip_prefix("blk.") else {
        return Some(what.into());
    };
    let Some((layer, tensor)) = rest.split_once('.') else {
        return Some(what.into());
    };
    let known = tensor
        .strip_suffix(".weight")
        .is_some_and(|t| BLOCK_TENSORS.contains(&t));
    match layer.parse::<usize>() {
        Ok(l) if known && l < n_layers => None,
        Ok(l) if known => Some(format!(
            "belongs to block {l}, beyond llama.block_count = {n_layers}"
        )),
        _ => Some(what.into()),
    }
}

/// Matrix `name` of shape `(out, inp)` from `gguf`: Q4_1 and Q8_0 as stored, any other
/// format dequantised to f32.
fn linear(gguf: &mut GgufFile, name: &str, out: usize, inp: usize) -> Result<Linear, ModelError> {
    use candle_core::quantized::GgmlDType;
    match gguf.tensor_dtype(name)? {
        dtype @ (GgmlDType::Q4_1 | GgmlDType::Q8_0) if inp.is_multiple_of(crate::matmul::QK) => {
            let bytes = gguf.tensor_bytes(name, &[out, inp])?;
            Linear::from_ggml_bytes(&bytes, dtype == GgmlDType::Q8_0, out, inp).map_err(|problem| {
                ModelError::BadFile {
                    path: gguf.path().display().to_string(),
                    problem: format!("tensor {name}: {problem}"),
                }
            })
        }
        _ => Linear::from_f32(gguf.tensor_f32(name, &[out, inp])?, out, inp),
    }
}

/// RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) of each row of `x` into `out`:
/// `out = x / sqrt(mean(x²) + eps) ⊙ w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * scale);
        }
    }
}

/// Rotary embedding (Su et al., arXiv:2104.09864) on interleaved pairs `(2i, 2i+1)`, the
/// layout of GGUF's permuted Q/K rows (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
#[inline]
fn rope_interleaved(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (x0, x1) = (pair[0], pair[1]);
        pair[0] = x0 * c - x1 * s;
        pair[1] = x0 * s + x1 * c;
    }
}

/// Causal scaled dot-product attention (Vaswani et al., arXiv:1706.03762) of one row: query
/// `q` (all heads) at position `pos` over positions `0..=pos` of `cache`, grouped-query
/// heads (arXiv:2305.13245) reading their K/V head in place.
///
/// The same operations run with or without AVX2 (`mul_add` is an exact fused multiply-add
/// either way); with it they are compiled 8 lanes wide.
fn attend(
    cfg: &LlamaConfig,
    cache: &LlamaCache,
    layer: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::simd_available() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn attend_avx2(
            cfg: &LlamaConfig,
            cache: &LlamaCache,
            layer: usize,
            pos: usize,
            q: &[f32],
            out: &mut [f32],
        ) {
            attend_body(cfg, cache, layer, pos, q, out)
        }
        // SAFETY: AVX2 and FMA are present (checked at run time).
        unsafe { attend_avx2(cfg, cache, layer, pos, q, out) };
        return;
    }
    attend_body(cfg, cache, layer, pos, q, out)
}

#[inline(always)]
fn attend_body(
    cfg: &LlamaConfig,
    cache: &LlamaCache,
    layer: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = cfg.head_dim;
    let kvd = cfg.kv_dim();
    let group = cfg.n_heads / cfg.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let segments = cache.kv_segments(layer, pos + 1, kvd);
    let mut scores = vec![0f32; pos + 1];
    for head in 0..cfg.n_heads {
        let kvh = head / group;
        let qh = &q[head * hd..(head + 1) * hd];
        // Scores four keys at a time (independent chains), each exactly dot_reference.
        let mut s0 = 0;
        for (keys, _) in &segments {
            let key = |r: usize| &keys[r * kvd + kvh * hd..r * kvd + (kvh + 1) * hd];
            let rows = keys.len() / kvd;
            let mut r = 0;
            while r + 4 <= rows {
                let d = crate::matmul::dot4([key(r), key(r + 1), key(r + 2), key(r + 3)], qh);
                for (s, d) in scores[s0 + r..s0 + r + 4].iter_mut().zip(d) {
                    *s = d * scale;
                }
                r += 4;
            }
            for r in r..rows {
                scores[s0 + r] = crate::matmul::dot_reference(key(r), qh) * scale;
            }
            s0 += rows;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in scores.iter_mut() {
            *s -= max;
        }
        crate::vecmath::exp_in_place(&mut scores);
        let sum: f32 = scores.iter().sum();
        crate::matmul::weighted_rows(
            &scores,
            sum,
            &[segments[0].1, segments[1].1],
            kvd,
            kvh * hd,
            &mut out[head * hd..(head + 1) * hd],
        );
    }
}

/// A Llama GGUF model with its tokenizer and chat template: tilt's real [`Policy`].
pub struct LlamaPolicy {
    name: String,
    path: std::path::PathBuf,
    model: Llama,
    tokenizer: GgufTokenizer,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for LlamaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaPolicy")
            .field("name", &self.name)
            .field("model", &self.model)
            .finish()
    }
}

/// How [`LlamaPolicy::load_with`] loads a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// CPU threads of the model's pool (0: [`crate::threads::num_threads`]).
    pub threads: usize,
    /// Compile the chat template the file ships (`tokenizer.chat_template`). Without it the
    /// template is not even parsed, so a file with a broken template still loads for raw
    /// prompts, and [`Policy::render_chat`] takes only one user message.
    pub chat_template: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 0,
            chat_template: true,
        }
    }
}

/// The chat template `gguf` ships (`tokenizer.chat_template`), compiled with its BOS and
/// EOS token strings from `tokenizer`; None when the file has none.
///
/// # Errors
/// [`ModelError::BadFile`] naming the file when the template does not parse.
pub fn chat_template_of(
    gguf: &GgufFile,
    tokenizer: &GgufTokenizer,
) -> Result<Option<ChatTemplate>, ModelError> {
    if !gguf.has("tokenizer.chat_template") {
        return Ok(None);
    }
    let token = |id: Option<TokenId>| {
        id.and_then(|i| tokenizer.token(i))
            .unwrap_or_default()
            .to_string()
    };
    let bos = token(tokenizer.bos_id());
    let eos = token(tokenizer.eos_ids().first().copied());
    let source = gguf.string("tokenizer.chat_template")?;
    ChatTemplate::new(source, &bos, &eos)
        .map(Some)
        .map_err(|e| ModelError::BadFile {
            path: gguf.path().display().to_string(),
            problem: format!(
                "its chat template (tokenizer.chat_template) {e}; load it without the chat \
                 template to use raw prompts"
            ),
        })
}

/// The chat template of the GGUF file at `path`, read from its metadata alone (no weights
/// are loaded): what a remote engine serving that file applies, for a face that renders
/// prompts itself.
///
/// # Errors
/// [`ModelError::BadFile`] naming the file: missing, malformed, no tokenizer, no chat
/// template, or one that does not parse.
pub fn load_chat_template(path: &std::path::Path) -> Result<ChatTemplate, ModelError> {
    let gguf = GgufFile::open(path)?;
    let tokenizer = GgufTokenizer::from_gguf(&gguf).map_err(|e| ModelError::BadFile {
        path: path.display().to_string(),
        problem: format!("tokenizer: {e}"),
    })?;
    chat_template_of(&gguf, &tokenizer)?.ok_or_else(|| ModelError::BadFile {
        path: path.display().to_string(),
        problem: "it has no chat template (tokenizer.chat_template)".into(),
    })
}

impl LlamaPolicy {
    /// Load a Llama-architecture GGUF file (weights, tokenizer, chat template), with
    /// `threads` threads (0: [`crate::threads::num_threads`]).
    ///
    /// # Errors
    /// As [`LlamaPolicy::load_with`].
    pub fn load(path: &std::path::Path, threads: usize) -> Result<Self, ModelError> {
        Self::load_with(
            path,
            LoadOptions {
                threads,
                ..LoadOptions::default()
            },
        )
    }

    /// Load a Llama-architecture GGUF file as `options` say.
    ///
    /// # Errors
    /// [`ModelError::BadFile`] naming the file: missing, malformed or truncated, a tokenizer
    /// it cannot build, or a chat template that does not parse;
    /// [`ModelError::UnsupportedArchitecture`].
    pub fn load_with(path: &std::path::Path, options: LoadOptions) -> Result<Self, ModelError> {
        let bad = |problem: String| ModelError::BadFile {
            path: path.display().to_string(),
            problem,
        };
        let mut gguf = GgufFile::open(path)?;
        gguf.require_llama()?;
        let tokenizer = GgufTokenizer::from_gguf(&gguf).map_err(|e| match e {
            ModelError::Tokenizer(m) => bad(format!("tokenizer: {m}")),
            other => other,
        })?;
        let model = Llama::load(&mut gguf, options.threads)?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens but the embedding only {} rows",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        let chat = if options.chat_template {
            chat_template_of(&gguf, &tokenizer)?
        } else {
            None
        };
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "llama".into());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            model,
            tokenizer,
            chat,
        })
    }

    /// Whether a chat template was loaded.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The network.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    fn single(mut v: Vec<Vec<StepOutput>>) -> Result<Vec<StepOutput>, ModelError> {
        v.pop()
            .ok_or_else(|| ModelError::Internal("forward returned no sequence".into()))
    }
}

impl Policy for LlamaPolicy {
    type Cache = LlamaCache;

    fn name(&self) -> &str {
        &self.name
    }

    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.model.cfg.hidden_size
    }

    fn context_length(&self) -> usize {
        self.model.cfg.context_length
    }

    fn eos_token_ids(&self) -> &[TokenId] {
        self.tokenizer.eos_ids()
    }

    fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        self.tokenizer.encode(text)
    }

    fn decode(&self, tokens: &[TokenId]) -> Result<String, ModelError> {
        self.tokenizer.decode(tokens, true)
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        match &self.chat {
            Some(t) => t.render(messages, true),
            None => crate::chat_template::render_without_template(&self.name, messages),
        }
    }

    /// K and V, f32, per layer and KV head: 2 · layers · kv_heads · head_dim · 4 bytes.
    fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.model.cfg;
        2 * c.n_layers as u64 * c.n_kv_heads as u64 * c.head_dim as u64 * 4
    }

    fn artifacts(&self) -> Vec<std::path::PathBuf> {
        vec![self.path.clone()]
    }

    fn prefill(&self, tokens: &[TokenId]) -> Result<(LlamaCache, StepOutput), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput(
                "empty prompt: prefill needs at least one token".into(),
            ));
        }
        let mut caches = [self.model.new_cache()];
        let out = self.model.forward(&mut caches, &[tokens], Outputs::Last)?;
        let last = Self::single(out)?
            .pop()
            .ok_or_else(|| ModelError::Internal("prefill returned no output".into()))?;
        let [mut cache] = caches;
        cache.share();
        Ok((cache, last))
    }

    fn step(
        &self,
        caches: &mut [LlamaCache],
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        if caches.len() != tokens.len() {
            return Err(ModelError::InvalidInput(format!(
                "step: {} caches but {} tokens",
                caches.len(),
                tokens.len()
            )));
        }
        let lists: Vec<&[TokenId]> = tokens.iter().map(std::slice::from_ref).collect();
        let out = self.model.forward(caches, &lists, Outputs::Last)?;
        out.into_iter()
            .map(|mut v| {
                v.pop()
                    .ok_or_else(|| ModelError::Internal("step returned no output".into()))
            })
            .collect()
    }

    fn extend(
        &self,
        cache: &mut LlamaCache,
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        let out = self
            .model
            .forward(std::slice::from_mut(cache), &[tokens], Outputs::All)?;
        Self::single(out)
    }

    fn cache_len(&self, cache: &LlamaCache) -> usize {
        cache.len()
    }

    /// On the model's pool (as many of its threads as [`crate::threads`] lets a region use).
    fn map_parallel<T: Send, R: Send>(
        &self,
        items: &mut [T],
        f: impl Fn(&mut T) -> R + Sync + Send,
    ) -> Vec<R> {
        if items.len() <= 1 || crate::threads::region_threads(self.model.threads) <= 1 {
            items.iter_mut().map(f).collect()
        } else {
            self.model.install(|| items.par_iter_mut().map(f).collect())
        }
    }

    /// Share the suffix when the forks would copy more than sharing does: always when the
    /// shared prefix is empty (sharing is then a move), else when (forks − 1)·suffix
    /// exceeds the positions [`LlamaCache::share`] may copy. Each fork then starts with
    /// an empty suffix, so a fork never copies more than one block's positions.
    fn prepare_fork(&self, cache: &mut LlamaCache, forks: usize) {
        let suffix = cache.len() - cache.shared_len();
        if suffix > 0
            && forks > 1
            && (cache.shared_len() == 0 || (forks - 1) * suffix > cache.len())
        {
            cache.share();
        }
    }

    /// One forward over the whole response (all positions at once), rather than the
    /// trait's token-by-token default.
    fn response_log_probs(
        &self,
        context: &[TokenId],
        response: &[TokenId],
    ) -> Result<Vec<f32>, ModelError> {
        if let Some((i, &t)) = response
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size())
        {
            return Err(ModelError::InvalidInput(format!(
                "response token {t} at position {i} is outside the vocabulary of {}",
                self.vocab_size()
            )));
        }
        let (mut cache, first) = self.prefill(context)?;
        let mut out = Vec::with_capacity(response.len());
        if let Some(&t0) = response.first() {
            out.push(first.log_probs[t0 as usize]);
        }
        if response.len() > 1 {
            let rest = self.extend(&mut cache, &response[..response.len() - 1])?;
            for (o, &t) in rest.iter().zip(&response[1..]) {
                out.push(o.log_probs[t as usize]);
            }
        }
        Ok(out)
    }
}
