//! Win rate of a policy over the reference, ties counting one half.
//!
//! ```text
//! W(π ≻ p) = P(r(Y) > r(Y')) + ½·P(r(Y) = r(Y')),   Y ~ π, Y' ~ p independent
//!          = Σ_L π(L)·(P_p(r < r_L) + ½·p(L))
//! ```
//! (arXiv 2401.01879 §5; tie convention of arXiv 2412.19792.) It only needs the policy's
//! mass per reward level, so it is computed on [`Levels`].

use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::{chunked_sum, Levels};

/// Win rate of a per-level pmf over the reference whose levels are `levels`.
///
/// ```text
/// W = Σ_L π(L)·(below(L) + mass(L)/2)
/// ```
pub fn win_rate_levels(levels: &Levels, level_pmf: &[f64]) -> f64 {
    let (below, mass) = (levels.below(), levels.masses());
    let [w] = chunked_sum(level_pmf.len(), |l| {
        [level_pmf[l] * (below[l] + 0.5 * mass[l])]
    });
    w
}

/// Win rate of the pmf `pi` (over the outcomes of `dist`, in its order) against `dist`'s
/// reference, ties counting ½ (arXiv 2401.01879 §5).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `pi` when its length differs from the number of
/// outcomes or an entry is negative or not finite.
///
/// ```
/// use tilt_core::{win_rate::win_rate, RewardDistribution};
/// let p = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
/// // best-of-2 on a fair coin: (1/4, 3/4) wins 5/8 of the time.
/// assert!((win_rate(&p, &[0.25, 0.75]).unwrap() - 0.625).abs() < 1e-15);
/// ```
pub fn win_rate(dist: &RewardDistribution, pi: &[f64]) -> Result<f64> {
    if let Some((i, q)) = pi
        .iter()
        .enumerate()
        .find(|(_, q)| !q.is_finite() || **q < 0.0)
    {
        return Err(TiltError::invalid(
            "pi",
            format!(
                "entry {} is {q}; probabilities must be finite and ≥ 0",
                i + 1
            ),
        ));
    }
    let levels = Levels::new(dist)?;
    let level_pmf = levels.level_masses_of("pi", pi)?;
    Ok(win_rate_levels(&levels, &level_pmf))
}
