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
use crate::levels::{Levels, SUM_CHUNK};
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
    /// π_n over the outcomes, in input order; empty (and left out of the JSON) in a
    /// summary ([`best_of_n_summary`]), which never computes it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
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
    Ok(order_pass(levels, n, selection, false)?.0)
}

/// The fused pass behind [`order_statistic_levels`]; with `estimate`, it also sums
/// `E_{L~π_n}[D̂(p(L))]` (the §4 estimator, see [`kl_estimate_per_draw`]) in the same pass,
/// sharing `log p(L)` and `log1p(−p(L))` with the KL term. The extra sum runs over the same
/// fixed chunks as every other sum here, so its bits equal those of a separate
/// `chunked_sum` pass and do not depend on the thread count.
fn order_pass(
    levels: &Levels,
    n: u64,
    selection: Selection,
    estimate: bool,
) -> Result<(LevelPolicy, f64)> {
    let nf = check_n(n)?;
    let (rw, ms, bl, ab) = (
        levels.rewards(),
        levels.masses(),
        levels.below(),
        levels.above(),
    );
    let est = EstimateConstants::new(nf);
    // One fused pass per fixed chunk of levels: the level's log-mass, its mass (written
    // out) and the compensated partial sums of KL, E[r], W (and the estimator), merged in
    // chunk order as `chunked_sum` does, so the bits do not depend on the thread count.
    let mut level_pmf = vec![0.0; levels.len()];
    let partial: Vec<[NeumaierSum; 4]> = level_pmf
        .par_chunks_mut(SUM_CHUNK)
        .enumerate()
        .map(|(c, out)| {
            let mut s = [NeumaierSum::default(); 4];
            for (j, slot) in out.iter_mut().enumerate() {
                let l = c * SUM_CHUNK + j;
                let m = ms[l];
                let log_m = m.ln();
                let (log_q, q) = if n == 1 {
                    // π_1 = p exactly (the general formula agrees up to rounding).
                    (log_m, m)
                } else {
                    let log_q = level_log_mass(nf, m, bl[l], ab[l], selection);
                    (log_q, log_q.exp())
                };
                *slot = q;
                if q == 0.0 {
                    continue; // every term is q·(…) = 0: adding zeros changes no sum
                }
                s[0].add(q * (log_q - log_m));
                s[1].add(q * rw[l]);
                s[2].add(q * (bl[l] + 0.5 * m));
                if estimate {
                    s[3].add(q * est.per_draw(m, log_m));
                }
            }
            s
        })
        .collect();
    let mut total = [NeumaierSum::default(); 4];
    for s in partial {
        for k in 0..4 {
            total[k].merge(s[k]);
        }
    }
    let [kl, er, w, kl_estimate] = total.map(|s| s.value());
    Ok((
        LevelPolicy {
            level_pmf,
            kl: non_negative(kl, "KL of best-of-n")?,
            expected_reward: er,
            win_rate: w,
        },
        kl_estimate,
    ))
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

/// The per-n constants of `D̂` and its evaluation from `ε` and `log ε`.
struct EstimateConstants {
    nf: f64,
    first_const: f64,
}

impl EstimateConstants {
    fn new(nf: f64) -> Self {
        Self {
            nf,
            first_const: nf.ln() - (nf - 1.0) / nf,
        }
    }

    /// `D̂(ε)` for ε in (0, 1], given `log_eps = ln ε`. A level mass a rounding above 1
    /// (the masses of a validated distribution sum to 1 only within tolerance) is read as
    /// ε = 1, where `D̂ = 0`; `ln_1p(−ε)` of it would be NaN.
    #[inline]
    fn per_draw(&self, epsilon: f64, log_eps: f64) -> f64 {
        let nf = self.nf;
        let (epsilon, log_eps) = (epsilon.min(1.0), log_eps.min(0.0));
        let log1m = (-epsilon).ln_1p(); // −∞ at ε = 1
        let log_q = nf * log1m; // log (1−ε)^n
                                // One exponential for both q and 1 − q: whichever is below ½ is computed, and the
                                // other, being ≥ ½, is its complement to within half an ulp of itself.
        let (q, one_minus_q) = if log_q < -std::f64::consts::LN_2 {
            let q = log_q.exp();
            (q, 1.0 - q)
        } else {
            let one_minus_q = -log_q.exp_m1();
            (1.0 - one_minus_q, one_minus_q)
        };
        let first = if q == 0.0 {
            0.0
        } else {
            q * (self.first_const + (nf - 1.0) * log1m)
        };
        let second = if one_minus_q == 0.0 {
            0.0
        } else {
            one_minus_q * (one_minus_q.ln() - log_eps)
        };
        first + second
    }
}

#[inline]
fn kl_estimate_unchecked(epsilon: f64, nf: f64) -> f64 {
    EstimateConstants::new(nf).per_draw(epsilon, epsilon.ln())
}

fn full(dist: &RewardDistribution, n: u64, selection: Selection, pmf: bool) -> Result<BestOfN> {
    let levels = Levels::new(dist)?;
    let (lp, kl_estimate) = order_pass(&levels, n, selection, true)?;
    let pmf = if pmf {
        levels.spread_to_outcomes(dist.probs(), &lp.level_pmf)
    } else {
        Vec::new()
    };
    let nf = n as f64;
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
    full(dist, n, Selection::Best, true)
}

/// [`best_of_n`] (or, with [`Selection::Worst`], [`worst_of_n`]) without the per-outcome
/// pmf: every scalar is the same bits, `pmf` is empty, and the pass that spreads the law
/// back onto the outcomes is skipped (for large references where only KL, reward and win
/// rate are wanted).
///
/// # Errors
/// As [`best_of_n`].
///
/// ```
/// use tilt_core::{best_of_n::{best_of_n, best_of_n_summary, Selection}, RewardDistribution};
/// let p = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
/// let s = best_of_n_summary(&p, 2, Selection::Best).unwrap();
/// assert!(s.pmf.is_empty());
/// assert_eq!(s.kl, best_of_n(&p, 2).unwrap().kl);
/// ```
pub fn best_of_n_summary(
    dist: &RewardDistribution,
    n: u64,
    selection: Selection,
) -> Result<BestOfN> {
    full(dist, n, selection, false)
}

/// Exact worst-of-n on `dist`: the lowest reward of n draws (arXiv 2412.19792's best-of-n
/// jailbreaking direction), ties uniform. Same formula with the order reversed.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when `n = 0`.
pub fn worst_of_n(dist: &RewardDistribution, n: u64) -> Result<BestOfN> {
    full(dist, n, Selection::Worst, true)
}
