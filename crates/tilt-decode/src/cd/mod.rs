//! Controlled decoding (Mudgal et al., *Controlled Decoding from Language Models*,
//! arXiv 2310.17022; tilt's `shared/spec/math.md` §6).
//!
//! A prefix scorer V(x, y_{<t}) estimates the expected final reward of continuing a prefix
//! with the reference policy p. Two decoders use it:
//!
//! - **cd-token** ([`token`]): at each step sample z with probability
//!   π(z) ∝ p(z | x, y_{<t})·e^{λ·V(x, [y_{<t}, z])} over the top-k tokens of p. The k
//!   children are scored in one batched forward: the prefix's cache is forked k times and
//!   stepped with the k candidates, and V reads the children's hidden states. The chosen
//!   child's cache and output *are* the next step's state, so guidance costs k−1 extra rows
//!   per step and no extra forward. Every step records the exact log π/p of the token it
//!   drew, so each sequence carries log π(y)/p(y), whose mean over samples is an unbiased
//!   Monte-Carlo estimate of KL(π‖p).
//! - **cd-block** ([`block`]): from one forked cache draw K continuations of M tokens from p,
//!   keep the one V scores best, repeat to the end. With M ≥ the whole length it is
//!   best-of-K under the reward V(final prefix); its KL obeys the chain-rule bound
//!   KL(π‖p) ≤ E_π[B]·(log K − (K−1)/K), B the (random) number of blocks: a bound on the
//!   expected KL, not on one sequence's log-ratio.
//!
//! The scorer is a small head over the policy's last hidden state ([`scorer`]), trained by
//! CD-FUDGE ([`train`]): regress the final reward of reference rollouts on every prefix. The
//! head is evaluated here in plain `f64` (it is a dot product or a two-layer MLP), not with
//! candle: decoding then has no tensor-backend state, and the same hidden states give the
//! same values bit for bit whatever the thread count. candle's autodiff is used only to fit it.
//!
//! Randomness: sequence i of a call draws from its own
//! [`SequenceSampler`] (ChaCha20, `seed`, stream `first_stream + i`), always in the same order, so the
//! same seed and configuration give the same tokens whatever the thread count or batch.

pub mod block;
pub mod run;
pub mod scorer;
pub mod token;
pub mod train;

pub use block::{cd_block_generate, CdBlockParams, CdBlockSample};
pub use run::{generate_controlled, CdStrategy};
pub use scorer::{ConstantScorer, LinearHead, MlpHead, PrefixScorer, ScorerHead};
pub use token::{
    cd_token_generate, cd_token_step_law, top_k_candidates, CdTokenParams, CdTokenSample,
    CdTokenStepLaw,
};
pub use train::{
    collect_rollouts, fit_head, HeadKind, PrefixDataset, RolloutConfig, TrainCard, TrainConfig,
};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tilt_models::sampling::SequenceSampler;
use tilt_models::{ModelError, Policy, TokenId};
use tilt_rewards::RewardError;

/// What can go wrong in controlled decoding and scorer training.
#[derive(Debug, thiserror::Error)]
pub enum CdError {
    /// A scorer file is missing, malformed, or does not fit the policy.
    #[error("scorer file {path}: {problem}")]
    ScorerFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A parameter is out of its domain (λ < 0, K = 0, M = 0, …).
    #[error("{name}: {problem}")]
    InvalidParameter {
        /// The parameter as the user knows it (e.g. `--lambda`).
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The policy failed.
    #[error("policy: {0}")]
    Model(#[from] ModelError),
    /// The reward failed.
    #[error(transparent)]
    Reward(#[from] RewardError),
    /// candle failed while training a scorer.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl CdError {
    /// Shorthand for [`CdError::InvalidParameter`].
    pub fn invalid(name: impl Into<String>, problem: impl Into<String>) -> Self {
        CdError::InvalidParameter {
            name: name.into(),
            problem: problem.into(),
        }
    }
}

/// `Result` with [`CdError`].
pub type Result<T> = std::result::Result<T, CdError>;

/// A ChaCha20 stream for the training split and initialisation (`seed`, `stream`).
pub(crate) fn sequence_rng(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Draw a token from the full distribution exp(`log_probs`) (temperature 1, no truncation:
/// the reference policy p itself) with the sequence's sampler.
pub(crate) fn sample_reference(
    log_probs: &[f32],
    sampler: &mut SequenceSampler,
) -> Result<TokenId> {
    let lw: Vec<f64> = log_probs.iter().map(|&l| f64::from(l)).collect();
    Ok(sampler.sample_index(&lw)? as TokenId)
}

/// The prompt tokens of a user message: the policy's chat template, then its tokenizer.
///
/// # Errors
/// The policy's template or tokenizer failing; an empty encoding.
pub fn encode_user_prompt<P: Policy>(policy: &P, user_message: &str) -> Result<Vec<TokenId>> {
    let text = policy.chat_prompt(user_message)?;
    let tokens = policy.encode(&text)?;
    if tokens.is_empty() {
        return Err(CdError::invalid(
            "prompt",
            format!("{user_message:?} encodes to no tokens"),
        ));
    }
    Ok(tokens)
}

/// Check that `max_new_tokens` new tokens fit after a prompt of `prompt_len` tokens (every
/// generated token is fed back, so its hidden state can be scored).
pub(crate) fn check_room<P: Policy>(
    policy: &P,
    prompt_len: usize,
    max_new_tokens: usize,
) -> Result<()> {
    if max_new_tokens == 0 {
        return Err(CdError::invalid("max_new_tokens", "must be at least 1"));
    }
    if prompt_len + max_new_tokens > policy.context_length() {
        return Err(CdError::invalid(
            "max_new_tokens",
            format!(
                "a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the \
                 context length {} of {}",
                policy.context_length(),
                policy.name()
            ),
        ));
    }
    Ok(())
}

/// Check that a scorer reads hidden states of the policy's size.
pub(crate) fn check_scorer_fits<P: Policy, S: PrefixScorer + ?Sized>(
    policy: &P,
    scorer: &S,
) -> Result<()> {
    if scorer.hidden_size() != policy.hidden_size() {
        return Err(CdError::ScorerFile {
            path: scorer.name(),
            problem: format!(
                "reads hidden states of size {}, but policy {} has hidden size {}",
                scorer.hidden_size(),
                policy.name(),
                policy.hidden_size()
            ),
        });
    }
    Ok(())
}
