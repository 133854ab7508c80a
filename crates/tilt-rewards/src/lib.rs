//! # tilt-rewards: reward models
//!
//! The [`Reward`] trait and its implementations. A reward scores (prompt, response) pairs
//! with finite `f32`s or says clearly why it cannot: never a silent NaN.
#![deny(missing_docs)]

use std::path::PathBuf;

/// What can go wrong while scoring.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The reward returned a non-finite score.
    #[error("reward {reward}: score {index} is {value}, not finite")]
    NonFinite {
        /// The reward's name.
        reward: String,
        /// Index of the pair in the batch.
        index: usize,
        /// The value it returned.
        value: f32,
    },
    /// Any other failure, with the reward's name and what happened.
    #[error("reward {reward}: {message}")]
    Failed {
        /// The reward's name.
        reward: String,
        /// What happened.
        message: String,
    },
}

/// A reward model: scores a batch of (prompt, response) pairs.
pub trait Reward: Send + Sync {
    /// A name for errors, logs and manifests (e.g. `minilm-relevance`).
    fn name(&self) -> String;
    /// One finite score per pair, in order.
    ///
    /// # Errors
    /// [`RewardError`] naming this reward.
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError>;
    /// Files whose bytes determine this reward (for manifests: they are hashed).
    fn artifacts(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Check that a batch of scores is complete and finite; the helper every implementation
/// runs on what it computed or received.
///
/// # Errors
/// [`RewardError::Failed`] on a wrong count, [`RewardError::NonFinite`] on NaN or ±∞.
pub fn check_scores(
    reward: &str,
    expected: usize,
    scores: Vec<f32>,
) -> Result<Vec<f32>, RewardError> {
    if scores.len() != expected {
        return Err(RewardError::Failed {
            reward: reward.to_string(),
            message: format!("returned {} scores for {expected} pairs", scores.len()),
        });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(RewardError::NonFinite {
            reward: reward.to_string(),
            index,
            value,
        });
    }
    Ok(scores)
}
