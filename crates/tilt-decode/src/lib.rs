//! # tilt-decode: inference-time alignment strategies
//!
//! Strategies that spend KL from a reference language model to buy reward, over the
//! `Policy` and `Reward` traits: `sample`, best-of-N, worst-of-N, soft best-of-N and
//! rewind-and-repeat ([`strategy`], [`select`]), run by one runner that prefills each prompt
//! once and steps its N candidates as a batch ([`generate`]); the KL each output cost, as a
//! bound and an estimate in nats ([`cost`]); run manifests and their verification
//! ([`manifest`]); and controlled decoding with prefix scorers ([`cd`]).
//!
//! The split follows what changes together: a selection rule is a pure function of
//! rewards and a seeded stream (testable against tilt-core's exact laws on a toy policy),
//! while the runner owns the model-facing work (caches, batching, stopping, scoring).
#![deny(missing_docs)]

pub mod cost;
pub mod generate;
pub mod manifest;
pub mod select;
pub mod strategy;

pub use generate::{
    generate, Candidate, FinishReason, GenerationConfig, GenerationOutput, Prefilled,
    SampledSequence,
};
pub use strategy::Strategy;

/// What can go wrong while generating, selecting or checking a run.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A user input is wrong: `input` names it (`--n`, `prompt`, …), `problem` says how.
    #[error("{input}: {problem}")]
    InvalidInput {
        /// The input as the user knows it.
        input: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The policy failed.
    #[error("policy: {0}")]
    Model(#[from] tilt_models::ModelError),
    /// The reward failed.
    #[error(transparent)]
    Reward(#[from] tilt_rewards::RewardError),
    /// The exact theory rejected an input.
    #[error(transparent)]
    Theory(#[from] tilt_core::TiltError),
    /// A manifest is malformed.
    #[error("manifest {path}: {problem}")]
    Manifest {
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
}

impl DecodeError {
    /// Shorthand for [`DecodeError::InvalidInput`].
    pub fn invalid(input: impl Into<String>, problem: impl Into<String>) -> Self {
        DecodeError::InvalidInput {
            input: input.into(),
            problem: problem.into(),
        }
    }

    /// Whether the error is the user's input (the CLI exits with code 2 for these).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            DecodeError::InvalidInput { .. }
                | DecodeError::Theory(tilt_core::TiltError::InvalidInput { .. })
                | DecodeError::Model(tilt_models::ModelError::InvalidInput(_))
                | DecodeError::Manifest { .. }
        )
    }
}

pub mod cd;
pub mod eval;
