//! Blockwise controlled decoding, cd-block (arXiv 2310.17022 §3, "blockwise CD";
//! docs/theory.md): best-of-K per block of M tokens.
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
//! The K continuations of a block are rows of the stepper's batch (its job is in
//! [`crate::stepper`]). Tokens are drawn from the full p at temperature 1, from the
//! sequence's own random stream, continuation by continuation in index order at each
//! position.

/// The KL bound of one block of best-of-K, log K − (K−1)/K nats (arXiv 2401.01879 Thm 3.1);
/// an output of B blocks reports B times it.
///
/// ```
/// assert!((tilt_engine::cd::block_kl_bound(4) - (4f64.ln() - 0.75)).abs() < 1e-15);
/// assert_eq!(tilt_engine::cd::block_kl_bound(1), 0.0);
/// ```
pub fn block_kl_bound(k: usize) -> f64 {
    let k = k as f64;
    k.ln() - (k - 1.0) / k
}
