//! The memoryless model (arXiv 2404.01730): closed forms, brute-force enumeration, the
//! large-length limits, and bad input.

use proptest::prelude::*;
use std::collections::BTreeMap;
use tilt_core::lattice::{sum_pmf, ConvolutionMethod};
use tilt_core::memoryless::{kl_log, MemorylessModel};
use tilt_core::{RewardDistribution, TiltError};

fn model(probs: &[f64], rewards: &[f64]) -> MemorylessModel {
    MemorylessModel::new(
        &RewardDistribution::new(probs.to_vec(), rewards.to_vec()).unwrap(),
        None,
    )
    .unwrap()
}

fn bern_kl(x: f64, q: f64) -> f64 {
    let t = |a: f64, b: f64| if a == 0.0 { 0.0 } else { a * (a / b).ln() };
    t(x, q) + t(1.0 - x, 1.0 - q)
}

#[test]
fn bernoulli_rate_function_is_binary_relative_entropy() {
    let q = 0.3;
    let m = model(&[1.0 - q, q], &[0.0, 1.0]);
    for x in [0.01, 0.1, 0.3, 0.5, 0.77, 0.99] {
        let got = m.rate_function(x).unwrap();
        assert!((got - bern_kl(x, q)).abs() < 1e-12, "x={x}: {got}");
    }
    assert!((m.rate_function(1.0).unwrap() + q.ln()).abs() < 1e-15);
    assert!((m.rate_function(0.0).unwrap() + (1.0 - q).ln()).abs() < 1e-15);
    assert_eq!(m.rate_function(1.5).unwrap(), f64::INFINITY);
    // Λ(λ) = log(1 − q + q e^λ), KL of the tilt at λ = 1 for q = 1/2: 0.1109441 (docs/theory.md §1).
    for l in [-3.0f64, 0.5, 4.0] {
        let exact = (1.0 - q + q * l.exp()).ln();
        assert!((m.cumulants(l).log_mgf - exact).abs() < 1e-14);
    }
    let half = model(&[0.5, 0.5], &[0.0, 1.0]);
    assert!((half.tilt_kl(1.0) - 0.110_944_1).abs() < 1e-7);
    // x*(Δ): KL(Bern(x*)‖Bern(q)) = Δ with x* > q.
    for delta in [0.01, 0.2, 1.0] {
        let xs = m.x_star(delta).unwrap();
        assert!(xs > q);
        assert!((bern_kl(xs, q) - delta).abs() < 1e-12, "Δ={delta}");
    }
}

#[test]
fn binomial_lattice_has_scaled_binary_rate() {
    // q = Binomial(6, 1/2) on {0..6}: Λ(λ) = 6·log((1+e^λ)/2), I(x) = 6·KL(Bern(x/6)‖Bern(½)).
    let lnf = tilt_core::numerics::ln_factorials(6);
    let probs: Vec<f64> = (0..=6)
        .map(|k| (lnf[6] - lnf[k] - lnf[6 - k] - 6.0 * 2f64.ln()).exp())
        .collect();
    let rewards: Vec<f64> = (0..=6).map(|k| k as f64).collect();
    let m = model(&probs, &rewards);
    for x in [0.5, 2.0, 3.0, 4.5, 5.9] {
        assert!((m.rate_function(x).unwrap() - 6.0 * bern_kl(x / 6.0, 0.5)).abs() < 1e-12);
    }
    for l in [-2.0f64, 0.7, 3.0] {
        let exact = 6.0 * ((1.0 + l.exp()) / 2.0).ln();
        assert!((m.cumulants(l).log_mgf - exact).abs() < 1e-13);
    }
}

/// All sequences of length `l` over the outcomes of (probs, rewards): the law of S.
fn enumerate_sum_law(probs: &[f64], rewards: &[i64], l: usize) -> BTreeMap<i64, f64> {
    let mut law = BTreeMap::new();
    let k = probs.len();
    let mut idx = vec![0usize; l];
    loop {
        let p: f64 = idx.iter().map(|&i| probs[i]).product();
        let s: i64 = idx.iter().map(|&i| rewards[i]).sum();
        *law.entry(s).or_insert(0.0) += p;
        let mut pos = 0;
        loop {
            if pos == l {
                return law;
            }
            idx[pos] += 1;
            if idx[pos] < k {
                break;
            }
            idx[pos] = 0;
            pos += 1;
        }
    }
}

#[test]
fn sum_law_matches_enumeration_under_any_accuracy_tilt() {
    let probs = [0.5, 0.3, 0.15, 0.05];
    let rewards = [0i64, 1, 3, 4];
    let rf: Vec<f64> = rewards.iter().map(|&r| r as f64).collect();
    let m = model(&probs, &rf);
    let exact = enumerate_sum_law(&probs, &rewards, 6);
    for tilt in [0.0, 1.3, -0.8, 4.0] {
        for method in [ConvolutionMethod::Direct, ConvolutionMethod::Fft] {
            let law = m.sum_law(6, tilt, Some(method)).unwrap();
            for (j, lp) in law.log_pmf.iter().enumerate() {
                let s = law.value(j).round() as i64;
                let e = exact.get(&s).copied().unwrap_or(0.0);
                if method == ConvolutionMethod::Direct {
                    if e == 0.0 {
                        assert_eq!(*lp, f64::NEG_INFINITY, "s={s}");
                    } else {
                        assert!((lp.exp() - e).abs() <= 1e-13 * e, "tilt {tilt} s={s}");
                    }
                } else {
                    // FFT: absolute accuracy relative to the peak of the *tilted* law, so
                    // compare on the tilted scale P_μ(s) = P(s)·e^{μs − LΛ(μ)}.
                    let shift = s as f64 * tilt - 6.0 * m.cumulants(tilt).log_mgf;
                    let got = (lp + shift).exp();
                    let want = e * shift.exp();
                    assert!((got - want).abs() <= 1e-13, "fft tilt {tilt} s={s}");
                }
            }
        }
    }
}

#[test]
fn fft_agrees_with_direct_where_both_are_accurate() {
    let q = [0.2, 0.5, 0.2, 0.1];
    let d = sum_pmf(&q, 300, ConvolutionMethod::Direct).unwrap();
    let f = sum_pmf(&q, 300, ConvolutionMethod::Fft).unwrap();
    let peak = d.iter().copied().fold(0.0, f64::max);
    for (a, b) in d.iter().zip(&f) {
        // FFT error: a few hundred ε of the peak, absolute; entries below the documented
        // floor 100·L·ε·peak are zeroed.
        let floor = 100.0 * 300.0 * f64::EPSILON * peak;
        assert!((a - b).abs() <= floor.max(1e-10 * a), "{a} vs {b}");
        if *a > 1e-5 * peak {
            assert!((a - b).abs() <= 1e-9 * a, "{a} vs {b}");
        }
    }
}

#[test]
fn best_of_three_matches_triple_enumeration_and_sequence_level_kl() {
    let probs = [0.6, 0.3, 0.1];
    let rewards = [0i64, 1, 2];
    let rf: Vec<f64> = rewards.iter().map(|&r| r as f64).collect();
    let m = model(&probs, &rf);
    let l = 4;
    let exact = enumerate_sum_law(&probs, &rewards, l);
    // Independent: the law of the max of 3 i.i.d. S by triple enumeration.
    let mut bon_exact: BTreeMap<i64, f64> = BTreeMap::new();
    for (s1, p1) in &exact {
        for (s2, p2) in &exact {
            for (s3, p3) in &exact {
                *bon_exact.entry(*s1.max(s2).max(s3)).or_insert(0.0) += p1 * p2 * p3;
            }
        }
    }
    let law = m.sum_law(l, 0.7, None).unwrap();
    let bon = law.best_of_n(3f64.ln()).unwrap();
    let mean_exact: f64 = bon_exact.iter().map(|(s, p)| *s as f64 * p).sum();
    assert!(
        (bon.mean - mean_exact).abs() < 1e-13,
        "{} vs {mean_exact}",
        bon.mean
    );
    for (j, lp) in bon.log_pmf.iter().enumerate() {
        let s = law.value(j).round() as i64;
        let e = bon_exact[&s];
        assert!((lp.exp() - e).abs() <= 1e-12 * e.max(1e-300), "s={s}");
    }
    // Sequence-level KL(BoN‖tilt) by enumerating sequences equals the KL of the S laws.
    let lambda = 0.9;
    let tq = m.tilted_probs(lambda);
    let mut kl_seq = 0.0;
    let mut idx = vec![0usize; l];
    'outer: loop {
        let p: f64 = idx.iter().map(|&i| probs[i]).product();
        let t: f64 = idx.iter().map(|&i| tq[i]).product();
        let s: i64 = idx.iter().map(|&i| rewards[i]).sum();
        let b = p / exact[&s] * bon_exact[&s];
        kl_seq += b * (b / t).ln();
        let mut pos = 0;
        loop {
            if pos == l {
                break 'outer;
            }
            idx[pos] += 1;
            if idx[pos] < probs.len() {
                break;
            }
            idx[pos] = 0;
            pos += 1;
        }
    }
    let kl_s = kl_log(&bon.log_pmf, &law.tilted_log_pmf(&m, lambda));
    assert!((kl_s - kl_seq).abs() < 1e-13, "{kl_s} vs {kl_seq}");
}

#[test]
fn convergence_as_length_grows() {
    let m = model(&[0.5, 0.3, 0.2], &[0.0, 1.0, 2.0]);
    let delta = 0.2;
    let mut prev_gap = f64::INFINITY;
    let mut prev_kl = f64::INFINITY;
    for l in [10usize, 100, 1000, 4000] {
        let r = m.analyze(l, delta).unwrap();
        assert!((r.rate_function_at_x_star - delta).abs() < 1e-12);
        assert!((r.tilt_kl_per_token - delta).abs() < 1e-12);
        assert!((r.tilt_reward_per_token_from_law - r.x_star).abs() < 1e-10);
        assert!(r.bon_kl_per_token <= r.bon_kl_bound_per_token + 1e-12);
        assert!(r.bon_reward_per_token < r.tilt_reward_per_token);
        assert!(r.bon_reward_per_token > r.reference_reward_per_token);
        let gap = r.x_star - r.bon_reward_per_token;
        assert!(
            gap < prev_gap,
            "L={l}: gap {gap} did not shrink from {prev_gap}"
        );
        assert!(
            r.kl_tilt_bon_per_token < prev_kl,
            "L={l}: KL/L did not shrink"
        );
        prev_gap = gap;
        prev_kl = r.kl_tilt_bon_per_token;
        if l == 4000 {
            assert!(
                gap < 0.01 * (r.x_star - r.reference_reward_per_token),
                "gap {gap}"
            );
            assert!(r.kl_tilt_bon_per_token < 2e-3);
        }
    }
}

#[test]
fn astronomically_large_n_stays_finite() {
    // log N = 3000 nats: N = e^3000.
    let m = model(&[0.7, 0.3], &[0.0, 1.0]);
    let r = m.analyze(10_000, 0.3).unwrap();
    assert!((r.log_n - 3000.0).abs() < 1e-9);
    assert_eq!(r.convolution, ConvolutionMethod::Fft);
    assert!(r.bon_reward_per_token.is_finite() && r.kl_tilt_bon_per_token.is_finite());
    assert!(r.bon_reward_per_token < r.x_star && r.x_star - r.bon_reward_per_token < 1e-3);
    assert!(r.bon_mass_lost_bound < 1e-12);
}

#[test]
fn renyi_form_of_scaled_cgf_is_exact_at_finite_length() {
    let m = model(&[0.4, 0.35, 0.25], &[0.0, 1.0, 3.0]);
    let lambda = m.lambda_for_kl(0.3).unwrap();
    let l = 20;
    let law = m
        .sum_law(l, lambda, Some(ConvolutionMethod::Direct))
        .unwrap();
    let tilt = law.tilted_log_pmf(&m, lambda);
    for ratio in [-0.6, 0.5, 1.0, 2.5] {
        let theta = ratio * lambda;
        let row = m.scaled_cgf_renyi(lambda, theta).unwrap();
        assert!((row.scaled_cgf - row.renyi_form).abs() < 1e-12, "{row:?}");
        let logs: Vec<f64> = tilt
            .iter()
            .enumerate()
            .map(|(j, lp)| lp + theta * law.value(j))
            .collect();
        let finite = tilt_core::numerics::log_sum_exp(&logs) / l as f64;
        assert!((finite - row.scaled_cgf).abs() < 1e-12, "θ={theta}");
    }
    assert!(m.scaled_cgf_renyi(lambda, -2.0 * lambda).is_err());
}

#[test]
fn bad_input_is_a_clear_error() {
    let m = model(&[0.5, 0.5], &[0.0, 1.0]);
    match m.analyze(10, 0.9) {
        Err(TiltError::KlBudgetTooLarge { max, .. }) => assert!((max - 2f64.ln()).abs() < 1e-15),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(m.analyze(0, 0.1), Err(TiltError::InvalidInput { input, .. }) if input == "length")
    );
    assert!(
        matches!(m.analyze(10, -0.1), Err(TiltError::InvalidInput { input, .. }) if input == "delta")
    );
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, std::f64::consts::PI]).unwrap();
    // π and 0 are on a grid (step π); √2 with 1 is not.
    assert!(MemorylessModel::new(&d, None).is_ok());
    let d = RewardDistribution::new(vec![0.3, 0.3, 0.4], vec![0.0, 1.0, 2f64.sqrt()]).unwrap();
    assert!(
        matches!(MemorylessModel::new(&d, None), Err(TiltError::InvalidInput { input, .. }) if input == "rewards")
    );
    let snapped = MemorylessModel::new(&d, Some(0.01)).unwrap();
    assert!(snapped.lattice().snap_error() <= 0.005 + 1e-15);
    assert!(MemorylessModel::new(&d, Some(-1.0)).is_err());
}

#[test]
fn fft_and_direct_give_the_same_best_of_n_and_kl_at_one_length() {
    // Force each method at lengths both can do: every reported quantity agrees to ~1e-10.
    for (probs, rewards, l, delta) in [
        (vec![0.5, 0.3, 0.2], vec![0.0, 1.0, 2.0], 200usize, 0.2),
        (vec![0.2, 0.5, 0.2, 0.1], vec![0.0, 1.0, 2.0, 3.0], 400, 0.1),
        (vec![0.7, 0.3], vec![0.0, 1.0], 1000, 0.3),
    ] {
        let m = model(&probs, &rewards);
        let d = m
            .analyze_with(l, delta, Some(ConvolutionMethod::Direct))
            .unwrap();
        let f = m
            .analyze_with(l, delta, Some(ConvolutionMethod::Fft))
            .unwrap();
        assert_eq!(d.convolution, ConvolutionMethod::Direct);
        assert_eq!(f.convolution, ConvolutionMethod::Fft);
        for (what, a, b) in [
            ("bon reward", d.bon_reward_per_token, f.bon_reward_per_token),
            (
                "KL(BoN‖tilt)/L",
                d.kl_tilt_bon_per_token,
                f.kl_tilt_bon_per_token,
            ),
            ("KL(BoN‖q)/L", d.bon_kl_per_token, f.bon_kl_per_token),
            (
                "tilt reward from the law",
                d.tilt_reward_per_token_from_law,
                f.tilt_reward_per_token_from_law,
            ),
        ] {
            assert!(
                (a - b).abs() <= 1e-10 * a.abs().max(1e-3),
                "L={l} {what}: direct {a:e}, fft {b:e}"
            );
        }
    }
}

#[test]
fn rate_function_is_finite_inside_the_range_and_nan_is_an_error() {
    let m = model(&[0.5, 0.3, 0.2], &[0.0, 1.0, 2.0]);
    let (lo, hi) = (-(0.5f64.ln()), -(0.2f64.ln()));
    // Points within rounding of the ends need extreme λ; the value stays finite and
    // between the endpoint values' range (I is convex with its minimum 0 at E r = 0.7).
    for x in [
        f64::from_bits(1),
        1e-300,
        1e-17,
        0.7,
        2.0 - 1e-15,
        2f64.next_down(),
    ] {
        let v = m.rate_function(x).unwrap();
        assert!(
            v.is_finite() && v >= 0.0 && v <= lo.max(hi) + 1e-12,
            "I({x:e}) = {v}"
        );
    }
    assert_eq!(m.rate_function(2.5).unwrap(), f64::INFINITY);
    assert_eq!(m.rate_function(f64::NEG_INFINITY).unwrap(), f64::INFINITY);
    assert!(matches!(
        m.rate_function(f64::NAN),
        Err(TiltError::InvalidInput { input, .. }) if input == "x"
    ));
}

#[test]
fn near_equal_rewards_are_a_clear_error_and_the_snap_error_is_reported() {
    for rewards in [vec![1e20, 1.00000000000001e20], vec![1.0, 1.0 + 1e-12]] {
        let d = RewardDistribution::new(vec![0.5, 0.5], rewards).unwrap();
        match MemorylessModel::new(&d, None) {
            Err(TiltError::InvalidInput { input, problem }) => {
                assert_eq!(input, "rewards");
                assert!(problem.contains("grid parameter"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Tiny rewards on an exact grid are detected (the tolerance is relative).
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1e-10]).unwrap();
    let m = MemorylessModel::new(&d, None).unwrap();
    assert_eq!(m.lattice().max_index(), 1);
    // A detected grid whose rewards carry rounding reports how far snapping moved them.
    let rewards = vec![0.0, 0.1, 0.7, 1.2000000001, 2.3];
    let d = RewardDistribution::new(vec![0.2; 5], rewards.clone()).unwrap();
    let m = MemorylessModel::new(&d, None).unwrap();
    let moved = m
        .lattice()
        .snapped()
        .iter()
        .zip(&rewards)
        .map(|(s, r)| (s - r).abs())
        .fold(0.0, f64::max);
    assert!(moved > 0.0);
    let r = m.analyze(20, 0.1).unwrap();
    assert_eq!(r.grid_snap_error_per_token, moved);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn legendre_duality_and_optimality(
        raw in proptest::collection::vec(0.05f64..1.0, 2..5),
        ks in proptest::collection::vec(0u32..5, 2..5),
        frac in 0.05f64..0.9,
        probe in -3.0f64..3.0,
    ) {
        let n = raw.len().min(ks.len());
        let total: f64 = raw[..n].iter().sum();
        let probs: Vec<f64> = raw[..n].iter().map(|p| p / total).collect();
        let rewards: Vec<f64> = ks[..n].iter().map(|&k| k as f64).collect();
        let r_max = rewards.iter().copied().fold(f64::MIN, f64::max);
        let r_min = rewards.iter().copied().fold(f64::MAX, f64::min);
        prop_assume!(r_max > r_min);
        let m = model(&probs, &rewards);
        let delta = frac * m.max_kl_per_token();
        let xs = m.x_star(delta).unwrap();
        prop_assert!((m.rate_function(xs).unwrap() - delta).abs() < 1e-10);
        // I(x) ≥ λx − Λ(λ) for every λ (it is the supremum).
        let x = r_min + (r_max - r_min) * 0.37;
        prop_assert!(m.rate_function(x).unwrap() >= probe * x - m.cumulants(probe).log_mgf - 1e-12);
        // Best-of-N's KL never exceeds LΔ, so its reward never beats the tilt's.
        let r = m.analyze(12, delta).unwrap();
        prop_assert!(r.bon_reward_per_token <= r.tilt_reward_per_token + 1e-12);
        prop_assert!(r.bon_kl_per_token <= r.bon_kl_bound_per_token + 1e-12);
    }
}
