//! Exact best-of-n and worst-of-n on a finite reference, with ties (arXiv 2401.01879 §2).
//!
//! Draw n outcomes iid from p and return the one with the highest reward (worst-of-n: the
//! lowest), breaking ties uniformly among the tied draws. With reward levels L (outcomes
//! tied at one reward), `F = P(r ≤ r_L)` and `F⁻ = P(r < r_L)`, the returned level has law
//! `F^n − F⁻^n` (the max of n iid levels), split among the tied outcomes in proportion to p:
//!
//! ```text
//! π_n(y) = p(y)/p(T(y)) · (F(y)^n − F⁻(y)^n)
//! ```
//!
//! ## Why it is computed the way it is
//! For n up to 10^15 the textbook `F.powi(n) - Fm.powi(n)` is useless: near the top,
//! `F = 1 − tail` with tails far below machine epsilon. Each level is instead computed as
//!
//! ```text
//! F^n − F⁻^n = e^{a}·(−expm1(c)),  a = n·log F,  c = n·log1p(−p(L)/F)
//! ```
//! where `log F = log1p(−above)` with the upper tail summed directly ([`Levels`]) when F is
//! near 1, and `ln(below + mass)` otherwise. The ratio `F⁻/F = 1 − p(L)/F` never forms the
//! difference of two numbers near 1, so every level keeps full relative accuracy, and KL is
//! accumulated from `log π_n(L)` in log space. Per-level work runs on rayon in fixed chunks
//! (bit-identical output for any thread count).

use crate::bounds::{bon_kl_bound, bon_win_rate_bound, check_n};
use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::{chunked_sum, Levels, SUM_CHUNK};
use crate::numerics::{ln_pow_one_minus, non_negative, NeumaierSum, Shown};
use rayon::prelude::*;
use serde::Serialize;

/// Which order statistic of the n draws is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The highest reward (best-of-n).
    Best,
    /// The lowest reward (worst-of-n, "best-of-n jailbreaking", arXiv 2412.19792).
    Worst,
}

/// The law of best-of-n (or worst-of-n) on reward levels, with its KL, reward and win rate.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelPolicy {
    /// Mass of each reward level under the policy (same order as [`Levels::rewards`]).
    pub level_pmf: Vec<f64>,
    /// KL(π‖p) in nats.
    pub kl: f64,
    /// E_π[r].
    pub expected_reward: f64,
    /// Win rate of π over p, ties counting ½.
    pub win_rate: f64,
}

/// Everything `tilt theory bon` reports for one n.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestOfN {
    /// Number of draws.
    pub n: u64,
    /// Best-of-n or worst-of-n.
    pub selection: Selection,
    /// Exact KL(π_n‖p), nats.
    pub kl: f64,
    /// `log n − (n−1)/n`, nats (an upper bound on `kl`, arXiv 2401.01879 Thm 3.1).
    pub kl_bound: f64,
    /// `E_{L~π_n}[D̂(p(L))]`, the estimator of arXiv 2401.01879 §4 averaged exactly over the
    /// policy's output, with ε the reference mass of the returned reward level (see
    /// [`kl_estimate_per_draw`] for why the level and not the outcome), nats.
    pub kl_estimate: f64,
    /// E_{π_n}[r].
    pub expected_reward: f64,
    /// Win rate of π_n over p, ties counting ½.
    pub win_rate: f64,
    /// `n/(n+1)`, the upper bound on the win rate of best-of-n (Thm 5.3); for worst-of-n,
    /// `1/(n+1)`, the corresponding lower bound.
    pub win_rate_bound: f64,
    /// π_n over the outcomes, in input order.
    pub pmf: Vec<f64>,
}

/// `log` of the policy mass of one level (see the module doc), for `n ≥ 1`.
#[inline]
fn level_log_mass(nf: f64, mass: f64, below: f64, above: f64, selection: Selection) -> f64 {
    if mass <= 0.0 {
        return f64::NEG_INFINITY;
    }
    // For worst-of-n the roles of the two tails swap: G = P(r ≥ r_L), G⁺ = P(r > r_L).
    let (near, far) = match selection {
        Selection::Best => (below, above),
        Selection::Worst => (above, below),
    };
    let cum = near + mass; // F (or G), accurate when small
    let log_cum = if far < 0.5 {
        ln_pow_one_minus(far, 1.0)
    } else {
        cum.ln()
    };
    let a = nf * log_cum;
    let c = nf * (-(mass / cum).min(1.0)).ln_1p();
    a + (-c.exp_m1()).ln()
}

/// Best-of-n (or worst-of-n) on precomputed levels: the per-level law and its KL (nats),
/// expected reward and win rate, following arXiv 2401.01879 §2 (ties: uniform among tied
/// draws).
///
/// ```text
/// π_n(L) = F_L^n − F⁻_L^n,   KL = Σ_L π_n(L)·log(π_n(L)/p(L)),   W = Σ_L π_n(L)(F⁻_L + p(L)/2)
/// ```
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`; [`TiltError::NumericalFailure`] if
/// the KL sum is NaN (never clamped to 0).
pub fn order_statistic_levels(
    levels: &Levels,
    n: u64,
    selection: Selection,
) -> Result<LevelPolicy> {
    let nf = check_n(n)?;
    let (rw, ms, bl, ab) = (
        levels.rewards(),
        levels.masses(),
        levels.below(),
        levels.above(),
    );
    // One fused pass per fixed chunk of levels: the level's log-mass, its mass (written
    // out) and the compensated partial sums of KL, E[r] and W, merged in chunk order as
    // `chunked_sum` does, so the bits do not depend on the thread count.
    let mut level_pmf = vec![0.0; levels.len()];
    let partial: Vec<[NeumaierSum; 3]> = level_pmf
        .par_chunks_mut(SUM_CHUNK)
        .enumerate()
        .map(|(c, out)| {
            let mut s = [NeumaierSum::default(); 3];
            for (j, slot) in out.iter_mut().enumerate() {
                let l = c * SUM_CHUNK + j;
                let (log_q, q) = if n == 1 {
                    // π_1 = p exactly (the general formula agrees up to rounding).
                    (ms[l].ln(), ms[l])
                } else {
                    let log_q = level_log_mass(nf, ms[l], bl[l], ab[l], selection);
                    (log_q, log_q.exp())
                };
                *slot = q;
                let terms = if q == 0.0 {
                    [0.0; 3]
                } else {
                    [
                        q * (log_q - ms[l].ln()),
                        q * rw[l],
                        q * (bl[l] + 0.5 * ms[l]),
                    ]
                };
                for (sum, t) in s.iter_mut().zip(terms) {
                    sum.add(t);
                }
            }
            s
        })
        .collect();
    let mut total = [NeumaierSum::default(); 3];
    for s in partial {
        for k in 0..3 {
            total[k].merge(s[k]);
        }
    }
    let [kl, er, w] = total.map(|s| s.value());
    Ok(LevelPolicy {
        level_pmf,
        kl: non_negative(kl, "KL of best-of-n")?,
        expected_reward: er,
        win_rate: w,
    })
}

/// The per-draw KL estimator `D̂(ε)` of arXiv 2401.01879 §4, where ε is the reference
/// probability of what best-of-n returned. Nats.
///
/// ```text
/// D̂(ε) = (1−ε)^n·(log n + (n−1)·log(1−ε) − (n−1)/n) + (1 − (1−ε)^n)·log((1 − (1−ε)^n)/ε)
/// ```
/// It is the exact best-of-n KL of a reference whose best output is one atom of mass ε
/// above a continuous remainder (docs/theory.md §3); `D̂(0) = log n − (n−1)/n` (the limit)
/// and `D̂(1) = 0`. The formula is the paper's; the paper averages
/// it over draws.
///
/// **ε with ties: the mass of the returned reward level.** The paper states the estimator
/// under its no-ties assumption, where the returned output and its reward level coincide.
/// With ties, what best-of-n selects is a reward level `T(y)`; which tied outcome comes
/// back is then a draw from p restricted to the level, and that step costs no KL
/// (`π_n/p` is constant on a level, docs/theory.md §2). So the atom of that reading is
/// the level, and [`best_of_n`] passes `ε = p(T(y))`. This keeps the estimate a function of
/// the reward law alone: splitting an outcome into several tied ones, or repeating a value
/// in a list of samples (each sample an outcome of mass 1/m), leaves it unchanged, where
/// `ε = p(y)` would slide it towards the bound `D̂(0)`.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`, or `epsilon` when outside [0, 1].
///
/// ```
/// use tilt_core::best_of_n::kl_estimate_per_draw;
/// assert!((kl_estimate_per_draw(0.5, 4).unwrap() - 0.4991239).abs() < 1e-7);
/// ```
pub fn kl_estimate_per_draw(epsilon: f64, n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    if !(0.0..=1.0).contains(&epsilon) {
        return Err(TiltError::invalid(
            "epsilon",
            format!(
                "{epsilon}: a probability must be in [0, 1]",
                epsilon = Shown(epsilon)
            ),
        ));
    }
    if epsilon == 0.0 {
        return bon_kl_bound(n);
    }
    Ok(kl_estimate_unchecked(epsilon, nf))
}

#[inline]
fn kl_estimate_unchecked(epsilon: f64, nf: f64) -> f64 {
    let log_q = ln_pow_one_minus(epsilon, nf); // log (1−ε)^n
    let q = log_q.exp();
    let one_minus_q = -log_q.exp_m1();
    let first = if q == 0.0 {
        0.0
    } else {
        q * (nf.ln() + (nf - 1.0) * (-epsilon).ln_1p() - (nf - 1.0) / nf)
    };
    let second = if one_minus_q == 0.0 {
        0.0
    } else {
        one_minus_q * (one_minus_q.ln() - epsilon.ln())
    };
    first + second
}

fn full(dist: &RewardDistribution, n: u64, selection: Selection) -> Result<BestOfN> {
    let levels = Levels::new(dist)?;
    let lp = order_statistic_levels(&levels, n, selection)?;
    let pmf = levels.spread_to_outcomes(dist.probs(), &lp.level_pmf);
    let nf = n as f64;
    // ε = the reference mass of the returned level (see `kl_estimate_per_draw`).
    let masses = levels.masses();
    let [kl_estimate] = chunked_sum(levels.len(), |l| {
        let q = lp.level_pmf[l];
        if q == 0.0 {
            [0.0]
        } else {
            [q * kl_estimate_unchecked(masses[l], nf)]
        }
    });
    Ok(BestOfN {
        n,
        selection,
        kl: lp.kl,
        kl_bound: bon_kl_bound(n)?,
        kl_estimate,
        expected_reward: lp.expected_reward,
        win_rate: lp.win_rate,
        win_rate_bound: match selection {
            Selection::Best => bon_win_rate_bound(n)?,
            Selection::Worst => 1.0 / (nf + 1.0),
        },
        pmf,
    })
}

/// Exact best-of-n on `dist` (arXiv 2401.01879 §2, ties uniform among tied draws), with its
/// KL, the analytical bound, the §4 estimator (ε = mass of the returned reward level),
/// expected reward and win rate.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`.
///
/// ```
/// use tilt_core::{best_of_n::best_of_n, RewardDistribution};
/// let p = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
/// let b = best_of_n(&p, 2).unwrap();
/// assert!((b.pmf[1] - 0.75).abs() < 1e-15);
/// assert!((b.kl - 0.130812035941).abs() < 1e-12);
/// assert!((b.win_rate - 0.625).abs() < 1e-15);
/// ```
pub fn best_of_n(dist: &RewardDistribution, n: u64) -> Result<BestOfN> {
    full(dist, n, Selection::Best)
}

/// Exact worst-of-n on `dist`: the lowest reward of n draws (arXiv 2412.19792's best-of-n
/// jailbreaking direction), ties uniform. Same formula with the order reversed.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`.
pub fn worst_of_n(dist: &RewardDistribution, n: u64) -> Result<BestOfN> {
    full(dist, n, Selection::Worst)
}
