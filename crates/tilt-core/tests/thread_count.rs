//! Results do not depend on the number of threads: bit-identical at 1 and 4 rayon threads,
//! on inputs large enough that every parallel path runs (the radix sort above 2^16
//! outcomes, several grouping spans of 2^16 sorted positions, several sum chunks of 2^14
//! levels).

use rayon::ThreadPoolBuilder;
use tilt_core::best_of_n::{best_of_n, worst_of_n, BestOfN};
use tilt_core::levels::Levels;
use tilt_core::tilt::{tilt_by_beta, Tilt};
use tilt_core::RewardDistribution;

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bon_bits(b: &BestOfN) -> (Vec<u64>, [u64; 4]) {
    (
        bits(&b.pmf),
        [b.kl, b.kl_estimate, b.expected_reward, b.win_rate].map(f64::to_bits),
    )
}

fn tilt_bits(t: &Tilt) -> (Vec<u64>, [u64; 4]) {
    (
        bits(&t.pmf),
        [t.kl, t.expected_reward, t.win_rate, t.log_partition].map(f64::to_bits),
    )
}

#[test]
fn levels_best_of_n_and_tilt_are_bit_identical_at_1_and_4_threads() {
    let n = 300_017;
    let mut state = 5u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    // All distinct, heavily tied (1000 levels), and three levels.
    for distinct in [0.0, 1000.0, 3.0] {
        let rewards: Vec<f64> = (0..n)
            .map(|_| {
                if distinct == 0.0 {
                    next() * 2.0 - 1.0
                } else {
                    (next() * distinct).floor() - distinct / 2.0
                }
            })
            .collect();
        let raw: Vec<f64> = (0..n).map(|_| next() + 1e-3).collect();
        let d = RewardDistribution::new_normalized(raw, rewards).unwrap();
        let run = || {
            let lv = Levels::new(&d).unwrap();
            let level_bits = (
                bits(lv.rewards()),
                bits(lv.masses()),
                bits(lv.below()),
                bits(lv.above()),
                lv.level_of().to_vec(),
            );
            let b = bon_bits(&best_of_n(&d, 1000).unwrap());
            let big = bon_bits(&best_of_n(&d, 1_000_000_000_000_000).unwrap());
            let w = bon_bits(&worst_of_n(&d, 7).unwrap());
            let t = tilt_bits(&tilt_by_beta(&d, 0.3).unwrap());
            (level_bits, b, big, w, t)
        };
        let one = in_pool(1, run);
        let four = in_pool(4, run);
        assert!(one.0 .0.len() > 1, "levels were built");
        assert_eq!(one.0, four.0, "levels, distinct = {distinct}");
        assert_eq!(one.1, four.1, "best-of-1000, distinct = {distinct}");
        assert_eq!(one.2, four.2, "best-of-10^15, distinct = {distinct}");
        assert_eq!(one.3, four.3, "worst-of-7, distinct = {distinct}");
        assert_eq!(one.4, four.4, "tilt, distinct = {distinct}");
    }
}
