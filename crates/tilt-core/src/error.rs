//! The one error type of the math core.
//!
//! Every variant names the input that was wrong and what was wrong with it, so that the CLI
//! can print it as a single line and exit non-zero. No function of this crate panics on
//! user-controlled input.
//!
//! # Whose fault: [`TiltError::kind`]
//! A face over this crate (the CLI, a server) must tell a caller's mistake from a failure
//! of the computation: the first is answered "fix your input" (exit code 2, HTTP 400), the
//! second "this run failed" (exit code 1, HTTP 500). [`TiltError::kind`] says which, and is
//! the one place that decides it, so that every face maps errors the same way:
//!
//! | variant                              | [`ErrorKind`]             |
//! |--------------------------------------|---------------------------|
//! | [`TiltError::InvalidInput`]          | [`ErrorKind::InvalidInput`] |
//! | [`TiltError::KlBudgetTooLarge`]      | [`ErrorKind::InvalidInput`] |
//! | [`TiltError::InvalidFile`]           | [`ErrorKind::InvalidInput`] |
//! | [`TiltError::NumericalFailure`]      | [`ErrorKind::Internal`]     |
//! | [`TiltError::NoConvergence`]         | [`ErrorKind::Internal`]     |
//!
//! A solver that does not converge on valid input is the library's failure, not the
//! caller's: inputs that no solver here can handle (a budget beyond what a quadrature
//! resolves, a count beyond a documented cap) are refused up front as
//! [`TiltError::InvalidInput`], naming the input and the limit.

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
    /// An input file is unreadable or malformed: `path` names it, `line` (1-based) the line
    /// at fault when there is one, `problem` says what is wrong. Shown as `path: problem`
    /// or `path line N: problem`.
    #[error(
        "{path}{}: {problem}",
        .line.map(|l| format!(" line {l}")).unwrap_or_default()
    )]
    InvalidFile {
        /// The file, as the caller named it.
        path: String,
        /// The 1-based line at fault, if one is.
        line: Option<usize>,
        /// What is wrong with it.
        problem: String,
    },
    /// A KL budget larger than any policy absolutely continuous w.r.t. the reference can reach.
    #[error(
        "KL budget {} nats is beyond the largest achievable, {} nats \
         (= -log p(argmax-reward set))",
        crate::numerics::Shown(*.requested),
        crate::numerics::Shown(*.max)
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

/// Whose fault an error is; see the [module documentation](self) for the mapping. Stable
/// public API: faces map it to exit codes and HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller's input is wrong or beyond a documented limit: fix the input (CLI exit
    /// code 2, HTTP 400).
    InvalidInput,
    /// The computation failed on input it accepted (a solver did not converge, a value came
    /// out NaN): not the caller's fault (CLI exit code 1, HTTP 500).
    Internal,
}

impl TiltError {
    /// Whose fault the error is (see the [module documentation](self)).
    ///
    /// ```
    /// use tilt_core::{ErrorKind, TiltError};
    /// assert_eq!(TiltError::invalid("n", "must be ≥ 1").kind(), ErrorKind::InvalidInput);
    /// let e = TiltError::NoConvergence { what: "β".into(), detail: "200 iterations".into() };
    /// assert_eq!(e.kind(), ErrorKind::Internal);
    /// assert!(!e.is_input_error());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            TiltError::InvalidInput { .. }
            | TiltError::InvalidFile { .. }
            | TiltError::KlBudgetTooLarge { .. } => ErrorKind::InvalidInput,
            TiltError::NumericalFailure { .. } | TiltError::NoConvergence { .. } => {
                ErrorKind::Internal
            }
        }
    }

    /// `self.kind() == ErrorKind::InvalidInput`.
    pub fn is_input_error(&self) -> bool {
        self.kind() == ErrorKind::InvalidInput
    }

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
