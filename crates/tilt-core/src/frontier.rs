//! The reward–KL frontier: best-of-n for a range of n next to the tilt at the same KL.
//!
//! The tilt is the policy of largest expected reward at a given KL (arXiv 2404.01730 §2),
//! so it bounds best-of-n from above at every point; the frontier shows how close best-of-n
//! comes (arXiv 2401.01879 §7, 2404.01730's asymptotic equivalence). Levels are built once
//! and shared by every n and every tilt.

use crate::best_of_n::{order_statistic_levels, Selection};
use crate::bounds::bon_kl_bound;
use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::Levels;
use crate::tilt::{max_kl, solve_lambda_for_kl, tilt_levels};
use serde::Serialize;

/// Best-of-n at one n.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BonPoint {
    /// Number of draws.
    pub n: u64,
    /// Exact KL(π_n‖p), nats.
    pub kl: f64,
    /// `log n − (n−1)/n`, nats.
    pub kl_bound: f64,
    /// E_{π_n}[r].
    pub expected_reward: f64,
    /// Win rate over p, ties ½.
    pub win_rate: f64,
}

/// The tilt at one KL.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TiltPoint {
    /// β = 1/λ; +∞ at KL = 0 (serialised as null; `lambda` is then 0).
    pub beta: f64,
    /// λ = 1/β; +∞ at the largest achievable KL, `−log p(argmax set)` (serialised as
    /// null; `beta` is then 0).
    pub lambda: f64,
    /// KL(φ‖p), nats.
    pub kl: f64,
    /// E_φ[r].
    pub expected_reward: f64,
    /// Win rate over p, ties ½.
    pub win_rate: f64,
}

/// Best-of-n and the tilt at the same KLs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frontier {
    /// Best-of-n points, increasing n.
    pub bon: Vec<BonPoint>,
    /// The tilt at each best-of-n's KL, same order.
    pub tilt: Vec<TiltPoint>,
}

/// The reward levels of one reference, built once and shared by every point of a
/// frontier: best-of-n at any n, the tilt at any KL or multiplier. What [`frontier`]
/// uses, one point at a time, so that a caller can stream the points (or report
/// progress) instead of holding them all.
#[derive(Debug, Clone)]
pub struct FrontierSolver {
    levels: Levels,
    kl_max: f64,
}

impl FrontierSolver {
    /// Group the outcomes of `dist` into levels.
    ///
    /// # Errors
    /// As [`Levels::new`].
    pub fn new(dist: &RewardDistribution) -> Result<Self> {
        let levels = Levels::new(dist)?;
        let kl_max = max_kl(&levels);
        Ok(Self { levels, kl_max })
    }

    /// The largest KL a tilt reaches, `−log p(argmax set)` (nats).
    pub fn max_kl(&self) -> f64 {
        self.kl_max
    }

    /// Exact best-of-n at one n (arXiv 2401.01879 §2; docs/theory.md §2).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `n` for n = 0.
    pub fn bon_point(&self, n: u64) -> Result<BonPoint> {
        let b = order_statistic_levels(&self.levels, n, Selection::Best)?;
        Ok(BonPoint {
            n,
            kl: b.kl,
            kl_bound: bon_kl_bound(n)?,
            expected_reward: b.expected_reward,
            win_rate: b.win_rate,
        })
    }

    /// The tilt whose KL is `kl` (arXiv 2404.01730 §2; docs/theory.md §1). A KL at the
    /// largest achievable, or within rounding below it (above every KL a finite λ reaches
    /// in floating point, see [`solve_lambda_for_kl`]), gives the λ = ∞ limit.
    ///
    /// # Errors
    /// As [`solve_lambda_for_kl`].
    pub fn tilt_at_kl(&self, kl: f64) -> Result<TiltPoint> {
        let lambda = if kl >= self.kl_max {
            f64::INFINITY
        } else {
            solve_lambda_for_kl(&self.levels, kl)?
        };
        self.tilt_at_lambda(lambda)
    }

    /// The tilt with multiplier λ ∈ [0, ∞] (no solve: one evaluation, e.g. to draw the
    /// tilt's curve on a grid of λ).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `lambda` when negative or NaN.
    pub fn tilt_at_lambda(&self, lambda: f64) -> Result<TiltPoint> {
        let t = tilt_levels(&self.levels, lambda)?;
        Ok(TiltPoint {
            beta: 1.0 / lambda,
            lambda,
            kl: t.kl,
            expected_reward: t.expected_reward,
            win_rate: t.win_rate,
        })
    }
}

/// The values of n of a frontier: all of `1..=n_max`, or, with `points = Some(k)`, k
/// log-spaced integers from 1 to `n_max` (deduplicated, so possibly fewer).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n-max` when 0, or `points` when 0 (or 1 with
/// `n_max > 1`), or when more than 10^6 points would be listed.
///
/// ```
/// use tilt_core::frontier::frontier_ns;
/// assert_eq!(frontier_ns(4, None).unwrap(), vec![1, 2, 3, 4]);
/// assert_eq!(frontier_ns(100, Some(3)).unwrap(), vec![1, 10, 100]);
/// ```
pub fn frontier_ns(n_max: u64, points: Option<usize>) -> Result<Vec<u64>> {
    if n_max == 0 {
        return Err(TiltError::invalid("n-max", "must be at least 1 (got 0)"));
    }
    match points {
        None => {
            if n_max > 1_000_000 {
                return Err(TiltError::invalid(
                    "n-max",
                    format!("{n_max} points; give points to log-space them (at most 10^6)"),
                ));
            }
            Ok((1..=n_max).collect())
        }
        Some(0) => Err(TiltError::invalid("points", "must be at least 1 (got 0)")),
        Some(k) if k > 1_000_000 => Err(TiltError::invalid("points", format!("{k}: at most 10^6"))),
        Some(1) => Ok(vec![n_max]),
        Some(k) => {
            let top = (n_max as f64).ln();
            let mut ns: Vec<u64> = (0..k)
                .map(|i| {
                    let v = (top * i as f64 / (k - 1) as f64).exp().round() as u64;
                    v.clamp(1, n_max)
                })
                .collect();
            ns[k - 1] = n_max;
            ns.dedup();
            Ok(ns)
        }
    }
}

/// Best-of-n at each n in `ns`, and the tilt at each one's exact KL (arXiv 2401.01879 §2,
/// arXiv 2404.01730 §2), with the levels built once ([`FrontierSolver`]).
///
/// # Errors
/// [`TiltError::InvalidInput`] for n = 0 in `ns`; [`TiltError::NoConvergence`] if a tilt
/// cannot be solved.
pub fn frontier(dist: &RewardDistribution, ns: &[u64]) -> Result<Frontier> {
    let solver = FrontierSolver::new(dist)?;
    let mut bon = Vec::with_capacity(ns.len());
    let mut tilt = Vec::with_capacity(ns.len());
    for &n in ns {
        let b = solver.bon_point(n)?;
        tilt.push(solver.tilt_at_kl(b.kl)?);
        bon.push(b);
    }
    Ok(Frontier { bon, tilt })
}
