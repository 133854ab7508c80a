//! A reference policy over a finite outcome set together with a reward on it.
//!
//! Everything in the finite-support theory (tilting, best-of-n, win rates) is a function of
//! the pair (p, r). [`RewardDistribution`] validates that pair once, so that the algorithms
//! downstream can assume finite rewards and a proper pmf.

use crate::error::{Result, TiltError};
use serde::{Deserialize, Serialize};

/// Tolerance on |Σ p − 1| accepted by [`RewardDistribution::new`].
pub const PROB_SUM_TOLERANCE: f64 = 1e-9;

/// A reference pmf `p` over outcomes `0..len`, each with a finite reward `r`, whose reward
/// range `max r − min r` is finite too.
///
/// Outcomes keep the order in which they were given; every pmf this crate returns for
/// them (tilt, best-of-n, …) is in that same order. Deserialising goes through
/// [`RewardDistribution::new`], so a deserialised value is validated like any other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedRewardDistribution")]
pub struct RewardDistribution {
    probs: Vec<f64>,
    rewards: Vec<f64>,
}

/// The serialised form of a [`RewardDistribution`], before validation.
#[derive(Deserialize)]
struct UncheckedRewardDistribution {
    probs: Vec<f64>,
    rewards: Vec<f64>,
}

impl TryFrom<UncheckedRewardDistribution> for RewardDistribution {
    type Error = TiltError;

    fn try_from(raw: UncheckedRewardDistribution) -> Result<Self> {
        RewardDistribution::new(raw.probs, raw.rewards)
    }
}

impl RewardDistribution {
    /// Validate and build. `probs` must be finite, non-negative and sum to 1 within
    /// [`PROB_SUM_TOLERANCE`]; `rewards` finite, with a finite range `max − min` (every
    /// formula here shifts rewards by one another, e.g. `λ(r − max r)` in the tilt, and
    /// `1e308 − (−1e308)` overflows to `∞`); both non-empty and of equal length.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `probs` or `rewards` and the first bad entry.
    pub fn new(probs: Vec<f64>, rewards: Vec<f64>) -> Result<Self> {
        Self::check(&probs, &rewards)?;
        let sum: f64 = probs.iter().sum();
        if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
            return Err(TiltError::invalid(
                "probs",
                format!(
                    "sum to {sum} (must be 1 within {PROB_SUM_TOLERANCE}; use normalisation to rescale)"
                ),
            ));
        }
        Ok(Self { probs, rewards })
    }

    /// Like [`RewardDistribution::new`], but rescales `probs` to sum to 1 (their sum must be
    /// positive).
    ///
    /// # Errors
    /// As [`RewardDistribution::new`], and when all probabilities are zero.
    pub fn new_normalized(mut probs: Vec<f64>, rewards: Vec<f64>) -> Result<Self> {
        Self::check(&probs, &rewards)?;
        let sum: f64 = probs.iter().sum();
        if sum.is_nan() || sum <= 0.0 || !sum.is_finite() {
            return Err(TiltError::invalid(
                "probs",
                format!("sum to {sum}; cannot normalise"),
            ));
        }
        for p in &mut probs {
            *p /= sum;
        }
        Ok(Self { probs, rewards })
    }

    /// The empirical distribution of reward samples: one outcome per sample, each of mass
    /// 1/len (ties between equal samples are kept as ties between outcomes).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `samples` when empty, when a sample is not finite,
    /// or when their range `max − min` overflows.
    pub fn from_samples(samples: &[f64]) -> Result<Self> {
        if samples.is_empty() {
            return Err(TiltError::invalid("samples", "no reward samples given"));
        }
        if let Some((i, x)) = samples.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(TiltError::invalid(
                "samples",
                format!("sample {} is {x}, not a finite number", i + 1),
            ));
        }
        check_range("samples", samples)?;
        let p = 1.0 / samples.len() as f64;
        Ok(Self {
            probs: vec![p; samples.len()],
            rewards: samples.to_vec(),
        })
    }

    fn check(probs: &[f64], rewards: &[f64]) -> Result<()> {
        if probs.is_empty() {
            return Err(TiltError::invalid("probs", "empty list"));
        }
        if rewards.is_empty() {
            return Err(TiltError::invalid("rewards", "empty list"));
        }
        if probs.len() != rewards.len() {
            return Err(TiltError::invalid(
                "probs/rewards",
                format!(
                    "unequal lengths: {} probabilities, {} rewards",
                    probs.len(),
                    rewards.len()
                ),
            ));
        }
        if let Some((i, p)) = probs
            .iter()
            .enumerate()
            .find(|(_, p)| !p.is_finite() || **p < 0.0)
        {
            return Err(TiltError::invalid(
                "probs",
                format!(
                    "entry {} is {p}; probabilities must be finite and ≥ 0",
                    i + 1
                ),
            ));
        }
        if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            return Err(TiltError::invalid(
                "rewards",
                format!("entry {} is {r}; rewards must be finite", i + 1),
            ));
        }
        check_range("rewards", rewards)
    }

    /// The reference probabilities, in input order.
    pub fn probs(&self) -> &[f64] {
        &self.probs
    }

    /// The rewards, in input order.
    pub fn rewards(&self) -> &[f64] {
        &self.rewards
    }

    /// Number of outcomes.
    pub fn len(&self) -> usize {
        self.probs.len()
    }

    /// Always false: a distribution has at least one outcome.
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }

    /// E_p[r].
    pub fn mean_reward(&self) -> f64 {
        self.probs
            .iter()
            .zip(&self.rewards)
            .map(|(p, r)| p * r)
            .sum()
    }
}

/// Reject finite values whose range `max − min` is not a finite number.
fn check_range(input: &str, values: &[f64]) -> Result<()> {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if (hi - lo).is_finite() {
        return Ok(());
    }
    Err(TiltError::invalid(
        input,
        format!(
            "range from {lo:e} to {hi:e} overflows (max − min is not a finite number); \
             rescale the rewards"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialising_validates() {
        let ok: RewardDistribution =
            serde_json::from_str(r#"{"probs":[0.25,0.75],"rewards":[0.0,1.0]}"#).unwrap();
        assert_eq!(
            ok,
            RewardDistribution::new(vec![0.25, 0.75], vec![0.0, 1.0]).unwrap()
        );
        let back: RewardDistribution =
            serde_json::from_str(&serde_json::to_string(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
        for (text, needle) in [
            (r#"{"probs":[0.5,0.5],"rewards":[0.0]}"#, "unequal lengths"),
            (r#"{"probs":[0.5,0.6],"rewards":[0.0,1.0]}"#, "sum to"),
            (r#"{"probs":[1.5,-0.5],"rewards":[0.0,1.0]}"#, "probs"),
            (r#"{"probs":[],"rewards":[]}"#, "empty"),
            (
                r#"{"probs":[0.5,0.5],"rewards":[-1e308,1e308]}"#,
                "overflows",
            ),
        ] {
            let err = serde_json::from_str::<RewardDistribution>(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn reward_ranges_that_overflow_are_rejected_by_name() {
        for rewards in [vec![-1e308, 1e308], vec![f64::MAX, -f64::MAX]] {
            match RewardDistribution::new(vec![0.5, 0.5], rewards) {
                Err(TiltError::InvalidInput { input, problem }) => {
                    assert_eq!(input, "rewards");
                    assert!(problem.contains("overflows"), "{problem}");
                }
                other => panic!("{other:?}"),
            }
        }
        match RewardDistribution::from_samples(&[1e308, -1e308, 0.0]) {
            Err(TiltError::InvalidInput { input, .. }) => assert_eq!(input, "samples"),
            other => panic!("{other:?}"),
        }
        // Large but with a finite range: accepted.
        assert!(RewardDistribution::new(vec![0.5, 0.5], vec![1e308, 5e307]).is_ok());
        assert!(RewardDistribution::new(vec![0.5, 0.5], vec![-8e307, 8e307]).is_ok());
    }
}
