//! How many CPU threads the models use.
//!
//! Each [`crate::Llama`] owns a rayon thread pool of its own, sized when the model is
//! loaded, and runs its matrix products (split over output columns) and its per-sequence
//! attention inside that pool. A process-wide pool would be simpler, but
//! rayon's global pool can be sized only once, and the thread count must be a user
//! setting: on a shared machine two threads that wait on a busy core are far slower than
//! one (measured: 20.8 → 541 ms per token with 0.7 of a core taken), so the CLI's
//! `--threads` must win over whatever the environment says.
//!
//! The default, in order: the value given to [`set_num_threads`], the environment variable
//! `TILT_NUM_THREADS`, then `RAYON_NUM_THREADS`, then the number of available cores.
//! Results do not depend on the thread count: the matrix products split work over output
//! columns, never over the summed dimension, and attention is computed one row per task.

use std::sync::atomic::{AtomicUsize, Ordering};

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Set the number of threads that models loaded from now on use (0 restores the default).
pub fn set_num_threads(n: usize) {
    NUM_THREADS.store(n, Ordering::Relaxed);
}

/// The number of threads a model loaded now would use (at least 1).
pub fn num_threads() -> usize {
    let set = NUM_THREADS.load(Ordering::Relaxed);
    if set > 0 {
        return set;
    }
    for var in ["TILT_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return n;
        }
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_setting_wins_and_zero_restores_default() {
        set_num_threads(3);
        assert_eq!(num_threads(), 3);
        set_num_threads(0);
        assert!(num_threads() >= 1);
    }
}
