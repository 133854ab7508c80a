//! cd-token and cd-block as `tilt generate` strategies: one prompt in, one
//! [`GenerationOutput`] out, shaped like the other strategies' outputs (the text, its reward,
//! its KL in nats and what that number is), so that the CLI prints them the same way.

use super::{
    cd_block_generate, cd_token_generate, CdBlockParams, CdError, CdTokenParams, PrefixScorer,
};
use crate::generate::{draw_stream, encode_prompt, Candidate, FinishReason, GenerationOutput};
use crate::DecodeError;
use serde::{Deserialize, Serialize};
use tilt_models::Policy;
use tilt_rewards::Reward;

/// A controlled-decoding strategy for `tilt generate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum CdStrategy {
    /// Token-level CD: λ and the top-k candidates per step.
    CdToken {
        /// λ ≥ 0.
        lambda: f64,
        /// k ≥ 1.
        top_k: usize,
    },
    /// Blockwise CD: best-of-K per block of M tokens.
    CdBlock {
        /// K ≥ 1.
        k: usize,
        /// M ≥ 1.
        m: usize,
    },
}

impl CdStrategy {
    /// `cd-token` or `cd-block`.
    pub fn name(&self) -> &'static str {
        match self {
            CdStrategy::CdToken { .. } => "cd-token",
            CdStrategy::CdBlock { .. } => "cd-block",
        }
    }
}

/// Map a [`CdError`] onto the crate's [`DecodeError`] (input errors stay input errors).
pub fn to_decode_error(e: CdError) -> DecodeError {
    match e {
        CdError::InvalidParameter { name, problem } => DecodeError::invalid(name, problem),
        CdError::ScorerFile { path, problem } => {
            DecodeError::invalid(format!("scorer file {path}"), problem)
        }
        CdError::Model(m) => DecodeError::Model(m),
        CdError::Reward(r) => DecodeError::Reward(r),
        CdError::Io { path, source } => DecodeError::Io { path, source },
        CdError::Candle(c) => DecodeError::Model(tilt_models::ModelError::Candle(c)),
    }
}

/// Generate one output for `prompt` (the prompt with index `index` of the input, which picks
/// its random stream `draw_stream(index, 0)`) with a controlled-decoding strategy, and score
/// it. cd-token reports `kl_estimate` = log π(y)/p(y) of this output (its mean over outputs
/// is a Monte-Carlo KL); cd-block reports `kl_bound` = B·(log K − (K−1)/K) for this output's
/// B blocks, whose mean over outputs estimates the chain-rule bound E_π[B]·(log K − (K−1)/K)
/// on the expected KL (see [`super::block`]). Both decoders sample from the model's own
/// distribution p (temperature 1, no top-p): KL is against that p.
///
/// # Errors
/// Invalid parameters, a scorer of the wrong hidden size, a bad prompt; the policy's,
/// scorer's and reward's errors.
#[allow(clippy::too_many_arguments)]
pub fn generate_controlled<P>(
    policy: &P,
    reward: &dyn Reward,
    scorer: &dyn PrefixScorer,
    prompt: &str,
    index: u64,
    strategy: &CdStrategy,
    seed: u64,
    max_new_tokens: usize,
    chat_template: bool,
) -> Result<GenerationOutput, DecodeError>
where
    P: Policy,
{
    let tokens = encode_prompt(policy, prompt, chat_template, max_new_tokens)?;
    let stream = draw_stream(index, 0);
    let (toks, eos, log_prob, kl_bound, kl_estimate, kl_note, n, draws) = match *strategy {
        CdStrategy::CdToken { lambda, top_k } => {
            let params = CdTokenParams {
                lambda,
                top_k,
                max_new_tokens,
                seed,
            };
            let s = cd_token_generate(policy, scorer, &tokens, 1, &params, stream)
                .map_err(to_decode_error)?
                .pop()
                .ok_or_else(|| DecodeError::invalid("cd-token", "produced no output"))?;
            (
                s.tokens,
                s.finished_by_eos,
                s.log_prob,
                None,
                Some(s.kl_estimate),
                format!(
                    "nats. kl_estimate = log π(y)/p(y) of this output, summed exactly over its steps, under cd-token (λ = {lambda}, top-{top_k}; p is the model at temperature 1 without truncation, so the top-k truncation is included): a single-sample estimate whose mean over outputs is an unbiased Monte-Carlo estimate of KL(π‖p) (arXiv 2310.17022). kl_bound: none"
                ),
                top_k,
                1,
            )
        }
        CdStrategy::CdBlock { k, m } => {
            let params = CdBlockParams {
                k,
                m,
                max_new_tokens,
                seed,
            };
            let s = cd_block_generate(policy, scorer, &tokens, 1, &params, stream)
                .map_err(to_decode_error)?
                .pop()
                .ok_or_else(|| DecodeError::invalid("cd-block", "produced no output"))?;
            let blocks = s.blocks;
            (
                s.tokens,
                s.finished_by_eos,
                s.log_prob,
                Some(s.kl_bound),
                None,
                format!(
                    "nats. kl_bound = B·(log K − (K−1)/K) for this output's B = {blocks} blocks of best-of-{k} (M = {m}). Each block is best-of-K of p's continuations under the scorer, so its KL given the prefix is at most log K − (K−1)/K (arXiv 2401.01879 Thm 3.1); by the chain rule KL(π‖p) ≤ E_π[B]·(log K − (K−1)/K). The bound is on the expected KL: this value's mean over outputs estimates it (it equals it when every output has the same B); it does not bound this output's own log π(y)/p(y). kl_estimate: none"
                ),
                k,
                blocks * k,
            )
        }
    };
    let text = policy.decode(&toks)?;
    let score = tilt_rewards::check_scores(&reward.name(), 1, reward.score(&[(prompt, &text)])?)?;
    let r = f64::from(score[0]);
    let finish = if eos {
        FinishReason::Eos
    } else {
        FinishReason::Length
    };
    Ok(GenerationOutput {
        index,
        prompt: prompt.to_string(),
        text: text.clone(),
        reward: r,
        selected: 0,
        strategy: strategy.name().to_string(),
        n,
        seed,
        draws,
        accepted: None,
        kl_bound,
        kl_estimate,
        kl_note,
        units: "nats".into(),
        candidates: vec![Candidate {
            text,
            reward: r,
            new_tokens: toks.len(),
            finish,
            log_prob,
            tokens: toks,
        }],
    })
}
