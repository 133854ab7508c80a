//! The one batched stepper under every strategy.
//!
//! ```text
//!            ┌──────────── one round ─────────────────────────────────────────────┐
//! jobs ──▶   poll each job: it samples its next tokens from its last outputs and
//!            pushes (cache, token) rows — or asks for rewards, or finishes
//!            rewards: one call per request for scores (across jobs when the reward
//!            says its scores do not depend on the batch)
//!            ONE Policy::step over the rows of every job
//!            absorb: each job takes back its rows' caches and outputs
//!            └────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! A *job* is one strategy run for one output (a choice of a request, the reference
//! samples of an evaluation, the rollouts of a prompt): a state machine that never calls
//! the model itself. The stepper owns the only loop that does, so the sequences of many
//! jobs — of different strategies, prompts and requests — step together as one batch;
//! jobs join and leave between rounds, a finished sequence leaves the batch at once, and a
//! cancelled job leaves at the next round. This is the loop the server's continuous
//! batching drives.
//!
//! Why the outputs do not depend on the batch: each sequence draws from its own random
//! stream, the selection rules from theirs, and the model's kernels are batch-invariant
//! (every row of a step is computed by the same sequence of operations whatever else is in
//! the batch). So a job gives the same bytes alone, beside others, or at any thread count;
//! `tests/stepper.rs` checks it. Rewards are the exception that needs care: a neural reward
//! that pads a batch may give other bits for the same text in another batch, so scores are
//! requested per job and pooled across jobs only for a reward whose
//! [`Reward::batch_invariant`] says so.
//!
//! Randomness: candidate (draw) `d` of a job draws its tokens from ChaCha20 stream
//! [`draw_stream`]`(index, d)` under the job's seed, the selection rule from
//! [`selection_stream`]; a candidate's tokens therefore depend only on (seed, index, draw)
//! and on the model, not on n, the batch it ran in, or the thread count.

use crate::cd::{cd_token_step_law, top_k_candidates, PrefixScorer, WeightedSum};
use crate::cost::{cost, Cost, Rule};
use crate::error::{EngineError, Result};
use crate::request::{Candidate, FinishReason, KlNote, Output};
use crate::select::{first_accepted, select};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::{Policy, StepOutput, TokenId};
use tilt_rewards::Reward;

/// The ChaCha20 stream of draw `draw` of the prompt with index `index`.
pub fn draw_stream(index: u64, draw: u64) -> u64 {
    (index << 32) | (draw & 0xFFFF_FFFF)
}

/// The ChaCha20 stream of the selection rule of choice `choice` of the prompt with index
/// `index` (choice 0: `(index << 32) | 0xFFFF_FFFF`, then downwards).
pub fn selection_stream(index: u64, choice: u64) -> u64 {
    (index << 32) | (0xFFFF_FFFF - (choice & 0xFFFF))
}

/// A handle that cancels a job (or a request): set it, and the work leaves the batch at
/// the next round, its result an [`EngineError::Cancelled`]. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Cancel.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One token drawn for a candidate, as a face streams it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    /// The choice (output) the candidate belongs to.
    pub choice: usize,
    /// The candidate within the choice (0 for sample and the cd strategies, whose one
    /// sequence is the output).
    pub candidate: usize,
    /// The token (None for the final flush of text held back, see `text`).
    pub token: Option<TokenId>,
    /// The text this token completes (may be empty: a character split across tokens, or
    /// text held back because it could start a stop sequence).
    pub text: &'a str,
}

/// Where token events go (a face's streaming callback).
pub type TokenSink<'a> = Box<dyn FnMut(&TokenEvent<'_>) + Send + 'a>;

pub(crate) type EventSink<'a> = TokenSink<'a>;

/// A prompt run through the model once: the cache every candidate forks, and the output at
/// its last position.
#[derive(Debug)]
pub struct Prefilled<C> {
    /// The prompt's tokens (after the chat template).
    pub tokens: Vec<TokenId>,
    /// The cache after the prompt (`clone` forks it).
    pub cache: C,
    /// The model's output at the last prompt position.
    pub output: StepOutput,
}

impl<C> Prefilled<C> {
    /// Prefill `tokens`.
    ///
    /// # Errors
    /// The policy's.
    pub fn new<P: Policy<Cache = C>>(policy: &P, tokens: Vec<TokenId>) -> Result<Self> {
        let (cache, output) = policy.prefill(&tokens)?;
        Ok(Prefilled {
            tokens,
            cache,
            output,
        })
    }
}

/// The rows of one step: a cache and the token to append to it.
pub(crate) struct Rows<C> {
    caches: Vec<C>,
    tokens: Vec<TokenId>,
}

impl<C> Rows<C> {
    fn new() -> Self {
        Rows {
            caches: Vec::new(),
            tokens: Vec::new(),
        }
    }
    pub(crate) fn push(&mut self, cache: C, token: TokenId) {
        self.caches.push(cache);
        self.tokens.push(token);
    }
    fn len(&self) -> usize {
        self.tokens.len()
    }
    fn truncate(&mut self, len: usize) {
        self.caches.truncate(len);
        self.tokens.truncate(len);
    }
}

/// What a job wants after a poll.
pub(crate) enum Poll {
    /// It pushed at least one row: step it.
    Step,
    /// It needs these rewards before it can go on.
    Score(ScoreRequest),
    /// It is finished.
    Done,
}

/// A batch of (prompt, response) pairs to score with one reward.
pub(crate) struct ScoreRequest {
    pub(crate) reward: Arc<dyn Reward>,
    pub(crate) prompt: Arc<str>,
    pub(crate) responses: Vec<String>,
}

/// Emits a job's token events (a no-op when nobody listens).
pub(crate) struct Emitter<'s, 'a> {
    sink: Option<&'s mut EventSink<'a>>,
    choice: usize,
}

impl Emitter<'_, '_> {
    pub(crate) fn listening(&self) -> bool {
        self.sink.is_some()
    }
    pub(crate) fn emit(&mut self, candidate: usize, token: Option<TokenId>, text: &str) {
        if let Some(sink) = self.sink.as_mut() {
            sink(&TokenEvent {
                choice: self.choice,
                candidate,
                token,
                text,
            });
        }
    }
}

/// What a finished job produced.
pub(crate) enum JobOutput {
    /// A generated output (a request's choice).
    Output(Box<Output>),
    /// Sequences sampled from p, with their rewards when asked for (eval's reference samples
    /// and shared candidates, scorer training's rollouts).
    Sampled(Vec<SampledSequence>),
}

/// A finished job: what it produced and how many tokens it generated.
pub(crate) struct Finished {
    pub(crate) output: JobOutput,
    pub(crate) generated_tokens: usize,
}

/// One job of the stepper (see the module docs).
pub(crate) trait Job<P: Policy>: Send {
    /// Advance as far as possible without the model: push rows to step, ask for rewards, or
    /// finish.
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll>;
    /// Take back the rows it pushed in the last poll, in push order, with their outputs.
    fn absorb(
        &mut self,
        policy: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()>;
    /// The scores of its last [`ScoreRequest`], one per response.
    fn scored(&mut self, scores: Vec<f64>) -> Result<()>;
    /// Its result, once [`Poll::Done`].
    fn finish(self: Box<Self>) -> Result<Finished>;
}

/// A job handle within a stepper.
pub(crate) type JobId = u64;

struct Slot<'a, P: Policy> {
    id: JobId,
    job: Box<dyn Job<P> + 'a>,
    cancel: CancelToken,
    events: Option<EventSink<'a>>,
    choice: usize,
}

/// Runs jobs in rounds, all their rows in one [`Policy::step`] per round.
pub(crate) struct Stepper<'a, P: Policy> {
    policy: &'a P,
    slots: Vec<Slot<'a, P>>,
    next_id: JobId,
    rows_last_round: usize,
}

impl<'a, P: Policy> Stepper<'a, P> {
    pub(crate) fn new(policy: &'a P) -> Self {
        Stepper {
            policy,
            slots: Vec::new(),
            next_id: 0,
            rows_last_round: 0,
        }
    }

    /// Add a job; `events` receives its tokens (for streaming), `choice` labels them.
    pub(crate) fn submit(
        &mut self,
        job: Box<dyn Job<P> + 'a>,
        cancel: CancelToken,
        events: Option<EventSink<'a>>,
        choice: usize,
    ) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot {
            id,
            job,
            cancel,
            events,
            choice,
        });
        id
    }

    /// Jobs not finished yet.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Rows stepped in the last round (the batch size).
    pub(crate) fn rows_last_round(&self) -> usize {
        self.rows_last_round
    }

    /// One round (see the module docs). Returns the jobs that finished in it, each with its
    /// result; a failing job fails alone (a failing step fails the jobs that had rows in it).
    pub(crate) fn round(&mut self) -> Vec<(JobId, Result<Finished>)> {
        let policy = self.policy;
        let mut finished: Vec<(JobId, Result<Finished>)> = Vec::new();
        // Outcome per slot this round: None = stepping, Some(Ok) = done, Some(Err) = failed.
        let mut outcome: Vec<Option<Result<()>>> = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            outcome.push(
                slot.cancel
                    .is_cancelled()
                    .then(|| Err(EngineError::Cancelled)),
            );
        }
        let mut rows = Rows::new();
        let mut spans: Vec<(usize, usize)> = Vec::new(); // (slot, rows pushed)
        let mut waiting: Vec<usize> = (0..self.slots.len())
            .filter(|&i| outcome[i].is_none())
            .collect();
        while !waiting.is_empty() {
            let mut scoring: Vec<(usize, ScoreRequest)> = Vec::new();
            for i in std::mem::take(&mut waiting) {
                let slot = &mut self.slots[i];
                let start = rows.len();
                let mut emit = Emitter {
                    sink: slot.events.as_mut(),
                    choice: slot.choice,
                };
                match slot.job.poll(policy, &mut rows, &mut emit) {
                    Ok(Poll::Step) if rows.len() > start => spans.push((i, rows.len() - start)),
                    Ok(Poll::Step) => {
                        rows.truncate(start);
                        outcome[i] = Some(Err(EngineError::Internal(
                            "a job asked for a step with no rows".into(),
                        )));
                    }
                    Ok(Poll::Score(req)) => {
                        rows.truncate(start);
                        scoring.push((i, req));
                    }
                    Ok(Poll::Done) => {
                        rows.truncate(start);
                        outcome[i] = Some(Ok(()));
                    }
                    Err(e) => {
                        rows.truncate(start);
                        outcome[i] = Some(Err(e));
                    }
                }
            }
            for (i, result) in score_all(scoring) {
                match result.and_then(|s| self.slots[i].job.scored(s)) {
                    Ok(()) => waiting.push(i),
                    Err(e) => outcome[i] = Some(Err(e)),
                }
            }
        }
        self.rows_last_round = rows.len();
        if rows.len() > 0 {
            let Rows { mut caches, tokens } = rows;
            let stepped = policy.step(&mut caches, &tokens).and_then(|outs| {
                if outs.len() == tokens.len() {
                    Ok(outs)
                } else {
                    Err(tilt_models::ModelError::Internal(format!(
                        "step returned {} outputs for {} rows",
                        outs.len(),
                        tokens.len()
                    )))
                }
            });
            match stepped {
                Ok(outs) => {
                    let mut back = caches.into_iter().zip(outs);
                    for &(i, count) in &spans {
                        let mut mine = back.by_ref().take(count);
                        if let Err(e) = self.slots[i].job.absorb(policy, &mut mine) {
                            outcome[i] = Some(Err(e));
                        }
                        // Whatever the job did not take is dropped, never given to the next.
                        mine.for_each(drop);
                    }
                }
                Err(e) => {
                    let e = EngineError::Model(e);
                    for &(i, _) in &spans {
                        outcome[i] = Some(Err(e.duplicate()));
                    }
                }
            }
        }
        // Remove finished slots, keeping the others in order.
        let mut kept = Vec::with_capacity(self.slots.len());
        for (slot, out) in std::mem::take(&mut self.slots).into_iter().zip(outcome) {
            match out {
                None => kept.push(slot),
                Some(Ok(())) => finished.push((slot.id, slot.job.finish())),
                Some(Err(e)) => finished.push((slot.id, Err(e))),
            }
        }
        self.slots = kept;
        finished
    }
}

/// Score every request: one call per request, or one call per reward for the rewards whose
/// scores do not depend on the batch. Returns each slot's scores or error.
fn score_all(requests: Vec<(usize, ScoreRequest)>) -> Vec<(usize, Result<Vec<f64>>)> {
    let mut out = Vec::with_capacity(requests.len());
    // Requests grouped by (batch-invariant) reward.
    type Pool = (Arc<dyn Reward>, Vec<(usize, ScoreRequest)>);
    let mut pooled: Vec<Pool> = Vec::new();
    for (i, req) in requests {
        if req.reward.batch_invariant() {
            match pooled.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &req.reward)) {
                Some((_, v)) => v.push((i, req)),
                None => pooled.push((Arc::clone(&req.reward), vec![(i, req)])),
            }
        } else {
            let r = score_pairs(
                req.reward.as_ref(),
                req.responses.iter().map(|t| (&*req.prompt, t.as_str())),
            );
            out.push((i, r));
        }
    }
    for (reward, reqs) in pooled {
        let pairs = reqs
            .iter()
            .flat_map(|(_, r)| r.responses.iter().map(|t| (&*r.prompt, t.as_str())));
        match score_pairs(reward.as_ref(), pairs) {
            Ok(all) => {
                let mut all = all.into_iter();
                for (i, r) in reqs {
                    out.push((i, Ok(all.by_ref().take(r.responses.len()).collect())));
                }
            }
            // One request's bad score (or a refused pair) must not fail the others: score
            // each on its own, which gives the same numbers since the reward is
            // batch-invariant, and only the request at fault keeps the error.
            Err(_) => {
                for (i, r) in reqs {
                    let scored = score_pairs(
                        reward.as_ref(),
                        r.responses.iter().map(|t| (&*r.prompt, t.as_str())),
                    );
                    out.push((i, scored));
                }
            }
        }
    }
    out
}

/// Score pairs with one call, checked complete and finite.
pub(crate) fn score_pairs<'t>(
    reward: &dyn Reward,
    pairs: impl Iterator<Item = (&'t str, &'t str)>,
) -> Result<Vec<f64>> {
    let pairs: Vec<(&str, &str)> = pairs.collect();
    let scores = tilt_rewards::check_scores(&reward.name(), pairs.len(), reward.score(&pairs)?)?;
    Ok(scores.into_iter().map(f64::from).collect())
}

/// Incremental detokenisation for streaming and stop sequences: the text of the tokens so
/// far, released as deltas that never end inside a character, and held back while its tail
/// could be the start of a stop sequence.
///
/// Decoding each new token alone is wrong for byte-level vocabularies (a character can span
/// tokens); decoding the whole sequence each step costs O(L²). This keeps two offsets, as
/// Hugging Face's text-generation-inference does: it decodes only the window from the last
/// clean boundary.
#[derive(Debug, Clone, Default)]
struct TextStream {
    prefix_offset: usize,
    read_offset: usize,
    /// The text decoded so far (up to the last clean boundary).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
}

impl TextStream {
    /// Take in the latest token (`tokens` = all tokens so far); return the byte offset in
    /// `text` of the first stop sequence, if one is now complete.
    fn push<P: Policy>(
        &mut self,
        policy: &P,
        tokens: &[TokenId],
        stops: &[String],
    ) -> Result<Option<usize>> {
        let prefix = policy.decode(&tokens[self.prefix_offset..self.read_offset])?;
        let window = policy.decode(&tokens[self.prefix_offset..])?;
        if window.len() > prefix.len() && !window.ends_with('\u{FFFD}') {
            if let Some(delta) = window.get(prefix.len()..) {
                let before = self.text.len();
                self.text.push_str(delta);
                self.prefix_offset = self.read_offset;
                self.read_offset = tokens.len();
                let longest = stops.iter().map(String::len).max().unwrap_or(0);
                let from = floor_char_boundary(&self.text, before.saturating_sub(longest));
                return Ok(stops
                    .iter()
                    .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
                    .min());
            }
        }
        Ok(None)
    }

    /// The text that can be released now: all of it when `done`, else up to the longest
    /// tail that could start a stop sequence.
    fn release(&mut self, stops: &[String], cut: Option<usize>, done: bool) -> &str {
        let end = match cut {
            Some(c) => c,
            None if done => self.text.len(),
            None => {
                let hold = stops
                    .iter()
                    .map(|s| partial_suffix(&self.text, s))
                    .max()
                    .unwrap_or(0);
                floor_char_boundary(&self.text, self.text.len() - hold)
            }
        };
        let start = self.released.min(end);
        self.released = self.released.max(end);
        &self.text[start..end]
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// The text of `tokens` as a candidate returns it: decoded (special tokens skipped), and
/// cut before the first stop sequence when it ended at one.
pub(crate) fn final_text<P: Policy>(
    policy: &P,
    tokens: &[TokenId],
    stops: &[String],
    finish: FinishReason,
) -> Result<String> {
    let mut text = policy.decode(tokens)?;
    if finish == FinishReason::Stop {
        if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
    }
    Ok(text)
}

/// One sequence sampled from the reference, before scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequence {
    /// The tokens drawn, ending with the end token when `finish` is [`FinishReason::Eos`].
    pub tokens: Vec<TokenId>,
    /// log p of each token under the model at temperature 1 (nats).
    pub token_log_probs: Vec<f64>,
    /// Its text ([`final_text`]).
    pub text: String,
    /// Why it stopped.
    pub finish: FinishReason,
    /// log p(tokens | prompt) under the model, nats.
    pub log_prob: f64,
    /// log-probability under the sampling distribution actually used, nats.
    pub sampling_log_prob: f64,
    /// The ChaCha20 stream it was drawn from.
    pub stream: u64,
    /// Its reward, when the job scored it.
    pub reward: Option<f64>,
    /// The hidden state at every prefix (entry t at the last position of prompt + t tokens,
    /// t = 0..=len), when asked for.
    pub prefix_hidden: Vec<Vec<f32>>,
}

/// What a group of sequences is drawn with.
#[derive(Clone)]
pub(crate) struct GroupSpec {
    pub(crate) seed: u64,
    pub(crate) sampling: SamplingParams,
    pub(crate) max_new_tokens: usize,
    pub(crate) stops: Arc<[String]>,
    pub(crate) keep_hidden: bool,
}

struct Seq<C> {
    stream: u64,
    sampler: SequenceSampler,
    tokens: Vec<TokenId>,
    token_log_probs: Vec<f64>,
    log_prob: f64,
    sampling_log_prob: f64,
    finish: Option<FinishReason>,
    cache: Option<C>,
    last: Option<StepOutput>,
    hidden: Vec<Vec<f32>>,
    text: Option<TextStream>,
}

/// Sequences drawn iid from one prefilled prompt, each from its own stream, until each
/// draws an end token, completes a stop sequence or reaches `max_new_tokens`.
pub(crate) struct Group<C> {
    prefill: Arc<Prefilled<C>>,
    spec: GroupSpec,
    seqs: Vec<Seq<C>>,
    fed: Vec<usize>,
    /// Index of the first sequence in the job's candidate numbering.
    first_candidate: usize,
}

impl<C: Clone + Send> Group<C> {
    pub(crate) fn new(
        prefill: Arc<Prefilled<C>>,
        spec: GroupSpec,
        streams: &[u64],
        first_candidate: usize,
    ) -> Self {
        let seqs = streams
            .iter()
            .map(|&stream| Seq {
                stream,
                sampler: SequenceSampler::new(spec.seed, stream),
                tokens: Vec::with_capacity(spec.max_new_tokens.min(1024)),
                token_log_probs: Vec::new(),
                log_prob: 0.0,
                sampling_log_prob: 0.0,
                finish: None,
                cache: None,
                last: None,
                hidden: if spec.keep_hidden {
                    vec![prefill.output.hidden.clone()]
                } else {
                    Vec::new()
                },
                text: None,
            })
            .collect();
        Group {
            prefill,
            spec,
            seqs,
            fed: Vec::new(),
            first_candidate,
        }
    }

    /// Draw the next token of every live sequence and push the rows that go on (with
    /// `keep_hidden`, a sequence's last token too, for the hidden state after it); false when
    /// there is nothing to step.
    pub(crate) fn feed<P: Policy<Cache = C>>(
        &mut self,
        policy: &P,
        rows: &mut Rows<C>,
        emit: &mut Emitter,
    ) -> Result<bool> {
        let eos = policy.eos_token_ids();
        let track = emit.listening() || !self.spec.stops.is_empty();
        self.fed.clear();
        // Draw every live sequence's next token first, on the policy's threads: each draw
        // reads only its own sequence's sampler and log-probs, so the draws do not depend
        // on the order (a vocabulary-wide inverse-CDF walk per sequence, a large share of a
        // step at 16 sequences).
        let mut live: Vec<&mut Seq<C>> = self
            .seqs
            .iter_mut()
            .filter(|s| s.finish.is_none())
            .collect();
        let (prefill, sampling) = (&self.prefill.output, &self.spec.sampling);
        let mut draws = policy
            .map_parallel(&mut live, |s| {
                let out = s.last.as_ref().unwrap_or(prefill);
                s.sampler.sample(&out.log_probs, sampling)
            })
            .into_iter();
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if s.finish.is_some() {
                continue;
            }
            let d = draws.next().ok_or_else(|| missing_row("sampling"))??;
            s.tokens.push(d.token);
            s.token_log_probs.push(d.log_prob);
            s.log_prob += d.log_prob;
            s.sampling_log_prob += d.sampling_log_prob;
            let mut cut = None;
            if track {
                let stream = s.text.get_or_insert_with(TextStream::default);
                cut = stream.push(policy, &s.tokens, &self.spec.stops)?;
            }
            s.finish = if eos.contains(&d.token) {
                Some(FinishReason::Eos)
            } else if cut.is_some() {
                Some(FinishReason::Stop)
            } else if s.tokens.len() >= self.spec.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(stream) = s.text.as_mut().filter(|_| emit.listening()) {
                let text = stream.release(&self.spec.stops, cut, s.finish.is_some());
                emit.emit(self.first_candidate + i, Some(d.token), text);
            }
            // A finished sequence leaves the batch now — unless its hidden states are kept,
            // when its last token is stepped once more for the hidden state after it.
            if s.finish.is_none() || self.spec.keep_hidden {
                let cache = s.cache.take().unwrap_or_else(|| self.prefill.cache.clone());
                rows.push(cache, d.token);
                self.fed.push(i);
            } else {
                s.cache = None;
                s.last = None;
            }
        }
        Ok(!self.fed.is_empty())
    }

    pub(crate) fn absorb(&mut self, back: &mut dyn Iterator<Item = (C, StepOutput)>) -> Result<()> {
        for &i in &self.fed {
            let (cache, out) = back.next().ok_or_else(|| missing_row("sampling"))?;
            let s = &mut self.seqs[i];
            if self.spec.keep_hidden {
                s.hidden.push(out.hidden.clone());
            }
            if s.finish.is_none() {
                s.cache = Some(cache);
                s.last = Some(out);
            }
        }
        self.fed.clear();
        Ok(())
    }

    /// The finished sequences, in stream order, with their texts.
    pub(crate) fn into_sequences<P: Policy<Cache = C>>(
        self,
        policy: &P,
    ) -> Result<Vec<SampledSequence>> {
        let stops = self.spec.stops;
        self.seqs
            .into_iter()
            .map(|s| {
                let finish = s.finish.unwrap_or(FinishReason::Length);
                Ok(SampledSequence {
                    text: final_text(policy, &s.tokens, &stops, finish)?,
                    tokens: s.tokens,
                    token_log_probs: s.token_log_probs,
                    finish,
                    log_prob: s.log_prob,
                    sampling_log_prob: s.sampling_log_prob,
                    stream: s.stream,
                    reward: None,
                    prefix_hidden: s.hidden,
                })
            })
            .collect()
    }
}

fn missing_row(what: &str) -> EngineError {
    EngineError::Internal(format!(
        "{what}: a row pushed to the step did not come back"
    ))
}

/// A [`Group`] run to the end, optionally scored: eval's reference samples and shared
/// candidates, the rollouts of scorer training.
pub(crate) struct SampleJob<C> {
    group: Option<Group<C>>,
    reward: Option<(Arc<dyn Reward>, Arc<str>)>,
    seqs: Vec<SampledSequence>,
    done: bool,
}

impl<C: Clone + Send> SampleJob<C> {
    pub(crate) fn new(group: Group<C>, reward: Option<(Arc<dyn Reward>, Arc<str>)>) -> Self {
        SampleJob {
            group: Some(group),
            reward,
            seqs: Vec::new(),
            done: false,
        }
    }
}

impl<P: Policy> Job<P> for SampleJob<P::Cache> {
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll> {
        if self.done {
            return Ok(Poll::Done);
        }
        if let Some(g) = self.group.as_mut() {
            if g.feed(policy, rows, emit)? {
                return Ok(Poll::Step);
            }
            let g = self.group.take().ok_or_else(|| missing_row("sampling"))?;
            self.seqs = g.into_sequences(policy)?;
        }
        match &self.reward {
            Some((reward, prompt)) => Ok(Poll::Score(ScoreRequest {
                reward: Arc::clone(reward),
                prompt: Arc::clone(prompt),
                responses: self.seqs.iter().map(|s| s.text.clone()).collect(),
            })),
            None => {
                self.done = true;
                Ok(Poll::Done)
            }
        }
    }

    fn absorb(
        &mut self,
        _: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()> {
        match self.group.as_mut() {
            Some(g) => g.absorb(back),
            None => Ok(()),
        }
    }

    fn scored(&mut self, scores: Vec<f64>) -> Result<()> {
        for (s, r) in self.seqs.iter_mut().zip(scores) {
            s.reward = Some(r);
        }
        self.done = true;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        let generated_tokens = self.seqs.iter().map(|s| s.tokens.len()).sum();
        Ok(Finished {
            output: JobOutput::Sampled(self.seqs),
            generated_tokens,
        })
    }
}

/// What every output of a request shares: its reward, the prompt the reward sees, the seed.
#[derive(Clone)]
pub(crate) struct OutputSpec {
    pub(crate) choice: usize,
    pub(crate) seed: u64,
    pub(crate) reward: Arc<dyn Reward>,
    pub(crate) prompt: Arc<str>,
}

fn candidates_of(seqs: Vec<SampledSequence>, rewards: &[f64]) -> Vec<Candidate> {
    seqs.into_iter()
        .zip(rewards)
        .map(|(s, &reward)| Candidate {
            text: s.text,
            reward,
            new_tokens: s.tokens.len(),
            finish: s.finish,
            log_prob: s.log_prob,
            tokens: s.tokens,
            token_log_probs: s.token_log_probs,
            token_texts: Vec::new(),
        })
        .collect()
}

/// Build an output from scored candidates and the selected one.
pub(crate) fn output_of(
    out: &OutputSpec,
    strategy: &str,
    n: Option<usize>,
    candidates: Vec<Candidate>,
    selected: usize,
    cost: Cost,
    accepted: Option<bool>,
) -> Output {
    let chosen = &candidates[selected];
    Output {
        choice: out.choice,
        text: chosen.text.clone(),
        tokens: chosen.tokens.clone(),
        finish_reason: chosen.finish,
        reward: chosen.reward,
        selected,
        strategy: strategy.to_string(),
        n,
        seed: out.seed,
        draws: candidates.len(),
        distinct_candidates: cost.distinct,
        accepted,
        blocks: None,
        kl_bound: cost.kl_bound,
        kl_estimate: cost.kl_estimate,
        kl_note: cost.kl_note,
        units: "nats".into(),
        candidates,
        scorer_values: Vec::new(),
        rewards: Vec::new(),
        engine: None,
    }
}

/// sample, bon, won, soft-bon: n candidates from one prefill, scored in one reward call,
/// then selected by the rule with the choice's selection stream.
pub(crate) struct SelectJob<C> {
    group: Option<Group<C>>,
    out: OutputSpec,
    rule: Rule,
    strategy: &'static str,
    n: usize,
    selector: SequenceSampler,
    seqs: Vec<SampledSequence>,
    result: Option<Output>,
}

impl<C: Clone + Send> SelectJob<C> {
    pub(crate) fn new(
        group: Group<C>,
        out: OutputSpec,
        rule: Rule,
        strategy: &'static str,
        n: usize,
        selector: SequenceSampler,
    ) -> Self {
        SelectJob {
            group: Some(group),
            out,
            rule,
            strategy,
            n,
            selector,
            seqs: Vec::new(),
            result: None,
        }
    }
}

impl<P: Policy> Job<P> for SelectJob<P::Cache> {
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll> {
        if self.result.is_some() {
            return Ok(Poll::Done);
        }
        if let Some(g) = self.group.as_mut() {
            if g.feed(policy, rows, emit)? {
                return Ok(Poll::Step);
            }
            let g = self.group.take().ok_or_else(|| missing_row("sampling"))?;
            self.seqs = g.into_sequences(policy)?;
        }
        Ok(Poll::Score(ScoreRequest {
            reward: Arc::clone(&self.out.reward),
            prompt: Arc::clone(&self.out.prompt),
            responses: self.seqs.iter().map(|s| s.text.clone()).collect(),
        }))
    }

    fn absorb(
        &mut self,
        _: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()> {
        match self.group.as_mut() {
            Some(g) => g.absorb(back),
            None => Ok(()),
        }
    }

    fn scored(&mut self, rewards: Vec<f64>) -> Result<()> {
        let selected = select(self.rule, None, &rewards, &mut self.selector)?;
        let seqs = std::mem::take(&mut self.seqs);
        let texts: Vec<&str> = seqs.iter().map(|s| s.text.as_str()).collect();
        let cost = cost(self.rule, &texts, &rewards, self.n)?;
        let n = (self.rule != Rule::Sample).then_some(self.n);
        let candidates = candidates_of(seqs, &rewards);
        self.result = Some(output_of(
            &self.out,
            self.strategy,
            n,
            candidates,
            selected,
            cost,
            None,
        ));
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        finished_output(self.result, "selection", None)
    }
}

/// Rewind-and-repeat: batches of n draws from one prefill until a draw's reward clears the
/// threshold or `max_draws` draws are made (arXiv 2401.01879 §6).
pub(crate) struct RewindJob<C> {
    prefill: Arc<Prefilled<C>>,
    spec: GroupSpec,
    out: OutputSpec,
    n: usize,
    threshold: f64,
    max_draws: usize,
    /// Stream of draw d: `first_stream + d`.
    first_stream: u64,
    selector: SequenceSampler,
    group: Option<Group<C>>,
    pending: Vec<SampledSequence>,
    all: Vec<Candidate>,
    chosen: Option<usize>,
    result: Option<Output>,
}

impl<C: Clone + Send> RewindJob<C> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        prefill: Arc<Prefilled<C>>,
        spec: GroupSpec,
        out: OutputSpec,
        n: usize,
        threshold: f64,
        max_draws: usize,
        first_stream: u64,
        selector: SequenceSampler,
    ) -> Self {
        RewindJob {
            prefill,
            spec,
            out,
            n,
            threshold,
            max_draws,
            first_stream,
            selector,
            group: None,
            pending: Vec::new(),
            all: Vec::new(),
            chosen: None,
            result: None,
        }
    }

    fn finish_selection(&mut self) -> Result<()> {
        let rewards: Vec<f64> = self.all.iter().map(|c| c.reward).collect();
        let accepted = rewards.iter().filter(|&&r| r >= self.threshold).count();
        let selected = match self.chosen {
            Some(i) => i,
            None => select(
                Rule::Rewind {
                    draws: rewards.len(),
                    accepted,
                },
                Some(self.threshold),
                &rewards,
                &mut self.selector,
            )?,
        };
        let texts: Vec<&str> = self.all.iter().map(|c| c.text.as_str()).collect();
        let rule = Rule::Rewind {
            draws: self.all.len(),
            accepted,
        };
        let cost = cost(rule, &texts, &rewards, self.n)?;
        let candidates = std::mem::take(&mut self.all);
        self.result = Some(output_of(
            &self.out,
            "rewind",
            Some(self.n),
            candidates,
            selected,
            cost,
            Some(accepted > 0),
        ));
        Ok(())
    }
}

impl<P: Policy> Job<P> for RewindJob<P::Cache> {
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll> {
        loop {
            if self.result.is_some() {
                return Ok(Poll::Done);
            }
            match self.group.as_mut() {
                Some(g) => {
                    if g.feed(policy, rows, emit)? {
                        return Ok(Poll::Step);
                    }
                    let g = self.group.take().ok_or_else(|| missing_row("rewind"))?;
                    self.pending = g.into_sequences(policy)?;
                    return Ok(Poll::Score(ScoreRequest {
                        reward: Arc::clone(&self.out.reward),
                        prompt: Arc::clone(&self.out.prompt),
                        responses: self.pending.iter().map(|s| s.text.clone()).collect(),
                    }));
                }
                None if self.all.len() < self.max_draws && self.chosen.is_none() => {
                    let done = self.all.len();
                    let batch = self.n.min(self.max_draws - done);
                    let streams: Vec<u64> = (done..done + batch)
                        .map(|d| self.first_stream + d as u64)
                        .collect();
                    self.group = Some(Group::new(
                        Arc::clone(&self.prefill),
                        self.spec.clone(),
                        &streams,
                        done,
                    ));
                }
                None => self.finish_selection()?,
            }
        }
    }

    fn absorb(
        &mut self,
        _: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()> {
        match self.group.as_mut() {
            Some(g) => g.absorb(back),
            None => Ok(()),
        }
    }

    fn scored(&mut self, rewards: Vec<f64>) -> Result<()> {
        let seqs = std::mem::take(&mut self.pending);
        let before = self.all.len();
        self.chosen = first_accepted(&rewards, self.threshold).map(|i| before + i);
        self.all.extend(candidates_of(seqs, &rewards));
        tracing::debug!(
            draws = self.all.len(),
            accepted = self.chosen.is_some(),
            "rewind batch"
        );
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        finished_output(self.result, "rewind", None)
    }
}

/// One sequence decoded by a cd strategy, before its reward.
struct CdSequence {
    tokens: Vec<TokenId>,
    token_log_probs: Vec<f64>,
    finish: Option<FinishReason>,
    log_prob: f64,
    text: Option<TextStream>,
}

impl CdSequence {
    fn new() -> Self {
        CdSequence {
            tokens: Vec::new(),
            token_log_probs: Vec::new(),
            finish: None,
            log_prob: 0.0,
            text: None,
        }
    }

    /// Append kept tokens; set the finish reason (end token, stop sequence, length); emit
    /// what streaming may show.
    fn append<P: Policy>(
        &mut self,
        policy: &P,
        new: &[TokenId],
        eos_ended: bool,
        spec: &CdSpec,
        emit: &mut Emitter,
    ) -> Result<()> {
        let track = emit.listening() || !spec.stops.is_empty();
        let mut cut = None;
        for (j, &t) in new.iter().enumerate() {
            self.tokens.push(t);
            if track {
                let stream = self.text.get_or_insert_with(TextStream::default);
                if cut.is_none() {
                    cut = stream.push(policy, &self.tokens, &spec.stops)?;
                }
            }
            let last = j + 1 == new.len();
            let finish = if last && eos_ended {
                Some(FinishReason::Eos)
            } else if cut.is_some() {
                Some(FinishReason::Stop)
            } else if self.tokens.len() >= spec.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(stream) = self.text.as_mut().filter(|_| emit.listening()) {
                let text = stream.release(&spec.stops, cut, finish.is_some());
                emit.emit(0, Some(t), text);
            }
            if finish.is_some() {
                self.finish = finish;
                // A block's tokens after a completed stop sequence are not part of the text,
                // but they were drawn: they stay in `tokens` (and in the KL accounting), and
                // a listener hears them as tokens without text, so that the stream's tokens
                // are the output's.
                if cut.is_some() {
                    for &rest in &new[j + 1..] {
                        self.tokens.push(rest);
                        emit.emit(0, Some(rest), "");
                    }
                }
                break;
            }
        }
        Ok(())
    }
}

/// What a cd job draws with.
#[derive(Clone)]
pub(crate) struct CdSpec {
    pub(crate) seed: u64,
    pub(crate) max_new_tokens: usize,
    pub(crate) stops: Arc<[String]>,
    pub(crate) scorer: Arc<WeightedSum>,
    /// Score the output with this reward when it is done (eval scores its cd outputs in
    /// batches of its own instead).
    pub(crate) out: OutputSpec,
    pub(crate) score: bool,
}

/// How a cd job's finished sequence goes on: to its reward, or (unscored) straight out.
enum CdEnd {
    Score(String, Poll),
    Unscored(String),
}

impl CdSpec {
    /// The finished sequence's text, and whether it is scored next.
    fn end<P: Policy>(&self, policy: &P, seq: &CdSequence) -> Result<CdEnd> {
        let finish = seq.finish.unwrap_or(FinishReason::Length);
        let text = final_text(policy, &seq.tokens, &self.stops, finish)?;
        Ok(if self.score {
            let poll = Poll::Score(ScoreRequest {
                reward: Arc::clone(&self.out.reward),
                prompt: Arc::clone(&self.out.prompt),
                responses: vec![text.clone()],
            });
            CdEnd::Score(text, poll)
        } else {
            CdEnd::Unscored(text)
        })
    }

    /// The text [`CdSpec::end`] sent to be scored, with its one score.
    fn scored(&self, text: Option<String>, scores: &[f64]) -> Result<(String, f64)> {
        let text =
            text.ok_or_else(|| EngineError::Internal("a cd output scored without a text".into()))?;
        Ok((text, single_score(scores)?))
    }
}

/// The output of a cd job: its one sequence is its one candidate. `kl` is (bound,
/// estimate). Without scoring (see [`CdSpec::score`]) the reward is 0, filled in later.
/// `last_hidden` is the hidden state at its last drawn token, where each scorer's value is
/// reported.
#[allow(clippy::too_many_arguments)]
fn cd_output(
    spec: &CdSpec,
    seq: CdSequence,
    last_hidden: &[f32],
    strategy: &str,
    policy_text: String,
    reward: f64,
    (kl_bound, kl_estimate): (Option<f64>, Option<f64>),
    kl_note: KlNote,
    draws: usize,
    blocks: Option<usize>,
) -> Result<Output> {
    let scorer_values = spec.scorer.values_at(last_hidden)?;
    let finish = seq.finish.unwrap_or(FinishReason::Length);
    let candidate = Candidate {
        text: policy_text.clone(),
        reward,
        new_tokens: seq.tokens.len(),
        finish,
        log_prob: seq.log_prob,
        tokens: seq.tokens.clone(),
        token_log_probs: seq.token_log_probs,
        token_texts: Vec::new(),
    };
    Ok(Output {
        choice: spec.out.choice,
        text: policy_text,
        tokens: seq.tokens,
        finish_reason: finish,
        reward,
        selected: 0,
        strategy: strategy.into(),
        n: None,
        seed: spec.seed,
        draws,
        distinct_candidates: None,
        accepted: None,
        blocks,
        kl_bound,
        kl_estimate,
        kl_note,
        units: "nats".into(),
        candidates: vec![candidate],
        scorer_values,
        rewards: Vec::new(),
        engine: None,
    })
}

/// Token-level controlled decoding for one output (arXiv 2310.17022 §3; see
/// [`crate::cd::token`] for the law and its numerics). At each step the k children of the
/// sequence are rows of the batch: its cache is forked k ways (k − 1 clones after
/// [`Policy::prepare_fork`], the original moved into the last), and the chosen child's cache
/// and output become the sequence's, so guidance costs k − 1 extra rows and no extra
/// forward.
pub(crate) struct CdTokenJob<C> {
    spec: CdSpec,
    lambda: f64,
    top_k: usize,
    sampler: SequenceSampler,
    cache: Option<C>,
    last: StepOutput,
    seq: CdSequence,
    log_ratio: f64,
    children: Vec<TokenId>,
    /// The token chosen in the last absorb, appended (and streamed) by the next poll.
    kept: Option<TokenId>,
    text: Option<String>,
    result: Option<Output>,
}

impl<C: Clone + Send> CdTokenJob<C> {
    pub(crate) fn new(
        prefill: &Prefilled<C>,
        spec: CdSpec,
        lambda: f64,
        top_k: usize,
        stream: u64,
    ) -> Self {
        CdTokenJob {
            sampler: SequenceSampler::new(spec.seed, stream),
            spec,
            lambda,
            top_k,
            cache: Some(prefill.cache.clone()),
            last: prefill.output.clone(),
            seq: CdSequence::new(),
            log_ratio: 0.0,
            children: Vec::new(),
            kept: None,
            text: None,
            result: None,
        }
    }

    fn output(&mut self, text: String, reward: f64) -> Result<Output> {
        let seq = std::mem::replace(&mut self.seq, CdSequence::new());
        cd_output(
            &self.spec,
            seq,
            &self.last.hidden,
            "cd-token",
            text,
            reward,
            (None, Some(self.log_ratio)),
            KlNote::CdTokenLogRatio,
            1,
            None,
        )
    }
}

impl<P: Policy> Job<P> for CdTokenJob<P::Cache> {
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll> {
        if self.result.is_some() {
            return Ok(Poll::Done);
        }
        if let Some(t) = self.kept.take() {
            let eos = policy.eos_token_ids().contains(&t);
            self.seq.append(policy, &[t], eos, &self.spec, emit)?;
        }
        if self.seq.finish.is_none() {
            let cands = top_k_candidates(&self.last.log_probs, self.top_k);
            let mut cache = self.cache.take().ok_or_else(|| missing_row("cd-token"))?;
            policy.prepare_fork(&mut cache, cands.len());
            for &c in &cands[..cands.len() - 1] {
                rows.push(cache.clone(), c);
            }
            rows.push(cache, cands[cands.len() - 1]);
            self.children = cands;
            return Ok(Poll::Step);
        }
        self.cache = None;
        match self.spec.end(policy, &self.seq)? {
            CdEnd::Score(text, poll) => {
                self.text = Some(text);
                Ok(poll)
            }
            CdEnd::Unscored(text) => {
                self.result = Some(self.output(text, 0.0)?);
                Ok(Poll::Done)
            }
        }
    }

    fn absorb(
        &mut self,
        _: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()> {
        let k = self.children.len();
        let (caches, outs): (Vec<P::Cache>, Vec<StepOutput>) = back.take(k).unzip();
        if outs.len() != k {
            return Err(missing_row("cd-token"));
        }
        let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
        let values = self.spec.scorer.score(&hidden)?;
        let law = cd_token_step_law(&self.last.log_probs, &self.children, &values, self.lambda)?;
        let log_pi: Vec<f64> = law.probs.iter().map(|p| p.ln()).collect();
        let j = self.sampler.sample_index(&log_pi)?;
        let tok = law.candidates[j];
        self.log_ratio += law.log_ratios[j];
        let lp = f64::from(self.last.log_probs[tok as usize]);
        self.seq.log_prob += lp;
        self.seq.token_log_probs.push(lp);
        self.cache = caches.into_iter().nth(j);
        self.last = outs
            .into_iter()
            .nth(j)
            .ok_or_else(|| missing_row("cd-token"))?;
        self.children.clear();
        self.kept = Some(tok);
        Ok(())
    }

    fn scored(&mut self, scores: Vec<f64>) -> Result<()> {
        let (text, r) = self.spec.scored(self.text.take(), &scores)?;
        self.result = Some(self.output(text, r)?);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        finished_output(self.result, "cd-token", None)
    }
}

fn single_score(scores: &[f64]) -> Result<f64> {
    match scores {
        [r] => Ok(*r),
        _ => Err(EngineError::Internal(format!(
            "{} scores for one output",
            scores.len()
        ))),
    }
}

/// A finished output; `drawn` counts the tokens drawn when they are more than the output's
/// own (cd-block's K continuations per block).
fn finished_output(result: Option<Output>, what: &str, drawn: Option<usize>) -> Result<Finished> {
    let output =
        result.ok_or_else(|| EngineError::Internal(format!("{what} finished without a result")))?;
    let generated_tokens =
        drawn.unwrap_or_else(|| output.candidates.iter().map(|c| c.new_tokens).sum());
    Ok(Finished {
        output: JobOutput::Output(Box::new(output)),
        generated_tokens,
    })
}

/// One block in progress: K continuations forked from the sequence.
struct Block<C> {
    len: usize,
    caches: Vec<Option<C>>,
    lasts: Vec<Option<StepOutput>>,
    tokens: Vec<Vec<TokenId>>,
    ended: Vec<bool>,
    log_p: Vec<Vec<f64>>,
    fed: Vec<usize>,
}

/// Blockwise controlled decoding for one output (arXiv 2310.17022 §3; see
/// [`crate::cd::block`]): per block, K continuations of up to M tokens drawn from p (one
/// random stream for the whole output, continuation by continuation in index order at each
/// position), stepped as rows of the batch; the continuation the scorer values most
/// (first on ties) is kept, its cache and output become the sequence's.
pub(crate) struct CdBlockJob<C> {
    spec: CdSpec,
    k: usize,
    m: usize,
    sampler: SequenceSampler,
    cache: Option<C>,
    last: StepOutput,
    seq: CdSequence,
    block: Option<Block<C>>,
    /// The block kept in the last absorb, appended (and streamed) by the next poll.
    kept: Option<(Vec<TokenId>, bool)>,
    blocks: usize,
    drawn_tokens: usize,
    text: Option<String>,
    result: Option<Output>,
}

impl<C: Clone + Send> CdBlockJob<C> {
    pub(crate) fn new(
        prefill: &Prefilled<C>,
        spec: CdSpec,
        k: usize,
        m: usize,
        stream: u64,
    ) -> Self {
        CdBlockJob {
            sampler: SequenceSampler::new(spec.seed, stream),
            spec,
            k,
            m,
            cache: Some(prefill.cache.clone()),
            last: prefill.output.clone(),
            seq: CdSequence::new(),
            block: None,
            kept: None,
            blocks: 0,
            drawn_tokens: 0,
            text: None,
            result: None,
        }
    }

    /// The KL bound of one block, log K − (K−1)/K nats (best-of-K, arXiv 2401.01879).
    fn block_kl_bound(&self) -> f64 {
        let k = self.k as f64;
        k.ln() - (k - 1.0) / k
    }

    fn output(&mut self, text: String, reward: f64) -> Result<Output> {
        let seq = std::mem::replace(&mut self.seq, CdSequence::new());
        let bound = self.blocks as f64 * self.block_kl_bound();
        cd_output(
            &self.spec,
            seq,
            &self.last.hidden,
            "cd-block",
            text,
            reward,
            (Some(bound), None),
            KlNote::CdBlockChainBound,
            self.blocks * self.k,
            Some(self.blocks),
        )
    }

    /// Close the block: score the continuations' last hidden states, keep the best.
    fn close_block(&mut self, block: Block<C>) -> Result<()> {
        let outs: Vec<StepOutput> = block
            .lasts
            .into_iter()
            .map(|o| o.ok_or_else(|| missing_row("cd-block")))
            .collect::<Result<_>>()?;
        let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
        let values = self.spec.scorer.score(&hidden)?;
        let mut best = 0;
        for (c, v) in values.iter().enumerate() {
            if *v > values[best] {
                best = c;
            }
        }
        self.drawn_tokens += block.tokens.iter().map(Vec::len).sum::<usize>();
        self.seq.log_prob += block.log_p[best].iter().sum::<f64>();
        self.blocks += 1;
        let mut caches = block.caches;
        self.cache = caches.swap_remove(best);
        self.last = outs
            .into_iter()
            .nth(best)
            .ok_or_else(|| missing_row("cd-block"))?;
        let mut tokens = block.tokens;
        let mut log_p = block.log_p;
        self.seq.token_log_probs.extend(log_p.swap_remove(best));
        self.kept = Some((tokens.swap_remove(best), block.ended[best]));
        Ok(())
    }
}

impl<P: Policy> Job<P> for CdBlockJob<P::Cache> {
    fn poll(&mut self, policy: &P, rows: &mut Rows<P::Cache>, emit: &mut Emitter) -> Result<Poll> {
        if self.result.is_some() {
            return Ok(Poll::Done);
        }
        if let Some((tokens, eos)) = self.kept.take() {
            self.seq.append(policy, &tokens, eos, &self.spec, emit)?;
        }
        if self.seq.finish.is_none() {
            if self.block.is_none() {
                let len = self.m.min(self.spec.max_new_tokens - self.seq.tokens.len());
                // K forks: K − 1 clones and the original moved into the last one.
                let mut cache = self.cache.take().ok_or_else(|| missing_row("cd-block"))?;
                policy.prepare_fork(&mut cache, self.k);
                let mut caches: Vec<Option<P::Cache>> = Vec::with_capacity(self.k);
                caches.extend((1..self.k).map(|_| Some(cache.clone())));
                caches.push(Some(cache));
                self.block = Some(Block {
                    len,
                    caches,
                    lasts: vec![None; self.k],
                    tokens: vec![Vec::with_capacity(len); self.k],
                    ended: vec![false; self.k],
                    log_p: vec![Vec::with_capacity(len); self.k],
                    fed: Vec::with_capacity(self.k),
                });
            }
            let b = self.block.as_mut().ok_or_else(|| missing_row("cd-block"))?;
            b.fed.clear();
            for c in 0..self.k {
                if b.ended[c] {
                    continue;
                }
                // All K draw their first token from the block's starting output.
                let out = b.lasts[c].as_ref().unwrap_or(&self.last);
                let d = self
                    .sampler
                    .sample(&out.log_probs, &SamplingParams::default())?;
                b.log_p[c].push(d.log_prob);
                b.tokens[c].push(d.token);
                let cache = b.caches[c].take().ok_or_else(|| missing_row("cd-block"))?;
                rows.push(cache, d.token);
                b.fed.push(c);
            }
            return Ok(Poll::Step);
        }
        self.cache = None;
        match self.spec.end(policy, &self.seq)? {
            CdEnd::Score(text, poll) => {
                self.text = Some(text);
                Ok(poll)
            }
            CdEnd::Unscored(text) => {
                self.result = Some(self.output(text, 0.0)?);
                Ok(Poll::Done)
            }
        }
    }

    fn absorb(
        &mut self,
        policy: &P,
        back: &mut dyn Iterator<Item = (P::Cache, StepOutput)>,
    ) -> Result<()> {
        let eos = policy.eos_token_ids();
        let b = self.block.as_mut().ok_or_else(|| missing_row("cd-block"))?;
        for &c in &b.fed {
            let (cache, out) = back.next().ok_or_else(|| missing_row("cd-block"))?;
            b.caches[c] = Some(cache);
            b.lasts[c] = Some(out);
            b.ended[c] = b.tokens[c].last().is_some_and(|t| eos.contains(t));
        }
        let position = b.tokens.iter().map(Vec::len).max().unwrap_or(0);
        if position >= b.len || b.ended.iter().all(|&e| e) {
            let block = self.block.take().ok_or_else(|| missing_row("cd-block"))?;
            self.close_block(block)?;
        }
        Ok(())
    }

    fn scored(&mut self, scores: Vec<f64>) -> Result<()> {
        let (text, r) = self.spec.scored(self.text.take(), &scores)?;
        self.result = Some(self.output(text, r)?);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Finished> {
        let drawn = self.drawn_tokens;
        finished_output(self.result, "cd-block", Some(drawn))
    }
}

/// Run `jobs` (each with the most rows it steps at once) to the end, admitting them in
/// order while their rows fit in `max_rows` (a bigger job runs alone), and return their
/// results in order; `on_done(k)` is called as the k-th job (in finishing order) ends.
///
/// # Errors
/// The first job's error (the others are dropped).
pub(crate) fn run_jobs<'a, P: Policy>(
    policy: &'a P,
    jobs: Vec<(usize, Box<dyn Job<P> + 'a>)>,
    max_rows: usize,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<Finished>> {
    let total = jobs.len();
    let mut stepper = Stepper::new(policy);
    let mut pending = jobs.into_iter().enumerate().peekable();
    let mut rows_of: std::collections::HashMap<JobId, (usize, usize)> = Default::default();
    let mut results: Vec<Option<Finished>> = (0..total).map(|_| None).collect();
    let (mut in_use, mut finished) = (0usize, 0usize);
    loop {
        while let Some((_, (rows, _))) = pending.peek() {
            if in_use + rows > max_rows && stepper.len() > 0 {
                break;
            }
            let (i, (rows, job)) = pending.next().expect("peeked");
            let id = stepper.submit(job, CancelToken::new(), None, 0);
            rows_of.insert(id, (i, rows));
            in_use += rows;
        }
        if stepper.len() == 0 {
            break;
        }
        for (id, r) in stepper.round() {
            let (i, rows) = rows_of
                .remove(&id)
                .ok_or_else(|| EngineError::Internal("an unknown job finished".into()))?;
            in_use -= rows;
            results[i] = Some(r?);
            finished += 1;
            on_done(finished);
        }
    }
    results
        .into_iter()
        .map(|r| r.ok_or_else(|| EngineError::Internal("a job was lost".into())))
        .collect()
}
