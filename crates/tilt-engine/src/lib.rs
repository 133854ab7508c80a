//! # tilt-engine: the engine every face of tilt calls
//!
//! The CLI, the server and the Python package are thin faces over this crate: they parse
//! their inputs into its types, call it, and print what it returns. Nothing a face needs to
//! run a model lives in a face.
//!
//! | module | what it holds |
//! |---|---|
//! | [`request`] | [`Request`] (an input, [`Params`]: one [`Strategy`], choices, seed, lengths, stop sequences, reward) and [`Response`] (typed outputs with their cost in nats) |
//! | [`strategy`] | the seven strategies as one enum, each variant with exactly the parameters it reads, and one constructor from loose options |
//! | [`stepper`] | the one batched stepper: jobs of any strategy, prompt and request step as one batch; token events for streaming; cancellation |
//! | [`engine`] | [`Engine`] (a loaded policy, rewards, scorers, settings) and [`Scheduler`] (many requests as one batch, admitted between steps) |
//! | [`remote`] | [`RemoteEngine`]: the selection strategies on candidates from an OpenAI-compatible engine (vLLM, SGLang, llama.cpp, another tilt) |
//! | [`eval`], [`scorer_training`] | `tilt eval` and CD-FUDGE training, on the stepper |
//! | [`gold`] | proxy against gold in `tilt eval`: both improvements, the sub-Gaussian bounds and the transfer interval (arXiv 2406.05883) |
//! | [`run`], [`manifest`] | the three recorded runs, their canonical outputs, manifests and replay |
//! | [`select`], [`cost`], [`cd`] | the selection rules, what an output costs in KL, controlled decoding's law and scorers |
//! | [`error`] | [`EngineError`] with an [`ErrorKind`] each face maps the same way |
//!
//! The split inside follows what changes together: a selection rule is a pure function of
//! rewards and a seeded stream (testable against tilt-core's exact laws on a toy policy),
//! while the stepper owns the only loop that calls the model.
#![deny(missing_docs)]

pub mod cd;
pub mod cost;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gold;
pub mod manifest;
pub mod memory;
pub mod progress;
pub mod prompts;
pub mod remote;
pub mod request;
pub mod run;
pub mod scorer_training;
pub mod select;
pub mod stepper;
pub mod strategy;

pub use engine::{Engine, EngineConfig, LogProb, RequestId, RewardConfig, Scheduler, ScorerConfig};
pub use error::{EngineError, ErrorKind, Result};
pub use progress::{NoProgress, Progress};
pub use remote::RemoteEngine;
pub use request::{
    Candidate, FinishReason, Input, KlNote, Output, Params, RemoteNote, Request, Response,
    RewardValue, Usage,
};
pub use stepper::{CancelToken, TokenEvent, TokenSink};
pub use strategy::{ScorerSpec, Strategy, StrategyOptions, WeightedScorer};
pub use tilt_models::{ChatMessage, Role};
