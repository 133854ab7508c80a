//! The one error type of the math core.
//!
//! Every variant names the input that was wrong and what was wrong with it, so that the CLI
//! can print it as a single line and exit non-zero. No function of this crate panics on
//! user-controlled input.

/// What went wrong in a computation of `tilt-core`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TiltError {
    /// An input is malformed: `input` names it, `problem` says what is wrong.
    #[error("{input}: {problem}")]
    InvalidInput {
        /// The name of the offending input, as the user knows it (e.g. `--probs`).
        input: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A KL budget larger than any policy absolutely continuous w.r.t. the reference can reach.
    #[error(
        "KL budget {requested} nats is beyond the largest achievable, {max} nats \
         (= -log p(argmax-reward set))"
    )]
    KlBudgetTooLarge {
        /// The budget asked for, in nats.
        requested: f64,
        /// The supremum of KL over the tilted family, in nats.
        max: f64,
    },
    /// A computation produced a value it cannot have (NaN where a divergence or a probability
    /// is expected): reported instead of being clamped into a plausible-looking number.
    #[error("{what}: numerical failure: {detail}")]
    NumericalFailure {
        /// The quantity being computed.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// An iterative solver (root finder, quadrature) failed to reach its tolerance.
    #[error("{what} did not converge: {detail}")]
    NoConvergence {
        /// The quantity being solved for.
        what: String,
        /// Why it stopped.
        detail: String,
    },
}

impl TiltError {
    /// Shorthand for [`TiltError::InvalidInput`].
    pub fn invalid(input: impl Into<String>, problem: impl Into<String>) -> Self {
        TiltError::InvalidInput {
            input: input.into(),
            problem: problem.into(),
        }
    }
}

/// `Result` with [`TiltError`].
pub type Result<T> = std::result::Result<T, TiltError>;
