//! Exact law of soft best-of-n (Verdun et al., arXiv 2505.03156; arXiv 2507.05913):
//! draw `Y_1…Y_n` iid from p, return `Y_i` with probability `∝ e^{r(Y_i)/λ}`.
//!
//! ```text
//! π(y) = p(y)·E[ n·w(y) / (w(y) + Σ_{j=2}^n w(Y_j)) ],   w = e^{r/λ},  Y_j iid p
//! ```
//! (docs/theory.md §6). λ is a temperature: λ → 0 is hard best-of-n (ties uniform),
//! λ → ∞ is p, and as n → ∞ the law tends to the tilt `p·e^{r/λ}/Z`.
//!
//! The expectation is computed exactly by enumerating the multinomial counts of the other
//! n − 1 draws over the reward levels (outcomes tied in reward have equal weight, so only
//! levels matter). That is `C(n + k − 2, k − 1)` count vectors for k levels: exact and fine
//! for small supports and n, hopeless beyond, so past [`MAX_COUNT_VECTORS`] (or
//! [`MAX_LEVELS`]) the function refuses with a clear error rather than running for hours.
//! Weights enter only as ratios `e^{(r_L − r_y)/λ}`, so no weight overflows.

use crate::best_of_n::{order_statistic_levels, Selection};
use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::Levels;
use crate::numerics::{kl_summand, ln_factorials, neumaier_sum, non_negative, NeumaierSum, Shown};
use crate::win_rate::win_rate_levels;
use serde::Serialize;

/// Largest number of count vectors of the other n − 1 draws that [`soft_best_of_n`]
/// enumerates.
pub const MAX_COUNT_VECTORS: f64 = 2.0e6;

/// Largest number of distinct reward levels (with positive mass) [`soft_best_of_n`] accepts.
pub const MAX_LEVELS: usize = 64;

/// The exact soft best-of-n policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoftBestOfN {
    /// Number of draws.
    pub n: u64,
    /// Temperature λ (0: hard best-of-n; ∞: p).
    pub lambda: f64,
    /// KL(π‖p), nats.
    pub kl: f64,
    /// E_π[r].
    pub expected_reward: f64,
    /// Win rate of π over p, ties counting ½.
    pub win_rate: f64,
    /// π over the outcomes, in input order.
    pub pmf: Vec<f64>,
}

/// Exact soft best-of-n law (see the module doc; docs/theory.md §6).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`, `lambda` when negative or NaN, or
/// `n` when the enumeration would exceed [`MAX_COUNT_VECTORS`] / [`MAX_LEVELS`].
///
/// ```
/// use tilt_core::{soft_best_of_n::soft_best_of_n, RewardDistribution};
/// let p = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
/// // π(1) = 1/4 + ½·sigmoid(1/λ) at n = 2.
/// let s = soft_best_of_n(&p, 2, 1.0).unwrap();
/// assert!((s.pmf[1] - (0.25 + 0.5 / (1.0 + (-1f64).exp()))).abs() < 1e-15);
/// ```
pub fn soft_best_of_n(dist: &RewardDistribution, n: u64, lambda: f64) -> Result<SoftBestOfN> {
    if n == 0 {
        return Err(TiltError::invalid("n", "must be at least 1 (got 0)"));
    }
    if lambda.is_nan() || lambda < 0.0 {
        return Err(TiltError::invalid(
            "lambda",
            format!(
                "{lambda}: the temperature must be ≥ 0",
                lambda = Shown(lambda)
            ),
        ));
    }
    let levels = Levels::new(dist)?;
    let level_pmf = if lambda == 0.0 {
        order_statistic_levels(&levels, n, Selection::Best)?.level_pmf
    } else if n == 1 || lambda == f64::INFINITY {
        levels.masses().to_vec()
    } else {
        enumerate(&levels, n, lambda)?
    };
    let (rw, ms) = (levels.rewards(), levels.masses());
    let kl = neumaier_sum(
        level_pmf
            .iter()
            .zip(ms)
            .filter(|(_, &m)| m > 0.0)
            .map(|(&q, &m)| {
                if q == 0.0 {
                    return m;
                }
                let u = q.ln() - m.ln();
                if u.abs() < 0.5 {
                    m * kl_summand(u)
                } else {
                    q * (u - 1.0) + m
                }
            }),
    );
    let kl = non_negative(kl, "KL of soft best-of-n")?;
    let expected_reward = neumaier_sum(level_pmf.iter().zip(rw).map(|(q, r)| q * r));
    let win_rate = win_rate_levels(&levels, &level_pmf);
    let pmf = levels.spread_to_outcomes(dist.probs(), &level_pmf);
    Ok(SoftBestOfN {
        n,
        lambda,
        kl,
        expected_reward,
        win_rate,
        pmf,
    })
}

fn enumerate(levels: &Levels, n: u64, lambda: f64) -> Result<Vec<f64>> {
    let support: Vec<usize> = (0..levels.len())
        .filter(|&l| levels.masses()[l] > 0.0)
        .collect();
    let k = support.len();
    if k > MAX_LEVELS {
        return Err(TiltError::invalid(
            "rewards",
            format!(
                "{k} distinct reward levels; exact soft best-of-n enumerates at most {MAX_LEVELS}"
            ),
        ));
    }
    let others = n - 1;
    // Number of count vectors: C(others + k − 1, k − 1), in logs to avoid overflow.
    let ln_count = ln_binomial(others as f64 + k as f64 - 1.0, k as f64 - 1.0);
    if ln_count > MAX_COUNT_VECTORS.ln() {
        return Err(TiltError::invalid(
            "n",
            format!(
                "exact soft best-of-n with n = {n} over {k} reward levels needs about {:.3e} \
                 count vectors; the limit is {MAX_COUNT_VECTORS:e}",
                ln_count.exp()
            ),
        ));
    }
    let m = others as usize;
    let ln_fact = ln_factorials(m);
    let rw: Vec<f64> = support.iter().map(|&l| levels.rewards()[l]).collect();
    let ln_mass: Vec<f64> = support.iter().map(|&l| levels.masses()[l].ln()).collect();
    // ratio[y][l] = w(l)/w(y) = e^{(r_l − r_y)/λ}
    let ratio: Vec<Vec<f64>> = rw
        .iter()
        .map(|ry| rw.iter().map(|rl| ((rl - ry) / lambda).exp()).collect())
        .collect();
    let mut acc = vec![NeumaierSum::default(); k];
    let mut counts = vec![0usize; k];
    let nf = n as f64;
    let mut visit = |counts: &[usize]| {
        let mut ln_p = ln_fact[m];
        for (c, lm) in counts.iter().zip(&ln_mass) {
            if *c > 0 {
                ln_p += *c as f64 * lm - ln_fact[*c];
            }
        }
        let prob = ln_p.exp();
        for (y, row) in ratio.iter().enumerate() {
            // Skip absent levels: 0·∞ (a weight ratio that overflowed) must count as 0.
            let s: f64 = counts
                .iter()
                .zip(row)
                .filter(|(&c, _)| c > 0)
                .map(|(&c, &w)| c as f64 * w)
                .sum();
            acc[y].add(prob * nf / (1.0 + s));
        }
    };
    compositions(m, 0, &mut counts, &mut visit);
    let mut out = vec![0.0; levels.len()];
    for (i, &l) in support.iter().enumerate() {
        out[l] = levels.masses()[l] * acc[i].value();
    }
    Ok(out)
}

/// Visit every vector of `counts[pos..]` summing to `left`.
fn compositions(left: usize, pos: usize, counts: &mut [usize], visit: &mut impl FnMut(&[usize])) {
    if pos + 1 == counts.len() {
        counts[pos] = left;
        visit(counts);
        counts[pos] = 0;
        return;
    }
    for c in 0..=left {
        counts[pos] = c;
        compositions(left - c, pos + 1, counts, visit);
    }
    counts[pos] = 0;
}

fn ln_binomial(a: f64, b: f64) -> f64 {
    // Σ_{i=1}^{b} log((a − b + i)/i), exact enough for a size check.
    let b = b.min(a - b);
    (1..=b as u64)
        .map(|i| ((a - b + i as f64) / i as f64).ln())
        .sum()
}
