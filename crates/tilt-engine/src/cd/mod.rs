//! Controlled decoding (Mudgal et al., *Controlled Decoding from Language Models*,
//! arXiv 2310.17022; docs/theory.md).
//!
//! A prefix scorer V(x, y_{<t}) estimates the expected final reward of continuing a prefix
//! with the reference policy p. Two decoders use it, both run by the stepper
//! ([`crate::stepper`]) as jobs whose rows share the batch with every other job:
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
//! CD-FUDGE or CD-Q ([`train`]): regress every prefix of reference rollouts on the final
//! reward, or (CD-Q) on the previous fit's value of the next prefix. The
//! head is evaluated here in plain `f64` (it is a dot product or a two-layer MLP), not with
//! candle: decoding then has no tensor-backend state, and the same hidden states give the
//! same values bit for bit whatever the thread count. candle's autodiff is used only to fit it.
//!
//! Randomness: output i of a call draws from its own `SequenceSampler` (ChaCha20, the seed,
//! its stream), always in the same order, so the same seed and configuration give the same
//! tokens whatever the thread count or batch.

pub mod block;
pub mod scorer;
pub mod token;
pub mod train;

pub use block::block_kl_bound;
pub use scorer::{
    ConstantScorer, LinearHead, MlpHead, PrefixScorer, ScorerFile, ScorerHead, ScorerValue,
    WeightedSum,
};
pub use token::{cd_token_step_law, top_k_candidates, CdTokenStepLaw};
pub use train::{
    fit_head, next_prefix_rows, HeadKind, LossPoint, PrefixDataset, QRound, TrainCard, TrainConfig,
    TrainMethod, MAX_Q_ROUNDS,
};

use crate::error::{EngineError, Result};
use tilt_models::Policy;

/// Check that a scorer reads hidden states of the policy's size.
///
/// # Errors
/// [`EngineError::Invalid`] naming `scorer`, with both sizes.
pub fn check_scorer_fits<P: Policy, S: PrefixScorer + ?Sized>(
    policy: &P,
    scorer: &S,
) -> Result<()> {
    if scorer.hidden_size() != policy.hidden_size() {
        return Err(EngineError::invalid(
            "scorer",
            format!(
                "{} reads hidden states of size {}, but policy {} has hidden size {}",
                scorer.name(),
                scorer.hidden_size(),
                policy.name(),
                policy.hidden_size()
            ),
        ));
    }
    Ok(())
}
