//! The theorems of the finite-support theory, as properties on random inputs.

use proptest::prelude::*;
use tilt_core::best_of_n::{best_of_n, kl_estimate_per_draw, worst_of_n};
use tilt_core::bounds::{
    bon_chi2_bound, bon_hellinger_squared_bound, bon_kl_bound, bon_renyi_bound, bon_tv_bound,
    optimal_sub_gaussian_proxy,
};
use tilt_core::divergence::{chi_squared, hellinger_squared, kl, renyi, total_variation};
use tilt_core::levels::Levels;
use tilt_core::tilt::{max_kl, solve_lambda_for_kl, tilt_by_lambda, tilt_levels};
use tilt_core::RewardDistribution;

/// Random (p, r) with up to 8 outcomes; rewards drawn from a few values so ties are common.
fn dist() -> impl Strategy<Value = RewardDistribution> {
    (1usize..=8)
        .prop_flat_map(|k| {
            (
                prop::collection::vec(0.0f64..1.0, k),
                prop::collection::vec(-3i32..4, k),
                prop::collection::vec(any::<bool>(), k),
            )
        })
        .prop_map(|(w, r, zero)| {
            let mut w: Vec<f64> = w
                .iter()
                .zip(&zero)
                .map(|(x, z)| if *z && x < &0.3 { 0.0 } else { x + 1e-3 })
                .collect();
            if w.iter().all(|&x| x == 0.0) {
                w[0] = 1.0;
            }
            RewardDistribution::new_normalized(w, r.iter().map(|&x| x as f64 * 0.7).collect())
                .unwrap()
        })
}

fn sums_to_one(v: &[f64]) -> bool {
    (v.iter().sum::<f64>() - 1.0).abs() < 1e-12
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn best_of_n_theorems(d in dist(), n in 1u64..300) {
        let b = best_of_n(&d, n).unwrap();
        prop_assert!(sums_to_one(&b.pmf));
        prop_assert!(b.pmf.iter().all(|&x| x >= 0.0));
        // 2401.01879 Thm 3.1 and 5.3.
        prop_assert!(b.kl <= bon_kl_bound(n).unwrap() + 1e-12, "KL {} > bound", b.kl);
        prop_assert!(b.win_rate <= n as f64 / (n as f64 + 1.0) + 1e-12);
        // The exact KL agrees with the generic divergence of the pmf.
        let k = kl(&b.pmf, d.probs()).unwrap();
        prop_assert!((k - b.kl).abs() <= 1e-10 * (1.0 + k));
        // Every f-divergence bound of 2406.05883 (docs/theory.md §4).
        prop_assert!(chi_squared(&b.pmf, d.probs()).unwrap() <= bon_chi2_bound(n).unwrap() * (1.0 + 1e-9) + 1e-12);
        prop_assert!(total_variation(&b.pmf, d.probs()).unwrap() <= bon_tv_bound(n).unwrap() + 1e-12);
        prop_assert!(hellinger_squared(&b.pmf, d.probs()).unwrap() <= bon_hellinger_squared_bound(n).unwrap() + 1e-12);
        for alpha in [0.5, 2.0, 5.0, f64::INFINITY] {
            prop_assert!(renyi(&b.pmf, d.probs(), alpha).unwrap() <= bon_renyi_bound(n, alpha).unwrap() + 1e-10);
        }
        // Best-of-n never loses reward; the estimator lies in [0, bound].
        prop_assert!(b.expected_reward >= d.mean_reward() - 1e-12);
        prop_assert!(b.kl_estimate >= -1e-15 && b.kl_estimate <= bon_kl_bound(n).unwrap() + 1e-12);
    }

    #[test]
    fn worst_of_n_mirrors_best_of_n(d in dist(), n in 1u64..100) {
        let w = worst_of_n(&d, n).unwrap();
        let neg = RewardDistribution::new(d.probs().to_vec(), d.rewards().iter().map(|r| -r).collect()).unwrap();
        let b = best_of_n(&neg, n).unwrap();
        for (x, y) in w.pmf.iter().zip(&b.pmf) {
            prop_assert!((x - y).abs() < 1e-14);
        }
        prop_assert!((w.win_rate - (1.0 - b.win_rate)).abs() < 1e-12);
        prop_assert!(w.win_rate >= 1.0 / (n as f64 + 1.0) - 1e-12);
    }

    #[test]
    fn tilt_kl_is_decreasing_in_beta(d in dist(), b1 in 0.05f64..20.0, b2 in 0.05f64..20.0) {
        let (lo, hi) = if b1 < b2 { (b1, b2) } else { (b2, b1) };
        let t_lo = tilt_by_lambda(&d, 1.0 / lo).unwrap();
        let t_hi = tilt_by_lambda(&d, 1.0 / hi).unwrap();
        prop_assert!(sums_to_one(&t_lo.pmf) && sums_to_one(&t_hi.pmf));
        prop_assert!(t_lo.kl >= t_hi.kl - 1e-14);
        prop_assert!(t_lo.expected_reward >= t_hi.expected_reward - 1e-12);
        let levels = Levels::new(&d).unwrap();
        prop_assert!(t_lo.kl <= max_kl(&levels) + 1e-12);
        // KL = λE r − Λ (docs/theory.md §1) and the generic KL agree.
        let lam = 1.0 / lo;
        let alt = lam * t_lo.expected_reward - t_lo.log_partition;
        prop_assert!((alt - t_lo.kl).abs() < 1e-9 * (1.0 + lam));
        prop_assert!((kl(&t_lo.pmf, d.probs()).unwrap() - t_lo.kl).abs() < 1e-11);
    }

    #[test]
    fn tilt_beats_best_of_n_at_equal_kl(d in dist(), n in 1u64..500) {
        let levels = Levels::new(&d).unwrap();
        let b = best_of_n(&d, n).unwrap();
        let lambda = if b.kl >= max_kl(&levels) { f64::INFINITY } else { solve_lambda_for_kl(&levels, b.kl).unwrap() };
        let t = tilt_levels(&levels, lambda).unwrap();
        prop_assert!((t.kl - b.kl).abs() <= 1e-9 * (1.0 + b.kl));
        prop_assert!(b.expected_reward <= t.expected_reward + 1e-9, "bon {} > tilt {}", b.expected_reward, t.expected_reward);
    }

    #[test]
    fn sub_gaussian_bound_holds_for_the_tilt(d in dist(), lambda in 0.0f64..10.0) {
        let s = optimal_sub_gaussian_proxy(&d).unwrap();
        prop_assert!(s.optimal >= s.variance * (1.0 - 1e-9) - 1e-15);
        prop_assert!(s.optimal <= s.hoeffding * (1.0 + 1e-9) + 1e-15);
        prop_assert!(s.upper >= s.variance * (1.0 - 1e-9) - 1e-15);
        prop_assert!(s.upper <= s.optimal * (1.0 + 1e-12) + 1e-15);
        // The bound holds with the (smaller) one-sided proxy: its proof needs λ > 0 only.
        let t = tilt_by_lambda(&d, lambda).unwrap();
        let gain = t.expected_reward - d.mean_reward();
        prop_assert!(gain <= (2.0 * s.upper * t.kl).sqrt() + 1e-9);
    }

    #[test]
    fn kl_estimator_is_between_zero_and_the_bound(eps in 0.0f64..=1.0, n in 1u64..100_000) {
        let v = kl_estimate_per_draw(eps, n).unwrap();
        prop_assert!(v >= -1e-12 && v <= bon_kl_bound(n).unwrap() + 1e-12);
    }
}
