//! Shared helpers of the engine's integration tests on the toy policy: rewards, scorers,
//! engines, request builders, a token-event recorder and the exact sampling of a random
//! stream written out from public pieces.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tilt_engine::cd::scorer::Standardizer;
use tilt_engine::cd::{ConstantScorer, LinearHead, PrefixScorer, ScorerHead};
use tilt_engine::{Engine, Input, Params, Request, Response, Strategy, TokenEvent, TokenSink};
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::toy::{ToyPolicy, TOY_EOS};
use tilt_models::{ChatMessage, ModelError, Policy, StepOutput, TokenId};
use tilt_rewards::{Reward, RewardError};

/// Hidden size of the toy policy: the one-hot of the last token and the position / 32.
pub const HIDDEN: usize = ToyPolicy::VOCAB + 1;
/// The toy policy's context length, as a float.
pub const CTX: f64 = ToyPolicy::CONTEXT_LENGTH as f64;

/// Weights of the linear toy scorer.
pub const W: [f32; HIDDEN] = [0.3, -0.5, 1.0, 0.2, 2.0];
/// Its bias.
pub const B: f32 = 0.1;

// ---------------------------------------------------------------------------------------
// Rewards
// ---------------------------------------------------------------------------------------

/// Reward: the length of the text.
pub struct LengthReward;

impl Reward for LengthReward {
    fn name(&self) -> String {
        "length".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs.iter().map(|(_, t)| t.len() as f32).collect())
    }
}

/// (number of `b`) − (number of `c`) of a text.
pub fn letter_reward(text: &str) -> f64 {
    text.chars()
        .map(|c| match c {
            'b' => 1.0,
            'c' => -1.0,
            _ => 0.0,
        })
        .sum()
}

/// Reward: (number of `b`) − (number of `c`). Integer-valued, so many responses tie. It
/// says its scores do not depend on the batch, so the stepper may pool its calls.
pub struct LetterReward;

impl Reward for LetterReward {
    fn name(&self) -> String {
        "letters".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs.iter().map(|(_, t)| letter_reward(t) as f32).collect())
    }
    fn batch_invariant(&self) -> bool {
        true
    }
}

/// A toy reward: the number of `c`s in the response.
pub struct CountC;

impl Reward for CountC {
    fn name(&self) -> String {
        "count-c".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, r)| r.chars().filter(|&c| c == 'c').count() as f32)
            .collect())
    }
}

/// A reward that counts its calls and records the size of each batch (to check one batch
/// per job); every score is 0.
#[derive(Default)]
pub struct CountingReward {
    pub calls: AtomicUsize,
    pub sizes: Mutex<Vec<usize>>,
}

impl CountingReward {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Reward for CountingReward {
    fn name(&self) -> String {
        "counting".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.sizes.lock().unwrap().push(pairs.len());
        Ok(vec![0.0; pairs.len()])
    }
}

/// A reward that records the prompts of each call, in call order, and scores the length.
#[derive(Default)]
pub struct RecordingReward {
    pub calls: Mutex<Vec<Vec<String>>>,
}

impl Reward for RecordingReward {
    fn name(&self) -> String {
        "recording".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        self.calls
            .lock()
            .unwrap()
            .push(pairs.iter().map(|(p, _)| p.to_string()).collect());
        Ok(pairs.iter().map(|(_, t)| t.len() as f32).collect())
    }
}

/// A reward that returns NaN.
pub struct NanReward;

impl Reward for NanReward {
    fn name(&self) -> String {
        "nan".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(vec![f32::NAN; pairs.len()])
    }
}

/// A reward that returns NaN for the pairs whose prompt is `bad_prompt` and the text's length
/// otherwise: a function of each pair alone, so (when `invariant`) it says that its scores do
/// not depend on the batch.
pub struct NanForPrompt {
    pub bad_prompt: &'static str,
    pub invariant: bool,
}

impl Reward for NanForPrompt {
    fn name(&self) -> String {
        format!("nan-for-{}", self.bad_prompt)
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(p, t)| {
                if *p == self.bad_prompt {
                    f32::NAN
                } else {
                    t.len() as f32
                }
            })
            .collect())
    }
    fn batch_invariant(&self) -> bool {
        self.invariant
    }
}

/// A reward as the engine holds it.
pub fn reward(r: impl Reward + 'static) -> Arc<dyn Reward> {
    Arc::new(r)
}

// ---------------------------------------------------------------------------------------
// Scorers
// ---------------------------------------------------------------------------------------

/// A linear scorer on the toy hidden state.
pub fn toy_scorer(weights: [f32; HIDDEN], bias: f32) -> ScorerHead {
    ScorerHead::Linear(LinearHead {
        standardizer: Standardizer {
            mean: vec![0.0; HIDDEN],
            std: vec![1.0; HIDDEN],
        },
        weight: weights.to_vec(),
        bias,
    })
}

/// V of the prefix whose last token is `last`, at context position `pos`, computed from the
/// formula (not through the scorer code).
pub fn v_by_hand(last: TokenId, pos: usize) -> f64 {
    W[last as usize] as f64 + W[HIDDEN - 1] as f64 * (pos as f32 / CTX as f32) as f64 + B as f64
}

/// A scorer as the engine holds it.
pub fn scorer(s: impl PrefixScorer + 'static) -> Arc<dyn PrefixScorer> {
    Arc::new(s)
}

/// The constant scorer of value `value` on the toy's hidden size.
pub fn constant(value: f64) -> ConstantScorer {
    ConstantScorer {
        value,
        hidden_size: HIDDEN,
    }
}

// ---------------------------------------------------------------------------------------
// Engines and requests
// ---------------------------------------------------------------------------------------

/// An engine over the toy policy.
pub fn toy_engine(
    rewards: Vec<(&str, Arc<dyn Reward>)>,
    scorers: Vec<(&str, Arc<dyn PrefixScorer>)>,
    max_batch: usize,
) -> Engine<ToyPolicy> {
    Engine::from_parts(
        ToyPolicy::new(),
        rewards
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect(),
        scorers
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect(),
        max_batch,
    )
    .unwrap()
}

/// The usual test engine: rewards `length` (the default) and `letters` (batch-invariant),
/// scorers `linear` (the default, [`W`], [`B`]) and `constant` (0), max_batch 4096.
pub fn engine() -> Engine<ToyPolicy> {
    toy_engine(
        vec![
            ("length", reward(LengthReward)),
            ("letters", reward(LetterReward)),
        ],
        vec![
            ("linear", scorer(toy_scorer(W, B))),
            ("constant", scorer(constant(0.0))),
        ],
        4096,
    )
}

/// A request for the user message `prompt` at index 0.
pub fn req(prompt: &str, strategy: Strategy, seed: u64, max_new_tokens: usize) -> Request {
    let mut params = Params::new(strategy);
    params.seed = seed;
    params.max_new_tokens = max_new_tokens;
    Request::new(Input::Prompt(prompt.into()), params)
}

/// `r` with `index`.
pub fn at(mut r: Request, index: u64) -> Request {
    r.index = index;
    r
}

/// `r` with `choices`.
pub fn choices(mut r: Request, choices: usize) -> Request {
    r.params.choices = choices;
    r
}

pub fn sample() -> Strategy {
    Strategy::Sample {
        sampling: SamplingParams::default(),
    }
}
pub fn bon(n: usize) -> Strategy {
    Strategy::Bon {
        n,
        sampling: SamplingParams::default(),
    }
}
pub fn won(n: usize) -> Strategy {
    Strategy::Won {
        n,
        sampling: SamplingParams::default(),
    }
}
pub fn soft_bon(n: usize, lambda: f64) -> Strategy {
    Strategy::SoftBon {
        n,
        lambda,
        sampling: SamplingParams::default(),
    }
}
pub fn rewind(n: usize, threshold: f64, max_draws: usize) -> Strategy {
    Strategy::Rewind {
        n,
        threshold,
        max_draws,
        sampling: SamplingParams::default(),
    }
}
pub fn cd_token(lambda: f64, top_k: usize) -> Strategy {
    Strategy::CdToken {
        lambda,
        top_k,
        scorer: None,
    }
}
pub fn cd_block(k: usize, m: usize) -> Strategy {
    Strategy::CdBlock { k, m, scorer: None }
}

/// One of every strategy, with small parameters.
pub fn every_strategy() -> Vec<Strategy> {
    vec![
        sample(),
        bon(3),
        won(3),
        soft_bon(3, 0.5),
        rewind(2, 3.0, 9),
        cd_token(1.5, 3),
        cd_block(3, 2),
    ]
}

/// The JSON bytes of a response.
pub fn json(r: &Response) -> String {
    serde_json::to_string(r).unwrap()
}

// ---------------------------------------------------------------------------------------
// Token events
// ---------------------------------------------------------------------------------------

/// A token event, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Ev {
    pub choice: usize,
    pub candidate: usize,
    pub token: Option<TokenId>,
    pub text: String,
}

/// A sink that records every event, and the shared list it records into.
pub fn recorder() -> (Arc<Mutex<Vec<Ev>>>, TokenSink<'static>) {
    let events: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let sink_events = Arc::clone(&events);
    let sink: TokenSink<'static> = Box::new(move |ev: &TokenEvent<'_>| {
        sink_events.lock().unwrap().push(Ev {
            choice: ev.choice,
            candidate: ev.candidate,
            token: ev.token,
            text: ev.text.to_string(),
        })
    });
    (events, sink)
}

/// The tokens and the concatenated text of the events of (`choice`, `candidate`).
pub fn streamed(events: &[Ev], choice: usize, candidate: usize) -> (Vec<TokenId>, String) {
    let mine = events
        .iter()
        .filter(|e| e.choice == choice && e.candidate == candidate);
    let tokens = mine.clone().filter_map(|e| e.token).collect();
    let text = mine.map(|e| e.text.as_str()).collect();
    (tokens, text)
}

// ---------------------------------------------------------------------------------------
// Sampling a stream directly
// ---------------------------------------------------------------------------------------

/// The tokens the toy policy draws after `prompt` from ChaCha20 stream `stream` of `seed` at
/// the reference sampling parameters, written out from public pieces (prefill, one sampler
/// draw per token, step): what a candidate drawn from that stream must be.
pub fn direct_sample(prompt: &str, seed: u64, stream: u64, max_new: usize) -> Vec<TokenId> {
    let toy = ToyPolicy::new();
    let (cache, mut out) = toy.prefill(&toy.encode(prompt).unwrap()).unwrap();
    let mut caches = vec![cache];
    let mut sampler = SequenceSampler::new(seed, stream);
    let mut tokens = Vec::new();
    loop {
        let d = sampler
            .sample(&out.log_probs, &SamplingParams::default())
            .unwrap();
        tokens.push(d.token);
        if d.token == TOY_EOS || tokens.len() == max_new {
            return tokens;
        }
        out = toy.step(&mut caches, &[d.token]).unwrap().remove(0);
    }
}

// ---------------------------------------------------------------------------------------
// A toy whose KV cache is huge (for the memory refusal)
// ---------------------------------------------------------------------------------------

/// The toy policy, but claiming `kv_bytes_per_token` bytes of KV cache per token, so that the
/// engine's memory check can be made to refuse a batch.
#[derive(Debug, Default)]
pub struct HeavyToy {
    pub toy: ToyPolicy,
    pub kv_bytes_per_token: u64,
}

impl Policy for HeavyToy {
    type Cache = Vec<TokenId>;
    fn name(&self) -> &str {
        "heavy-toy"
    }
    fn vocab_size(&self) -> usize {
        self.toy.vocab_size()
    }
    fn hidden_size(&self) -> usize {
        self.toy.hidden_size()
    }
    fn context_length(&self) -> usize {
        self.toy.context_length()
    }
    fn eos_token_ids(&self) -> &[TokenId] {
        self.toy.eos_token_ids()
    }
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        self.toy.encode(text)
    }
    fn decode(&self, tokens: &[TokenId]) -> Result<String, ModelError> {
        self.toy.decode(tokens)
    }
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        self.toy.render_chat(messages)
    }
    fn kv_bytes_per_token(&self) -> u64 {
        self.kv_bytes_per_token
    }
    fn prefill(&self, tokens: &[TokenId]) -> Result<(Self::Cache, StepOutput), ModelError> {
        self.toy.prefill(tokens)
    }
    fn step(
        &self,
        caches: &mut [Self::Cache],
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        self.toy.step(caches, tokens)
    }
    fn extend(
        &self,
        cache: &mut Self::Cache,
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        self.toy.extend(cache, tokens)
    }
    fn cache_len(&self, cache: &Self::Cache) -> usize {
        self.toy.cache_len(cache)
    }
}

/// An engine over a [`HeavyToy`] whose KV cache per token is a thousandth of the memory
/// available now (None where that cannot be read): about a thousand tokens of all the
/// sequences of a batch fill the memory.
pub fn heavy_engine() -> Option<Engine<HeavyToy>> {
    let avail = tilt_engine::memory::available_memory_bytes()?;
    Some(
        Engine::from_parts(
            HeavyToy {
                toy: ToyPolicy::new(),
                kv_bytes_per_token: avail / 1000,
            },
            vec![("length".into(), reward(LengthReward))],
            vec![("linear".into(), scorer(toy_scorer(W, B)))],
            4096,
        )
        .unwrap(),
    )
}
