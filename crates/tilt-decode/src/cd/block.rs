//! Blockwise controlled decoding, cd-block (arXiv 2310.17022 §3, "blockwise CD";
//! `math.md` §6): best-of-K per block of M tokens.
//!
//! ```text
//! repeat until EOS or max_new_tokens:
//!     fork the sequence's cache K times; draw K continuations of ≤ M tokens from p
//!     keep the continuation whose extended prefix V scores highest (first on ties)
//! KL(π‖p) ≤ B·(log K − (K−1)/K)  over the B blocks drawn (chain rule; best-of-K bound per
//! block, arXiv 2401.01879 / 2310.17022 §3)
//! ```
//!
//! With M ≥ `max_new_tokens` there is one block, and cd-block is exactly best-of-K with the
//! reward r(y) = V(x, y) of the complete sequence.
//!
//! The K continuations of a block are stepped together in one batched [`Policy::step`] per
//! token. Tokens are drawn from the full p at temperature 1, from the sequence's own random
//! stream, continuation by continuation in index order at each position.

use super::{check_room, check_scorer_fits, sample_reference, CdError, PrefixScorer, Result};
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
    /// Check K ≥ 1, M ≥ 1, max_new_tokens ≥ 1.
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
    /// B·(log K − (K−1)/K): an upper bound on KL(π‖p) in nats for this sequence's blocks.
    pub kl_bound: f64,
    /// log p(y | x) under the reference policy, nats.
    pub log_prob: f64,
}

/// Draw `n` sequences with cd-block from one prompt (arXiv 2310.17022 §3).
///
/// Sequence i uses random stream `first_stream + i` of `params.seed`.
///
/// # Errors
/// Invalid parameters (K = 0, M = 0); a scorer of the wrong hidden size; no room in the
/// context; the policy or scorer failing.
pub fn cd_block_generate<P: Policy, S: PrefixScorer + ?Sized>(
    policy: &P,
    scorer: &S,
    prompt: &[TokenId],
    n: usize,
    params: &CdBlockParams,
    first_stream: u64,
) -> Result<Vec<CdBlockSample>> {
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
            let mut caches: Vec<P::Cache> = vec![cache.clone(); params.k];
            let mut lasts: Vec<StepOutput> = vec![last.clone(); params.k];
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
                    let tok = sample_reference(&lasts[c].log_probs, &mut rng)?;
                    block_log_p[c] += f64::from(lasts[c].log_probs[tok as usize]);
                    blocks[c].push(tok);
                    toks.push(tok);
                }
                let mut live_caches: Vec<P::Cache> =
                    live.iter().map(|&c| caches[c].clone()).collect();
                let outs = policy.step(&mut live_caches, &toks)?;
                if outs.len() != live.len() {
                    return Err(CdError::Model(tilt_models::ModelError::Internal(format!(
                        "step returned {} outputs for {} sequences",
                        outs.len(),
                        live.len()
                    ))));
                }
                for (((&c, cch), out), tok) in live.iter().zip(live_caches).zip(outs).zip(&toks) {
                    caches[c] = cch;
                    lasts[c] = out;
                    ended[c] = eos.contains(tok);
                }
            }
            let hidden: Vec<&[f32]> = lasts.iter().map(|o| o.hidden.as_slice()).collect();
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
            cache = caches.swap_remove(best);
            last = lasts.swap_remove(best);
        }
        sample.kl_bound = sample.blocks as f64 * params.block_kl_bound();
        samples.push(sample);
    }
    Ok(samples)
}
