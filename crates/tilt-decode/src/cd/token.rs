//! Token-level controlled decoding, cd-token (arXiv 2310.17022 §3, Theorem 2.1; `math.md` §6).
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

use super::{check_room, check_scorer_fits, CdError, PrefixScorer, Result};
use serde::{Deserialize, Serialize};
use tilt_models::sampling::SequenceSampler;
use tilt_models::{Policy, StepOutput, TokenId};

/// Settings of cd-token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdTokenParams {
    /// λ ≥ 0: the strength of the guidance (λ = 0 is p restricted to its top-k).
    pub lambda: f64,
    /// k ≥ 1: candidates per step, the k most likely tokens of p (k ≥ vocabulary = no
    /// truncation).
    pub top_k: usize,
    /// Most tokens generated per sequence.
    pub max_new_tokens: usize,
    /// Seed of the sequences' random streams.
    pub seed: u64,
}

impl CdTokenParams {
    /// Check λ ≥ 0 (finite), k ≥ 1, max_new_tokens ≥ 1.
    ///
    /// # Errors
    /// [`CdError::InvalidParameter`] naming `--lambda`, `--top-k` or `--max-new-tokens`.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(CdError::invalid(
                "--lambda",
                format!("is {}; λ must be a finite number ≥ 0", self.lambda),
            ));
        }
        if self.top_k == 0 {
            return Err(CdError::invalid("--top-k", "is 0; k must be at least 1"));
        }
        if self.max_new_tokens == 0 {
            return Err(CdError::invalid(
                "--max-new-tokens",
                "is 0; must be at least 1",
            ));
        }
        Ok(())
    }
}

/// One sequence drawn by cd-token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdTokenSample {
    /// The generated tokens (EOS included when drawn).
    pub tokens: Vec<TokenId>,
    /// Whether it ended with an EOS token (otherwise it hit `max_new_tokens`).
    pub finished_by_eos: bool,
    /// log π(y_t | ·)/p(y_t | ·) of each step, nats.
    pub step_log_ratios: Vec<f64>,
    /// Σ of `step_log_ratios` = log π(y)/p(y), nats: its mean over samples estimates
    /// KL(π‖p).
    pub kl_estimate: f64,
    /// V of each chosen prefix [y_{<t}, y_t].
    pub step_values: Vec<f64>,
    /// log p(y | x) under the reference policy, nats.
    pub log_prob: f64,
}

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
/// use tilt_decode::cd::cd_token_step_law;
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
        return Err(CdError::invalid(
            "--lambda",
            format!("is {lambda}; λ must be a finite number ≥ 0"),
        ));
    }
    if candidates.is_empty() || candidates.len() != values.len() {
        return Err(CdError::invalid(
            "candidates",
            format!(
                "{} candidates with {} values (need at least one, one value each)",
                candidates.len(),
                values.len()
            ),
        ));
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(CdError::invalid(
            "scorer values",
            format!("value {v} is not finite"),
        ));
    }
    let mut lp = Vec::with_capacity(candidates.len());
    for &c in candidates {
        let l = *log_probs.get(c as usize).ok_or_else(|| {
            CdError::invalid(
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
        return Err(CdError::invalid(
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

struct Running<C> {
    /// The sequence's cache; `None` only while it is forked into the step's children.
    cache: Option<C>,
    last: StepOutput,
    sample: CdTokenSample,
    sampler: SequenceSampler,
    done: bool,
}

/// Draw `n` sequences with cd-token from one prompt (arXiv 2310.17022 §3, token-level CD).
///
/// Sequence i uses random stream `first_stream + i` of `params.seed`. At each step the k
/// children of every running sequence are scored in one batched [`Policy::step`]: the
/// sequence's cache is forked k ways (k − 1 clones, after [`Policy::prepare_fork`], and the original
/// moved into the last child), and the chosen child's cache is moved back as the sequence's.
///
/// # Errors
/// Invalid parameters; a scorer whose hidden size differs from the policy's; no room in the
/// context; the policy or scorer failing.
pub fn cd_token_generate<P, S>(
    policy: &P,
    scorer: &S,
    prompt: &[TokenId],
    n: usize,
    params: &CdTokenParams,
    first_stream: u64,
) -> Result<Vec<CdTokenSample>>
where
    P: Policy,
    S: PrefixScorer + ?Sized,
{
    params.validate()?;
    check_scorer_fits(policy, scorer)?;
    check_room(policy, prompt.len(), params.max_new_tokens)?;
    let eos = policy.eos_token_ids().to_vec();
    let (cache0, out0) = policy.prefill(prompt)?;
    let mut seqs: Vec<Running<P::Cache>> = (0..n)
        .map(|i| Running {
            cache: Some(cache0.clone()),
            last: out0.clone(),
            sample: CdTokenSample {
                tokens: Vec::new(),
                finished_by_eos: false,
                step_log_ratios: Vec::new(),
                kl_estimate: 0.0,
                step_values: Vec::new(),
                log_prob: 0.0,
            },
            sampler: SequenceSampler::new(params.seed, first_stream + i as u64),
            done: false,
        })
        .collect();
    for _t in 0..params.max_new_tokens {
        let active: Vec<usize> = (0..n).filter(|&i| !seqs[i].done).collect();
        if active.is_empty() {
            break;
        }
        // (Σ k_i) children: fork each active sequence's cache once per candidate.
        let mut child_caches = Vec::new();
        let mut child_tokens = Vec::new();
        let mut spans = Vec::with_capacity(active.len());
        for &i in &active {
            let seq = &mut seqs[i];
            let cands = top_k_candidates(&seq.last.log_probs, params.top_k);
            let mut cache = seq.cache.take().ok_or_else(internal)?;
            policy.prepare_fork(&mut cache, cands.len());
            let start = child_tokens.len();
            for _ in 1..cands.len() {
                child_caches.push(cache.clone());
            }
            child_caches.push(cache);
            child_tokens.extend_from_slice(&cands);
            spans.push((start, child_tokens.len()));
        }
        let outs = policy.step(&mut child_caches, &child_tokens)?;
        if outs.len() != child_tokens.len() {
            return Err(CdError::Model(tilt_models::ModelError::Internal(format!(
                "step returned {} outputs for {} sequences",
                outs.len(),
                child_tokens.len()
            ))));
        }
        let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
        let values = scorer.score(&hidden)?;
        let mut child_caches: Vec<Option<P::Cache>> = child_caches.into_iter().map(Some).collect();
        let mut outs: Vec<Option<StepOutput>> = outs.into_iter().map(Some).collect();
        for (&i, &(lo, hi)) in active.iter().zip(&spans) {
            let seq = &mut seqs[i];
            let law = cd_token_step_law(
                &seq.last.log_probs,
                &child_tokens[lo..hi],
                &values[lo..hi],
                params.lambda,
            )?;
            let log_pi: Vec<f64> = law.probs.iter().map(|p| p.ln()).collect();
            let j = seq.sampler.sample_index(&log_pi)?;
            let tok = law.candidates[j];
            seq.sample.tokens.push(tok);
            seq.sample.step_log_ratios.push(law.log_ratios[j]);
            seq.sample.step_values.push(values[lo + j]);
            seq.sample.log_prob += f64::from(seq.last.log_probs[tok as usize]);
            seq.cache = Some(child_caches[lo + j].take().ok_or_else(internal)?);
            seq.last = outs[lo + j].take().ok_or_else(internal)?;
            if eos.contains(&tok) {
                seq.sample.finished_by_eos = true;
                seq.done = true;
            }
        }
    }
    Ok(seqs
        .into_iter()
        .map(|mut s| {
            s.sample.kl_estimate = s.sample.step_log_ratios.iter().sum();
            s.sample
        })
        .collect())
}

fn internal() -> CdError {
    CdError::Model(tilt_models::ModelError::Internal(
        "a child state was taken twice".into(),
    ))
}
