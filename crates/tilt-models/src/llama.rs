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
//! - **Weights are dequantised to f32 at load.** On CPU, candle's quantised matmul is a loop
//!   of matrix–vector products that re-reads the weights for every row of the batch (16
//!   rows cost 12–14× one row), has no SIMD kernel for the shipped Q4_1 type, and made a
//!   64-token prefill take 2.7 s where the f32 GEMM takes 0.19 s (measurements on 2 AVX2
//!   cores, `shared/notes/measurements.md`). The f32 GEMM reuses each weight across all
//!   rows, which is what sampling N continuations of one prompt needs. The cost is memory
//!   (4 bytes a weight: 540 MB for SmolLM2-135M) and a batch-1 decode bound by memory
//!   bandwidth (every step streams all weights). Other devices (a GPU, a CPU with fast
//!   int8 dot products) would call for other formats; tilt runs on CPU only so far.
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
//!   For a 135M model most of a step is per-operation overhead, so the hot loops work on
//!   plain `f32` slices with preallocated buffers; only the matrix products call a library
//!   (the `gemm` crate, which candle's CPU backend also uses).
//!
//! Determinism: matrix products are split over fixed blocks of output columns (the same
//! blocks whatever the thread count), each computed by a single-threaded GEMM, and attention
//! is one task per row; so results are bitwise identical at any thread count. They may
//! differ in the last bits with the *number of rows* in a batch (GEMM picks its blocking
//! from the matrix sizes, and from 2 rows on the product is written column-major), so a
//! sequence's log-probs can differ slightly depending on how many other sequences share its
//! batch; the tests bound the difference (1e-4 nats on tiny models) and check that the
//! argmax agrees. Same seed and configuration give the same bytes at 1 or 2 threads.

use std::sync::Arc;

use rayon::prelude::*;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
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

impl LlamaConfig {
    /// Read the configuration from `gguf`'s metadata and tensor shapes.
    ///
    /// # Errors
    /// Not a Llama file, missing or inconsistent hyper-parameters, or features this
    /// implementation lacks (RoPE scaling, partial rotary dimensions).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        gguf.require_llama()?;
        let bad = |problem: String| ModelError::BadFile {
            path: gguf.path().display().to_string(),
            problem,
        };
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
        if gguf.has("llama.attention.key_length") {
            let k = gguf.positive("llama.attention.key_length")?;
            if k != head_dim {
                return Err(bad(format!(
                    "llama.attention.key_length = {k} differs from embedding/heads = {head_dim} \
                     (not supported)"
                )));
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
        if gguf.has("llama.rope.scaling.type") {
            let t = gguf.string("llama.rope.scaling.type")?;
            if t != "none" {
                return Err(bad(format!("RoPE scaling {t:?} is not supported")));
            }
        }
        if gguf.has_tensor("rope_freqs.weight") {
            return Err(bad(
                "rope_freqs.weight (Llama 3.1 RoPE frequency factors) is not supported".into(),
            ));
        }
        let embd = gguf.tensor_shape("token_embd.weight")?;
        if embd.len() != 2 || embd[1] != hidden_size {
            return Err(bad(format!(
                "token_embd.weight has shape {embd:?}, expected [vocab, {hidden_size}]"
            )));
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
            n_layers: gguf.positive("llama.block_count")?,
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
    /// Costs one copy of the cache when the prefix was already non-empty. Call it before
    /// forking a sequence many times (e.g. after extending it by a block).
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
        let mut merged = (*self.prefix).clone();
        for l in 0..n_layers {
            merged.k[l].extend_from_slice(&suffix.k[l]);
            merged.v[l].extend_from_slice(&suffix.v[l]);
        }
        merged.len += suffix.len;
        self.prefix = Arc::new(merged);
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

/// A linear layer y = W x, its weight row-major `(out, in)`, as GGUF stores it. (Measured
/// on 2 AVX2 cores, 16 rows × the 576×49152 LM head: this layout read as the GEMM's
/// transposed right operand took 35 ms, a pre-transposed `(in, out)` copy 93 ms.)
#[derive(Debug, Clone)]
struct Linear {
    w: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Linear {
    /// From weights given row-major `(out, in)`, several stacked by rows (fused
    /// projections) when `parts` has more than one.
    fn from_rows(parts: &[&[f32]], inp: usize) -> Self {
        let w: Vec<f32> = parts.concat();
        Self {
            out: w.len() / inp,
            inp,
            w,
        }
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

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint column blocks of one buffer from several tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl Llama {
    /// Load the weights of `gguf` (dequantised to f32) and make a pool of `threads` threads
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
        let embed = Linear {
            w: gguf.tensor_f32("token_embd.weight", &[cfg.vocab_size, d])?,
            out: cfg.vocab_size,
            inp: d,
        };
        let lm_head = if gguf.has_tensor("output.weight") {
            let w = gguf.tensor_f32("output.weight", &[cfg.vocab_size, d])?;
            Some(Linear::from_rows(&[&w], d))
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let name = |s: &str| format!("blk.{l}.{s}.weight");
            let mut t = |s: &str, shape: &[usize]| gguf.tensor_f32(&name(s), shape);
            let attn_norm = t("attn_norm", &[d])?;
            let wq = t("attn_q", &[qd, d])?;
            let wk = t("attn_k", &[kvd, d])?;
            let wv = t("attn_v", &[kvd, d])?;
            let wo = t("attn_output", &[d, qd])?;
            let ffn_norm = t("ffn_norm", &[d])?;
            let gate = t("ffn_gate", &[f, d])?;
            let up = t("ffn_up", &[f, d])?;
            let down = t("ffn_down", &[d, f])?;
            blocks.push(Block {
                attn_norm,
                wqkv: Linear::from_rows(&[&wq, &wk, &wv], d),
                wo: Linear::from_rows(&[&wo], qd),
                ffn_norm,
                w_gate_up: Linear::from_rows(&[&gate, &up], d),
                w_down: Linear::from_rows(&[&down], f),
            });
        }
        let final_norm = gguf.tensor_f32("output_norm.weight", &[d])?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tilt-llama-{i}"))
            .build()
            .map_err(|e| ModelError::Internal(format!("cannot start {threads} threads: {e}")))?;
        tracing::info!(
            path = %gguf.path().display(),
            layers = cfg.n_layers,
            d,
            vocab = cfg.vocab_size,
            threads,
            "loaded Llama weights (f32)"
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
        // (sequence, position, token) of every new row.
        let mut rows: Vec<(usize, usize, TokenId)> = Vec::new();
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
        rows: &[(usize, usize, TokenId)],
        outputs: Outputs,
    ) -> Result<Vec<Vec<StepOutput>>, ModelError> {
        let cfg = &self.cfg;
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let qkv_w = qd + 2 * kvd;
        let n = rows.len();
        let eps = cfg.rms_norm_eps;

        // Residual stream h: (n, d), starting from the token embeddings.
        let mut h = vec![0f32; n * d];
        for (r, &(_, _, t)) in rows.iter().enumerate() {
            let t = t as usize;
            h[r * d..(r + 1) * d].copy_from_slice(&self.embed.w[t * d..(t + 1) * d]);
        }
        // RoPE angles per row: cos/sin (n, hd/2), θ_i = base^(-2i/hd) (arXiv:2104.09864).
        let half = hd / 2;
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (r, &(_, pos, _)) in rows.iter().enumerate() {
            for i in 0..half {
                let inv_freq = 1.0 / (cfg.rope_freq_base as f64).powf(2.0 * i as f64 / hd as f64);
                let angle = pos as f64 * (inv_freq as f32) as f64;
                cos[r * half + i] = angle.cos() as f32;
                sin[r * half + i] = angle.sin() as f32;
            }
        }
        let mut xn = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * qkv_w];
        let mut attn = vec![0f32; n * qd];
        let mut gate_up = vec![0f32; n * 2 * f];
        let mut act = vec![0f32; n * f];

        for (l, blk) in self.blocks.iter().enumerate() {
            // Attention sub-block.
            rms_norm(&h, &blk.attn_norm, eps, &mut xn);
            self.matmul(&xn, n, &blk.wqkv, &mut qkv, false)?; // (n, qd + 2 kvd)
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
            {
                let caches: &[LlamaCache] = caches;
                let qkv = &qkv;
                attn.par_chunks_mut(qd)
                    .zip(rows.par_iter())
                    .enumerate()
                    .for_each(|(r, (out, &(s, pos, _)))| {
                        let q = &qkv[r * qkv_w..r * qkv_w + qd];
                        attend(cfg, &caches[s], l, pos, q, out);
                    });
            }
            self.matmul(&attn, n, &blk.wo, &mut h, true)?; // h += attn Woᵀ

            // Gated MLP (SwiGLU, arXiv:2002.05202): h += W_down (silu(W_gate x) ⊙ W_up x).
            rms_norm(&h, &blk.ffn_norm, eps, &mut xn);
            self.matmul(&xn, n, &blk.w_gate_up, &mut gate_up, false)?; // (n, 2f)
            for r in 0..n {
                let gu = &gate_up[r * 2 * f..(r + 1) * 2 * f];
                let (g, u) = gu.split_at(f);
                for ((a, &g), &u) in act[r * f..(r + 1) * f].iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            self.matmul(&act, n, &blk.w_down, &mut h, true)?;
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
        rms_norm(&hidden, &self.final_norm, eps, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let vocab = head.out;
        let mut logits = vec![0f32; m * vocab];
        self.matmul(&normed, m, head, &mut logits, false)?;
        let mut out: Vec<Vec<StepOutput>> = vec![Vec::new(); caches.len()];
        let results: Vec<StepOutput> = logits
            .par_chunks(vocab)
            .zip(normed.par_chunks(d))
            .map(|(lg, hn)| StepOutput {
                log_probs: log_softmax(lg),
                hidden: hn.to_vec(),
            })
            .collect();
        for (&r, res) in picked.iter().zip(results) {
            out[rows[r].0].push(res);
        }
        Ok(out)
    }

    /// `out (rows, w.out) = x (rows, w.inp) · Wᵀ`, or `out += …` when `accumulate`.
    ///
    /// The output columns are split into fixed blocks, one single-threaded GEMM each, so
    /// the arithmetic does not depend on the thread count. From 2 rows on, the GEMM writes
    /// a column-major `(out, rows)` scratch that is then transposed into `out`: measured on
    /// 2 AVX2 cores, the LM head took 16 ms that way for 16 rows against 26 ms writing
    /// row-major (29 against 36 ms for 4 rows); one row takes GEMM's matrix–vector path.
    fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        w: &Linear,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<(), ModelError> {
        if x.len() != rows * w.inp || out.len() != rows * w.out || w.w.len() != w.out * w.inp {
            return Err(ModelError::Internal(format!(
                "matmul shapes: x {} for {rows}×{}, out {} for {rows}×{}",
                x.len(),
                w.inp,
                out.len(),
                w.out
            )));
        }
        let column_major = rows >= 2;
        // Narrow blocks for the layer matrices (576–3072 outputs), so that both threads get
        // work; wider ones for the LM head. Chosen from the shapes only, never the thread
        // count, so that the arithmetic is the same at any thread count.
        let block_cols = match (w.out <= 4096, column_major) {
            (true, _) => 64,
            (false, true) => 256,
            (false, false) => 1024,
        };
        let mut scratch = if column_major {
            vec![0f32; rows * w.out]
        } else {
            Vec::new()
        };
        let dst = SendPtr(if column_major {
            scratch.as_mut_ptr()
        } else {
            out.as_mut_ptr()
        });
        let n_blocks = w.out.div_ceil(block_cols);
        let block = |b: usize| {
            let c0 = b * block_cols;
            let cols = block_cols.min(w.out - c0);
            let dst = &dst;
            // SAFETY: this task writes only the columns c0..c0+cols of the destination,
            // which is (rows, w.out) row-major (`out`) or column-major (`scratch`); lhs is
            // (rows, inp) row-major; rhs = Wᵀ is (inp, cols), read from W's rows c0.. with
            // column stride inp. The length checks above keep every index in bounds.
            unsafe {
                let (d, dst_cs, dst_rs, read) = if column_major {
                    (dst.0.add(c0 * rows), rows as isize, 1, false)
                } else {
                    (dst.0.add(c0), 1, w.out as isize, accumulate)
                };
                gemm::gemm(
                    rows,
                    cols,
                    w.inp,
                    d,
                    dst_cs,
                    dst_rs,
                    read,
                    x.as_ptr(),
                    1,
                    w.inp as isize,
                    w.w.as_ptr().add(c0 * w.inp),
                    w.inp as isize,
                    1,
                    if read { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        };
        if self.threads == 1 {
            (0..n_blocks).for_each(block);
        } else {
            (0..n_blocks).into_par_iter().for_each(block);
        }
        if column_major {
            let o = w.out;
            let transpose_row = |(r, row): (usize, &mut [f32])| {
                if accumulate {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v += scratch[c * rows + r];
                    }
                } else {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v = scratch[c * rows + r];
                    }
                }
            };
            if self.threads == 1 || rows * o < 1 << 16 {
                out.chunks_exact_mut(o).enumerate().for_each(transpose_row);
            } else {
                out.par_chunks_exact_mut(o)
                    .enumerate()
                    .for_each(transpose_row);
            }
        }
        Ok(())
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
fn attend(
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
    let keys = || segments.iter().flat_map(|(k, _)| k.chunks_exact(kvd));
    let values = || segments.iter().flat_map(|(_, v)| v.chunks_exact(kvd));
    let mut scores = vec![0f32; pos + 1];
    for head in 0..cfg.n_heads {
        let kvh = head / group;
        let qh = &q[head * hd..(head + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (s, k) in scores.iter_mut().zip(keys()) {
            let k = &k[kvh * hd..(kvh + 1) * hd];
            *s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let o = &mut out[head * hd..(head + 1) * hd];
        o.fill(0.0);
        for (&p, v) in scores.iter().zip(values()) {
            let v = &v[kvh * hd..(kvh + 1) * hd];
            let p = p / sum;
            for (a, &b) in o.iter_mut().zip(v) {
                *a += p * b;
            }
        }
    }
}

/// Normalised natural-log probabilities: `x − log Σ exp x` (terms in f32, each ≤ 1, summed
/// in f64).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| (x - max).exp() as f64).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
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

impl LlamaPolicy {
    /// Load a Llama-architecture GGUF file (weights, tokenizer, chat template), with
    /// `threads` threads (0: [`crate::threads::num_threads`]).
    ///
    /// # Errors
    /// [`ModelError::BadFile`] (missing, malformed or truncated file),
    /// [`ModelError::UnsupportedArchitecture`], tokenizer or chat-template errors.
    pub fn load(path: &std::path::Path, threads: usize) -> Result<Self, ModelError> {
        let mut gguf = GgufFile::open(path)?;
        gguf.require_llama()?;
        let tokenizer = GgufTokenizer::from_gguf(&gguf)?;
        let model = Llama::load(&mut gguf, threads)?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(ModelError::BadFile {
                path: path.display().to_string(),
                problem: format!(
                    "the tokenizer has {} tokens but the embedding only {} rows",
                    tokenizer.vocab_size(),
                    model.config().vocab_size
                ),
            });
        }
        let chat = if gguf.has("tokenizer.chat_template") {
            let token = |id: Option<TokenId>| {
                id.and_then(|i| tokenizer.token(i))
                    .unwrap_or_default()
                    .to_string()
            };
            let bos = token(tokenizer.bos_id());
            let eos = token(tokenizer.eos_ids().first().copied());
            Some(ChatTemplate::new(
                gguf.string("tokenizer.chat_template")?,
                &bos,
                &eos,
            )?)
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

    /// The network.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Render a whole chat with the model's template (`add_generation_prompt` opens the
    /// assistant's turn).
    ///
    /// # Errors
    /// The model has no chat template, or rendering failed.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.chat
            .as_ref()
            .ok_or_else(|| ModelError::ChatTemplate(format!("{} has no chat template", self.name)))?
            .render(messages, add_generation_prompt)
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

    fn chat_prompt(&self, user_message: &str) -> Result<String, ModelError> {
        match &self.chat {
            Some(t) => t.render(&[ChatMessage::new("user", user_message)], true),
            None => Ok(user_message.to_string()),
        }
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
