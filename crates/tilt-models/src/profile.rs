//! Where a forward's time goes: wall time per phase of [`crate::Llama::forward`], summed
//! over calls while profiling is on (off by default; the benches turn it on).
//!
//! Each phase is timed around the whole operation as the caller waits for it, so a
//! parallel phase's figure includes handing its work to the pool's threads and waiting for
//! the slowest of them. The matrix products' figures include dequantising the weights,
//! which happens in registers inside the product (see `matmul.rs`) and so cannot be timed
//! apart. When off, a phase costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The phases of a forward, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Embedding rows and rotary angles.
    Embed,
    /// The RMSNorms before attention and the MLP.
    Norm,
    /// The fused query/key/value product.
    QkvMatmul,
    /// Rotary embeddings of queries and keys, and appending keys and values to the caches.
    RopeAndCache,
    /// Attention over each row's own sequence.
    Attention,
    /// The attention output product (with the residual add).
    OutMatmul,
    /// The fused gate/up product of the MLP.
    GateUpMatmul,
    /// SiLU(gate) ⊙ up.
    Silu,
    /// The MLP's down product (with the residual add).
    DownMatmul,
    /// The final norm and the output layer's product (the vocabulary logits).
    LmHead,
    /// The log-softmax over the vocabulary.
    LogSoftmax,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 11] = [
        Phase::Embed,
        Phase::Norm,
        Phase::QkvMatmul,
        Phase::RopeAndCache,
        Phase::Attention,
        Phase::OutMatmul,
        Phase::GateUpMatmul,
        Phase::Silu,
        Phase::DownMatmul,
        Phase::LmHead,
        Phase::LogSoftmax,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Embed => "embedding + rotary angles",
            Phase::Norm => "RMSNorm",
            Phase::QkvMatmul => "matmul qkv",
            Phase::RopeAndCache => "rotary + KV append",
            Phase::Attention => "attention",
            Phase::OutMatmul => "matmul attn out",
            Phase::GateUpMatmul => "matmul gate/up",
            Phase::Silu => "SiLU ⊙ up",
            Phase::DownMatmul => "matmul down",
            Phase::LmHead => "output layer (matmul)",
            Phase::LogSoftmax => "log-softmax",
        }
    }

    /// Whether the phase is a matrix product (weights read from memory).
    pub fn is_matmul(self) -> bool {
        matches!(
            self,
            Phase::QkvMatmul
                | Phase::OutMatmul
                | Phase::GateUpMatmul
                | Phase::DownMatmul
                | Phase::LmHead
        )
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Phase::ALL.len()] = [const { AtomicU64::new(0) }; Phase::ALL.len()];
static REGIONS: AtomicU64 = AtomicU64::new(0);
static WAIT: AtomicU64 = AtomicU64::new(0);

/// Turn profiling on or off (process-wide).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether profiling is on.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// What was measured since the last [`take`].
#[derive(Debug, Clone)]
pub struct Taken {
    /// Wall time per phase.
    pub phases: Vec<(Phase, Duration)>,
    /// Parallel regions (hand-offs to the pool).
    pub regions: u64,
    /// Time the calling thread spent in matrix products waiting for the pool's other
    /// threads with no block left for it (inside the matmul phases).
    pub wait: Duration,
}

/// What was measured since the last call; resets the counters.
pub fn take() -> Taken {
    let phases = Phase::ALL
        .iter()
        .map(|&p| {
            let ns = NANOS[p as usize].swap(0, Ordering::Relaxed);
            (p, Duration::from_nanos(ns))
        })
        .collect();
    Taken {
        phases,
        regions: REGIONS.swap(0, Ordering::Relaxed),
        wait: Duration::from_nanos(WAIT.swap(0, Ordering::Relaxed)),
    }
}

/// Count one matrix product that handed work to the pool, its caller having waited
/// `wait_ns` for the other threads (a product run on the caller alone counts nothing).
#[inline]
pub(crate) fn add_handoff(wait_ns: u64) {
    if ON.load(Ordering::Relaxed) {
        REGIONS.fetch_add(1, Ordering::Relaxed);
        WAIT.fetch_add(wait_ns, Ordering::Relaxed);
    }
}

/// Time `f` as `phase` when profiling is on; count it as `regions` hand-offs to the pool
/// (the matrix products count their own, see [`add_handoff`]).
#[inline]
pub(crate) fn time<T>(phase: Phase, regions: u64, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let ns = t.elapsed().as_nanos() as u64;
    NANOS[phase as usize].fetch_add(ns, Ordering::Relaxed);
    REGIONS.fetch_add(regions, Ordering::Relaxed);
    out
}
