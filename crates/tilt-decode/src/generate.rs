//! The runner: N candidates of one prompt from one shared prefill, scored in one reward
//! batch, then selected.
//!
//! ```text
//! prompt ─ chat template ─ encode ─ prefill (once) ─┬─ fork cache 0 ─┐
//!                                                   ├─ fork cache 1 ─┤ step the batch until
//!                                                   │      …         │ each stops (EOS or
//!                                                   └─ fork cache N-1┘ max_new_tokens)
//!            decode each ─ reward.score(all N pairs, one batch) ─ select ─ cost
//! ```
//!
//! Why this shape: the prompt is the same for all N candidates, so its forward pass (the
//! most expensive single step) runs once and the N caches are forks of it (a policy shares
//! the prompt part, see `Policy`). Finished sequences drop out of the batch, so a short
//! answer does not pay for a long one. Scoring all candidates in one call lets a neural
//! reward batch them.
//!
//! Randomness and determinism: candidate (draw) `d` of the prompt with index `i` samples
//! its tokens from its own ChaCha20 stream `(i << 32) | d` under the run's seed
//! ([`SequenceSampler`]); the selection rule draws from stream `(i << 32) | 0xFFFF_FFFF`. A
//! candidate's tokens therefore depend only on (seed, prompt index, draw number) and on the
//! model's outputs, not on N, the batch it ran in, or the thread count; with the same seed,
//! `sample`, `bon` and `won` see the same candidates.

use crate::cost::{cost, Cost};
use crate::select::{first_accepted, select};
use crate::{DecodeError, Strategy};
use serde::{Deserialize, Serialize};
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::{Policy, StepOutput, TokenId};
use tilt_rewards::Reward;

/// The largest N (and the largest rewind batch) accepted: a documented cap above which a
/// run is refused before any work, whatever the memory (draw numbers must also fit in the
/// 32 low bits of a stream id).
pub const MAX_N: usize = 4096;

/// The largest rewind `max_draws` accepted.
pub const MAX_DRAWS: usize = 1 << 20;

/// Everything that determines the output of one prompt, besides the models and the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// The selection rule.
    pub strategy: Strategy,
    /// Number of candidates (for rewind: the batch size of draws).
    pub n: usize,
    /// The run's seed.
    pub seed: u64,
    /// Most new tokens per candidate (a candidate stops earlier at an end token).
    pub max_new_tokens: usize,
    /// How candidates are sampled from the model (the reference p of the strategy).
    pub sampling: SamplingParams,
    /// Wrap the prompt in the model's chat template (as a single user message).
    pub chat_template: bool,
}

impl GenerationConfig {
    /// Check everything that can be checked without the models.
    ///
    /// # Errors
    /// [`DecodeError::InvalidInput`] naming `--n` (0 or above [`MAX_N`]),
    /// `--max-new-tokens` (0), or the strategy's parameter.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.n == 0 {
            return Err(DecodeError::invalid("--n", "0 candidates; use at least 1"));
        }
        if self.n > MAX_N {
            return Err(DecodeError::invalid(
                "--n",
                format!(
                    "{} candidates is above the cap of {MAX_N} (each needs its own KV cache; \
                     split the work into several runs)",
                    self.n
                ),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(DecodeError::invalid(
                "--max-new-tokens",
                "0 new tokens leaves nothing to score; use at least 1",
            ));
        }
        if let Strategy::Rewind { max_draws, .. } = self.strategy {
            if max_draws > MAX_DRAWS {
                return Err(DecodeError::invalid(
                    "--max-draws",
                    format!("{max_draws} is above the cap of {MAX_DRAWS}"),
                ));
            }
        }
        self.strategy.validate()
    }
}

/// Why a candidate stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It drew an end-of-sequence token (included in its tokens).
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

/// One sampled continuation of a prompt, before scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequence {
    /// The tokens drawn, ending with the end token when `finish` is [`FinishReason::Eos`].
    pub tokens: Vec<TokenId>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// log p(tokens | prompt) under the model, nats.
    pub log_prob: f64,
    /// log-probability under the sampling distribution actually used, nats.
    pub sampling_log_prob: f64,
    /// The ChaCha20 stream it was drawn from.
    pub stream: u64,
}

/// One scored candidate, as printed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The decoded text (special tokens skipped).
    pub text: String,
    /// Its reward.
    pub reward: f64,
    /// Number of tokens generated (an end token included).
    pub new_tokens: usize,
    /// Why it stopped.
    pub finish: FinishReason,
    /// log p(response | prompt) under the model, nats.
    pub log_prob: f64,
    /// The tokens (not printed: the text says it for people).
    #[serde(skip)]
    pub tokens: Vec<TokenId>,
}

/// The result for one prompt: what was returned, what it cost, and every candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationOutput {
    /// The prompt's index in the input (0 for `--prompt`; the line number − 1 for a file).
    pub index: u64,
    /// The prompt as given (before the chat template).
    pub prompt: String,
    /// The returned text.
    pub text: String,
    /// Its reward.
    pub reward: f64,
    /// Index of the returned candidate in `candidates`.
    pub selected: usize,
    /// The strategy's name.
    pub strategy: String,
    /// N (for rewind, the batch size of draws).
    pub n: usize,
    /// The run's seed.
    pub seed: u64,
    /// Number of candidates drawn (N, or for rewind the draws made).
    pub draws: usize,
    /// Rewind only: whether a draw cleared the threshold.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accepted: Option<bool>,
    /// Upper bound on KL(π‖p), nats (null when there is none).
    pub kl_bound: Option<f64>,
    /// Estimate of KL(π‖p) from the candidates, nats (null when it cannot be formed).
    pub kl_estimate: Option<f64>,
    /// What `kl_bound` and `kl_estimate` are.
    pub kl_note: String,
    /// Units of the divergences: always `nats`.
    pub units: String,
    /// Every candidate, in draw order.
    pub candidates: Vec<Candidate>,
}

/// A prompt run through the model once: the cache to fork and the next-token output.
#[derive(Debug, Clone)]
pub struct Prefilled<C> {
    /// The prompt's tokens (after the chat template).
    pub tokens: Vec<TokenId>,
    /// The cache after the prompt (fork it with `clone`).
    pub cache: C,
    /// The model's output at the last prompt position.
    pub output: StepOutput,
}

/// The tokens of `prompt`: checked non-empty, wrapped in the chat template if asked, encoded,
/// and checked to leave room for `max_new_tokens` in the model's context.
///
/// # Errors
/// [`DecodeError::InvalidInput`] naming `prompt` when it is empty (or whitespace), when its
/// encoding is longer than the context, or when it leaves fewer than `max_new_tokens`
/// positions; the policy's tokenizer/template errors.
pub fn encode_prompt<P: Policy>(
    policy: &P,
    prompt: &str,
    chat_template: bool,
    max_new_tokens: usize,
) -> Result<Vec<TokenId>, DecodeError> {
    if prompt.trim().is_empty() {
        return Err(DecodeError::invalid("prompt", "empty prompt"));
    }
    let text = if chat_template {
        policy.chat_prompt(prompt)?
    } else {
        prompt.to_string()
    };
    let tokens = policy.encode(&text)?;
    if tokens.is_empty() {
        return Err(DecodeError::invalid("prompt", "encodes to no tokens"));
    }
    let ctx = policy.context_length();
    if tokens.len() > ctx {
        return Err(DecodeError::invalid(
            "prompt",
            format!(
                "{} tokens is longer than the model's context of {ctx} tokens",
                tokens.len()
            ),
        ));
    }
    if tokens.len() + max_new_tokens > ctx {
        return Err(DecodeError::invalid(
            "prompt",
            format!(
                "{} tokens + --max-new-tokens {max_new_tokens} exceed the model's context of \
                 {ctx} tokens (lower --max-new-tokens to at most {})",
                tokens.len(),
                ctx - tokens.len()
            ),
        ));
    }
    Ok(tokens)
}

/// Run the prompt through the model once.
///
/// # Errors
/// The policy's errors.
pub fn prefill_prompt<P: Policy>(
    policy: &P,
    tokens: Vec<TokenId>,
) -> Result<Prefilled<P::Cache>, DecodeError> {
    let (cache, output) = policy.prefill(&tokens)?;
    Ok(Prefilled {
        tokens,
        cache,
        output,
    })
}

/// The ChaCha20 stream of draw `draw` of the prompt with index `prompt_index`.
pub fn draw_stream(prompt_index: u64, draw: u64) -> u64 {
    (prompt_index << 32) | (draw & 0xFFFF_FFFF)
}

/// The ChaCha20 stream of the selection rule of the prompt with index `prompt_index`.
pub fn selection_stream(prompt_index: u64) -> u64 {
    (prompt_index << 32) | 0xFFFF_FFFF
}

/// Sample one continuation per stream in `streams` from the prefilled prompt: fork its
/// cache once per stream and step all unfinished sequences in one batched
/// [`Policy::step`] per position, each stopping at an end token or at `max_new_tokens`.
///
/// # Errors
/// `max_new_tokens` = 0; the policy's or the sampler's errors.
pub fn sample_continuations<P: Policy>(
    policy: &P,
    prefilled: &Prefilled<P::Cache>,
    seed: u64,
    streams: &[u64],
    max_new_tokens: usize,
    sampling: &SamplingParams,
) -> Result<Vec<SampledSequence>, DecodeError> {
    if max_new_tokens == 0 {
        return Err(DecodeError::invalid(
            "--max-new-tokens",
            "must be at least 1",
        ));
    }
    let eos = policy.eos_token_ids();
    let mut seqs: Vec<SampledSequence> = streams
        .iter()
        .map(|&stream| SampledSequence {
            tokens: Vec::with_capacity(max_new_tokens),
            finish: FinishReason::Length,
            log_prob: 0.0,
            sampling_log_prob: 0.0,
            stream,
        })
        .collect();
    let mut samplers: Vec<SequenceSampler> = streams
        .iter()
        .map(|&s| SequenceSampler::new(seed, s))
        .collect();
    // Active sequences: (index into seqs, its cache, its latest output). Caches are forked
    // lazily, only for sequences that continue past their first token.
    let mut active: Vec<usize> = (0..streams.len()).collect();
    let mut outputs: Vec<Option<StepOutput>> = vec![None; streams.len()];
    let mut caches: Vec<Option<P::Cache>> = vec![None; streams.len()];
    while !active.is_empty() {
        let mut step_ids = Vec::with_capacity(active.len());
        let mut step_tokens = Vec::with_capacity(active.len());
        for &i in &active {
            let out = outputs[i].as_ref().unwrap_or(&prefilled.output);
            let d = samplers[i].sample(&out.log_probs, sampling)?;
            let s = &mut seqs[i];
            s.tokens.push(d.token);
            s.log_prob += d.log_prob;
            s.sampling_log_prob += d.sampling_log_prob;
            if eos.contains(&d.token) {
                s.finish = FinishReason::Eos;
            } else if s.tokens.len() < max_new_tokens {
                step_ids.push(i);
                step_tokens.push(d.token);
            }
        }
        if step_ids.is_empty() {
            break;
        }
        let mut batch: Vec<P::Cache> = step_ids
            .iter()
            .map(|&i| caches[i].take().unwrap_or_else(|| prefilled.cache.clone()))
            .collect();
        let outs = policy.step(&mut batch, &step_tokens)?;
        if outs.len() != step_ids.len() {
            return Err(DecodeError::Model(tilt_models::ModelError::Internal(
                format!(
                    "step returned {} outputs for {} sequences",
                    outs.len(),
                    step_ids.len()
                ),
            )));
        }
        for ((&i, cache), out) in step_ids.iter().zip(batch).zip(outs) {
            caches[i] = Some(cache);
            outputs[i] = Some(out);
        }
        active = step_ids;
    }
    Ok(seqs)
}

/// Decode and score sequences: one [`Reward::score`] call for the whole batch.
///
/// # Errors
/// The policy's decode errors; the reward's errors.
pub fn score_sequences<P: Policy>(
    policy: &P,
    reward: &dyn Reward,
    prompt: &str,
    seqs: Vec<SampledSequence>,
) -> Result<Vec<Candidate>, DecodeError> {
    let texts: Vec<String> = seqs
        .iter()
        .map(|s| policy.decode(&s.tokens))
        .collect::<Result<_, _>>()?;
    let pairs: Vec<(&str, &str)> = texts.iter().map(|t| (prompt, t.as_str())).collect();
    let scores = tilt_rewards::check_scores(&reward.name(), pairs.len(), reward.score(&pairs)?)?;
    Ok(seqs
        .into_iter()
        .zip(texts)
        .zip(scores)
        .map(|((s, text), r)| Candidate {
            text,
            reward: f64::from(r),
            new_tokens: s.tokens.len(),
            finish: s.finish,
            log_prob: s.log_prob,
            tokens: s.tokens,
        })
        .collect())
}

/// Run `config` on one prompt: encode, prefill once, draw and score the candidates, select,
/// and cost the selection (see the module docs). `index` is the prompt's position in the
/// input, which picks its random streams.
///
/// # Errors
/// [`DecodeError::InvalidInput`] for a bad config or prompt (see
/// [`GenerationConfig::validate`], [`encode_prompt`]); the policy's and reward's errors.
pub fn generate<P: Policy>(
    policy: &P,
    reward: &dyn Reward,
    prompt: &str,
    index: u64,
    config: &GenerationConfig,
) -> Result<GenerationOutput, DecodeError> {
    config.validate()?;
    if index >= 1 << 31 {
        return Err(DecodeError::invalid(
            "prompts",
            format!("prompt index {index} is beyond 2^31"),
        ));
    }
    let tokens = encode_prompt(policy, prompt, config.chat_template, config.max_new_tokens)?;
    let prefilled = prefill_prompt(policy, tokens)?;
    let mut selector = SequenceSampler::new(config.seed, selection_stream(index));
    let (candidates, selected, accepted_count) = match config.strategy {
        Strategy::Rewind {
            threshold,
            max_draws,
        } => {
            let mut all: Vec<Candidate> = Vec::new();
            let mut chosen = None;
            while all.len() < max_draws && chosen.is_none() {
                let batch = config.n.min(max_draws - all.len());
                let streams: Vec<u64> = (all.len()..all.len() + batch)
                    .map(|d| draw_stream(index, d as u64))
                    .collect();
                let seqs = sample_continuations(
                    policy,
                    &prefilled,
                    config.seed,
                    &streams,
                    config.max_new_tokens,
                    &config.sampling,
                )?;
                let scored = score_sequences(policy, reward, prompt, seqs)?;
                let rewards: Vec<f64> = scored.iter().map(|c| c.reward).collect();
                chosen = first_accepted(&rewards, threshold).map(|i| all.len() + i);
                all.extend(scored);
                tracing::debug!(
                    draws = all.len(),
                    accepted = chosen.is_some(),
                    "rewind batch"
                );
            }
            let rewards: Vec<f64> = all.iter().map(|c| c.reward).collect();
            let accepted = rewards.iter().filter(|&&r| r >= threshold).count();
            let sel = match chosen {
                Some(i) => i,
                None => select(&config.strategy, &rewards, &mut selector)?,
            };
            (all, sel, accepted)
        }
        _ => {
            let streams: Vec<u64> = (0..config.n as u64)
                .map(|d| draw_stream(index, d))
                .collect();
            let seqs = sample_continuations(
                policy,
                &prefilled,
                config.seed,
                &streams,
                config.max_new_tokens,
                &config.sampling,
            )?;
            let scored = score_sequences(policy, reward, prompt, seqs)?;
            let rewards: Vec<f64> = scored.iter().map(|c| c.reward).collect();
            let sel = select(&config.strategy, &rewards, &mut selector)?;
            (scored, sel, 0)
        }
    };
    let texts: Vec<&str> = candidates.iter().map(|c| c.text.as_str()).collect();
    let rewards: Vec<f64> = candidates.iter().map(|c| c.reward).collect();
    let Cost {
        kl_bound,
        kl_estimate,
        kl_note,
    } = cost(
        &config.strategy,
        &texts,
        &rewards,
        config.n,
        candidates.len(),
        accepted_count,
    )?;
    let chosen = &candidates[selected];
    Ok(GenerationOutput {
        index,
        prompt: prompt.to_string(),
        text: chosen.text.clone(),
        reward: chosen.reward,
        selected,
        strategy: config.strategy.name().to_string(),
        n: config.n,
        seed: config.seed,
        draws: candidates.len(),
        accepted: match config.strategy {
            Strategy::Rewind { .. } => Some(accepted_count > 0),
            _ => None,
        },
        kl_bound,
        kl_estimate,
        kl_note,
        units: "nats".into(),
        candidates,
    })
}

/// Bytes of memory a batch of `n` sequences needs beyond the weights: the shared prompt's
/// KV cache, each sequence's own KV cache for `max_new_tokens` tokens, and two vocabulary-
/// sized f32 vectors per sequence (log-probs in and out of the sampler).
///
/// ```text
/// bytes = (prompt_len + n·max_new_tokens)·kv_bytes_per_token + n·vocab·4·2
/// kv_bytes_per_token = 2 (K and V) · layers · kv_heads · head_dim · 4 (f32)
/// ```
pub fn batch_memory_bytes(
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
    kv_bytes_per_token: u64,
    vocab: usize,
) -> u64 {
    let tokens = prompt_len as u64 + n as u64 * max_new_tokens as u64;
    tokens
        .saturating_mul(kv_bytes_per_token)
        .saturating_add(n as u64 * vocab as u64 * 8)
}

/// Refuse a batch whose [`batch_memory_bytes`] exceeds `available_bytes`. `input` names the
/// flag that sets the batch size (`--n`, `--block-k`, `--reference-samples`, …), so that the
/// error says what to lower.
///
/// # Errors
/// [`DecodeError::InvalidInput`] naming `input`, with the estimate and what is available.
pub fn check_batch_memory(
    input: &str,
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
    kv_bytes_per_token: u64,
    vocab: usize,
    available_bytes: u64,
) -> Result<(), DecodeError> {
    let need = batch_memory_bytes(n, prompt_len, max_new_tokens, kv_bytes_per_token, vocab);
    if need > available_bytes {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(DecodeError::invalid(
            input,
            format!(
                "a batch of {n} sequences of up to {max_new_tokens} new tokens needs about \
                 {:.2} GiB of KV cache and log-probabilities, more than the {:.2} GiB of memory \
                 available; lower {input} or --max-new-tokens",
                gib(need),
                gib(available_bytes)
            ),
        ));
    }
    Ok(())
}

/// Memory available to this process now, from `/proc/meminfo`'s `MemAvailable` (None where
/// it cannot be read, e.g. off Linux).
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
