//! Selection rules over scored candidates, with the seeded randomness they need.
//!
//! The rules see only the candidates' rewards (in draw order) and a [`SequenceSampler`] of
//! their own (the prompt's selection stream, see [`crate::generate`]), so a rule is a pure
//! function of (rewards, seed): easy to test exactly and independent of how the candidates
//! were produced. Ties are compared exactly (`==` on the reward values), and broken
//! uniformly, which is the tie rule under which tilt-core's best-of-n law
//! `π_n(y) = p(y)/p(T(y))·(F^n − F⁻^n)` holds (arXiv 2401.01879 §2, docs/theory.md).

use crate::cost::Rule;
use crate::error::{EngineError, Result as EResult};
use tilt_models::sampling::SequenceSampler;

/// The index of the highest reward, ties broken uniformly with one draw from `sampler`
/// (best-of-N, arXiv 2401.01879 §2).
///
/// # Errors
/// [`EngineError::Invalid`] on no rewards or a non-finite reward.
///
/// ```
/// use tilt_engine::select::select_best;
/// use tilt_models::sampling::SequenceSampler;
/// let mut s = SequenceSampler::new(0, 0);
/// assert_eq!(select_best(&[0.1, 0.7, 0.3], &mut s).unwrap(), 1);
/// ```
pub fn select_best(rewards: &[f64], sampler: &mut SequenceSampler) -> Result<usize, EngineError> {
    select_extreme(rewards, sampler, |a, b| a > b)
}

/// The index of the lowest reward, ties broken uniformly (worst-of-N).
///
/// # Errors
/// As [`select_best`].
pub fn select_worst(rewards: &[f64], sampler: &mut SequenceSampler) -> Result<usize, EngineError> {
    select_extreme(rewards, sampler, |a, b| a < b)
}

fn select_extreme(
    rewards: &[f64],
    sampler: &mut SequenceSampler,
    better: impl Fn(f64, f64) -> bool,
) -> Result<usize, EngineError> {
    check_rewards(rewards)?;
    let mut best = rewards[0];
    for &r in &rewards[1..] {
        if better(r, best) {
            best = r;
        }
    }
    let tied: Vec<usize> = (0..rewards.len()).filter(|&i| rewards[i] == best).collect();
    // One uniform draw whatever the number of ties, so the stream's use is fixed.
    let u = sampler.uniform();
    let k = ((u * tied.len() as f64) as usize).min(tied.len() - 1);
    Ok(tied[k])
}

/// Soft best-of-N (arXiv 2505.03156): index i with probability
/// `e^{r_i/λ} / Σ_j e^{r_j/λ}`, drawn from `sampler` (computed from `r_i/λ` in log space,
/// so large rewards or small λ do not overflow).
///
/// # Errors
/// [`EngineError::Invalid`] on no rewards, a non-finite reward, or λ not finite > 0.
pub fn select_soft(
    rewards: &[f64],
    lambda: f64,
    sampler: &mut SequenceSampler,
) -> Result<usize, EngineError> {
    check_rewards(rewards)?;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(EngineError::invalid(
            "lambda",
            format!("{lambda} is not a finite temperature > 0 (use bon for λ → 0)"),
        ));
    }
    let log_w: Vec<f64> = rewards.iter().map(|r| r / lambda).collect();
    Ok(sampler.sample_index(&log_w)?)
}

/// The first candidate (in draw order) whose reward is at least `threshold`: the
/// acceptance rule of rewind-and-repeat (arXiv 2401.01879 §6).
pub fn first_accepted(rewards: &[f64], threshold: f64) -> Option<usize> {
    rewards.iter().position(|&r| r >= threshold)
}

/// Apply `rule` to one batch of scored candidates. For a rewind this is the first accepted
/// candidate, or the best one when none is accepted (the runner handles repeated batches).
///
/// # Errors
/// As the rules it calls.
pub fn select(
    rule: Rule,
    threshold: Option<f64>,
    rewards: &[f64],
    sampler: &mut SequenceSampler,
) -> EResult<usize> {
    match rule {
        Rule::Sample => {
            check_rewards(rewards)?;
            Ok(0)
        }
        Rule::Best => select_best(rewards, sampler),
        Rule::Worst => select_worst(rewards, sampler),
        Rule::Soft { lambda } => select_soft(rewards, lambda, sampler),
        Rule::Rewind { .. } => match threshold.and_then(|t| first_accepted(rewards, t)) {
            Some(i) => {
                check_rewards(rewards)?;
                Ok(i)
            }
            None => select_best(rewards, sampler),
        },
    }
}

fn check_rewards(rewards: &[f64]) -> Result<(), EngineError> {
    if rewards.is_empty() {
        return Err(EngineError::invalid(
            "rewards",
            "no candidates to select from",
        ));
    }
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(EngineError::invalid(
            "rewards",
            format!("candidate {i} has reward {r}, not finite"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_are_split_uniformly() {
        let mut s = SequenceSampler::new(42, u64::MAX);
        let rewards = [1.0, 3.0, 0.0, 3.0, 3.0];
        let mut counts = [0usize; 5];
        let n = 30_000;
        for _ in 0..n {
            counts[select_best(&rewards, &mut s).unwrap()] += 1;
        }
        assert_eq!((counts[0], counts[2]), (0, 0));
        // Chi-square, 2 degrees of freedom, 0.999 quantile 13.82.
        let e = n as f64 / 3.0;
        let chi2: f64 = [1, 3, 4]
            .iter()
            .map(|&i| (counts[i] as f64 - e).powi(2) / e)
            .sum();
        assert!(chi2 < 13.82, "chi2 {chi2} counts {counts:?}");
        assert_eq!(select_worst(&rewards, &mut s).unwrap(), 2);
    }

    #[test]
    fn soft_selection_matches_softmax_and_limits() {
        let mut s = SequenceSampler::new(7, 1);
        let rewards = [0.0, 1.0];
        let n = 40_000;
        let ones = (0..n)
            .filter(|_| select_soft(&rewards, 1.0, &mut s).unwrap() == 1)
            .count();
        let p = 1.0 / (1.0 + (-1f64).exp());
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let z = (ones as f64 / n as f64 - p) / sd;
        assert!(z.abs() < 4.0, "z = {z}");
        // Tiny λ: no overflow, the best one.
        assert_eq!(select_soft(&[1e3, 2e3], 1e-6, &mut s).unwrap(), 1);
        assert!(select_soft(&rewards, 0.0, &mut s).is_err());
        assert!(select_soft(&rewards, f64::NAN, &mut s).is_err());
    }

    #[test]
    fn rewind_takes_the_first_accepted_or_the_best() {
        let mut s = SequenceSampler::new(0, 0);
        let st = Rule::Rewind {
            draws: 3,
            accepted: 0,
        };
        assert_eq!(select(st, Some(0.5), &[0.1, 0.6, 0.9], &mut s).unwrap(), 1);
        assert_eq!(select(st, Some(0.5), &[0.1, 0.4, 0.2], &mut s).unwrap(), 1);
        assert_eq!(first_accepted(&[0.1, 0.2], 0.5), None);
    }

    #[test]
    fn bad_rewards_are_errors() {
        let mut s = SequenceSampler::new(0, 0);
        assert!(select_best(&[], &mut s).is_err());
        assert!(select_best(&[0.0, f64::NAN], &mut s).is_err());
        assert!(select(Rule::Sample, None, &[f64::INFINITY], &mut s).is_err());
    }
}
