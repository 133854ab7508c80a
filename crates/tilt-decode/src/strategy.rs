//! What `tilt generate` does with N samples of one prompt: the strategies as data.
//!
//! Every strategy is "draw candidates iid from the reference policy p (the model with the
//! configured sampling parameters), score them with the reward in one batch, select one".
//! They differ only in the selection rule, so a [`Strategy`] is a value, not a code path:
//! the runner ([`crate::generate`]) draws, [`crate::select`] selects, and [`crate::cost`]
//! says what the selection costs in KL. The exact output law of each rule is in tilt-core
//! (`best_of_n`, `worst_of_n`, `soft_best_of_n`), which the tests compare against.

use crate::DecodeError;
use serde::{Deserialize, Serialize};

/// A selection rule over iid candidates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Strategy {
    /// The reference: return the first candidate (a plain draw from p). The other N − 1
    /// candidates are still drawn and scored, so that with the same seed `sample`, `bon` and
    /// `won` see the same candidates and differ only in the choice.
    Sample,
    /// Best-of-N (arXiv 2401.01879 §2): the highest reward, ties broken uniformly among the
    /// tied candidates with the seeded selection stream.
    Bon,
    /// Worst-of-N (arXiv 2412.19792, "best-of-N jailbreaking"): the lowest reward, ties
    /// uniform.
    Won,
    /// Soft best-of-N (arXiv 2505.03156; 2507.05913): candidate i with probability
    /// ∝ e^{r_i/λ}. λ is a temperature in reward units: λ → 0 is best-of-N, λ → ∞ is
    /// `sample`.
    SoftBon {
        /// The temperature λ (finite, > 0).
        lambda: f64,
    },
    /// Rewind-and-repeat (arXiv 2401.01879 §6): draw until a candidate's reward is at least
    /// `threshold`, at most `max_draws` draws. Draws are made in batches of N from one shared
    /// prefill; the accepted candidate is the first in draw order, so the output does not
    /// depend on N (only the number of wasted draws does). When no draw clears the threshold
    /// within the cap, the best draw is returned and the output says `accepted: false`.
    Rewind {
        /// The acceptance threshold on the reward.
        threshold: f64,
        /// The cap on the number of draws (≥ 1).
        max_draws: usize,
    },
}

impl Strategy {
    /// The name used on the command line and in outputs: `sample`, `bon`, `won`,
    /// `soft-bon`, `rewind`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Sample => "sample",
            Strategy::Bon => "bon",
            Strategy::Won => "won",
            Strategy::SoftBon { .. } => "soft-bon",
            Strategy::Rewind { .. } => "rewind",
        }
    }

    /// Check the strategy's own parameters.
    ///
    /// # Errors
    /// [`DecodeError::InvalidInput`] naming `--lambda` (not finite or ≤ 0), `--threshold`
    /// (not finite) or `--max-draws` (0).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match *self {
            Strategy::SoftBon { lambda } if !(lambda.is_finite() && lambda > 0.0) => {
                Err(DecodeError::invalid(
                    "--lambda",
                    format!("{lambda} is not a finite temperature > 0 (use bon for λ → 0)"),
                ))
            }
            Strategy::Rewind { threshold, .. } if !threshold.is_finite() => Err(
                DecodeError::invalid("--threshold", format!("{threshold} is not finite")),
            ),
            Strategy::Rewind { max_draws: 0, .. } => Err(DecodeError::invalid(
                "--max-draws",
                "0 draws can accept nothing; use at least 1",
            )),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
