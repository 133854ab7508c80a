//! Exact finite-support theory against independent derivations: brute-force enumeration
//! of every n-tuple of draws, the closed forms of docs/theory.md §1–§6, and
//! series expansions for n = 10^15.

use tilt_core::best_of_n::{best_of_n, kl_estimate_per_draw, worst_of_n};
use tilt_core::bounds::{bon_kl_bound, optimal_sub_gaussian_proxy, sub_gaussian_improvement_bound};
use tilt_core::divergence::{chi_squared, hellinger_squared, kl, renyi, total_variation};
use tilt_core::frontier::{frontier, frontier_ns};
use tilt_core::levels::Levels;
use tilt_core::soft_best_of_n::soft_best_of_n;
use tilt_core::tilt::{max_kl, tilt_by_beta, tilt_by_kl, tilt_by_lambda};
use tilt_core::win_rate::win_rate;
use tilt_core::{RewardDistribution, TiltError};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(close(a, b, tol), "{what}: got {a:.17e}, expected {b:.17e}");
}

/// Deterministic small pseudo-random numbers for building test cases (SplitMix64).
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random distribution on `k` outcomes whose rewards come from a set of `distinct`
/// values (so with ties when distinct < k), some outcomes possibly with mass 0.
fn random_dist(rng: &mut SplitMix, k: usize, distinct: u64) -> RewardDistribution {
    let raw: Vec<f64> = (0..k)
        .map(|_| {
            if rng.unit() < 0.1 {
                0.0
            } else {
                rng.unit() + 0.01
            }
        })
        .collect();
    let rewards: Vec<f64> = (0..k)
        .map(|_| (rng.next() % distinct) as f64 * 0.5 - 1.0)
        .collect();
    let raw = if raw.iter().all(|&x| x == 0.0) {
        vec![1.0; k]
    } else {
        raw
    };
    RewardDistribution::new_normalized(raw, rewards).unwrap()
}

/// Brute force: enumerate all k^n ordered tuples; the chosen outcome is uniform among the
/// draws attaining the best (or worst) reward.
fn brute_force_order_statistic(d: &RewardDistribution, n: u32, best: bool) -> Vec<f64> {
    let (p, r) = (d.probs(), d.rewards());
    let k = p.len();
    let mut out = vec![0.0; k];
    let total = (k as u64).pow(n);
    let mut tuple = vec![0usize; n as usize];
    for code in 0..total {
        let mut c = code;
        let mut prob = 1.0;
        for t in tuple.iter_mut() {
            *t = (c % k as u64) as usize;
            c /= k as u64;
            prob *= p[*t];
        }
        if prob == 0.0 {
            continue;
        }
        let target = tuple.iter().map(|&i| r[i]).fold(
            if best {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            },
            |a, b| {
                if best {
                    a.max(b)
                } else {
                    a.min(b)
                }
            },
        );
        let winners: Vec<usize> = tuple.iter().copied().filter(|&i| r[i] == target).collect();
        for &w in &winners {
            out[w] += prob / winners.len() as f64;
        }
    }
    out
}

fn direct_kl(q: &[f64], p: &[f64]) -> f64 {
    q.iter()
        .zip(p)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| a * (a / b).ln())
        .sum()
}

fn direct_win_rate(q: &[f64], d: &RewardDistribution) -> f64 {
    let (p, r) = (d.probs(), d.rewards());
    let mut w = 0.0;
    for i in 0..q.len() {
        for j in 0..p.len() {
            let s = if r[i] > r[j] {
                1.0
            } else if r[i] == r[j] {
                0.5
            } else {
                0.0
            };
            w += q[i] * p[j] * s;
        }
    }
    w
}

#[test]
fn best_and_worst_of_n_match_enumeration_of_all_tuples_with_ties() {
    let mut rng = SplitMix(7);
    let mut cases = 0;
    for k in 1..=6 {
        for distinct in [1u64, 2, 3, 6] {
            let d = random_dist(&mut rng, k, distinct);
            for n in 1..=5u32 {
                for best in [true, false] {
                    let exact = brute_force_order_statistic(&d, n, best);
                    let b = if best {
                        best_of_n(&d, n as u64).unwrap()
                    } else {
                        worst_of_n(&d, n as u64).unwrap()
                    };
                    for (a, e) in b.pmf.iter().zip(&exact) {
                        assert_close(*a, *e, 1e-13, &format!("pmf k={k} n={n} best={best}"));
                    }
                    assert_close(b.kl, direct_kl(&exact, d.probs()), 1e-12, "kl");
                    assert_close(b.win_rate, direct_win_rate(&exact, &d), 1e-13, "win rate");
                    let er: f64 = exact.iter().zip(d.rewards()).map(|(q, r)| q * r).sum();
                    assert_close(b.expected_reward, er, 1e-13, "expected reward");
                    // §4 estimator averaged over the output, ε = the reference mass of the
                    // returned reward level (all outcomes tied with it).
                    let tied_mass = |y: usize| -> f64 {
                        d.probs()
                            .iter()
                            .zip(d.rewards())
                            .filter(|(_, &r)| r == d.rewards()[y])
                            .map(|(p, _)| p)
                            .sum()
                    };
                    let est: f64 = exact
                        .iter()
                        .enumerate()
                        .filter(|(_, &q)| q > 0.0)
                        .map(|(y, &q)| q * kl_estimate_per_draw(tied_mass(y), n as u64).unwrap())
                        .sum();
                    assert_close(b.kl_estimate, est, 1e-12, "kl estimate");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 6 * 4 * 5 * 2);
}

#[test]
fn fair_coin_closed_forms_of_spec_section_2() {
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
    let b2 = best_of_n(&d, 2).unwrap();
    let b4 = best_of_n(&d, 4).unwrap();
    assert_close(b2.kl, 0.130812035941, 1e-11, "KL(π_2‖p)");
    assert_close(b4.kl, 0.459355521853, 1e-11, "KL(π_4‖p)");
    assert_eq!(b2.win_rate, 5.0 / 8.0);
    assert_eq!(b4.win_rate, 23.0 / 32.0);
    assert_close(b2.kl_bound, 0.1931472, 1e-7, "bound n=2");
    assert_close(b4.win_rate_bound, 0.8, 1e-15, "n/(n+1)");
    // docs/theory.md §2 and §5: π_n(hi) = 1 − 2^{−n}; W_n = 3/4 − 2^{−n}/2; KL(π_8) = 0.667588.
    for n in 1..=40u64 {
        let b = best_of_n(&d, n).unwrap();
        let lo = 0.5f64.powi(n as i32);
        assert_close(b.pmf[0], lo, 1e-14, "π_n(lo)");
        assert_close(b.win_rate, 0.75 - lo / 2.0, 1e-15, "W_n");
        let klc = lo * (lo / 0.5).ln() + (1.0 - lo) * ((1.0 - lo) / 0.5).ln();
        assert_close(b.kl, klc, 1e-13, "two-point KL");
    }
    assert_close(best_of_n(&d, 8).unwrap().kl, 0.667588, 1e-6, "KL(π_8)");
}

#[test]
fn kl_bound_values_of_theory_section_3() {
    let table = [
        (2, 0.1931472),
        (4, 0.6362944),
        (8, 1.2044415),
        (16, 1.8350887),
        (32, 2.4969859),
        (64, 3.1745081),
        (128, 3.8598428),
        (256, 4.5490837),
    ];
    for (n, v) in table {
        assert!((bon_kl_bound(n).unwrap() - v).abs() < 6e-8, "n={n}");
    }
}

#[test]
#[allow(clippy::approx_constant)] // the values as printed in docs/theory.md §3
fn kl_estimator_values_of_theory_section_3() {
    let table = [
        (2, 0.5, 0.1790988),
        (2, 0.1, 0.1930594),
        (4, 0.5, 0.4991239),
        (4, 0.1, 0.6348703),
        (8, 0.5, 0.6722926),
        (8, 0.1, 1.1917784),
        (32, 0.5, 0.6931472),
        (32, 0.1, 2.1633696),
    ];
    for (n, eps, v) in table {
        let got = kl_estimate_per_draw(eps, n).unwrap();
        assert!((got - v).abs() < 6e-8, "D̂({eps}) at n={n}: {got}");
    }
    for n in [2u64, 4, 8, 32] {
        assert_close(
            kl_estimate_per_draw(1e-300, n).unwrap(),
            bon_kl_bound(n).unwrap(),
            1e-15,
            "D̂(0+)",
        );
        assert_eq!(kl_estimate_per_draw(1.0, n).unwrap(), 0.0);
    }
    assert!(kl_estimate_per_draw(1.5, 4).is_err());
    assert!(kl_estimate_per_draw(0.5, 0).is_err());
}

#[test]
fn tie_example_of_theory_section_2() {
    let d = RewardDistribution::new(vec![0.2, 0.3, 0.1, 0.4], vec![0.0, 1.0, 1.0, 2.0]).unwrap();
    let b = best_of_n(&d, 3).unwrap();
    let expect = [0.008, 0.156, 0.052, 0.784];
    for (a, e) in b.pmf.iter().zip(expect) {
        assert_close(*a, e, 1e-14, "tie example");
    }
}

/// `1 − (1 − t)^n` by its alternating binomial series in x = n·t (with the n-dependence
/// exact): Σ_{k≥1} (−1)^{k+1} C(n,k) t^k, each term computed from the previous one.
fn one_minus_pow_series(t: f64, n: f64) -> f64 {
    let mut term = n * t; // C(n,1) t
    let mut sum = 0.0;
    let mut k = 1.0;
    while term.abs() > 1e-40 {
        sum += term;
        term *= -(n - k) / (k + 1.0) * t;
        k += 1.0;
    }
    sum
}

#[test]
fn n_of_ten_to_the_fifteen_matches_series_expansions() {
    let n: u64 = 1_000_000_000_000_000;
    let nf = n as f64;
    for t in [1e-20, 1e-17, 3e-16, 1e-15] {
        let d = RewardDistribution::new(vec![1.0 - t, t], vec![0.0, 1.0]).unwrap();
        assert_eq!(
            Levels::new(&d).unwrap().above()[0],
            t,
            "tail summed directly"
        );
        let b = best_of_n(&d, n).unwrap();
        // π(top) = 1 − (1−t)^n, by series (x = n t ≤ 1: converges quickly).
        let top = one_minus_pow_series(t, nf);
        assert_close(b.pmf[1], top, 1e-13, &format!("π(top) t={t}"));
        assert_close(b.pmf[0], 1.0 - top, 1e-13, "π(bottom)");
        let klx = (1.0 - top) * ((1.0 - top).ln() - (-t).ln_1p()) + top * (top / t).ln();
        assert_close(b.kl, klx, 1e-12, &format!("KL t={t}"));
        assert_close(
            b.win_rate,
            (1.0 - top) * (1.0 - t) / 2.0 + top * (1.0 - t / 2.0),
            1e-14,
            "W",
        );
        assert!(b.kl <= b.kl_bound);
    }
    // Three levels, the middle one tiny: π(mid) = (1−t)^n − ½^n ≈ e^{−nt}.
    let t = 1e-16;
    let d = RewardDistribution::new(vec![0.5, 0.5 - t, t], vec![0.0, 1.0, 2.0]).unwrap();
    let b = best_of_n(&d, n).unwrap();
    let top = one_minus_pow_series(t, nf);
    assert_close(b.pmf[2], top, 1e-13, "top of three");
    assert_close(b.pmf[1], 1.0 - top, 1e-13, "middle of three");
    assert_eq!(b.pmf[0], 0.0);
    assert!((b.pmf.iter().sum::<f64>() - 1.0).abs() < 1e-15);
}

#[test]
fn moderate_n_agrees_with_plain_powers() {
    let d = RewardDistribution::new(vec![0.3, 0.2, 0.5], vec![3.0, 1.0, 2.0]).unwrap();
    for n in [7u64, 100, 1000] {
        let b = best_of_n(&d, n).unwrap();
        let f = |x: f64| x.powi(n as i32);
        let expect = [1.0 - f(0.7), f(0.2), f(0.7) - f(0.2)];
        for (a, e) in b.pmf.iter().zip(expect) {
            assert_close(*a, e, 1e-13, "powers");
        }
    }
}

#[test]
fn tilt_closed_forms_and_kl_solver() {
    // docs/theory.md §1: Bernoulli(½), λ = 1: a = e/(1+e), K = 0.1109441.
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
    let t = tilt_by_lambda(&d, 1.0).unwrap();
    let a = 1f64.exp() / (1.0 + 1f64.exp());
    assert_close(t.pmf[1], a, 1e-15, "φ(1)");
    let k = a * (a / 0.5).ln() + (1.0 - a) * ((1.0 - a) / 0.5).ln();
    assert_close(t.kl, k, 1e-14, "K(1)");
    assert_close(t.kl, 0.1109441, 1e-7, "table");
    assert_close(t.log_partition, (0.5 + 0.5 * 1f64.exp()).ln(), 1e-15, "Λ");
    assert_close(t.win_rate, (1.0 - a) * 0.25 + a * 0.75, 1e-15, "W");
    assert_eq!(t.beta, 1.0);
    // KL → λ round trip, 1e-12 relative, across scales; tiny KLs keep their digits.
    let d3 = RewardDistribution::new(vec![0.2, 0.5, 0.3], vec![-4.0, 0.5, 10.0]).unwrap();
    for lambda in [1e-7, 1e-3, 0.1, 0.3, 1.0] {
        let kl_l = tilt_by_lambda(&d3, lambda).unwrap().kl;
        let back = tilt_by_kl(&d3, kl_l).unwrap();
        assert!(
            (back.lambda / lambda - 1.0).abs() < 1e-11,
            "λ={lambda}: {}",
            back.lambda
        );
        assert!((back.beta * lambda - 1.0).abs() < 1e-11);
    }
    // Near saturation KL is flat in λ (dKL/dλ = λ·Var_φ(r) ≈ e^{−28}): λ is then only
    // determined up to rounding of KL, so check the KL reached instead.
    let kl_flat = tilt_by_lambda(&d3, 3.0).unwrap().kl;
    let back = tilt_by_kl(&d3, kl_flat).unwrap();
    assert_close(
        back.kl,
        kl_flat,
        1e-15,
        "KL at the solved λ near saturation",
    );
    // Small-λ KL ≈ λ² Var/2.
    let var = {
        let mu = d3.mean_reward();
        d3.probs()
            .iter()
            .zip(d3.rewards())
            .map(|(p, r)| p * (r - mu) * (r - mu))
            .sum::<f64>()
    };
    let small = tilt_by_lambda(&d3, 1e-8).unwrap().kl;
    assert_close(small, 1e-16 * var / 2.0, 1e-6, "KL ≈ λ²σ²/2");
    // β → ∞ is p; KL_max = −log p(argmax); beyond it an error.
    let levels = Levels::new(&d3).unwrap();
    assert_close(max_kl(&levels), -(0.3f64.ln()), 1e-15, "KL_max");
    let at_max = tilt_by_kl(&d3, -(0.3f64.ln())).unwrap();
    assert_eq!(at_max.pmf, vec![0.0, 0.0, 1.0]);
    match tilt_by_kl(&d3, 1.3) {
        Err(TiltError::KlBudgetTooLarge { requested, max }) => {
            assert_eq!(requested, 1.3);
            assert!((max - 1.2039728).abs() < 1e-7);
        }
        other => panic!("expected KlBudgetTooLarge, got {other:?}"),
    }
    assert_eq!(tilt_by_kl(&d3, 0.0).unwrap().pmf, d3.probs());
    assert!(tilt_by_beta(&d3, 0.0).is_err());
    assert!(tilt_by_kl(&d3, -1.0).is_err());
    // Ties: outcomes tied at the top share the tilt's mass in proportion to p.
    let dt = RewardDistribution::new(vec![0.5, 0.1, 0.4], vec![0.0, 1.0, 1.0]).unwrap();
    let tt = tilt_by_lambda(&dt, 2.0).unwrap();
    assert_close(tt.pmf[1] / tt.pmf[2], 0.25, 1e-15, "tie split");
    let z = 0.5 + 0.5 * 2f64.exp();
    assert_close(tt.pmf[0], 0.5 / z, 1e-15, "tilt with ties");
}

#[test]
fn soft_best_of_n_values_of_theory_section_6() {
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
    for (lambda, v) in [(0.1, 0.749977), (1.0, 0.615529), (10.0, 0.512490)] {
        let s = soft_best_of_n(&d, 2, lambda).unwrap();
        assert!((s.pmf[1] - v).abs() < 6e-7, "λ={lambda}: {}", s.pmf[1]);
    }
    // Limits: λ → 0 is hard best-of-n, λ → ∞ is p.
    let d3 = RewardDistribution::new(vec![0.2, 0.3, 0.1, 0.4], vec![0.0, 1.0, 1.0, 2.0]).unwrap();
    let hard = best_of_n(&d3, 4).unwrap();
    let cold = soft_best_of_n(&d3, 4, 1e-3).unwrap();
    for (a, b) in cold.pmf.iter().zip(&hard.pmf) {
        assert!((a - b).abs() < 1e-12);
    }
    let hot = soft_best_of_n(&d3, 4, 1e9).unwrap();
    for (a, b) in hot.pmf.iter().zip(d3.probs()) {
        assert!((a - b).abs() < 1e-8);
    }
    assert!(soft_best_of_n(&d3, 0, 1.0).is_err());
    let wide =
        RewardDistribution::from_samples(&(0..40).map(f64::from).collect::<Vec<_>>()).unwrap();
    let e = soft_best_of_n(&wide, 30, 1.0).unwrap_err();
    assert!(e.to_string().contains("count vectors"), "{e}");
}

#[test]
fn soft_best_of_n_matches_enumeration_of_all_tuples() {
    let mut rng = SplitMix(11);
    for k in 1..=4 {
        let d = random_dist(&mut rng, k, 3);
        for n in 1..=4u32 {
            for lambda in [0.3, 1.0, 5.0] {
                let (p, r) = (d.probs(), d.rewards());
                let mut exact = vec![0.0; k];
                let mut tuple = vec![0usize; n as usize];
                for code in 0..(k as u64).pow(n) {
                    let mut c = code;
                    let mut prob = 1.0;
                    for t in tuple.iter_mut() {
                        *t = (c % k as u64) as usize;
                        c /= k as u64;
                        prob *= p[*t];
                    }
                    let z: f64 = tuple.iter().map(|&i| (r[i] / lambda).exp()).sum();
                    for &i in &tuple {
                        exact[i] += prob * (r[i] / lambda).exp() / z;
                    }
                }
                let s = soft_best_of_n(&d, n as u64, lambda).unwrap();
                for (a, e) in s.pmf.iter().zip(&exact) {
                    assert_close(*a, *e, 1e-13, "soft pmf");
                }
                assert_close(s.kl, direct_kl(&exact, p), 1e-12, "soft kl");
                assert_close(s.win_rate, direct_win_rate(&exact, &d), 1e-13, "soft W");
            }
        }
    }
}

#[test]
fn divergences_match_direct_formulas() {
    let q = [0.1, 0.2, 0.3, 0.4];
    let p = [0.25, 0.25, 0.25, 0.25];
    assert_close(kl(&q, &p).unwrap(), direct_kl(&q, &p), 1e-15, "KL");
    assert_close(kl(&p, &q).unwrap(), direct_kl(&p, &q), 1e-15, "reverse KL");
    let tv: f64 = 0.5 * q.iter().zip(&p).map(|(a, b)| (a - b).abs()).sum::<f64>();
    assert_close(total_variation(&q, &p).unwrap(), tv, 1e-15, "TV");
    let chi: f64 = q.iter().zip(&p).map(|(a, b)| (a - b) * (a - b) / b).sum();
    assert_close(chi_squared(&q, &p).unwrap(), chi, 1e-15, "χ²");
    let bc: f64 = q.iter().zip(&p).map(|(a, b)| (a * b).sqrt()).sum();
    assert_close(hellinger_squared(&q, &p).unwrap(), 1.0 - bc, 1e-14, "H²");
    for alpha in [0.5, 2.0, 3.0] {
        let s: f64 = q
            .iter()
            .zip(&p)
            .map(|(a, b)| a.powf(alpha) * b.powf(1.0 - alpha))
            .sum();
        assert_close(
            renyi(&q, &p, alpha).unwrap(),
            s.ln() / (alpha - 1.0),
            1e-14,
            "Rényi",
        );
    }
    // α → 1 tends to KL; α = ∞ is log max ratio; ordering in α.
    assert_close(
        renyi(&q, &p, 1.0 + 1e-7).unwrap(),
        direct_kl(&q, &p),
        1e-6,
        "α→1",
    );
    assert_close(
        renyi(&q, &p, f64::INFINITY).unwrap(),
        1.6f64.ln(),
        1e-15,
        "D_∞",
    );
    assert!(renyi(&q, &p, 0.5).unwrap() <= renyi(&q, &p, 2.0).unwrap());
    // Support failures are +∞, not NaN.
    let q0 = [0.5, 0.5, 0.0, 0.0];
    let p0 = [1.0, 0.0, 0.0, 0.0];
    assert_eq!(kl(&q0, &p0).unwrap(), f64::INFINITY);
    assert_eq!(chi_squared(&q0, &p0).unwrap(), f64::INFINITY);
    assert_eq!(renyi(&q0, &p0, 2.0).unwrap(), f64::INFINITY);
    assert_close(
        renyi(&q0, &p0, 0.5).unwrap(),
        -2.0 * (0.5f64.sqrt()).ln(),
        1e-15,
        "α<1",
    );
    assert!(kl(&[0.5, 0.5], &[1.0]).is_err());
    assert!(kl(&[], &[]).is_err());
    assert!(renyi(&q, &p, 0.0).is_err());
}

#[test]
fn sub_gaussian_proxy_closed_forms_and_bound() {
    // Kearns–Saul: Bernoulli(q) optimal proxy (1 − 2q)/(2 log((1−q)/q)); ¼ at q = ½.
    for q in [0.5, 0.3, 0.1, 0.01, 1e-6] {
        let d = RewardDistribution::new(vec![1.0 - q, q], vec![0.0, 1.0]).unwrap();
        let s = optimal_sub_gaussian_proxy(&d).unwrap();
        let ks = if q == 0.5 {
            0.25
        } else {
            (1.0 - 2.0 * q) / (2.0 * ((1.0 - q) / q).ln())
        };
        assert_close(s.optimal, ks, 1e-9, &format!("σ² q={q}"));
        assert_eq!(s.hoeffding, 0.25);
        assert_close(s.variance, q * (1.0 - q), 1e-14, "variance");
        // One-sided: for q < ½ the heavy tail is the upper one and the two agree; for q > ½
        // 2(Λ(λ) − λq)/λ² decreases on λ > 0 from its limit, the variance.
        let upper = if q <= 0.5 { ks } else { q * (1.0 - q) };
        assert_close(s.upper, upper, 1e-9, &format!("σ²₊ q={q}"));
        assert!(s.upper <= s.optimal * (1.0 + 1e-12));
    }
    // Scaling: rewards ×3 multiply σ² by 9.
    let d = RewardDistribution::new(vec![0.2, 0.5, 0.3], vec![0.0, 1.0, 4.0]).unwrap();
    let d3 = RewardDistribution::new(vec![0.2, 0.5, 0.3], vec![0.0, 3.0, 12.0]).unwrap();
    let (a, b) = (
        optimal_sub_gaussian_proxy(&d).unwrap(),
        optimal_sub_gaussian_proxy(&d3).unwrap(),
    );
    assert_close(b.optimal, 9.0 * a.optimal, 1e-9, "scaling");
    // The bound holds for best-of-n and the tilt.
    let f = frontier(&d, &frontier_ns(1000, Some(12)).unwrap()).unwrap();
    for (bp, tp) in f.bon.iter().zip(&f.tilt) {
        let bound = sub_gaussian_improvement_bound(a.optimal, bp.kl).unwrap();
        assert!(bp.expected_reward - d.mean_reward() <= bound + 1e-12);
        assert!(tp.expected_reward - d.mean_reward() <= bound + 1e-12);
        assert!(bp.expected_reward <= tp.expected_reward + 1e-10);
    }
}

#[test]
fn frontier_n_values_and_win_rate_helper() {
    assert_eq!(frontier_ns(1, None).unwrap(), vec![1]);
    let ns = frontier_ns(1_000_000_000_000_000, Some(16)).unwrap();
    assert_eq!(ns.len(), 16);
    assert_eq!(*ns.last().unwrap(), 1_000_000_000_000_000);
    assert!(ns.windows(2).all(|w| w[0] < w[1]));
    assert!(frontier_ns(0, None).is_err());
    assert!(frontier_ns(10, Some(0)).is_err());
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
    assert!(win_rate(&d, &[0.5]).is_err());
    assert!(win_rate(&d, &[f64::NAN, 1.0]).is_err());
    assert_eq!(win_rate(&d, &[0.0, 1.0]).unwrap(), 0.75);
    // n = 10^15 on a fair coin: KL → log 2 from below, no NaN.
    let f = frontier(&d, &ns).unwrap();
    for p in &f.bon {
        assert!(p.kl.is_finite() && p.kl <= 2f64.ln() + 1e-15);
    }
}

#[test]
fn tilt_with_an_underflowing_exponent_is_exact_not_nan() {
    // λ(r − max r) = 1e300·(−1e9) underflows to −∞: that level has no tilted mass and
    // contributes p(L)·h(−∞) = p(L) to KL = Σ p·h(log φ/p), so KL = −log p(top) = log 2.
    let d = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1e9]).unwrap();
    let t = tilt_by_beta(&d, 1e-300).unwrap();
    assert_eq!(t.pmf, vec![0.0, 1.0]);
    assert_close(t.kl, 2f64.ln(), 1e-15, "KL at β = 1e-300");
    assert_eq!(t.win_rate, 0.75);
    assert_eq!(t.expected_reward, 1e9);
    // Rewards near ±f64::MAX with a finite range: every tilt is finite and exact.
    let big = RewardDistribution::new(vec![0.25, 0.75], vec![-8e307, 8e307]).unwrap();
    let zero = tilt_by_kl(&big, 0.0).unwrap();
    assert_eq!(zero.pmf, big.probs());
    assert_eq!(zero.kl, 0.0);
    let one = tilt_by_beta(&big, 1.0).unwrap();
    assert_eq!(one.pmf, vec![0.0, 1.0]);
    assert_close(one.kl, -(0.75f64.ln()), 1e-15, "KL at β = 1, range 1.6e308");
    // The KL solver works in units of the reward range, whatever their scale: at every
    // scale s, the tilt of s·r at KL Δ is the tilt of r at λ/s (same pmf, same KL).
    let unit = RewardDistribution::new(vec![0.2, 0.5, 0.3], vec![-1.0, 0.0, 1.0]).unwrap();
    let reference = tilt_by_kl(&unit, 0.3).unwrap();
    for s in [1e-300, 1e-150, 1e150, 5e307] {
        let scaled = RewardDistribution::new(vec![0.2, 0.5, 0.3], vec![-s, 0.0, s]).unwrap();
        let t = tilt_by_kl(&scaled, 0.3).unwrap();
        assert_close(t.kl, 0.3, 1e-13, &format!("KL at scale {s:e}"));
        for (a, b) in t.pmf.iter().zip(&reference.pmf) {
            assert_close(*a, *b, 1e-10, &format!("pmf at scale {s:e}"));
        }
        assert!(t.pmf.iter().all(|p| p.is_finite()));
    }
}

#[test]
fn one_level_whose_mass_rounds_above_one_has_a_zero_estimate_not_nan() {
    // These probabilities pass validation but sum to 1 + 2⁻⁵²: the single reward level's
    // mass is a rounding above 1, and ln(1 − ε) of it would be NaN. Best-of-n of one level
    // is the reference itself, so KL and D̂ are 0 for every n.
    let d = RewardDistribution::new(
        vec![0.7740716847110638, 0.16325146636577292, 0.0626768489231634],
        vec![2.1; 3],
    )
    .unwrap();
    assert!(d.probs().iter().sum::<f64>() > 1.0);
    for n in [1u64, 2, 16, 1000] {
        for b in [best_of_n(&d, n).unwrap(), worst_of_n(&d, n).unwrap()] {
            assert_eq!(b.kl_estimate, 0.0, "D̂ n={n}");
            assert!(b.kl.abs() < 1e-15, "KL n={n}: {}", b.kl);
        }
    }
}

#[test]
fn kl_estimate_uses_the_mass_of_the_returned_reward_level() {
    // Splitting a level into several tied outcomes leaves best-of-n's law on rewards, its
    // KL and the estimate unchanged: ε is the level's mass.
    let whole = RewardDistribution::new(vec![0.2, 0.3, 0.5], vec![0.0, 1.0, 2.0]).unwrap();
    let split = RewardDistribution::new(
        vec![0.05, 0.15, 0.1, 0.2, 0.3, 0.2],
        vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
    )
    .unwrap();
    for n in [1u64, 2, 4, 17, 1000] {
        let (a, b) = (best_of_n(&whole, n).unwrap(), best_of_n(&split, n).unwrap());
        assert_close(b.kl, a.kl, 1e-14, &format!("KL n={n}"));
        assert_close(b.kl_estimate, a.kl_estimate, 1e-14, &format!("D̂ n={n}"));
        // Independently: Σ over levels of π_n(L)·D̂(p(L)) from the closed-form pmf.
        let (f, fm) = ([0.2f64, 0.5, 1.0], [0.0f64, 0.2, 0.5]);
        let expect: f64 = (0..3)
            .map(|l| {
                let q = f[l].powi(n as i32) - fm[l].powi(n as i32);
                q * kl_estimate_per_draw(whole.probs()[l], n).unwrap()
            })
            .sum();
        assert_close(
            a.kl_estimate,
            expect,
            1e-13,
            &format!("D̂ closed form n={n}"),
        );
        let wa = worst_of_n(&whole, n).unwrap();
        let wb = worst_of_n(&split, n).unwrap();
        assert_close(
            wb.kl_estimate,
            wa.kl_estimate,
            1e-14,
            &format!("worst D̂ n={n}"),
        );
    }
    // Samples of 0/1 rewards: each sample is an outcome of mass 1/m, but the levels have
    // mass ½, so the estimate is D̂(½) = 0.4991239194 at n = 4 (the README's fair coin),
    // not D̂(1/m), which would sit at the bound.
    let samples = RewardDistribution::from_samples(&[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
    let coin = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
    let (s, c) = (
        best_of_n(&samples, 4).unwrap(),
        best_of_n(&coin, 4).unwrap(),
    );
    assert_close(s.kl_estimate, c.kl_estimate, 1e-15, "samples vs coin");
    assert!(
        (c.kl_estimate - 0.4991239194).abs() < 5e-11,
        "{}",
        c.kl_estimate
    );
    assert!(s.kl_estimate < s.kl_bound - 0.1);
}

#[test]
fn sub_gaussian_proxy_with_a_tiny_top_mass() {
    // A top mass q = 1e-200 puts the supremum of 2(Λ(λ) − λμ)/λ² at λ ≈ 2 log(1/q) ≈ 921,
    // where e^{λ r} overflows; Kearns–Saul's closed form is the independent value.
    for (q, scale) in [(1e-200, 1.0), (1e-200, 10.0), (1e-100, 1.0), (1e-300, 0.5)] {
        let d = RewardDistribution::new(vec![1.0 - q, q], vec![0.0, scale]).unwrap();
        let s = optimal_sub_gaussian_proxy(&d).unwrap();
        let ks = scale * scale * (1.0 - 2.0 * q) / (2.0 * ((1.0 - q) / q).ln());
        assert_close(s.optimal, ks, 1e-9, &format!("σ² q={q:e} scale={scale}"));
        assert!(
            s.optimal > 100.0 * s.variance,
            "far above the variance {s:?}"
        );
    }
    // Three levels, a tiny top far above two close ones (whose own proxy is 2.5e-5, so
    // the top sets σ²): against a direct evaluation of the same supremum in log-sum-exp
    // form on a fine grid of λ (an independent, slower computation).
    let (p, r) = ([0.5, 0.5, 1e-200], [0.0, 0.01, 3.0]);
    let d = RewardDistribution::new(p.to_vec(), r.to_vec()).unwrap();
    let s = optimal_sub_gaussian_proxy(&d).unwrap();
    let mu: f64 = p.iter().zip(&r).map(|(p, r)| p * r).sum();
    let mut best: f64 = 0.0;
    for i in 0..=200_000 {
        let lambda = 10f64.powf(-2.0 + 5.0 * i as f64 / 200_000.0);
        let terms: Vec<f64> = p
            .iter()
            .zip(&r)
            .map(|(p, r)| p.ln() + lambda * (r - mu))
            .collect();
        let m = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln();
        best = best.max(2.0 * lse / (lambda * lambda));
    }
    assert!(best > 100.0 * 2.5e-5, "the tiny top dominates: {best}");
    assert_close(s.optimal, best, 1e-7, "σ², three levels, top mass 1e-200");
    assert!(
        s.optimal >= best * (1.0 - 1e-12),
        "the refinement finds at least the grid"
    );
}

#[test]
fn frontier_tilt_near_saturation_is_the_lambda_infinity_limit() {
    // Distributions (non-symmetric, heavy top levels) where best-of-n's exact KL at
    // intermediate n is a rounding step below −log p(argmax set), above every KL a finite
    // λ reaches in floating point; the tilt there is its λ = ∞ limit.
    let cases = [
        (
            vec![
                0.46812495259464726,
                0.8914642232493949,
                0.0706488959246858,
                0.5740803657505313,
            ],
            vec![-0.26, 1.59, 1.22, 1.22],
        ),
        (
            vec![
                0.582399528329806,
                0.3246845773055631,
                0.33252229254600985,
                0.42758595550739276,
                0.4141670664927143,
                0.038026261268896626,
            ],
            vec![2.33, 2.33, 0.48, 2.33, 2.33, -1.0],
        ),
        (vec![0.5, 0.3, 0.2], vec![0.0, 1.0, 2.0]),
        (vec![0.05, 0.15, 0.8], vec![3.0, -2.0, 7.5]),
    ];
    for (p, r) in cases {
        let d = RewardDistribution::new_normalized(p, r).unwrap();
        let mut ns: Vec<u64> = (1..=400).collect();
        ns.extend(frontier_ns(1_000_000_000_000_000, Some(60)).unwrap());
        let f = frontier(&d, &ns).unwrap();
        let kl_max = max_kl(&Levels::new(&d).unwrap());
        for (b, t) in f.bon.iter().zip(&f.tilt) {
            assert_close(t.kl, b.kl, 1e-12, &format!("KL at n={}", b.n));
            assert!(t.kl <= kl_max && b.kl <= kl_max + 1e-15);
            assert!(
                b.expected_reward <= t.expected_reward + 1e-12,
                "n={}: best-of-n {} above the tilt {}",
                b.n,
                b.expected_reward,
                t.expected_reward
            );
        }
        // And directly: a budget one rounding step below the maximum is solvable.
        let below = f64::from_bits(kl_max.to_bits() - 1);
        let t = tilt_by_kl(&d, below).unwrap();
        assert_close(t.kl, below, 1e-15, "KL one step below the maximum");
    }
}
