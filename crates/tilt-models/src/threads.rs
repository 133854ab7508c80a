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
//!
//! # Threads that adapt to a busy machine
//!
//! A parallel region ends when its slowest thread does. When another process keeps one of
//! the cores busy, the scheduler preempts one of the pool's threads in the middle of its
//! share and the others wait for it. Measured on 2 cores beside one busy loop, with each
//! product's blocks dealt out in advance, 2 threads decoded 16 sequences at 174 tok/s where
//! 1 thread decoded 217 (quiet: 370 and 214). Blocks claimed one at a time from a counter
//! (`matmul.rs`) brought 2 threads to 201, and holding a thread back while the others
//! wait to 207 (`cargo bench -p tilt-models --bench contention`). So the matrix products
//! measure, in each parallel region, how long the calling thread waits for the others once
//! no work is left for it, and the model adapts how many of its pool's threads a region
//! uses ([`region_threads`]): over a window of [`WINDOW`] regions, a waiting share above
//! [`HIGH_WAIT`] holds one thread back; while threads are held back, every [`PROBE_EVERY`]
//! windows one window runs with one more, which stays if its waiting share is below
//! [`LOW_WAIT`]. This is "thread counts that adapt" rather than a spin-then-park pool:
//! rayon's workers already spin briefly, then park, so a hand-off is cheap (0.1 µs to a
//! spinning worker, measured by the decode bench); what a busy core costs is a preempted
//! thread holding work, which no waiting strategy recovers.
//!
//! The choice changes no result (each output element is computed wholly by one task, in
//! one fixed order, whatever the split). `TILT_ADAPT_THREADS=0` (or
//! [`set_adaptive`]`(false)`) turns it off.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Regions per decision window.
pub const WINDOW: u32 = 64;
/// Waiting share of a window above which one thread is held back.
pub const HIGH_WAIT: f64 = 0.25;
/// Waiting share of a probe window below which the extra thread stays.
pub const LOW_WAIT: f64 = 0.10;
/// Windows between probes while threads are held back.
pub const PROBE_EVERY: u32 = 16;

/// 0: not yet read from the environment; 1: on; 2: off.
static ADAPT: AtomicU8 = AtomicU8::new(0);
/// Threads held back from every region (the fast path reads only this).
static HELD_BACK: AtomicUsize = AtomicUsize::new(0);

struct Window {
    wall_ns: u64,
    wait_ns: u64,
    regions: u32,
    /// Windows since threads were last held back or probed.
    quiet_windows: u32,
    /// Whether this window is a probe (one thread fewer held back than before it).
    probing: bool,
}

static WINDOW_STATE: Mutex<Window> = Mutex::new(Window {
    wall_ns: 0,
    wait_ns: 0,
    regions: 0,
    quiet_windows: 0,
    probing: false,
});

/// Turn the adaptation on or off (process-wide; off also releases every held-back thread).
pub fn set_adaptive(on: bool) {
    ADAPT.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    if !on {
        HELD_BACK.store(0, Ordering::Relaxed);
    }
}

/// Whether the adaptation is on (default: on unless `TILT_ADAPT_THREADS=0`).
pub fn adaptive() -> bool {
    match ADAPT.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("TILT_ADAPT_THREADS").map_or(true, |v| v.trim() != "0");
            ADAPT.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Threads held back from parallel regions now (0 on a quiet machine).
pub fn held_back() -> usize {
    HELD_BACK.load(Ordering::Relaxed)
}

/// How many threads of a pool of `pool` a parallel region should use now (at least 1).
pub(crate) fn region_threads(pool: usize) -> usize {
    if pool <= 1 || !adaptive() {
        return pool.max(1);
    }
    pool.saturating_sub(HELD_BACK.load(Ordering::Relaxed))
        .max(1)
}

/// Record one parallel region of a pool of `pool` threads that used `used` of them: its wall
/// time and how long the calling thread waited for the others with no work left for it.
pub(crate) fn record_region(pool: usize, used: usize, wall_ns: u64, wait_ns: u64) {
    if !adaptive() {
        return;
    }
    let Ok(mut w) = WINDOW_STATE.lock() else {
        return;
    };
    w.wall_ns += wall_ns;
    w.wait_ns += wait_ns.min(wall_ns);
    w.regions += 1;
    if w.regions < WINDOW {
        return;
    }
    let held = HELD_BACK.load(Ordering::Relaxed);
    HELD_BACK.store(w.decide(held, used, pool), Ordering::Relaxed);
}

impl Window {
    /// At the end of a window: the threads to hold back next, given `held` now and the
    /// window's last region's `used` threads of `pool`; starts the next window.
    fn decide(&mut self, held: usize, used: usize, pool: usize) -> usize {
        let share = self.wait_ns as f64 / self.wall_ns.max(1) as f64;
        let mut next = held;
        if self.probing {
            // The probe window ran with one thread more: keep it only if nobody waited.
            self.probing = false;
            if share >= LOW_WAIT {
                next = held + 1;
            }
            self.quiet_windows = 0;
        } else if used > 1 && share > HIGH_WAIT {
            next = held + 1;
            self.quiet_windows = 0;
        } else if held > 0 {
            self.quiet_windows += 1;
            if self.quiet_windows >= PROBE_EVERY {
                next = held - 1;
                self.probing = true;
                self.quiet_windows = 0;
            }
        }
        self.wall_ns = 0;
        self.wait_ns = 0;
        self.regions = 0;
        next.min(pool.saturating_sub(1))
    }
}

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

    fn window(wait_share: f64, probing: bool, quiet_windows: u32) -> Window {
        Window {
            wall_ns: 1_000_000,
            wait_ns: (wait_share * 1e6) as u64,
            regions: WINDOW,
            quiet_windows,
            probing,
        }
    }

    #[test]
    fn waiting_holds_a_thread_back_and_a_quiet_probe_returns_it() {
        // Quiet: nothing changes.
        assert_eq!(window(0.02, false, 0).decide(0, 2, 2), 0);
        // Waiting above the high mark holds one back, never the last thread.
        assert_eq!(window(0.40, false, 0).decide(0, 2, 2), 1);
        assert_eq!(window(0.40, false, 0).decide(1, 2, 2), 1);
        assert_eq!(window(0.40, false, 0).decide(1, 3, 4), 2);
        // Held back: quiet windows count up to a probe.
        let mut w = window(0.0, false, PROBE_EVERY - 2);
        assert_eq!(w.decide(1, 1, 2), 1);
        assert_eq!((w.quiet_windows, w.probing), (PROBE_EVERY - 1, false));
        w.regions = WINDOW;
        assert_eq!(w.decide(1, 1, 2), 0);
        assert!(w.probing);
        // A probe that waited goes back; one that did not keeps the thread.
        assert_eq!(window(0.30, true, 0).decide(0, 2, 2), 1);
        assert_eq!(window(0.05, true, 0).decide(0, 2, 2), 0);
        // A window starts empty.
        let mut w = window(0.5, false, 0);
        w.decide(0, 2, 2);
        assert_eq!((w.wall_ns, w.wait_ns, w.regions), (0, 0, 0));
    }

    #[test]
    fn explicit_setting_wins_and_zero_restores_default() {
        set_num_threads(3);
        assert_eq!(num_threads(), 3);
        set_num_threads(0);
        assert!(num_threads() >= 1);
    }
}
