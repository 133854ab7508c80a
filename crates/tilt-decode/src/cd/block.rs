//! Blockwise controlled decoding, cd-block (arXiv 2310.17022 §3, "blockwise CD";
//! `math.md` §6): best-of-K per block of M tokens.
//!
//! ```text
//! repeat until EOS or max_new_tokens:
//!     fork the sequence's cache K times; draw K continuations of ≤ M tokens from p
//!     keep the continuation whose extended prefix V scores highest (first on ties)
//! KL(π‖p) = E_π[ Σ_{b ≤ B} KL(π_b(·|prefix_b) ‖ p(·|prefix_b)) ]   (chain rule over blocks)
//!         ≤ E_π[B] · (log K − (K−1)/K)                             (best-of-K per block)
//! ```
//!
//! Each block's law given its prefix is best-of-K of p's M-token continuations under the
//! score V (first index on ties, which for iid draws is the same law as a uniform choice
//! among the tied), so its KL from p's continuation law is at most log K − (K−1)/K
//! (arXiv 2401.01879 Thm 3.1). The chain rule sums these over the blocks, whose number B is
//! random (an EOS ends the sequence early): the bound is on the *expected* KL,
//! E_π[B]·(log K − (K−1)/K). A sequence's [`CdBlockSample::kl_bound`] = B·(log K − (K−1)/K)
//! is therefore not a bound on that sequence's log π(y)/p(y) (no such bound exists); its
//! mean over sequences drawn by cd-block is an unbiased estimate of the bound, and it is
//! the bound itself when every sequence has the same B (e.g. none stops early).
//!
//! With M ≥ `max_new_tokens` there is one block, and cd-block is exactly best-of-K with the
//! reward r(y) = V(x, y) of the complete sequence.
//!
//! The K continuations of a block are stepped together in one batched [`Policy::step`] per
//! token. Tokens are drawn from the full p at temperature 1, from the sequence's own random
//! stream, continuation by continuation in index order at each position.

use super::{check_room, check_scorer_fits, sample_reference, CdError, PrefixScorer, Result};
use crate::generate::MAX_N;
use serde::{Deserialize, Serialize};
use tilt_models::sampling::SequenceSampler;
use tilt_models::{Policy, StepOutput, TokenId};

/// Settings of cd-block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdBlockParams {
    /// K ≥ 1 continuations per block.
    pub k: usize,
    /// M ≥ 1 tokens per block.
    pub m: usize,
    /// Most tokens generated per sequence.
    pub max_new_tokens: usize,
    /// Seed of the sequences' random streams.
    pub seed: u64,
}

impl CdBlockParams {
    /// Check 1 ≤ K ≤ [`MAX_N`], M ≥ 1, max_new_tokens ≥ 1.
    ///
    /// # Errors
    /// [`CdError::InvalidParameter`] naming `--block-k`, `--block-m` or `--max-new-tokens`.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(CdError::invalid(
                "--block-k",
                "K is 0; K must be at least 1 continuation per block",
            ));
        }
        if self.m == 0 {
            return Err(CdError::invalid(
                "--block-m",
                "M is 0; M must be at least 1 token per block",
            ));
        }
        if self.k > MAX_N {
            return Err(CdError::invalid(
                "--block-k",
                format!(
                    "K = {} is above the cap of {MAX_N} continuations per block (each needs its \
                     own KV cache)",
                    self.k
                ),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(CdError::invalid(
                "--max-new-tokens",
                "is 0; must be at least 1",
            ));
        }
        Ok(())
    }

    /// The KL bound of one block, log K − (K−1)/K nats (best-of-K, arXiv 2401.01879).
    pub fn block_kl_bound(&self) -> f64 {
        let k = self.k as f64;
        k.ln() - (k - 1.0) / k
    }
}

/// One sequence drawn by cd-block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdBlockSample {
    /// The generated tokens (EOS included when drawn).
    pub tokens: Vec<TokenId>,
    /// Whether it ended with an EOS token.
    pub finished_by_eos: bool,
    /// Number of blocks B.
    pub blocks: usize,
    /// V of the kept continuation of each block.
    pub block_values: Vec<f64>,
    /// B·(log K − (K−1)/K) nats for this sequence's B blocks: its mean over cd-block's
    /// sequences estimates the chain-rule bound E_π[B]·(log K − (K−1)/K) ≥ KL(π‖p) (see the
    /// module docs); it does not bound this sequence's own log π(y)/p(y).
    pub kl_bound: f64,
    /// log p(y | x) under the reference policy, nats.
    pub log_prob: f64,
}

/// Draw `n` sequences with cd-block from one prompt (arXiv 2310.17022 §3).
///
/// Sequence i uses random stream `first_stream + i` of `params.seed`. Each block forks the
/// kept continuation's cache K ways (after [`Policy::prepare_fork`], so that the forks share the
/// sequence so far instead of each copying it); the K continuations are stepped together,
/// their caches moved in and out of the batch, never copied.
///
/// # Errors
/// Invalid parameters (K = 0, M = 0, K above the cap); a scorer of the wrong hidden size; no
/// room in the context; the policy or scorer failing.
pub fn cd_block_generate<P, S>(
    policy: &P,
    scorer: &S,
    prompt: &[TokenId],
    n: usize,
    params: &CdBlockParams,
    first_stream: u64,
) -> Result<Vec<CdBlockSample>>
where
    P: Policy,
    S: PrefixScorer + ?Sized,
{
    params.validate()?;
    check_scorer_fits(policy, scorer)?;
    check_room(policy, prompt.len(), params.max_new_tokens)?;
    let eos = policy.eos_token_ids().to_vec();
    let (cache0, out0) = policy.prefill(prompt)?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let mut rng = SequenceSampler::new(params.seed, first_stream + i as u64);
        let mut cache = cache0.clone();
        let mut last = out0.clone();
        let mut sample = CdBlockSample {
            tokens: Vec::new(),
            finished_by_eos: false,
            blocks: 0,
            block_values: Vec::new(),
            kl_bound: 0.0,
            log_prob: 0.0,
        };
        while sample.tokens.len() < params.max_new_tokens && !sample.finished_by_eos {
            let len = params.m.min(params.max_new_tokens - sample.tokens.len());
            // K forks: K − 1 clones and the original moved into the last one.
            policy.prepare_fork(&mut cache, params.k);
            let mut caches: Vec<Option<P::Cache>> = Vec::with_capacity(params.k);
            caches.extend((1..params.k).map(|_| Some(cache.clone())));
            caches.push(Some(cache));
            // Each continuation's latest output; `None` until its first token is fed (all
            // K draw their first token from the block's starting output `last`).
            let mut lasts: Vec<Option<StepOutput>> = vec![None; params.k];
            let mut blocks: Vec<Vec<TokenId>> = vec![Vec::with_capacity(len); params.k];
            let mut ended = vec![false; params.k];
            let mut block_log_p = vec![0.0f64; params.k];
            for _ in 0..len {
                let live: Vec<usize> = (0..params.k).filter(|&c| !ended[c]).collect();
                if live.is_empty() {
                    break;
                }
                let mut toks = Vec::with_capacity(live.len());
                for &c in &live {
                    let out = lasts[c].as_ref().unwrap_or(&last);
                    let tok = sample_reference(&out.log_probs, &mut rng)?;
                    block_log_p[c] += f64::from(out.log_probs[tok as usize]);
                    blocks[c].push(tok);
                    toks.push(tok);
                }
                let mut live_caches: Vec<P::Cache> = live
                    .iter()
                    .map(|&c| caches[c].take().ok_or_else(taken_twice))
                    .collect::<Result<_>>()?;
                let outs = policy.step(&mut live_caches, &toks)?;
                if outs.len() != live.len() {
                    return Err(CdError::Model(tilt_models::ModelError::Internal(format!(
                        "step returned {} outputs for {} sequences",
                        outs.len(),
                        live.len()
                    ))));
                }
                for (((&c, cch), out), tok) in live.iter().zip(live_caches).zip(outs).zip(&toks) {
                    caches[c] = Some(cch);
                    lasts[c] = Some(out);
                    ended[c] = eos.contains(tok);
                }
            }
            // Every continuation has at least one token (len ≥ 1), so each has an output.
            let outs: Vec<StepOutput> = lasts
                .into_iter()
                .map(|o| o.ok_or_else(taken_twice))
                .collect::<Result<_>>()?;
            let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
            let values = scorer.score(&hidden)?;
            let mut best = 0;
            for (c, v) in values.iter().enumerate() {
                if *v > values[best] {
                    best = c;
                }
            }
            sample.tokens.extend_from_slice(&blocks[best]);
            sample.block_values.push(values[best]);
            sample.log_prob += block_log_p[best];
            sample.blocks += 1;
            sample.finished_by_eos = ended[best];
            cache = caches.swap_remove(best).ok_or_else(taken_twice)?;
            last = outs.into_iter().nth(best).ok_or_else(taken_twice)?;
        }
        sample.kl_bound = sample.blocks as f64 * params.block_kl_bound();
        samples.push(sample);
    }
    Ok(samples)
}

fn taken_twice() -> CdError {
    CdError::Model(tilt_models::ModelError::Internal(
        "cd-block: a continuation's state was missing".into(),
    ))
}
