//! A reference policy over a finite outcome set together with a reward on it.
//!
//! Everything in the finite-support theory (tilting, best-of-n, win rates) is a function of
//! the pair (p, r). [`RewardDistribution`] validates that pair once, so that the algorithms
//! downstream can assume finite rewards and a proper pmf.

use crate::error::{Result, TiltError};
use serde::{Deserialize, Serialize};

/// Tolerance on |Σ p − 1| accepted by [`RewardDistribution::new`].
pub const PROB_SUM_TOLERANCE: f64 = 1e-9;

/// A reference pmf `p` over outcomes `0..len`, each with a finite reward `r`.
///
/// Outcomes keep the order in which they were given; every pmf this crate returns for
/// them (tilt, best-of-n, …) is in that same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardDistribution {
    probs: Vec<f64>,
    rewards: Vec<f64>,
}

impl RewardDistribution {
    /// Validate and build. `probs` must be finite, non-negative and sum to 1 within
    /// [`PROB_SUM_TOLERANCE`]; `rewards` finite; both non-empty and of equal length.
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
        if !(sum > 0.0) || !sum.is_finite() {
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
    /// [`TiltError::InvalidInput`] naming `samples` when empty or when a sample is not finite.
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
        Ok(())
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
