//! [`RemoteEngine`]: the strategies run on candidates drawn from an engine tilt does not
//! run itself (vLLM, SGLang, a llama.cpp server, another `tilt serve`), through
//! [`tilt_remote::RemotePolicy`].
//!
//! The selection strategies need of a policy only what an OpenAI-compatible engine gives:
//! n candidates for a prompt. tilt draws them from the engine, scores them with its own
//! rewards, and selects and prices them with exactly the rules the local engine uses
//! ([`crate::select`], [`crate::cost`]), so `sample`, `bon`, `won`, `soft-bon` and `rewind`
//! mean the same thing on either. Their KL numbers (the bound log n − (n−1)/n, the §4
//! estimate on the candidates' empirical law, rewind's log(draws/accepted)) rest on the
//! candidates and their rewards only, not on the engine's log-probabilities; each
//! candidate's `log_prob` is the engine's own (the sum of the token log-probabilities it
//! returned), and every output says in `engine` how it was drawn.
//!
//! `cd-token` is refused: it needs the full next-token distribution at every step and a
//! scorer on the model's hidden states, which no such API exposes. `cd-block` runs on text
//! prompts (raw, or chats tilt renders with the served model's chat template, given as
//! `chat-template=` in the spec): each block continues the text so far through
//! `/completions`, and the value of a
//! prefix is the request's reward of the partial answer (a prefix scorer, which reads hidden
//! states, is refused); its KL note is the local one (B blocks of best-of-K).
//!
//! Randomness: candidate d of choice j (draw j·MAX_N + d, rewind's j·MAX_DRAWS + d, as
//! locally) is asked with seed [`candidate_seed`]`(seed, index, draw)`; where the engine
//! honours `n`, one request asks for all of a batch with the first of them, and what the
//! engine does with it is the engine's. The selection rule draws from the same stream as
//! locally (`selection_stream(index, j)`).

use crate::cost::{cost, Rule};
use crate::engine::{add_reported_rewards, build_rewards, find_named, RewardConfig};
use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::request::{Candidate, FinishReason, Input, RemoteNote, Request, Response, Usage};
use crate::select::{first_accepted, select};
use crate::stepper::{draw_stream, output_of, score_pairs, selection_stream, OutputSpec};
use crate::strategy::{Strategy, MAX_DRAWS, MAX_N};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::{ChatMessage, ChatTemplate};
use tilt_remote::{
    Ask, Completion, EngineSpec, Finish, Message, OpenAiEngine, Prompt, RemoteError, RemotePolicy,
};
use tilt_rewards::Reward;

impl From<RemoteError> for EngineError {
    fn from(e: RemoteError) -> Self {
        if e.is_invalid_input() {
            EngineError::invalid("engine", e.to_string())
        } else {
            EngineError::Remote(e.to_string())
        }
    }
}

/// The seed candidate `draw` of the request with `index` is asked with: a 31-bit mix of the
/// request's seed and the draw's stream (31 bits because some engines keep seeds in a
/// signed 32-bit integer).
pub fn candidate_seed(seed: u64, index: u64, draw: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        // splitmix64's finaliser (Steele, Lea & Flood 2014).
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(seed ^ mix(draw_stream(index, draw))) & 0x7FFF_FFFF
}

/// A remote policy with tilt's rewards: what the faces hold when given `--engine`.
pub struct RemoteEngine {
    policy: Arc<dyn RemotePolicy>,
    rewards: Vec<(String, Arc<dyn Reward>)>,
    spec: Option<EngineSpec>,
    /// Requests run at once by [`RemoteEngine::generate_many`].
    parallel: usize,
    /// The model's chat template, when tilt renders chat prompts itself (then sent to
    /// `/completions`), with where it came from.
    template: Option<(String, ChatTemplate)>,
}

/// The refusal of `cd-block` on a chat prompt that tilt cannot render itself.
pub(crate) fn cd_block_needs_text() -> EngineError {
    EngineError::invalid(
        "prompt",
        "cd-block on a remote engine continues the partial answer through /completions, so a \
         chat prompt needs the model's chat template on tilt's side: name it in the engine \
         spec (chat-template=FILE.gguf, or chat-template=default for the embedded default \
         model), or give the prompt raw (--no-chat-template) with the template written out",
    )
}

/// How a request's prompt reached the engine (the `prompt` of [`RemoteNote`]).
fn prompt_note(input: &Input, template: Option<&str>) -> String {
    match (input, template) {
        (Input::Raw(_), _) => "raw: sent to /completions as given".into(),
        (_, Some(source)) => format!(
            "chat, rendered by tilt with the chat template of {source}, sent to /completions"
        ),
        (_, None) => "chat: sent to /chat/completions, rendered by the engine's template".into(),
    }
}

impl std::fmt::Debug for RemoteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEngine")
            .field("engine", self.policy.info())
            .field(
                "rewards",
                &self.rewards.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RemoteEngine {
    /// Connect to the engine `spec` names (`openai:URL[,…]`, see [`EngineSpec`]), probe it,
    /// and build the rewards.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `engine` for a bad spec, a model it does not serve or
    /// an unset key variable; [`EngineError::Remote`] when the probe fails; the rewards'
    /// errors.
    pub fn connect(
        spec: &str,
        rewards: &[RewardConfig],
        progress: &dyn Progress,
    ) -> Result<RemoteEngine> {
        let spec = EngineSpec::parse(spec)?;
        if rewards.is_empty() {
            return Err(EngineError::invalid("reward", "no reward configured"));
        }
        crate::error::check_names(rewards.iter().map(|r| r.name.as_str()), "reward")?;
        let template = match spec.chat_template.as_deref() {
            None => None,
            Some(source) => {
                let path = match source {
                    "default" => crate::progress::fetch_default_policy(progress)?,
                    file => std::path::PathBuf::from(file),
                };
                let t = tilt_models::load_chat_template(&path).map_err(|e| {
                    EngineError::invalid("engine", format!("chat-template={source}: {e}"))
                })?;
                Some((path.display().to_string(), t))
            }
        };
        let built = build_rewards(rewards, progress)?;
        progress.note(&format!("probing the engine at {}", spec.url));
        let policy = OpenAiEngine::connect(&spec)?;
        let parallel = spec.max_concurrency;
        Ok(RemoteEngine {
            policy: Arc::new(policy),
            rewards: built,
            spec: Some(spec),
            parallel,
            template,
        })
    }

    /// This engine, rendering chat prompts itself with `template` (from `source`, said in
    /// every output) and sending them to `/completions`.
    pub fn with_chat_template(mut self, source: &str, template: ChatTemplate) -> Self {
        self.template = Some((source.to_string(), template));
        self
    }

    /// What a request's `input` is sent as: a raw text as it is; a chat rendered with the
    /// model's chat template when tilt has it (then continued by `/completions`), else the
    /// conversation for the engine's `/chat/completions`.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `prompt` when the template refuses the messages.
    pub fn prompt_of(&self, input: &Input) -> Result<Prompt> {
        let messages = match input {
            Input::Raw(t) => return Ok(Prompt::Text(t.clone())),
            Input::Prompt(t) => vec![ChatMessage::user(t.clone())],
            Input::Messages(m) => m.clone(),
        };
        Ok(match &self.template {
            Some((_, t)) => Prompt::Text(
                t.render(&messages, true)
                    .map_err(|e| EngineError::invalid("prompt", e.to_string()))?,
            ),
            None => Prompt::Chat(
                messages
                    .iter()
                    .map(|m| Message {
                        role: m.role.as_str().into(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ),
        })
    }

    /// An engine over a policy already made (a test double, another implementation).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] when there is no reward or a name repeats.
    pub fn from_parts(
        policy: Arc<dyn RemotePolicy>,
        rewards: Vec<(String, Arc<dyn Reward>)>,
        parallel: usize,
    ) -> Result<RemoteEngine> {
        if rewards.is_empty() {
            return Err(EngineError::invalid("reward", "no reward given"));
        }
        crate::error::check_names(rewards.iter().map(|(n, _)| n.as_str()), "reward")?;
        Ok(RemoteEngine {
            policy,
            rewards,
            spec: None,
            parallel: parallel.max(1),
            template: None,
        })
    }

    /// What the probe found.
    pub fn info(&self) -> &tilt_remote::EngineInfo {
        self.policy.info()
    }

    /// The spec it was connected with (None for [`RemoteEngine::from_parts`]).
    pub fn spec(&self) -> Option<&EngineSpec> {
        self.spec.as_ref()
    }

    /// The names of its rewards.
    pub fn reward_names(&self) -> Vec<&str> {
        self.rewards.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// log p(response | input) under the engine, token by token (where it can score a
    /// given text: the prompt raw, or a chat rendered with the model's chat template when
    /// tilt has it, see [`RemoteEngine::prompt_of`]).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `prompt` for a chat without a template on tilt's side,
    /// or `engine` when the engine cannot score a text; [`EngineError::Remote`].
    pub fn log_prob(&self, input: &Input, response: &str) -> Result<tilt_remote::TextLogProb> {
        input.validate()?;
        match self.prompt_of(input)? {
            Prompt::Text(prompt) => Ok(self.policy.log_prob(&prompt, response)?),
            Prompt::Chat(_) => Err(EngineError::invalid(
                "prompt",
                "a remote engine scores a given text through /completions, so a chat prompt \
                 needs the model's chat template on tilt's side: name it in the engine spec \
                 (chat-template=FILE.gguf, or chat-template=default for the embedded default \
                 model), or give the prompt raw (--no-chat-template)",
            )),
        }
    }

    /// Score (prompt, response) pairs with the reward named `reward` (None: the first).
    ///
    /// # Errors
    /// An unknown name; the reward's errors.
    pub fn score(&self, reward: Option<&str>, pairs: &[(&str, &str)]) -> Result<Vec<f64>> {
        let r = find_named(&self.rewards, reward, "reward")?;
        score_pairs(r.as_ref(), pairs.iter().copied())
    }

    /// Run one request: every choice, its candidates drawn from the engine.
    ///
    /// # Errors
    /// A bad request (as locally), a strategy a remote engine cannot run (naming
    /// `strategy`), the engine's or a reward's failure. Nothing partial is returned.
    pub fn generate(&self, request: &Request) -> Result<Response> {
        request.validate()?;
        let p = &request.params;
        // cd-block samples p itself (temperature 1, no truncation), as locally.
        let model_law = SamplingParams::default();
        let mut block: Option<usize> = None;
        let (n, rule, name, sampling, rewind) = match &p.strategy {
            Strategy::Sample { sampling } => (1, Rule::Sample, "sample", sampling, None),
            Strategy::Bon { n, sampling } => (*n, Rule::Best, "bon", sampling, None),
            Strategy::Won { n, sampling } => (*n, Rule::Worst, "won", sampling, None),
            Strategy::SoftBon {
                n,
                lambda,
                sampling,
            } => (
                *n,
                Rule::Soft { lambda: *lambda },
                "soft-bon",
                sampling,
                None,
            ),
            Strategy::Rewind {
                n,
                threshold,
                max_draws,
                sampling,
            } => (
                *n,
                Rule::Sample,
                "rewind",
                sampling,
                Some((*threshold, *max_draws)),
            ),
            Strategy::CdToken { .. } => {
                return Err(EngineError::invalid(
                    "strategy",
                    "cd-token cannot run on a remote engine: it needs the full next-token \
                     distribution at every step and a prefix scorer on the model's hidden \
                     states, which an OpenAI-style API does not expose (use bon, soft-bon or \
                     rewind, or cd-token on a local model)",
                ))
            }
            Strategy::CdBlock { k, m, scorer } => {
                if scorer.is_some() {
                    return Err(EngineError::invalid(
                        "scorer",
                        "a prefix scorer reads the model's hidden states, which a remote engine \
                         does not expose: on a remote engine cd-block is guided by the reward \
                         on the partial text (give no scorer)",
                    ));
                }
                block = Some(*m);
                (*k, Rule::Best, "cd-block", &model_law, None)
            }
        };
        let reward = Arc::clone(find_named(&self.rewards, p.reward.as_deref(), "reward")?);
        let mut report = Vec::with_capacity(p.report_rewards.len());
        for r in &p.report_rewards {
            let found = find_named(&self.rewards, Some(r), "reward")
                .map_err(|e| EngineError::invalid("report_rewards", e.problem()))?;
            report.push((r.clone(), Arc::clone(found)));
        }
        let prompt = self.prompt_of(&request.input)?;
        if block.is_some() && !matches!(prompt, Prompt::Text(_)) {
            return Err(cd_block_needs_text());
        }
        let reward_prompt: Arc<str> = Arc::from(request.input.reward_prompt());
        let note = self.note(&request.input);
        let mut usage = Usage::default();
        let mut outputs = Vec::with_capacity(p.choices);
        for choice in 0..p.choices {
            let j = choice as u64;
            let out = OutputSpec {
                choice,
                seed: p.seed,
                reward: Arc::clone(&reward),
                prompt: Arc::clone(&reward_prompt),
            };
            let mut selector = SequenceSampler::new(p.seed, selection_stream(request.index, j));
            let draw = |first: u64, count: usize, usage: &mut Usage| -> Result<Vec<Candidate>> {
                let seeds: Vec<u64> = (0..count as u64)
                    .map(|d| candidate_seed(p.seed, request.index, first + d))
                    .collect();
                self.draw(&prompt, sampling, p, &seeds, &reward, &reward_prompt, usage)
            };
            let mut o = match rewind {
                None if block.is_some() => {
                    let m = block.unwrap_or(1);
                    self.blocks(
                        &prompt,
                        p,
                        request.index,
                        j,
                        n,
                        m,
                        &out,
                        &mut selector,
                        &mut usage,
                    )?
                }
                None => {
                    let candidates = draw(j * MAX_N as u64, n, &mut usage)?;
                    let rewards: Vec<f64> = candidates.iter().map(|c| c.reward).collect();
                    let selected = select(rule, None, &rewards, &mut selector)?;
                    let texts: Vec<&str> = candidates.iter().map(|c| c.text.as_str()).collect();
                    let c = cost(rule, &texts, &rewards, n)?;
                    let size = (rule != Rule::Sample).then_some(n);
                    output_of(&out, name, size, candidates, selected, c, None)
                }
                Some((threshold, max_draws)) => {
                    // As the local rewind: batches of n until one holds an acceptance, the
                    // first accepted in draw order returned, else the best.
                    let mut all: Vec<Candidate> = Vec::new();
                    let mut chosen = None;
                    while all.len() < max_draws && chosen.is_none() {
                        let batch = n.min(max_draws - all.len());
                        let first = j * MAX_DRAWS as u64 + all.len() as u64;
                        let mut got = draw(first, batch, &mut usage)?;
                        let rewards: Vec<f64> = got.iter().map(|c| c.reward).collect();
                        chosen = first_accepted(&rewards, threshold).map(|i| all.len() + i);
                        all.append(&mut got);
                    }
                    let rewards: Vec<f64> = all.iter().map(|c| c.reward).collect();
                    // Earlier batches held no acceptance, so this counts the last batch's.
                    let accepted = rewards.iter().filter(|&&r| r >= threshold).count();
                    let rule = Rule::Rewind {
                        draws: all.len(),
                        accepted,
                    };
                    let selected = match chosen {
                        Some(i) => i,
                        None => select(rule, Some(threshold), &rewards, &mut selector)?,
                    };
                    let texts: Vec<&str> = all.iter().map(|c| c.text.as_str()).collect();
                    let c = cost(rule, &texts, &rewards, n)?;
                    output_of(
                        &out,
                        "rewind",
                        Some(n),
                        all,
                        selected,
                        c,
                        Some(accepted > 0),
                    )
                }
            };
            o.engine = Some(note.clone());
            outputs.push(o);
        }
        add_reported_rewards(&mut outputs, &reward_prompt, &report)?;
        Ok(Response {
            index: request.index,
            prompt: reward_prompt.to_string(),
            outputs,
            usage,
        })
    }

    /// Remote cd-block for one choice: blocks of `m` tokens, each the best of `k`
    /// continuations of the text so far (a `/completions` request whose prompt is the raw
    /// prompt followed by the answer so far) under the request's reward of the partial
    /// answer, until a chosen block ends (an end token or a stop sequence) or the budget is
    /// spent (arXiv 2310.17022 §3, with the reward of the partial text as the value of the
    /// prefix). Block b's candidate i is draw `j·2^24 + b·k + i` of the request.
    #[allow(clippy::too_many_arguments)]
    fn blocks(
        &self,
        prompt: &Prompt,
        p: &crate::request::Params,
        index: u64,
        j: u64,
        k: usize,
        m: usize,
        out: &OutputSpec,
        selector: &mut SequenceSampler,
        usage: &mut Usage,
    ) -> Result<crate::request::Output> {
        let Prompt::Text(base) = prompt else {
            return Err(EngineError::Internal("cd-block needs a raw prompt".into()));
        };
        let (mut text, mut tokens, mut lps, mut texts) =
            (String::new(), 0usize, Vec::new(), Vec::new());
        let (mut blocks, mut reward, mut finish) = (0usize, f64::NAN, Finish::Length);
        while tokens < p.max_new_tokens {
            let budget = m.min(p.max_new_tokens - tokens);
            let seeds: Vec<u64> = (0..k as u64)
                .map(|i| candidate_seed(p.seed, index, (j << 24) + (blocks * k) as u64 + i))
                .collect();
            let ask_prompt = Prompt::Text(format!("{base}{text}"));
            let ask = Ask {
                prompt: &ask_prompt,
                max_tokens: budget,
                temperature: 1.0,
                top_p: None,
                top_k: None,
                stop: &p.stop,
                seeds: &seeds,
            };
            let got = self.policy.complete(&ask)?;
            if got.candidates.len() != k {
                return Err(EngineError::Remote(format!(
                    "engine {}: {} candidates for {k} asked",
                    self.policy.info().url,
                    got.candidates.len()
                )));
            }
            if blocks == 0 {
                usage.prompt_tokens = got.prompt_tokens;
            }
            usage.completion_tokens += got.completion_tokens;
            let partial: Vec<String> = got
                .candidates
                .iter()
                .map(|c| format!("{text}{}", c.text))
                .collect();
            let values = score_pairs(
                out.reward.as_ref(),
                partial.iter().map(|t| (&*out.prompt, t.as_str())),
            )?;
            let chosen = crate::select::select_best(&values, selector)?;
            let c = got
                .candidates
                .into_iter()
                .nth(chosen)
                .ok_or_else(|| EngineError::Internal("the chosen block is missing".into()))?;
            blocks += 1;
            reward = values[chosen];
            text = partial[chosen].clone();
            tokens += c.token_log_probs.len();
            lps.extend_from_slice(&c.token_log_probs);
            texts.extend(c.tokens);
            finish = c.finish;
            if c.finish == Finish::Stop || c.token_log_probs.is_empty() {
                break;
            }
        }
        let per_block = tilt_core::bounds::bon_kl_bound(k as u64)?;
        let finish = match finish {
            Finish::Length => FinishReason::Length,
            Finish::Stop if p.stop.is_empty() => FinishReason::Eos,
            Finish::Stop => FinishReason::Stop,
        };
        let candidate = Candidate {
            text: text.clone(),
            reward,
            new_tokens: lps.len(),
            finish,
            log_prob: lps.iter().sum(),
            tokens: Vec::new(),
            token_log_probs: lps,
            token_texts: texts,
        };
        let cost = crate::cost::Cost {
            kl_bound: Some(blocks as f64 * per_block),
            kl_estimate: None,
            kl_note: crate::request::KlNote::CdBlockChainBound,
            distinct: None,
        };
        let mut o = output_of(out, "cd-block", None, vec![candidate], 0, cost, None);
        o.draws = blocks * k;
        o.blocks = Some(blocks);
        Ok(o)
    }

    /// Candidates for `seeds`, scored.
    #[allow(clippy::too_many_arguments)]
    fn draw(
        &self,
        prompt: &Prompt,
        sampling: &SamplingParams,
        p: &crate::request::Params,
        seeds: &[u64],
        reward: &Arc<dyn Reward>,
        reward_prompt: &str,
        usage: &mut Usage,
    ) -> Result<Vec<Candidate>> {
        let ask = Ask {
            prompt,
            max_tokens: p.max_new_tokens,
            temperature: sampling.temperature(),
            top_p: sampling.top_p(),
            top_k: sampling.top_k(),
            stop: &p.stop,
            seeds,
        };
        let got = self.policy.complete(&ask)?;
        if got.candidates.len() != seeds.len() {
            return Err(EngineError::Remote(format!(
                "engine {}: {} candidates for {} asked",
                self.policy.info().url,
                got.candidates.len(),
                seeds.len()
            )));
        }
        usage.prompt_tokens = got.prompt_tokens;
        usage.completion_tokens += got.completion_tokens;
        let rewards = score_pairs(
            reward.as_ref(),
            got.candidates
                .iter()
                .map(|c| (reward_prompt, c.text.as_str())),
        )?;
        Ok(got
            .candidates
            .into_iter()
            .zip(rewards)
            .map(|(c, reward)| candidate(c, reward, !p.stop.is_empty()))
            .collect())
    }

    /// Run many requests, up to the engine's `max-concurrency` at once, handing each result
    /// to `on_response` in input order; `on_response` returning false stops the run.
    pub fn generate_many(
        &self,
        requests: Vec<Request>,
        on_response: impl FnMut(usize, Result<Response>) -> bool,
    ) {
        in_order(
            &requests,
            self.parallel,
            |_, r| self.generate(r),
            on_response,
        );
    }

    /// Requests (or prompts) run at once.
    pub(crate) fn parallel(&self) -> usize {
        self.parallel
    }

    /// The reward named `name` (None: the first).
    pub(crate) fn reward(&self, name: Option<&str>) -> Result<&Arc<dyn Reward>> {
        find_named(&self.rewards, name, "reward")
    }

    /// One candidate per seed for `input` from the engine at temperature 1 (p itself, as
    /// the local reference samples), each scored by `reward`.
    pub(crate) fn candidates(
        &self,
        input: &Input,
        seeds: &[u64],
        max_new_tokens: usize,
        reward: &Arc<dyn Reward>,
    ) -> Result<Vec<Candidate>> {
        let prompt = self.prompt_of(input)?;
        let mut params = crate::request::Params::new(Strategy::Sample {
            sampling: SamplingParams::default(),
        });
        params.max_new_tokens = max_new_tokens;
        let reward_prompt = input.reward_prompt();
        self.draw(
            &prompt,
            &SamplingParams::default(),
            &params,
            seeds,
            reward,
            reward_prompt,
            &mut Usage::default(),
        )
    }

    /// What every output drawn for `input` says of the engine.
    pub(crate) fn note(&self, input: &Input) -> RemoteNote {
        let info = self.policy.info();
        let text = matches!(input, Input::Raw(_)) || self.template.is_some();
        let honours_n = if text {
            info.completions.honours_n
        } else {
            info.chat.honours_n
        };
        RemoteNote {
            url: info.url.clone(),
            model: info.model.clone(),
            requests: if honours_n { "n" } else { "per-candidate" }.into(),
            log_probs: "engine".into(),
            prompt: prompt_note(input, self.template.as_ref().map(|t| t.0.as_str())),
        }
    }
}

/// `f` on every item, up to `workers` at once on scoped threads, each result handed to
/// `on_result` in item order as soon as the ones before it are in; `on_result` returning
/// false stops the run (items not yet started are not started).
pub(crate) fn in_order<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(usize, &T) -> R + Sync,
    mut on_result: impl FnMut(usize, R) -> bool,
) {
    let total = items.len();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(total) {
            let tx = tx.clone();
            let (next, stop, f) = (&next, &stop, &f);
            s.spawn(move || loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                if tx.send((i, f(i, &items[i]))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut done: std::collections::HashMap<usize, R> = Default::default();
        let mut next_out = 0;
        for (i, r) in rx {
            done.insert(i, r);
            while let Some(r) = done.remove(&next_out) {
                if !on_result(next_out, r) {
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                next_out += 1;
            }
        }
    });
}

fn candidate(c: Completion, reward: f64, had_stops: bool) -> Candidate {
    let log_prob = c.log_prob();
    Candidate {
        new_tokens: c.token_log_probs.len(),
        finish: match c.finish {
            Finish::Length => FinishReason::Length,
            // OpenAI's "stop" is an end token or a stop sequence; without stop sequences
            // it can only be the end token.
            Finish::Stop if had_stops => FinishReason::Stop,
            Finish::Stop => FinishReason::Eos,
        },
        text: c.text,
        reward,
        log_prob,
        tokens: Vec::new(),
        token_log_probs: c.token_log_probs,
        token_texts: c.tokens,
    }
}
