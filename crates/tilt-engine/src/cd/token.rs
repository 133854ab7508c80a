//! Token-level controlled decoding, cd-token (arXiv 2310.17022 §3, Theorem 2.1; docs/theory.md).
//!
//! ```text
//! π(z | x, y_{<t}) = p(z | x, y_{<t}) · e^{λ·V(x, [y_{<t}, z])} / Z,   z ∈ top-k of p
//! Z = Σ_{z' ∈ top-k} p(z') e^{λ·V(z')}
//! log π(z)/p(z) = λ·V(z) − log Z
//! ```
//!
//! The recorded log-ratio is taken against the *untruncated* p, so it includes the top-k
//! truncation (with λ = 0 it is −log p(top-k)); summed over a sequence it is
//! log π(y)/p(y), the single-sample estimate of KL(π‖p) in nats.
//!
//! Numerics: with a = λ·(V − max V) ≤ 0, log Z̃ = log Σ_{top-k} p·e^{a} − log Σ_{all} p
//! (p renormalised over the whole vocabulary, so that the f32 rounding of the model's
//! log-probabilities does not leak into the law: π sums to 1 to f64 rounding). Both sums are
//! of positive terms (no cancellation; the argmax-V candidate contributes p·1 ≥ p/|top-k|
//! of it) and run in token-id order, so a constant scorer with k ≥ the vocabulary gives two
//! bit-identical sums and a log-ratio of exactly 0.

use crate::error::{EngineError, Result};
use tilt_models::TokenId;

/// The exact law of one cd-token step over its candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct CdTokenStepLaw {
    /// The candidates (top-k of p, most likely first, ties by smaller id).
    pub candidates: Vec<TokenId>,
    /// π(z) for each candidate (sums to 1 up to rounding).
    pub probs: Vec<f64>,
    /// log π(z)/p(z) for each candidate, nats, against the untruncated p.
    pub log_ratios: Vec<f64>,
}

/// The `k` most likely tokens of `log_probs`, most likely first, ties broken by the smaller
/// token id (deterministic). `k` larger than the vocabulary gives the whole vocabulary.
pub fn top_k_candidates(log_probs: &[f32], k: usize) -> Vec<TokenId> {
    let mut idx: Vec<usize> = (0..log_probs.len()).collect();
    let key = |&i: &usize| log_probs[i];
    let by = |a: &usize, b: &usize| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
    }
    idx.sort_by(by);
    idx.into_iter().map(|i| i as TokenId).collect()
}

/// The cd-token law of one step (arXiv 2310.17022 Theorem 2.1 restricted to the top-k):
/// π(z) ∝ p(z)·e^{λ·V(z)} over `candidates`, and log π(z)/p(z) against the full p.
///
/// `log_probs` is the full next-token log-distribution of p; `values[i]` is
/// V(x, [y_{<t}, candidates[i]]).
///
/// # Errors
/// λ < 0 or not finite; no candidates; a candidate out of the vocabulary; a non-finite value.
///
/// # Examples
/// ```
/// use tilt_engine::cd::cd_token_step_law;
/// // p = (1/2, 1/4, 1/4); V = (0, ln 2, 0); λ = 1, all three candidates:
/// // π ∝ (1/2, 1/2, 1/4) → (0.4, 0.4, 0.2).
/// let lp = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
/// let law = cd_token_step_law(&lp, &[0, 1, 2], &[0.0, 2f64.ln(), 0.0], 1.0).unwrap();
/// assert!((law.probs[0] - 0.4).abs() < 1e-7 && (law.probs[1] - 0.4).abs() < 1e-7);
/// assert!((law.log_ratios[2] - (0.2f64 / 0.25).ln()).abs() < 1e-7);
/// ```
pub fn cd_token_step_law(
    log_probs: &[f32],
    candidates: &[TokenId],
    values: &[f64],
    lambda: f64,
) -> Result<CdTokenStepLaw> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(EngineError::invalid(
            "lambda",
            format!("is {lambda}; λ must be a finite number ≥ 0"),
        ));
    }
    if candidates.is_empty() || candidates.len() != values.len() {
        return Err(EngineError::invalid(
            "candidates",
            format!(
                "{} candidates with {} values (need at least one, one value each)",
                candidates.len(),
                values.len()
            ),
        ));
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(EngineError::invalid(
            "scorer values",
            format!("value {v} is not finite"),
        ));
    }
    let mut lp = Vec::with_capacity(candidates.len());
    for &c in candidates {
        let l = *log_probs.get(c as usize).ok_or_else(|| {
            EngineError::invalid(
                "candidates",
                format!("token {c} is outside the vocabulary of {}", log_probs.len()),
            )
        })?;
        lp.push(f64::from(l));
    }
    let vmax = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let a: Vec<f64> = values.iter().map(|v| lambda * (v - vmax)).collect();
    // Both sums in token-id order, so that a = 0 over the whole vocabulary gives two
    // bit-identical sums and log Z̃ = 0 exactly.
    let mut by_id: Vec<usize> = (0..candidates.len()).collect();
    by_id.sort_by_key(|&i| candidates[i]);
    let top: f64 = by_id.iter().map(|&i| lp[i].exp() * a[i].exp()).sum();
    let all: f64 = log_probs.iter().map(|&l| f64::from(l).exp()).sum();
    let log_z = top.ln() - all.ln();
    if !(top.is_finite() && top > 0.0 && log_z.is_finite()) {
        return Err(EngineError::invalid(
            "candidates",
            "the top-k tokens have zero probability under p",
        ));
    }
    let log_ratios: Vec<f64> = a.iter().map(|ai| ai - log_z).collect();
    // π = p̃·e^{a}/Z̃ = p·e^{a}/Σ_{top-k} p·e^{a}.
    let probs = lp
        .iter()
        .zip(&a)
        .map(|(l, ai)| l.exp() * ai.exp() / top)
        .collect();
    Ok(CdTokenStepLaw {
        candidates: candidates.to_vec(),
        probs,
        log_ratios,
    })
}
