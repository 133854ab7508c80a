//! # tilt-models: language models as tilt's decoding strategies see them
//!
//! The [`Policy`] trait (tokenise, chat-template, batched forward with next-token log-probs
//! and hidden states, forkable KV cache, full-sequence log-probs) and its implementations.
#![deny(missing_docs)]

pub mod chat_template;
pub mod gguf;
pub mod llama;
mod matmul;
pub mod policy;
pub mod profile;
pub mod sampling;
pub mod threads;
pub mod tokenizer;
pub mod toy;
mod vecmath;

pub use chat_template::{ChatMessage, ChatTemplate, Role};
pub use gguf::GgufFile;
pub use llama::{
    load_chat_template, Llama, LlamaCache, LlamaConfig, LlamaPolicy, LoadOptions, Outputs,
};
pub use policy::{Policy, StepOutput, TokenId};
pub use threads::set_num_threads;
pub use tokenizer::GgufTokenizer;

/// What can go wrong with a policy model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model or tokenizer file is missing, truncated or malformed.
    #[error("model file {path}: {problem}")]
    BadFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A model whose architecture this crate does not implement.
    #[error("model file {path}: unsupported architecture {arch:?} (tilt runs Llama-architecture GGUF files)")]
    UnsupportedArchitecture {
        /// The file.
        path: String,
        /// `general.architecture` from its metadata.
        arch: String,
    },
    /// Bad input to a model call (empty prompt, token out of range, context overflow …).
    #[error("{0}")]
    InvalidInput(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// candle failed.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
    /// A broken internal invariant (a bug: please report).
    #[error("internal error: {0}")]
    Internal(String),
}
