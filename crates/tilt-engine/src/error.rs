//! Errors of the engine, each with a [`ErrorKind`] that every face maps the same way.
//!
//! Why a kind and not only a message: the same failure must reach a user of the CLI as an
//! exit code, a client of the server as an HTTP status and a Python caller as an exception
//! class. Deciding that in each face would split one policy three ways (it did: four
//! places classified exit codes before this module), so the library decides once:
//!
//! | kind | what it means | CLI | HTTP | Python |
//! |---|---|---|---|---|
//! | [`ErrorKind::InvalidInput`] | the caller's input is wrong (a parameter, a prompt, a file it named) | exit 2 | 400 | `ValueError` |
//! | [`ErrorKind::Unavailable`] | a resource failed or is missing (a reward backend, a remote engine, a download, the disk) | exit 1 | 503 | `RuntimeError` |
//! | [`ErrorKind::Cancelled`] | the caller cancelled the work | exit 1 | (no reply) | `RuntimeError` |
//! | [`ErrorKind::Internal`] | a bug, or a numerical routine that did not converge | exit 1 | 500 | `RuntimeError` |
//!
//! Parameters are named as the library knows them (`n`, `temperature`, `max_new_tokens`),
//! never as a face spells them (`--n`, `max_tokens`): [`EngineError::param`] gives the name
//! so that each face can translate it.

use tilt_models::ModelError;
use tilt_rewards::RewardError;

/// What kind of failure an [`EngineError`] is (see the module docs for how faces map it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The caller's input is wrong.
    InvalidInput,
    /// A resource the work needs failed or is missing.
    Unavailable,
    /// The work was cancelled.
    Cancelled,
    /// A bug or a numerical failure.
    Internal,
}

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A parameter or input is wrong: `param` names it, `problem` says how.
    #[error("{param}: {problem}")]
    Invalid {
        /// The parameter as the library names it (`n`, `prompt`, `scorer`, …).
        param: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The policy failed (its kind follows [`ModelError`]).
    #[error("policy: {0}")]
    Model(#[from] ModelError),
    /// The reward failed (invalid input when [`RewardError::is_invalid_input`]: a bad
    /// spec or file; otherwise its backend failed).
    #[error(transparent)]
    Reward(#[from] RewardError),
    /// The exact theory rejected an input or failed to converge.
    #[error(transparent)]
    Theory(#[from] tilt_core::TiltError),
    /// Fetching a default model failed.
    #[error(transparent)]
    Asset(#[from] tilt_assets::AssetError),
    /// A file the caller named is missing, malformed or does not fit (a scorer, a manifest,
    /// a prompts file).
    #[error("{path}: {problem}")]
    BadFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// candle failed while fitting a scorer.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
    /// A remote engine failed or answered something unusable (its message names the
    /// engine and quotes what it said).
    #[error("{0}")]
    Remote(String),
    /// The caller cancelled the work.
    #[error("cancelled")]
    Cancelled,
    /// Another error, with what was being done (its kind is the inner error's).
    #[error("{context}: {error}")]
    Context {
        /// What was being done (`prompts.jsonl line 3`).
        context: String,
        /// The error.
        error: Box<EngineError>,
    },
    /// A broken invariant or a numerical failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::Invalid`].
    pub fn invalid(param: impl Into<String>, problem: impl Into<String>) -> Self {
        EngineError::Invalid {
            param: param.into(),
            problem: problem.into(),
        }
    }

    /// Shorthand for [`EngineError::BadFile`].
    pub fn bad_file(path: impl std::fmt::Display, problem: impl Into<String>) -> Self {
        EngineError::BadFile {
            path: path.to_string(),
            problem: problem.into(),
        }
    }

    /// Shorthand for [`EngineError::Io`].
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.to_string(),
            source,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Invalid { .. } | EngineError::BadFile { .. } => ErrorKind::InvalidInput,
            EngineError::Model(m) => match m {
                ModelError::BadFile { .. }
                | ModelError::UnsupportedArchitecture { .. }
                | ModelError::InvalidInput(_)
                | ModelError::Tokenizer(_)
                | ModelError::ChatTemplate(_) => ErrorKind::InvalidInput,
                ModelError::Candle(_) | ModelError::Internal(_) => ErrorKind::Internal,
            },
            EngineError::Reward(r) if r.is_invalid_input() => ErrorKind::InvalidInput,
            EngineError::Reward(_)
            | EngineError::Asset(_)
            | EngineError::Io { .. }
            | EngineError::Remote(_) => ErrorKind::Unavailable,
            EngineError::Theory(t) if t.is_input_error() => ErrorKind::InvalidInput,
            EngineError::Theory(_) | EngineError::Candle(_) | EngineError::Internal(_) => {
                ErrorKind::Internal
            }
            EngineError::Cancelled => ErrorKind::Cancelled,
            EngineError::Context { error, .. } => error.kind(),
        }
    }

    /// `error` with what was being done.
    pub fn context(context: impl Into<String>, error: EngineError) -> Self {
        EngineError::Context {
            context: context.into(),
            error: Box::new(error),
        }
    }

    /// The parameter an [`EngineError::Invalid`] names (None for the other variants).
    pub fn param(&self) -> Option<&str> {
        match self {
            EngineError::Invalid { param, .. } => Some(param),
            EngineError::Context { error, .. } => error.param(),
            _ => None,
        }
    }

    /// The problem without the parameter's name (the whole message for other variants), for
    /// a face that prints the parameter in its own spelling.
    pub fn problem(&self) -> String {
        match self {
            EngineError::Invalid { problem, .. } => problem.clone(),
            other => other.to_string(),
        }
    }

    /// A copy of this error for another job that shared the failed work (the I/O source is
    /// kept as its message).
    pub(crate) fn duplicate(&self) -> EngineError {
        match self {
            EngineError::Invalid { param, problem } => EngineError::invalid(param, problem),
            EngineError::BadFile { path, problem } => EngineError::bad_file(path, problem),
            EngineError::Cancelled => EngineError::Cancelled,
            other => match other.kind() {
                ErrorKind::InvalidInput => EngineError::invalid("input", other.to_string()),
                _ => EngineError::Internal(other.to_string()),
            },
        }
    }
}

/// Refuse an empty or repeated name among `names` (of `param`s).
pub(crate) fn check_names<'a>(names: impl Iterator<Item = &'a str>, param: &str) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    for n in names {
        if n.trim().is_empty() {
            return Err(EngineError::invalid(
                param,
                format!("an empty {param} name"),
            ));
        }
        if seen.contains(&n) {
            return Err(EngineError::invalid(
                param,
                format!("the name {n:?} is given twice"),
            ));
        }
        seen.push(n);
    }
    Ok(())
}

impl From<tilt_models::sampling::SamplingError> for EngineError {
    fn from(e: tilt_models::sampling::SamplingError) -> Self {
        EngineError::invalid(e.param, e.problem)
    }
}

/// `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
