//! The weights of a linear layer, kept in the file's quantised format, and the product
//! `out = x · Wᵀ` the Llama forward spends its time in.
//!
//! # Why these kernels are hand-written
//!
//! A 135M-parameter model on a CPU is bound by how many bytes of weights each step reads.
//! Dequantised to f32, SmolLM2-135M is 540 MB a step; in the file's own formats (Q4_1 for
//! the layer matrices, Q8_0 for the tied embedding / LM head) it is about 100 MB. The crates
//! at hand do not do what this needs: the `gemm` crate multiplies f32 (or f16) matrices
//! only, so it must read the 540 MB copy (measured on 2 AVX2 cores: 19 tok/s for one
//! sequence, 116 tok/s aggregated for 16, 64-token prompt); candle's quantised matmul has
//! no SIMD kernel for Q4_1, chooses its AVX2 kernels at compile time (a dependent crate
//! gets them only with `-C target-cpu=native`), re-reads the weights for every row of a
//! batch, and first rounds the activations to 8 bits (Q8_1), so its result differs from
//! the f32 product of the same weights. So the products are written here, small enough
//! to read: each weight row is dequantised exactly (the same f32 values as candle's and
//! llama.cpp's `dequantize`), 8 lanes at a time, and multiplied with f32 activations.
//!
//! # One result per (row, column), whatever the batch
//!
//! Every output element is defined by one fixed sequence of operations, the same
//! whichever kernel computes it and whatever else is in the batch:
//!
//! ```text
//! chunks k = 0 … ⌈inp/8⌉−1 of 8 inputs (zero-padded at the end);
//! acc[l] = fma(w[8k+l], x[8k+l], acc[l])   for each lane l = 0 … 7, k in order;
//! dot    = ((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7));
//! out    = dot, or out + dot when accumulating.
//! ```
//!
//! The kernels compute exactly this, chosen at run time: for one row, AVX2/FMA with the
//! weights dequantised in registers; for several rows, the weights of a group of columns
//! are dequantised once into a small buffer and multiplied with blocks of rows — 3 rows ×
//! 4 columns in AVX2, or on AVX-512 6 rows × 8 columns with two columns' 8-lane
//! accumulators side by side in each zmm register. [`dot_reference`] computes it with
//! scalar `mul_add` (the path for CPUs without AVX2), and the tests check that every
//! path agrees with it bit for bit. Hence a sequence's log-probs do not depend on how many
//! other sequences share its batch, on the thread count, or on whether its tokens came one
//! at a time or in one prefill.
//!
//! # What it gained
//!
//! `cargo bench -p tilt-models --bench decode_vs_transformers`, SmolLM2-135M Q4_1,
//! 64-token prompt, 64 new tokens, 2 threads, on 2 cores with AVX-512: one sequence
//! decodes at 100–135 tok/s (19 with the f32 copy), 16 sequences at ≈400 tok/s
//! aggregated (116), ≈350 with AVX2 only (`TILT_NO_AVX512=1`). Prefetching the weight
//! rows two groups ahead took one sequence from 29 to 61 tok/s on one thread: the
//! arithmetic per cache line is heavy enough that the out-of-order window alone keeps
//! too few lines in flight.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::ModelError;

/// Column blocks per pool thread in a product: enough that a thread preempted in one holds
/// up little, few enough that each block still streams whole groups of weight rows.
const BLOCKS_PER_THREAD: usize = 4;

/// Weights per block of the quantised formats (Q4_1, Q8_0).
pub(crate) const QK: usize = 32;

/// A Q4_1 block (GGML): 32 weights `w = d·q + m`, `q ∈ 0..16`; byte `j` of `qs` holds
/// weight `j` in its low nibble and weight `j + 16` in its high nibble. The scales are
/// kept as f32 (converted exactly from the file's f16).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    d: f32,
    m: f32,
    qs: [u8; QK / 2],
}

/// A Q8_0 block (GGML): 32 weights `w = d·q`, `q ∈ −128..128`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    d: f32,
    qs: [i8; QK],
}

/// A weight matrix `(out, inp)`, row-major by output, in one of the formats the kernels
/// read. Other GGUF formats are dequantised to f32 at load.
#[derive(Debug, Clone)]
pub(crate) enum Weights {
    /// Plain f32.
    F32(Vec<f32>),
    /// GGML Q4_1 blocks, `inp / 32` per output row.
    Q4_1(Vec<BlockQ4_1>),
    /// GGML Q8_0 blocks, `inp / 32` per output row.
    Q8_0(Vec<BlockQ8_0>),
}

impl Weights {
    fn format(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::Q4_1(_) => "Q4_1",
            Weights::Q8_0(_) => "Q8_0",
        }
    }
}

/// A linear layer `y = W x` without bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weights: Weights,
    out: usize,
    inp: usize,
}

fn f16_bits(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

impl Linear {
    /// From f32 weights, row-major `(out, inp)`.
    pub(crate) fn from_f32(w: Vec<f32>, out: usize, inp: usize) -> Result<Self, ModelError> {
        if w.len() != out * inp {
            return Err(ModelError::Internal(format!(
                "f32 weights: {} values for a {out}×{inp} matrix",
                w.len()
            )));
        }
        Ok(Self {
            weights: Weights::F32(w),
            out,
            inp,
        })
    }

    /// From a GGUF tensor's raw bytes in Q4_1 or Q8_0 (`q8 = true`) layout, `(out, inp)`
    /// with `inp` a multiple of 32. Every scale and weight must be finite.
    pub(crate) fn from_ggml_bytes(
        bytes: &[u8],
        q8: bool,
        out: usize,
        inp: usize,
    ) -> Result<Self, String> {
        if !inp.is_multiple_of(QK) {
            return Err(format!("row length {inp} is not a multiple of {QK}"));
        }
        let blocks = out * inp / QK;
        let size = if q8 { 34 } else { 20 };
        if bytes.len() != blocks * size {
            return Err(format!(
                "{} bytes for {blocks} blocks of {size} bytes",
                bytes.len()
            ));
        }
        let chunks = bytes.chunks_exact(size);
        let weights = if q8 {
            let v: Vec<BlockQ8_0> = chunks
                .map(|b| {
                    let mut qs = [0i8; QK];
                    for (q, &byte) in qs.iter_mut().zip(&b[2..]) {
                        *q = byte as i8;
                    }
                    BlockQ8_0 {
                        d: f16_bits(b[0], b[1]),
                        qs,
                    }
                })
                .collect();
            if let Some(i) = v.iter().position(|b| !b.d.is_finite()) {
                return Err(format!("block {i} has a non-finite scale {}", v[i].d));
            }
            Weights::Q8_0(v)
        } else {
            let v: Vec<BlockQ4_1> = chunks
                .map(|b| {
                    let mut qs = [0u8; QK / 2];
                    qs.copy_from_slice(&b[4..]);
                    BlockQ4_1 {
                        d: f16_bits(b[0], b[1]),
                        m: f16_bits(b[2], b[3]),
                        qs,
                    }
                })
                .collect();
            if let Some(i) = v.iter().position(|b| {
                // The largest weight d·15 + m must be finite too.
                !(b.d.is_finite() && b.m.is_finite() && b.d.mul_add(15.0, b.m).is_finite())
            }) {
                return Err(format!(
                    "block {i} has non-finite scales (d {}, m {})",
                    v[i].d, v[i].m
                ));
            }
            Weights::Q4_1(v)
        };
        Ok(Self { weights, out, inp })
    }

    /// Several matrices with the same `inp`, stacked by rows (a fused projection). Stays
    /// in the parts' format when they share one, else becomes f32.
    pub(crate) fn stack(parts: Vec<Linear>) -> Result<Self, ModelError> {
        let inp = parts.first().map_or(0, |p| p.inp);
        if parts.iter().any(|p| p.inp != inp) {
            return Err(ModelError::Internal(
                "stacked matrices differ in width".into(),
            ));
        }
        let out = parts.iter().map(|p| p.out).sum();
        let weights = match parts.first().map(|p| &p.weights) {
            Some(Weights::Q4_1(_))
                if parts.iter().all(|p| matches!(p.weights, Weights::Q4_1(_))) =>
            {
                Weights::Q4_1(
                    parts
                        .iter()
                        .flat_map(|p| match &p.weights {
                            Weights::Q4_1(v) => v.as_slice(),
                            _ => &[],
                        })
                        .copied()
                        .collect(),
                )
            }
            Some(Weights::Q8_0(_))
                if parts.iter().all(|p| matches!(p.weights, Weights::Q8_0(_))) =>
            {
                Weights::Q8_0(
                    parts
                        .iter()
                        .flat_map(|p| match &p.weights {
                            Weights::Q8_0(v) => v.as_slice(),
                            _ => &[],
                        })
                        .copied()
                        .collect(),
                )
            }
            _ => {
                let mut w = Vec::with_capacity(out * inp);
                for p in &parts {
                    let start = w.len();
                    w.resize(start + p.out * inp, 0.0);
                    for (j, row) in w[start..].chunks_exact_mut(inp).enumerate() {
                        p.dequantize_row(j, row);
                    }
                }
                Weights::F32(w)
            }
        };
        Ok(Self { weights, out, inp })
    }

    /// Output size (rows of W).
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// Input size (columns of W).
    pub(crate) fn inp(&self) -> usize {
        self.inp
    }

    /// The storage format, for logs.
    pub(crate) fn format(&self) -> &'static str {
        self.weights.format()
    }

    /// Bytes of weight data.
    pub(crate) fn bytes(&self) -> usize {
        match &self.weights {
            Weights::F32(v) => v.len() * 4,
            Weights::Q4_1(v) => v.len() * std::mem::size_of::<BlockQ4_1>(),
            Weights::Q8_0(v) => v.len() * std::mem::size_of::<BlockQ8_0>(),
        }
    }

    /// Row `j` of W (output unit `j`), dequantised into `dst[..inp]`. Values equal those
    /// of candle's / GGML's `dequantize` (`d·q + m` with an exact product, so one
    /// rounding, as the FMA below gives).
    pub(crate) fn dequantize_row(&self, j: usize, dst: &mut [f32]) {
        let inp = self.inp;
        let dst = &mut dst[..inp];
        match &self.weights {
            Weights::F32(w) => dst.copy_from_slice(&w[j * inp..(j + 1) * inp]),
            Weights::Q4_1(w) => {
                let nb = inp / QK;
                for (b, out) in w[j * nb..(j + 1) * nb].iter().zip(dst.chunks_exact_mut(QK)) {
                    for (i, &q) in b.qs.iter().enumerate() {
                        out[i] = ((q & 0x0F) as f32).mul_add(b.d, b.m);
                        out[i + QK / 2] = ((q >> 4) as f32).mul_add(b.d, b.m);
                    }
                }
            }
            Weights::Q8_0(w) => {
                let nb = inp / QK;
                for (b, out) in w[j * nb..(j + 1) * nb].iter().zip(dst.chunks_exact_mut(QK)) {
                    for (o, &q) in out.iter_mut().zip(&b.qs) {
                        *o = q as f32 * b.d;
                    }
                }
            }
        }
    }

    /// `out (rows, self.out) = x (rows, self.inp) · Wᵀ`, or `out += …` when `accumulate`,
    /// split over output columns across the current rayon pool. Each element is the
    /// fixed computation of the module docs, so the result does not depend on `rows`, the
    /// batch's other rows or the thread count.
    pub(crate) fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<(), ModelError> {
        self.matmul_with(x, rows, out, accumulate, Isa::best())
    }

    /// [`Linear::matmul`] with the kernels of `isa` (which must be available here).
    fn matmul_with(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        accumulate: bool,
        isa: Isa,
    ) -> Result<(), ModelError> {
        if x.len() != rows * self.inp || out.len() != rows * self.out {
            return Err(ModelError::Internal(format!(
                "matmul shapes: x {} for {rows}×{}, out {} for {rows}×{}",
                x.len(),
                self.inp,
                out.len(),
                self.out
            )));
        }
        if rows == 0 || self.out == 0 {
            return Ok(());
        }
        // Rows padded to whole chunks of 8 (only matrices whose width is not a multiple
        // of 8 need the copy; the Llama's never do).
        let stride = self.inp.div_ceil(8) * 8;
        let padded;
        let x = if stride == self.inp {
            x
        } else {
            let mut p = vec![0f32; rows * stride];
            for (dst, src) in p.chunks_exact_mut(stride).zip(x.chunks_exact(self.inp)) {
                dst[..self.inp].copy_from_slice(src);
            }
            padded = p;
            &padded
        };
        let pool = rayon::current_num_threads().max(1);
        // Column blocks: several per thread, in whole groups of 8 (the widest kernel's),
        // claimed one at a time by whichever thread is free, so that a thread the OS
        // preempts holds up at most the block it is in. The split does not change any
        // result.
        let block = self
            .out
            .div_ceil(BLOCKS_PER_THREAD * pool)
            .div_ceil(8)
            .max(1)
            * 8;
        let n_blocks = self.out.div_ceil(block);
        let dst = SendPtr(out.as_mut_ptr());
        let run = |b: usize| {
            let c0 = b * block;
            let c1 = (c0 + block).min(self.out);
            let dst = &dst;
            // SAFETY: this task writes only columns c0..c1 of `out`, (rows, self.out)
            // row-major, whose length was checked above; block b is claimed by one task
            // only (the counter below), so no other task writes them.
            unsafe { self.columns(x, stride, rows, c0, c1, dst.0, accumulate, isa) }
        };
        let used = crate::threads::region_threads(pool).min(n_blocks);
        if used <= 1 {
            (0..n_blocks).for_each(run);
            if pool > 1 && n_blocks > 1 {
                // Threads were held back: count the region, so that the next probe comes.
                crate::threads::record_region(pool, 1, 0, 0);
            }
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let caller = rayon::current_thread_index();
        let start = Instant::now();
        // When the calling thread found no block left (the rest of the region it waits).
        let caller_done = AtomicU64::new(0);
        (0..used).into_par_iter().for_each(|_| {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= n_blocks {
                    break;
                }
                run(b);
            }
            if rayon::current_thread_index() == caller {
                caller_done.fetch_max(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        });
        // Only a caller that is one of the pool's threads takes part (the model's forward
        // always is); from outside, the whole region is a wait that says nothing.
        if caller.is_some() {
            let wall = start.elapsed().as_nanos() as u64;
            let wait = wall.saturating_sub(caller_done.load(Ordering::Relaxed));
            crate::threads::record_region(pool, used, wall, wait);
            crate::profile::add_handoff(wait);
        }
        Ok(())
    }

    /// Columns `c0..c1` of the product into `out` (row stride `self.out`).
    ///
    /// # Safety
    /// `x` holds `rows` rows of `stride ≥ inp` values (zero beyond `inp`), `out` points to
    /// `rows × self.out` writable values, and no one else touches columns `c0..c1`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns(
        &self,
        x: &[f32],
        stride: usize,
        rows: usize,
        c0: usize,
        c1: usize,
        out: *mut f32,
        accumulate: bool,
        isa: Isa,
    ) {
        let simd = isa != Isa::Scalar;
        #[cfg(target_arch = "x86_64")]
        if simd && rows == 1 && !matches!(self.weights, Weights::F32(_)) {
            // One row: dequantise in registers, straight into the dot products.
            avx2::fused_row(self, x, c0, c1, out, accumulate);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            avx512::columns(self, x, stride, rows, c0, c1, out, accumulate);
            return;
        }
        if let (Weights::F32(w), true) = (&self.weights, stride == self.inp) {
            // f32 rows of whole chunks: the kernel reads the matrix itself.
            let mut r = 0;
            while r < rows {
                let n = row_block(rows - r);
                let xs = &x[r * stride..(r + n) * stride];
                let mut c = c0;
                while c < c1 {
                    let cols = (c1 - c).min(4);
                    let ws = &w[c * stride..(c + cols) * stride];
                    let o = out.add(r * self.out + c);
                    block(xs, ws, stride, n, cols, o, self.out, accumulate, simd);
                    c += cols;
                }
                r += n;
            }
            return;
        }
        // Dequantised weight rows of one group of ≤ 4 columns, each padded to `stride`.
        let mut w = vec![0f32; 4 * stride];
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(4);
            for i in 0..cols {
                let row = &mut w[i * stride..(i + 1) * stride];
                if simd {
                    #[cfg(target_arch = "x86_64")]
                    avx2::dequantize_row(self, c + i, row);
                } else {
                    self.dequantize_row(c + i, row);
                }
            }
            let mut r = 0;
            while r < rows {
                let n = row_block(rows - r);
                let xs = &x[r * stride..(r + n) * stride];
                let o = out.add(r * self.out + c);
                block(xs, &w, stride, n, cols, o, self.out, accumulate, simd);
                r += n;
            }
            c += cols;
        }
    }
}

/// Rows per kernel call when `left` remain: 3 (12 accumulators: with the 3 inputs and a
/// weight vector, all 16 ymm registers), 2 + 2 for the last 4.
fn row_block(left: usize) -> usize {
    match left {
        4 => 2,
        left => left.min(3),
    }
}

/// `n` rows × `cols` columns of dequantised weights `w` (row stride `stride`), by the
/// SIMD kernel when `simd`, else the scalar one.
///
/// # Safety
/// As [`scalar_block`].
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn block(
    xs: &[f32],
    w: &[f32],
    stride: usize,
    n: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    accumulate: bool,
    simd: bool,
) {
    if simd {
        #[cfg(target_arch = "x86_64")]
        avx2::block(xs, w, stride, n, cols, out, out_stride, accumulate);
    } else {
        scalar_block(xs, w, stride, n, cols, out, out_stride, accumulate);
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint column blocks of one buffer from several tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The instruction sets the kernels use; every one computes the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// Plain Rust (`mul_add`).
    Scalar,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX2 + FMA, and AVX-512 F/DQ for the multi-row kernel.
    Avx512,
}

impl Isa {
    /// The best this CPU runs (checked once, at run time); `TILT_NO_AVX512=1` keeps to
    /// AVX2, to compare the two.
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            if !simd_available() {
                Isa::Scalar
            } else if avx512_detected() && std::env::var_os("TILT_NO_AVX512").is_none() {
                Isa::Avx512
            } else {
                Isa::Avx2
            }
        })
    }

    /// Every instruction set this CPU can run, for tests.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut v = vec![Isa::Scalar];
        if simd_available() {
            v.push(Isa::Avx2);
            if avx512_detected() {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

fn avx512_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2 + FMA kernels can run here (checked once, at run time).
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The dot product of the module docs: `w` and `x` of equal length (any), zero-padded to
/// whole chunks of 8, 8 lane accumulators by `mul_add`, then the fixed reduction tree.
/// The reference the SIMD kernels are tested against, bit for bit; inlined into AVX2
/// code (attention) it vectorises to the same instructions.
#[inline(always)]
pub(crate) fn dot_reference(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (w, x) = (&w[..n], &x[..n]);
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for l in 0..8 {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
    }
    // The zero-padded last chunk: lanes past the end add fma(0, 0, acc) = acc.
    for l in 0..wr.len() {
        acc[l] = wr[l].mul_add(xr[l], acc[l]);
    }
    reduce8(&acc)
}

/// [`dot_reference`] of `x` with four vectors at once (four independent chains of fused
/// multiply-adds, which a CPU overlaps); each result is bit-identical to
/// `dot_reference(w[i], x)`.
#[inline]
pub(crate) fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd_available() && x.len().is_multiple_of(8) && w.iter().all(|wi| wi.len() == x.len()) {
        // SAFETY: AVX2 and FMA are present; all five slices have the same length, a
        // multiple of 8.
        return unsafe { avx2::dot4(w, x) };
    }
    w.map(|wi| dot_reference(wi, x))
}

/// `out = Σ_s (p[s] / div) · row_s[offset .. offset + out.len()]` over the rows of the
/// segments in order (each segment rows of `stride` values), every output element one
/// chain of fused multiply-adds in row order from 0: attention's weighted sum of values.
/// With AVX2 the outputs stay in registers, 64 at a time (the same bits).
pub(crate) fn weighted_rows(
    p: &[f32],
    div: f32,
    segments: &[&[f32]],
    stride: usize,
    offset: usize,
    out: &mut [f32],
) {
    let n = out.len();
    debug_assert!(offset + n <= stride);
    #[cfg(target_arch = "x86_64")]
    if simd_available() && n.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA are present; every row read has `stride` ≥ offset + n values.
        unsafe { avx2::weighted_rows(p, div, segments, stride, offset, out) };
        return;
    }
    out.fill(0.0);
    let rows = segments.iter().flat_map(|s| s.chunks_exact(stride));
    for (&ps, row) in p.iter().zip(rows) {
        let c = ps / div;
        for (o, &v) in out.iter_mut().zip(&row[offset..offset + n]) {
            *o = c.mul_add(v, *o);
        }
    }
}

#[inline(always)]
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Scalar kernel for `n` rows × `cols` columns (machines without AVX2/FMA).
///
/// # Safety
/// As [`Linear::columns`]: `out` points at element (0, 0) of the block.
#[allow(clippy::too_many_arguments)]
unsafe fn scalar_block(
    xs: &[f32],
    w: &[f32],
    stride: usize,
    n: usize,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    accumulate: bool,
) {
    for r in 0..n {
        for c in 0..cols {
            let dot = dot_reference(
                &w[c * stride..(c + 1) * stride],
                &xs[r * stride..(r + 1) * stride],
            );
            let o = out.add(r * out_stride + c);
            *o = if accumulate { *o + dot } else { dot };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + FMA kernels. Each is `#[target_feature]`, called only after
    //! [`super::simd_available`] said yes.
    use std::arch::x86_64::*;

    use super::{Linear, Weights, QK};

    /// Row `j` of W dequantised into `dst` (length ≥ inp, multiple of 8); the tail beyond
    /// `inp` is zeroed. Same values as [`Linear::dequantize_row`].
    pub(super) fn dequantize_row(w: &Linear, j: usize, dst: &mut [f32]) {
        debug_assert!(dst.len() >= w.inp && dst.len().is_multiple_of(8));
        // SAFETY: only reached when AVX2 and FMA are present (simd_available); chunk k
        // lands at 8k..8k+8 < dst.len().
        unsafe { dequantize_chunks(w, j, dst.as_mut_ptr(), 8) }
    }

    /// Row `j` of W dequantised chunk by chunk: chunk k (8 weights, zero-padded past
    /// `inp`) is written at `dst + k·chunk_stride`.
    ///
    /// # Safety
    /// AVX2 and FMA are present; `dst` has room for ⌈inp/8⌉ chunks at that stride.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequantize_chunks(
        w: &Linear,
        j: usize,
        dst: *mut f32,
        chunk_stride: usize,
    ) {
        let inp = w.inp;
        match &w.weights {
            Weights::F32(v) => {
                let row = &v[j * inp..(j + 1) * inp];
                for (k, c) in row.chunks(8).enumerate() {
                    let mut chunk = [0f32; 8];
                    chunk[..c.len()].copy_from_slice(c);
                    _mm256_storeu_ps(dst.add(k * chunk_stride), _mm256_loadu_ps(chunk.as_ptr()));
                }
            }
            Weights::Q4_1(v) => {
                let nb = inp / QK;
                let mask = _mm256_set1_epi32(0x0F);
                let ahead = prefetch_base(v, (j + 4 * PREFETCH_GROUPS) * nb);
                for (i, b) in v[j * nb..(j + 1) * nb].iter().enumerate() {
                    prefetch_blocks(ahead, i, 1, nb);
                    let d = _mm256_set1_ps(b.d);
                    let m = _mm256_set1_ps(b.m);
                    let p = b.qs.as_ptr() as *const __m128i;
                    // qs has 16 bytes; each load reads 8 of them.
                    let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p));
                    let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        (p as *const u8).add(8) as *const __m128i
                    ));
                    let q = [
                        _mm256_and_si256(lo, mask),
                        _mm256_and_si256(hi, mask),
                        _mm256_srli_epi32(lo, 4),
                        _mm256_srli_epi32(hi, 4),
                    ];
                    for (k, q) in q.into_iter().enumerate() {
                        let wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m);
                        _mm256_storeu_ps(dst.add((4 * i + k) * chunk_stride), wv);
                    }
                }
            }
            Weights::Q8_0(v) => {
                let nb = inp / QK;
                let ahead = prefetch_base(v, (j + 4 * PREFETCH_GROUPS) * nb);
                for (i, b) in v[j * nb..(j + 1) * nb].iter().enumerate() {
                    prefetch_blocks(ahead, i, 1, nb);
                    let d = _mm256_set1_ps(b.d);
                    let p = b.qs.as_ptr();
                    for k in 0..4 {
                        // qs has 32 bytes; chunk k reads bytes 8k..8k+8.
                        let q =
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i));
                        let wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                        _mm256_storeu_ps(dst.add((4 * i + k) * chunk_stride), wv);
                    }
                }
            }
        }
    }

    /// One row `x` (length inp, a multiple of 32) times columns `c0..c1` of a quantised
    /// W, dequantising each chunk of 8 weights in registers: the same operations, in the
    /// same order, as dequantising into a buffer and calling [`block`].
    ///
    /// # Safety
    /// `out` points to the row's `w.out` outputs; no one else writes columns `c0..c1`.
    pub(super) unsafe fn fused_row(
        w: &Linear,
        x: &[f32],
        c0: usize,
        c1: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        debug_assert!(x.len() >= w.inp && w.inp.is_multiple_of(QK));
        let mut c = c0;
        while c + 4 <= c1 {
            fused::<4>(w, x, c, out, accumulate);
            c += 4;
        }
        while c < c1 {
            fused::<1>(w, x, c, out, accumulate);
            c += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fused<const C: usize>(
        w: &Linear,
        x: &[f32],
        c: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let nb = w.inp / QK;
        let mut acc = [_mm256_setzero_ps(); C];
        let xp = x.as_ptr();
        match &w.weights {
            Weights::Q4_1(v) => {
                let mask = _mm256_set1_epi32(0x0F);
                let ahead = prefetch_base(v, (c + C * PREFETCH_GROUPS) * nb);
                let v = &v[c * nb..(c + C) * nb];
                for b in 0..nb {
                    prefetch_blocks(ahead, b, C, nb);
                    // SAFETY: x has inp = 32·nb values.
                    let xs = load_block(xp.add(b * QK));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let blk = &v[j * nb + b];
                        let d = _mm256_set1_ps(blk.d);
                        let m = _mm256_set1_ps(blk.m);
                        let p = blk.qs.as_ptr();
                        let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
                        let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
                        let q = [
                            _mm256_and_si256(lo, mask),
                            _mm256_and_si256(hi, mask),
                            _mm256_srli_epi32(lo, 4),
                            _mm256_srli_epi32(hi, 4),
                        ];
                        for k in 0..4 {
                            let wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[k]), d, m);
                            *a = _mm256_fmadd_ps(wv, xs[k], *a);
                        }
                    }
                }
            }
            Weights::Q8_0(v) => {
                let ahead = prefetch_base(v, (c + C * PREFETCH_GROUPS) * nb);
                let v = &v[c * nb..(c + C) * nb];
                for b in 0..nb {
                    prefetch_blocks(ahead, b, C, nb);
                    let xs = load_block(xp.add(b * QK));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let blk = &v[j * nb + b];
                        let d = _mm256_set1_ps(blk.d);
                        let p = blk.qs.as_ptr();
                        for k in 0..4 {
                            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                p.add(8 * k) as *const __m128i
                            ));
                            let wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                            *a = _mm256_fmadd_ps(wv, xs[k], *a);
                        }
                    }
                }
            }
            Weights::F32(_) => unreachable!("fused_row is for quantised weights"),
        }
        for (j, &a) in acc.iter().enumerate() {
            let dot = reduce(a);
            let o = out.add(c + j);
            *o = if accumulate { *o + dot } else { dot };
        }
    }

    /// How many groups of 4 weight rows ahead the kernels prefetch: their arithmetic per
    /// cache line is heavy enough that the out-of-order window alone keeps too few lines
    /// in flight to stream at memory speed (measured, one thread, SmolLM2: 29 → 61 tok/s
    /// for one sequence).
    const PREFETCH_GROUPS: usize = 2;

    /// The block `start` of `v`, or `None` past the end (nothing to prefetch).
    #[inline(always)]
    pub(super) fn prefetch_base<T>(v: &[T], start: usize) -> Option<*const T> {
        (start < v.len()).then(|| v[start..].as_ptr())
    }

    /// Prefetch block `b` of each of the `cols` weight rows (`nb` blocks each) at `base`.
    #[inline(always)]
    pub(super) unsafe fn prefetch_blocks<T>(
        base: Option<*const T>,
        b: usize,
        cols: usize,
        nb: usize,
    ) {
        if let Some(p) = base {
            for j in 0..cols {
                // A prefetch never faults, whatever the address.
                _mm_prefetch(p.wrapping_add(j * nb + b) as *const i8, _MM_HINT_T0);
            }
        }
    }

    /// The 32 values at `p` as its 4 chunks of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_block(p: *const f32) -> [__m256; 4] {
        [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)))
    }

    /// `n` (1–3) rows × `cols` (1–4) columns: dispatch to the const-sized kernel.
    ///
    /// # Safety
    /// As `super::scalar_block`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        xs: &[f32],
        w: &[f32],
        stride: usize,
        n: usize,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        macro_rules! go {
            ($r:literal, $c:literal) => {
                kernel::<$r, $c>(xs, w, stride, out, out_stride, accumulate)
            };
        }
        match (n, cols) {
            (1, 1) => go!(1, 1),
            (1, 2) => go!(1, 2),
            (1, 3) => go!(1, 3),
            (1, 4) => go!(1, 4),
            (2, 1) => go!(2, 1),
            (2, 2) => go!(2, 2),
            (2, 3) => go!(2, 3),
            (2, 4) => go!(2, 4),
            (3, 1) => go!(3, 1),
            (3, 2) => go!(3, 2),
            (3, 3) => go!(3, 3),
            _ => go!(3, 4),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const R: usize, const C: usize>(
        xs: &[f32],
        w: &[f32],
        stride: usize,
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        debug_assert!(xs.len() >= R * stride && w.len() >= C * stride && stride.is_multiple_of(8));
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let (xp, wp) = (xs.as_ptr(), w.as_ptr());
        for k in (0..stride).step_by(8) {
            let mut xv = [_mm256_setzero_ps(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                // SAFETY: row r has `stride` values, k + 8 ≤ stride.
                *v = _mm256_loadu_ps(xp.add(r * stride + k));
            }
            for c in 0..C {
                let wv = _mm256_loadu_ps(wp.add(c * stride + k));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv, xv[r], acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, &a) in row.iter().enumerate() {
                let dot = reduce(a);
                let o = out.add(r * out_stride + c);
                *o = if accumulate { *o + dot } else { dot };
            }
        }
    }

    /// Four dot products with `x`, as `super::dot_reference` each.
    ///
    /// # Safety
    /// All slices have `x.len()` values, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let p = w.map(|wi| wi.as_ptr());
        for k in (0..x.len()).step_by(8) {
            let xv = _mm256_loadu_ps(x.as_ptr().add(k));
            for i in 0..4 {
                acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(p[i].add(k)), xv, acc[i]);
            }
        }
        acc.map(|a| reduce(a))
    }

    /// As `super::weighted_rows`, for `out.len()` a multiple of 8: 64 outputs (8 ymm
    /// accumulators) at a time, each over all rows.
    ///
    /// # Safety
    /// AVX2 and FMA are present; each row has `stride ≥ offset + out.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_rows(
        p: &[f32],
        div: f32,
        segments: &[&[f32]],
        stride: usize,
        offset: usize,
        out: &mut [f32],
    ) {
        let coeffs: Vec<__m256> = p.iter().map(|&ps| _mm256_set1_ps(ps / div)).collect();
        for d0 in (0..out.len()).step_by(64) {
            let w = (out.len() - d0).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut s = 0;
            for seg in segments {
                for row in seg.chunks_exact(stride) {
                    let Some(&c) = coeffs.get(s) else { break };
                    let v = row.as_ptr().add(offset + d0);
                    for (i, a) in acc.iter_mut().enumerate().take(w) {
                        *a = _mm256_fmadd_ps(c, _mm256_loadu_ps(v.add(8 * i)), *a);
                    }
                    s += 1;
                }
            }
            for (i, a) in acc.iter().enumerate().take(w) {
                _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * i), *a);
            }
        }
    }

    /// ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)), as `super::reduce8`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn reduce(a: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0b01));
        _mm_cvtss_f32(s1)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The multi-row kernel on AVX-512: one zmm register holds the 8-lane accumulators of
    //! two output columns side by side, so each half runs exactly the chain of fused
    //! multiply-adds of the AVX2 kernel (and of `super::dot_reference`), and the halves
    //! are reduced by the same tree. Twice the lanes per instruction and 32 registers
    //! (6 rows × 8 columns of accumulators) double the arithmetic per cycle.
    use std::arch::x86_64::*;

    use super::avx2::{prefetch_base, prefetch_blocks};
    use super::{Linear, Weights, QK};

    /// Rows per kernel call: 6 (24 accumulators, 4 weight registers, 1 input), or what
    /// is left.
    pub(super) const ROWS: usize = 6;

    /// Columns `c0..c1` for `rows ≥ 1` rows of `x` (row stride `stride`, a multiple of 8,
    /// zero-padded), into `out` (row stride `w.out`).
    ///
    /// # Safety
    /// AVX-512 F/DQ, AVX2 and FMA are present; as `super::Linear::columns`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(
        w: &Linear,
        x: &[f32],
        stride: usize,
        rows: usize,
        c0: usize,
        c1: usize,
        out: *mut f32,
        accumulate: bool,
    ) {
        let chunks = stride / 8;
        // Up to 8 columns as 4 pairs; pair p, chunk k at (p·chunks + k)·16: its two
        // columns' chunks side by side. A missing column of a pair is zero. The buffer is
        // the thread's own, reused (zeroing a fresh one per call cost 1.5% of a step).
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(scratch.len().max(4 * chunks * 16), 0.0);
            columns_in(
                w,
                x,
                stride,
                rows,
                c0,
                c1,
                out,
                accumulate,
                &mut scratch[..4 * chunks * 16],
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    unsafe fn columns_in(
        w: &Linear,
        x: &[f32],
        stride: usize,
        rows: usize,
        c0: usize,
        c1: usize,
        out: *mut f32,
        accumulate: bool,
        scratch: &mut [f32],
    ) {
        let chunks = stride / 8;
        let mut c = c0;
        while c < c1 {
            let cols = (c1 - c).min(8);
            if cols % 2 == 1 {
                scratch.fill(0.0);
            }
            for p in 0..cols.div_ceil(2) {
                let dst = scratch.as_mut_ptr().add(p * chunks * 16);
                let j = c + 2 * p;
                if 2 * p + 1 < cols && !matches!(w.weights, Weights::F32(_)) {
                    dequantize_pair(w, j, dst, chunks);
                } else {
                    super::avx2::dequantize_chunks(w, j, dst, 16);
                    if 2 * p + 1 < cols {
                        super::avx2::dequantize_chunks(w, j + 1, dst.add(8), 16);
                    }
                }
            }
            let mut r = 0;
            while r < rows {
                let n = (rows - r).min(ROWS);
                let xs = &x[r * stride..(r + n) * stride];
                block(
                    xs,
                    scratch,
                    chunks,
                    n,
                    cols,
                    out.add(r * w.out + c),
                    w.out,
                    accumulate,
                );
                r += n;
            }
            c += cols;
        }
    }

    /// Weight rows `j` and `j + 1` (quantised) dequantised 16 at a time into the paired
    /// layout: chunk k of row j, then chunk k of row j + 1, at `dst + 16k`. The same
    /// values as `super::avx2::dequantize_chunks` (one rounding: `fma(q, d, m)`, `q·d`).
    ///
    /// # Safety
    /// AVX-512 F/DQ present; `dst` has room for `chunks` × 16 values; both rows exist.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    unsafe fn dequantize_pair(w: &Linear, j: usize, dst: *mut f32, chunks: usize) {
        let nb = w.inp / QK;
        debug_assert!(chunks == 4 * nb);
        // 128-bit lanes (0, 1) of a then b, and (2, 3) of a then b: [a chunk | b chunk].
        const FIRST: i32 = 0b01_00_01_00;
        const SECOND: i32 = 0b11_10_11_10;
        let store = |k: usize, a: __m512, b: __m512| {
            _mm512_storeu_ps(dst.add(16 * k), _mm512_shuffle_f32x4::<FIRST>(a, b));
            _mm512_storeu_ps(dst.add(16 * (k + 1)), _mm512_shuffle_f32x4::<SECOND>(a, b));
        };
        match &w.weights {
            Weights::Q4_1(v) => {
                let mask = _mm512_set1_epi32(0x0F);
                let (ra, rb) = (&v[j * nb..(j + 1) * nb], &v[(j + 1) * nb..(j + 2) * nb]);
                let ahead = prefetch_base(v, (j + 8) * nb);
                for (i, (a, b)) in ra.iter().zip(rb).enumerate() {
                    prefetch_blocks(ahead, i, 2, nb);
                    let deq = |blk: &super::BlockQ4_1| {
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            blk.qs.as_ptr() as *const __m128i
                        ));
                        let (d, m) = (_mm512_set1_ps(blk.d), _mm512_set1_ps(blk.m));
                        (
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), d, m),
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q)), d, m),
                        )
                    };
                    let ((a01, a23), (b01, b23)) = (deq(a), deq(b));
                    store(4 * i, a01, b01);
                    store(4 * i + 2, a23, b23);
                }
            }
            Weights::Q8_0(v) => {
                let (ra, rb) = (&v[j * nb..(j + 1) * nb], &v[(j + 1) * nb..(j + 2) * nb]);
                let ahead = prefetch_base(v, (j + 8) * nb);
                for (i, (a, b)) in ra.iter().zip(rb).enumerate() {
                    prefetch_blocks(ahead, i, 2, nb);
                    let deq = |blk: &super::BlockQ8_0, half: usize| {
                        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                            blk.qs.as_ptr().add(16 * half) as *const __m128i,
                        ));
                        _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(blk.d))
                    };
                    store(4 * i, deq(a, 0), deq(b, 0));
                    store(4 * i + 2, deq(a, 1), deq(b, 1));
                }
            }
            Weights::F32(_) => unreachable!("dequantize_pair is for quantised weights"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        xs: &[f32],
        w: &[f32],
        chunks: usize,
        n: usize,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        macro_rules! go {
            ($r:literal, $p:literal) => {
                kernel::<$r, $p>(xs, w, chunks, cols, out, out_stride, accumulate)
            };
        }
        let pairs = cols.div_ceil(2);
        match (n, pairs) {
            (1, 1) => go!(1, 1),
            (1, 2) => go!(1, 2),
            (1, 3) => go!(1, 3),
            (1, _) => go!(1, 4),
            (2, 1) => go!(2, 1),
            (2, 2) => go!(2, 2),
            (2, 3) => go!(2, 3),
            (2, _) => go!(2, 4),
            (3, 1) => go!(3, 1),
            (3, 2) => go!(3, 2),
            (3, 3) => go!(3, 3),
            (3, _) => go!(3, 4),
            (4, 1) => go!(4, 1),
            (4, 2) => go!(4, 2),
            (4, 3) => go!(4, 3),
            (4, _) => go!(4, 4),
            (5, 1) => go!(5, 1),
            (5, 2) => go!(5, 2),
            (5, 3) => go!(5, 3),
            (5, _) => go!(5, 4),
            (_, 1) => go!(6, 1),
            (_, 2) => go!(6, 2),
            (_, 3) => go!(6, 3),
            (_, _) => go!(6, 4),
        }
    }

    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize, const P: usize>(
        xs: &[f32],
        w: &[f32],
        chunks: usize,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        let stride = chunks * 8;
        debug_assert!(xs.len() >= R * stride && w.len() >= P * chunks * 16 && cols <= 2 * P);
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let (xp, wp) = (xs.as_ptr(), w.as_ptr());
        for k in 0..chunks {
            let mut wv = [_mm512_setzero_ps(); P];
            for (p, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(wp.add((p * chunks + k) * 16));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // The row's chunk k in both halves.
                let xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(xp.add(r * stride + 8 * k)));
                for (a, &v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(v, xv, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (p, &a) in row.iter().enumerate() {
                let halves = [_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)];
                for (h, half) in halves.into_iter().enumerate() {
                    let c = 2 * p + h;
                    if c < cols {
                        let dot = super::avx2::reduce(half);
                        let o = out.add(r * out_stride + c);
                        *o = if accumulate { *o + dot } else { dot };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_linear(rng: &mut ChaCha8Rng, format: &str, out: usize, inp: usize) -> Linear {
        match format {
            "f32" => {
                let w = (0..out * inp)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                Linear::from_f32(w, out, inp).unwrap()
            }
            "q4_1" | "q8_0" => {
                let q8 = format == "q8_0";
                let size = if q8 { 34 } else { 20 };
                let mut bytes = vec![0u8; out * inp / QK * size];
                for b in bytes.chunks_exact_mut(size) {
                    rng.fill(&mut b[..]);
                    let d = half::f16::from_f32(rng.random::<f32>() * 0.1 + 1e-3).to_bits();
                    b[..2].copy_from_slice(&d.to_le_bytes());
                    if !q8 {
                        let m = half::f16::from_f32(-rng.random::<f32>()).to_bits();
                        b[2..4].copy_from_slice(&m.to_le_bytes());
                    }
                }
                Linear::from_ggml_bytes(&bytes, q8, out, inp).unwrap()
            }
            _ => unreachable!(),
        }
    }

    fn product(
        w: &Linear,
        x: &[f32],
        rows: usize,
        init: f32,
        accumulate: bool,
        threads: usize,
        isa: Isa,
    ) -> Vec<f32> {
        let mut out = vec![init; rows * w.out];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| w.matmul_with(x, rows, &mut out, accumulate, isa))
            .unwrap();
        out
    }

    /// The kernels of every instruction set this CPU has against the scalar definition,
    /// bit for bit, for every format, odd shapes (more columns than one kernel call
    /// takes), 1–14 rows, 1–3 threads, with and without accumulation; and the definition
    /// against an f64 dot product of the dequantised weights.
    #[test]
    fn kernels_equal_the_reference_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (format, inps) in [
            ("f32", vec![5usize, 8, 13, 64]),
            ("q4_1", vec![32, 96]),
            ("q8_0", vec![32, 64]),
        ] {
            for inp in inps {
                for out in [1usize, 3, 4, 9, 17, 37] {
                    let w = random_linear(&mut rng, format, out, inp);
                    for rows in 1..=14 {
                        let x: Vec<f32> = (0..rows * inp)
                            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                            .collect();
                        for (accumulate, isa) in [false, true]
                            .into_iter()
                            .flat_map(|a| Isa::available().into_iter().map(move |i| (a, i)))
                        {
                            let got = product(&w, &x, rows, 0.25, accumulate, 1 + rows % 3, isa);
                            let mut wrow = vec![0f32; inp];
                            for r in 0..rows {
                                for c in 0..out {
                                    w.dequantize_row(c, &mut wrow);
                                    let xr = &x[r * inp..(r + 1) * inp];
                                    let dot = dot_reference(&wrow, xr);
                                    let want = if accumulate { 0.25 + dot } else { dot };
                                    let g = got[r * out + c];
                                    assert_eq!(g.to_bits(), want.to_bits(), "{isa:?} {format} {out}×{inp}, {rows} rows, ({r},{c}): {g} vs {want}");
                                    let exact: f64 = wrow
                                        .iter()
                                        .zip(xr)
                                        .map(|(a, b)| *a as f64 * *b as f64)
                                        .sum();
                                    assert!(
                                        (dot as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                                        "{dot} vs {exact}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The dequantised values are candle's own (GGML's `dequantize_row_q4_1/q8_0`).
    #[test]
    fn dequantisation_matches_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (out, inp) = (6, 64);
        let data: Vec<f32> = (0..out * inp)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect();
        let t = Tensor::from_slice(&data, (out, inp), &Device::Cpu).unwrap();
        for (dtype, q8) in [(GgmlDType::Q4_1, false), (GgmlDType::Q8_0, true)] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let theirs: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours = Linear::from_ggml_bytes(&q.data().unwrap(), q8, out, inp).unwrap();
            let mut row = vec![0f32; inp];
            let mut simd_row = vec![0f32; inp];
            for j in 0..out {
                ours.dequantize_row(j, &mut row);
                assert_eq!(row, theirs[j * inp..(j + 1) * inp], "{dtype:?} row {j}");
                if simd_available() {
                    #[cfg(target_arch = "x86_64")]
                    avx2::dequantize_row(&ours, j, &mut simd_row);
                    assert_eq!(simd_row, row, "{dtype:?} row {j} (AVX2)");
                }
            }
        }
    }

    #[test]
    fn four_dot_products_at_once_equal_four_single_ones() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for n in [1usize, 7, 8, 13, 64, 67] {
            let v: Vec<Vec<f32>> = (0..5)
                .map(|_| (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect())
                .collect();
            let got = dot4([&v[0], &v[1], &v[2], &v[3]], &v[4]);
            for i in 0..4 {
                assert_eq!(
                    got[i].to_bits(),
                    dot_reference(&v[i], &v[4]).to_bits(),
                    "n {n}, {i}"
                );
            }
        }
    }

    #[test]
    fn weighted_rows_equal_the_scalar_chain() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let stride = 200;
        let a: Vec<f32> = (0..7 * stride).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..5 * stride).map(|_| rng.random::<f32>() - 0.5).collect();
        let p: Vec<f32> = (0..12).map(|_| rng.random::<f32>()).collect();
        for (offset, n) in [(0usize, 64usize), (8, 136), (64, 8), (3, 5)] {
            let mut got = vec![7f32; n];
            weighted_rows(&p, 2.5, &[&a, &b], stride, offset, &mut got);
            let rows: Vec<&[f32]> = a
                .chunks_exact(stride)
                .chain(b.chunks_exact(stride))
                .collect();
            for (i, g) in got.iter().enumerate() {
                let mut want = 0f32;
                for (&ps, row) in p.iter().zip(&rows) {
                    want = (ps / 2.5).mul_add(row[offset + i], want);
                }
                assert_eq!(g.to_bits(), want.to_bits(), "offset {offset}, n {n}, {i}");
            }
        }
    }

    #[test]
    fn stacking_keeps_a_shared_format_and_falls_back_to_f32() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = random_linear(&mut rng, "q4_1", 3, 64);
        let b = random_linear(&mut rng, "q4_1", 2, 64);
        let c = random_linear(&mut rng, "q8_0", 2, 64);
        let same = Linear::stack(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!((same.format(), same.out()), ("Q4_1", 5));
        let mixed = Linear::stack(vec![a.clone(), c.clone()]).unwrap();
        assert_eq!((mixed.format(), mixed.out()), ("f32", 5));
        let (mut r1, mut r2) = (vec![0f32; 64], vec![0f32; 64]);
        for (j, (part, pj)) in [(&a, 0), (&a, 1), (&a, 2), (&c, 0), (&c, 1)]
            .into_iter()
            .enumerate()
        {
            mixed.dequantize_row(j, &mut r1);
            part.dequantize_row(pj, &mut r2);
            assert_eq!(r1, r2);
        }
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(Linear::from_ggml_bytes(&[0u8; 19], false, 1, 32).is_err());
        assert!(Linear::from_ggml_bytes(&[0u8; 20], false, 1, 16).is_err());
        let mut b = [0u8; 34];
        b[..2].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
        let e = Linear::from_ggml_bytes(&b, true, 1, 32).unwrap_err();
        assert!(e.contains("non-finite"), "{e}");
    }
}
