//! The KL-regularised optimum: the exponential tilt of the reference by the reward
//! (arXiv 2404.01730 §2; the RLHF objective's closed-form solution).
//!
//! ```text
//! φ_λ(y) = p(y)·e^{λ r(y)} / Z(λ),   Λ(λ) = log Z(λ) = log E_p e^{λ r},   λ = 1/β
//! KL(φ_λ‖p) = λ·E_{φ_λ}[r] − Λ(λ)     (increasing in λ, from 0 to −log p(argmax set))
//! ```
//!
//! Inside, the multiplier λ is the one convention; β = 1/λ is converted at the edges.
//! `Λ` is a sum shifted by the top reward (never overflowing), and KL is summed as
//! `Σ_L p(L)·h(log(φ(L)/p(L)))` with `h(u) = u·e^u − e^u + 1 ≥ 0` ([`kl_summand`]): every
//! term is non-negative, so KL keeps its relative accuracy at λ → 0 where `λE r − Λ` would
//! cancel to nothing. That matters because [`tilt_by_kl`] solves `KL(φ_λ‖p) = Δ` for λ to
//! 1e-12 relative accuracy (Brent's method on log λ after bracketing; KL is monotone).

use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::{chunked_sum, Levels};
use crate::numerics::{kl_summand, neg_log_share, non_negative, Shown};
use crate::optimize::brent_root;
use crate::win_rate::win_rate_levels;
use serde::Serialize;

/// Relative tolerance to which [`tilt_by_kl`] solves for λ (and β).
pub const LAMBDA_RELATIVE_TOLERANCE: f64 = 1e-12;

/// The tilt on reward levels, for a given multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct TiltedLevels {
    /// λ = 1/β (may be +∞: the reference conditioned on its argmax set).
    pub lambda: f64,
    /// Λ(λ) = log E_p e^{λ r} (+∞ at λ = +∞).
    pub log_partition: f64,
    /// φ_λ per reward level.
    pub level_pmf: Vec<f64>,
    /// KL(φ_λ‖p), nats.
    pub kl: f64,
    /// E_{φ_λ}[r].
    pub expected_reward: f64,
    /// Win rate of φ_λ over p, ties counting ½.
    pub win_rate: f64,
}

/// Everything `tilt theory tilt` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tilt {
    /// β = 1/λ, the KL-regularisation strength; +∞ at λ = 0, the reference itself
    /// (serialised as null; `lambda` is then 0).
    pub beta: f64,
    /// λ = 1/β; +∞ at the largest achievable KL, `−log p(argmax set)` (serialised as null;
    /// `beta` is then 0).
    pub lambda: f64,
    /// KL(φ‖p), nats.
    pub kl: f64,
    /// E_φ[r].
    pub expected_reward: f64,
    /// Win rate of φ over p, ties counting ½.
    pub win_rate: f64,
    /// log Z = log E_p e^{r/β} (nats); +∞ at β = 0 (serialised as null).
    pub log_partition: f64,
    /// φ over the outcomes, in input order.
    pub pmf: Vec<f64>,
}

/// The largest KL a tilt reaches on a finite support: `−log p(argmax set)`, the λ → ∞ limit
/// (arXiv 2404.01730 §2; docs/theory.md §1). A larger KL budget buys no more reward: the
/// tilt at λ = ∞ already has the largest reward on the support.
///
/// ```text
/// KL_max = −log p(T*) = log1p(P_p(r < r*)/p(T*)),   T* = argmax set, r* its reward
/// ```
/// Formed from the mass below the argmax set ([`neg_log_share`]), so it is `≥ 0` exactly,
/// and `0` exactly when every outcome ties for the top (where `−log Σ p` over 10⁶ equal
/// masses would round to `−7.9e-12`).
pub fn max_kl(levels: &Levels) -> f64 {
    let top = levels.top_level();
    neg_log_share(
        levels.masses()[top],
        levels.below()[top] + levels.above()[top],
    )
}

/// The tilt's normaliser at one finite λ > 0, and the per-level pieces every quantity of
/// the tilt is made of, without allocating.
///
/// ```text
/// y_L = λ(r_L − r*) ≤ 0,   shift = log Σ_L p(L)·e^{y_L} = Λ(λ) − λ r*,   u_L = y_L − shift
/// φ_λ(L) = p(L)·e^{u_L},   KL = Σ_L p(L)·h(u_L),   h(u) = u·e^u − e^u + 1
/// ```
/// The sum is taken as `Σ p·e^{y − K}` with `K = max(log p(T*), −700)`: every term is at
/// most `e^{700}` (since `p ≤ 1`, `y ≤ 0`) and the top one at least `e^{−745 + 700}`, so it
/// neither overflows nor loses digits to subnormals, in one pass and without a logarithm per
/// level. Sums run in fixed chunks ([`chunked_sum`]): the bits do not depend on the
/// thread count.
struct TiltKernel<'a> {
    levels: &'a Levels,
    lambda: f64,
    top_reward: f64,
    shift: f64,
}

impl<'a> TiltKernel<'a> {
    /// For `0 < λ < ∞`.
    fn new(levels: &'a Levels, lambda: f64) -> Self {
        let (rw, ms) = (levels.rewards(), levels.masses());
        let top = levels.top_level();
        let c = rw[top];
        let k = ms[top].ln().max(-700.0);
        let [sum] = chunked_sum(levels.len(), |l| {
            let m = ms[l];
            if m > 0.0 {
                [m * (lambda * (rw[l] - c) - k).exp()]
            } else {
                [0.0]
            }
        });
        Self {
            levels,
            lambda,
            top_reward: c,
            shift: k + sum.ln(),
        }
    }

    /// `u_L = log(φ(L)/p(L))` (meaningful where `p(L) > 0`; `−∞` where `λ(r − r*)` underflows).
    #[inline]
    fn log_ratio(&self, l: usize) -> f64 {
        self.lambda * (self.levels.rewards()[l] - self.top_reward) - self.shift
    }

    /// `φ(L) = p(L)·e^{u}` (`e^{log p + u}` where `e^u` alone would overflow).
    #[inline]
    fn level_mass(&self, l: usize) -> f64 {
        let m = self.levels.masses()[l];
        if m <= 0.0 {
            return 0.0;
        }
        let u = self.log_ratio(l);
        if u < 700.0 {
            m * u.exp()
        } else {
            (m.ln() + u).exp()
        }
    }

    /// `KL(φ_λ‖p) = Σ_L p(L)·h(u_L)`, every term `≥ 0`, so KL keeps its relative accuracy as
    /// λ → 0 where `λ·E r − Λ` would cancel to nothing.
    ///
    /// # Errors
    /// [`TiltError::NumericalFailure`] if the sum is NaN.
    fn kl(&self) -> Result<f64> {
        let ms = self.levels.masses();
        let [k] = chunked_sum(self.levels.len(), |l| {
            let m = ms[l];
            if m <= 0.0 {
                return [0.0];
            }
            // When λ(r − r*) underflows to −∞ the level has no tilted mass, u = −∞ and
            // h(−∞) = 1 (the form q·(u − 1) + m would give 0·(−∞) = NaN there).
            let u = self.log_ratio(l);
            if u == f64::NEG_INFINITY {
                [m]
            } else if u.abs() < 0.5 {
                [m * kl_summand(u)]
            } else {
                [self.level_mass(l) * (u - 1.0) + m]
            }
        });
        non_negative(k, "KL of the tilt")
    }
}

/// The tilt with multiplier λ ≥ 0 on precomputed levels (λ = +∞ allowed), arXiv
/// 2404.01730 §2 (docs/theory.md §1): `φ_λ ∝ p·e^{λ r}`, `KL = Σ_L p(L)·h(log φ/p)`.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `lambda` when negative or NaN;
/// [`TiltError::NumericalFailure`] if the KL sum is NaN (never clamped to 0).
pub fn tilt_levels(levels: &Levels, lambda: f64) -> Result<TiltedLevels> {
    if lambda.is_nan() || lambda < 0.0 {
        return Err(TiltError::invalid(
            "lambda",
            format!(
                "{lambda}: the tilt multiplier must be ≥ 0 (β = 1/λ > 0)",
                lambda = Shown(lambda)
            ),
        ));
    }
    let (rw, ms) = (levels.rewards(), levels.masses());
    let top = levels.top_level();
    let level_pmf: Vec<f64>;
    let (log_partition, kl);
    if lambda == f64::INFINITY {
        let mut v = vec![0.0; levels.len()];
        v[top] = 1.0;
        level_pmf = v;
        log_partition = f64::INFINITY;
        kl = max_kl(levels);
    } else if lambda == 0.0 {
        // β = ∞: the reference itself, exactly.
        level_pmf = ms.to_vec();
        log_partition = 0.0;
        kl = 0.0;
    } else {
        let kernel = TiltKernel::new(levels, lambda);
        log_partition = kernel.shift + lambda * kernel.top_reward;
        level_pmf = (0..levels.len()).map(|l| kernel.level_mass(l)).collect();
        kl = kernel.kl()?;
    }
    let [er] = chunked_sum(levels.len(), |l| [level_pmf[l] * rw[l]]);
    let win_rate = win_rate_levels(levels, &level_pmf);
    Ok(TiltedLevels {
        lambda,
        log_partition,
        level_pmf,
        kl,
        expected_reward: er,
        win_rate,
    })
}

/// `KL(φ_λ‖p)` alone, for `λ ∈ [0, ∞]`: what [`tilt_levels`] reports as `kl`, without
/// building the pmf (the inner loop of [`solve_lambda_for_kl`]).
fn kl_of_lambda(levels: &Levels, lambda: f64) -> Result<f64> {
    if lambda == 0.0 {
        Ok(0.0)
    } else if lambda == f64::INFINITY {
        Ok(max_kl(levels))
    } else {
        TiltKernel::new(levels, lambda).kl()
    }
}

/// Solve `KL(φ_λ‖p) = kl` for λ on precomputed levels (arXiv 2404.01730 §2; docs/theory.md
/// §1: `K(λ)` is increasing from 0 to `−log p(argmax set)`) to
/// [`LAMBDA_RELATIVE_TOLERANCE`]: a bracket by doubling from a Gaussian guess, then Brent's
/// method on `log λ` (about ten evaluations of KL, each two passes over the levels).
/// `kl = 0` gives λ = 0; `kl = max_kl` gives λ = +∞. λ is searched in units of the reward
/// range (`λ·(max r − min r)` between 1e-300 and 1e300), so that rewards of any scale are
/// solvable.
///
/// Near saturation KL is flat in λ (`dKL/d log λ = λ²·Var_φ(r)` falls below the rounding
/// of KL), and a budget a rounding step below the maximum, such as the exact KL of
/// best-of-n at large n, may lie above every KL a finite λ reaches in floating point. When
/// doubling λ no longer increases KL, the tilt has reached its λ → ∞ limit to rounding, and
/// λ = +∞ is returned (its KL, `−log p(argmax set)`, then equals the budget to rounding).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `kl` when negative or not finite;
/// [`TiltError::KlBudgetTooLarge`] when `kl > −log p(argmax set)`;
/// [`TiltError::NoConvergence`] if no bracket is found within `λ·range ∈ [1e-300, 1e300]`.
pub fn solve_lambda_for_kl(levels: &Levels, kl: f64) -> Result<f64> {
    if !kl.is_finite() || kl < 0.0 {
        return Err(TiltError::invalid(
            "kl",
            format!(
                "{kl}: a KL budget must be finite and ≥ 0 (nats)",
                kl = Shown(kl)
            ),
        ));
    }
    let max = max_kl(levels);
    if kl > max {
        return Err(TiltError::KlBudgetTooLarge { requested: kl, max });
    }
    if kl == 0.0 {
        return Ok(0.0);
    }
    if kl == max {
        return Ok(f64::INFINITY);
    }
    let k = |lambda: f64| kl_of_lambda(levels, lambda);
    // 0 < kl < max, so at least two levels carry mass and the range is positive (and
    // finite: `RewardDistribution` rejects overflowing ranges).
    let (rw, ms) = (levels.rewards(), levels.masses());
    let range = rw[levels.top_level()] - rw[levels.bottom_level()];
    // Initial guess from the Gaussian approximation KL ≈ λ²σ²/2, in units of the range.
    let mu: f64 = rw.iter().zip(ms).map(|(r, m)| r * m).sum();
    let var_scaled: f64 = rw
        .iter()
        .zip(ms)
        .map(|(r, m)| m * ((r - mu) / range) * ((r - mu) / range))
        .sum();
    let guess = if var_scaled > 0.0 && var_scaled.is_finite() {
        (2.0 * kl / var_scaled).sqrt() / range
    } else {
        1.0 / range
    };
    let no_bracket = |detail: String| TiltError::NoConvergence {
        what: "tilt multiplier for the KL budget".into(),
        detail,
    };
    let (mut lo, mut hi) = (guess, guess);
    let mut k_hi = k(hi)?;
    let mut k_lo = k_hi;
    while k_hi < kl {
        let next = k(2.0 * hi)?;
        if next <= k_hi {
            // KL stopped growing: it is at its λ → ∞ limit to rounding.
            if max - kl <= 1e-9 * max {
                return Ok(f64::INFINITY);
            }
            return Err(no_bracket(format!(
                "the KL of the tilt stops growing at {k_hi} nats, below the budget {kl} nats \
                 (maximum {max})",
                kl = Shown(kl),
                max = Shown(max),
                k_hi = Shown(k_hi)
            )));
        }
        (lo, k_lo) = (hi, k_hi);
        hi *= 2.0;
        k_hi = next;
        if hi * range > 1e300 || !hi.is_finite() {
            return Err(no_bracket(format!(
                "KL budget {kl} nats is within rounding of the maximum {max}",
                kl = Shown(kl),
                max = Shown(max)
            )));
        }
    }
    while k_lo > kl {
        hi = lo;
        lo /= 2.0;
        k_lo = k(lo)?;
        if lo * range < 1e-300 {
            return Err(no_bracket(format!(
                "KL budget {kl} nats is too small to resolve",
                kl = Shown(kl)
            )));
        }
    }
    if k_lo == kl {
        return Ok(lo);
    }
    // Brent on s = log λ: KL is smooth and increasing in s, so the bracket [log lo, log hi]
    // (KL(lo) ≤ kl ≤ KL(hi)) shrinks superlinearly.
    let mut failure = None;
    let s = brent_root(
        |s| match k(s.exp()) {
            Ok(v) => v - kl,
            Err(e) => {
                failure = Some(e);
                f64::NAN
            }
        },
        lo.ln(),
        hi.ln(),
        0.1 * LAMBDA_RELATIVE_TOLERANCE,
        "tilt multiplier for the KL budget",
    );
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(s?.exp())
}

fn finish(dist: &RewardDistribution, levels: &Levels, t: TiltedLevels) -> Tilt {
    let pmf = levels.spread_to_outcomes(dist.probs(), &t.level_pmf);
    Tilt {
        beta: 1.0 / t.lambda,
        lambda: t.lambda,
        kl: t.kl,
        expected_reward: t.expected_reward,
        win_rate: t.win_rate,
        log_partition: t.log_partition,
        pmf,
    }
}

/// The tilt `φ_λ ∝ p·e^{λ r}` for a multiplier λ ∈ [0, ∞] (arXiv 2404.01730 §2).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `lambda` when negative or NaN.
pub fn tilt_by_lambda(dist: &RewardDistribution, lambda: f64) -> Result<Tilt> {
    let levels = Levels::new(dist)?;
    let t = tilt_levels(&levels, lambda)?;
    Ok(finish(dist, &levels, t))
}

/// The KL-regularised optimum `φ_β ∝ p·e^{r/β}`, maximiser of `E_π r − β·KL(π‖p)`
/// (arXiv 2404.01730 §2), for β ∈ (0, ∞] (β = ∞ is p).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `beta` when not > 0.
///
/// ```
/// use tilt_core::{tilt::tilt_by_beta, RewardDistribution};
/// let p = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
/// let t = tilt_by_beta(&p, 1.0).unwrap();
/// // Bernoulli(½), λ = 1: φ(1) = a = e/(1 + e), KL = a·log 2a + (1 − a)·log 2(1 − a)
/// // = 0.1109441 nats (docs/theory.md §1).
/// assert!((t.kl - 0.1109441).abs() < 1e-7);
/// ```
pub fn tilt_by_beta(dist: &RewardDistribution, beta: f64) -> Result<Tilt> {
    if beta.is_nan() || beta <= 0.0 {
        return Err(TiltError::invalid(
            "beta",
            format!(
                "{beta}: the regularisation strength must be > 0",
                beta = Shown(beta)
            ),
        ));
    }
    tilt_by_lambda(dist, 1.0 / beta)
}

/// The tilt at a KL budget Δ (nats): the policy of largest expected reward among all with
/// KL ≤ Δ (arXiv 2404.01730 §2), λ solved to 1e-12 relative.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `kl` when negative or not finite;
/// [`TiltError::KlBudgetTooLarge`] beyond `−log p(argmax set)`.
pub fn tilt_by_kl(dist: &RewardDistribution, kl: f64) -> Result<Tilt> {
    let levels = Levels::new(dist)?;
    let lambda = solve_lambda_for_kl(&levels, kl)?;
    let t = tilt_levels(&levels, lambda)?;
    Ok(finish(dist, &levels, t))
}
