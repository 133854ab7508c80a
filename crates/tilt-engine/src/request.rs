//! What a caller asks for ([`Request`]) and what it gets back ([`Response`]).
//!
//! All of these are serde types, so that a JSON request to the server, a request recorded
//! in a manifest and a Python dict are one and the same thing; unknown fields are refused
//! when read, so a misspelt parameter is an error, never silently ignored.
//!
//! ```
//! use tilt_engine::{Input, Params, Request};
//! let r: Request = serde_json::from_str(
//!     r#"{"input": {"prompt": "Name a fruit."},
//!         "params": {"strategy": {"name": "bon", "n": 8}, "seed": 3, "max_new_tokens": 32}}"#,
//! ).unwrap();
//! assert_eq!(r.input, Input::Prompt("Name a fruit.".into()));
//! assert_eq!(r.params.seed, 3);
//! assert!(serde_json::from_str::<Request>(r#"{"input": {"prompt": "x"}, "params": {"strategy": {"name": "sample"}, "sed": 3}}"#).is_err());
//! ```

use crate::cd::ScorerValue;
use crate::error::{check_names, EngineError, Result};
use crate::Strategy;
use serde::{Deserialize, Serialize};
use tilt_models::{ChatMessage, Role, TokenId};

/// The most outputs (choices) one request may ask for.
pub const MAX_CHOICES: usize = 128;

/// The most stop sequences a request may give.
pub const MAX_STOP: usize = 16;

/// The default `max_new_tokens`.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A user message, wrapped in the model's chat template (one user turn).
    Prompt(String),
    /// A whole conversation (system, user and assistant turns), wrapped in the chat
    /// template with the assistant's turn opened.
    Messages(Vec<ChatMessage>),
    /// Text given to the model as it is, without the chat template.
    Raw(String),
}

impl Input {
    /// The text the reward sees as the prompt: the message, the raw text, or the last user
    /// message of a conversation.
    pub fn reward_prompt(&self) -> &str {
        match self {
            Input::Prompt(s) | Input::Raw(s) => s,
            Input::Messages(m) => m
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or("", |m| m.content.as_str()),
        }
    }

    /// Check it without the model: some non-blank text; a conversation with at least one
    /// user message.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `prompt` or `messages`.
    pub fn validate(&self) -> Result<()> {
        match self {
            Input::Prompt(s) | Input::Raw(s) if s.trim().is_empty() => {
                Err(EngineError::invalid("prompt", "empty prompt"))
            }
            Input::Messages(m) if m.is_empty() => Err(EngineError::invalid(
                "messages",
                "no messages; give at least one user message",
            )),
            Input::Messages(m) if !m.iter().any(|m| m.role == Role::User) => Err(
                EngineError::invalid("messages", "no user message among the messages"),
            ),
            _ => Ok(()),
        }
    }
}

fn one() -> usize {
    1
}

fn default_max_new_tokens() -> usize {
    DEFAULT_MAX_NEW_TOKENS
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// Everything of a request but its input: how to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The strategy with its parameters.
    pub strategy: Strategy,
    /// Independent outputs to return (OpenAI's `n`), each a whole run of the strategy;
    /// 1 to [`MAX_CHOICES`].
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub choices: usize,
    /// The seed of every random choice.
    #[serde(default)]
    pub seed: u64,
    /// Most new tokens per candidate.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Texts that end a candidate when they appear in it (the text is cut before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// The reward's name in the engine (None: its default reward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    /// Further rewards (names in the engine) each output is scored with too, reported in its
    /// `rewards`: what a run guided by several objectives bought in each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_rewards: Vec<String>,
}

impl Params {
    /// Parameters with the strategy and every other field at its default.
    pub fn new(strategy: Strategy) -> Self {
        Params {
            strategy,
            choices: 1,
            seed: 0,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            stop: Vec::new(),
            reward: None,
            report_rewards: Vec::new(),
        }
    }

    /// Check everything that can be checked without the models.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming the parameter: the strategy's, `choices` (0 or above
    /// [`MAX_CHOICES`]), `max_new_tokens` (0), `stop` (more than [`MAX_STOP`], or an empty
    /// text).
    pub fn validate(&self) -> Result<()> {
        self.strategy.validate()?;
        if self.choices == 0 || self.choices > MAX_CHOICES {
            return Err(EngineError::invalid(
                "choices",
                format!("{} outputs; ask for 1 to {MAX_CHOICES}", self.choices),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(EngineError::invalid(
                "max_new_tokens",
                "0 new tokens leaves nothing to score; use at least 1",
            ));
        }
        if self.stop.len() > MAX_STOP {
            return Err(EngineError::invalid(
                "stop",
                format!("{} stop sequences; at most {MAX_STOP}", self.stop.len()),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(EngineError::invalid("stop", "an empty stop sequence"));
        }
        if self.report_rewards.len() > MAX_STOP {
            return Err(EngineError::invalid(
                "report_rewards",
                format!("{} rewards; at most {MAX_STOP}", self.report_rewards.len()),
            ));
        }
        check_names(
            self.report_rewards.iter().map(String::as_str),
            "report_rewards",
        )
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// What to continue.
    pub input: Input,
    /// The request's position in its input (a prompt file's line number − 1), which picks
    /// its random streams together with the seed; 0 for a lone request.
    #[serde(default)]
    pub index: u64,
    /// How to generate.
    pub params: Params,
}

impl Request {
    /// A request for `input` with `params`, at index 0.
    pub fn new(input: Input, params: Params) -> Self {
        Request {
            input,
            index: 0,
            params,
        }
    }

    /// Check everything that can be checked without the models.
    ///
    /// # Errors
    /// As [`Input::validate`] and [`Params::validate`]; `index` at or beyond 2^31.
    pub fn validate(&self) -> Result<()> {
        self.input.validate()?;
        self.params.validate()?;
        if self.index >= 1 << 31 {
            return Err(EngineError::invalid(
                "index",
                format!(
                    "{} is beyond 2^31 (it picks the random streams)",
                    self.index
                ),
            ));
        }
        Ok(())
    }
}

/// Why a candidate (or an output) stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It drew an end-of-sequence token (included in its tokens).
    Eos,
    /// It reached `max_new_tokens`.
    Length,
    /// A stop sequence appeared (the text is cut before it).
    Stop,
}

/// One scored candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The decoded text (special tokens skipped; cut before a stop sequence).
    pub text: String,
    /// Its reward.
    pub reward: f64,
    /// Number of tokens generated (an end token included).
    pub new_tokens: usize,
    /// Why it stopped.
    pub finish: FinishReason,
    /// log p(response | prompt) under the model at temperature 1, nats.
    pub log_prob: f64,
    /// The tokens (not serialised: the text says it for people).
    #[serde(skip)]
    pub tokens: Vec<TokenId>,
    /// log p of each token under the model at temperature 1, nats (not serialised; what an
    /// OpenAI-style `logprobs` answer reports).
    #[serde(skip)]
    pub token_log_probs: Vec<f64>,
    /// The tokens as text, where there are no ids (a remote engine's candidates; empty for
    /// the local model, whose `tokens` decode). Not serialised.
    #[serde(skip)]
    pub token_texts: Vec<String>,
}

/// What an output's KL numbers are: a short code in every output, explained once by
/// [`KlNote::explain`] (and in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlNote {
    /// `sample`: a draw from the reference, KL 0 exactly.
    Reference,
    /// bon/won: the bound log n − (n−1)/n and the §4 plug-in estimate.
    SelectionBound,
    /// soft-bon: the bound log n and the exact law on the candidates' empirical law.
    SoftSelection,
    /// soft-bon whose empirical law was too large to enumerate: the bound only.
    SoftSelectionBoundOnly,
    /// rewind, accepted: the maximum-likelihood estimate log(draws/accepted).
    Rewind,
    /// rewind, nothing accepted: no estimate.
    RewindNotAccepted,
    /// cd-token: the exact log π(y)/p(y) of this output.
    CdTokenLogRatio,
    /// cd-block: B·(log K − (K−1)/K) for this output's B blocks.
    CdBlockChainBound,
}

impl KlNote {
    /// Every note, for listings.
    pub const ALL: [KlNote; 8] = [
        KlNote::Reference,
        KlNote::SelectionBound,
        KlNote::SoftSelection,
        KlNote::SoftSelectionBoundOnly,
        KlNote::Rewind,
        KlNote::RewindNotAccepted,
        KlNote::CdTokenLogRatio,
        KlNote::CdBlockChainBound,
    ];

    /// The code as written in outputs (`selection-bound`, …).
    pub fn code(self) -> &'static str {
        match self {
            KlNote::Reference => "reference",
            KlNote::SelectionBound => "selection-bound",
            KlNote::SoftSelection => "soft-selection",
            KlNote::SoftSelectionBoundOnly => "soft-selection-bound-only",
            KlNote::Rewind => "rewind",
            KlNote::RewindNotAccepted => "rewind-not-accepted",
            KlNote::CdTokenLogRatio => "cd-token-log-ratio",
            KlNote::CdBlockChainBound => "cd-block-chain-bound",
        }
    }

    /// The note whose code is `code`.
    pub fn from_code(code: &str) -> Option<KlNote> {
        KlNote::ALL.into_iter().find(|n| n.code() == code)
    }

    /// What `kl_bound` and `kl_estimate` are under this note, in nats.
    pub fn explain(self) -> &'static str {
        match self {
            KlNote::Reference => {
                "sample returns a draw from the reference p itself: KL(π‖p) = 0 nats exactly \
                 (kl_bound = kl_estimate = 0)."
            }
            KlNote::SelectionBound => {
                "kl_bound = log n − (n−1)/n, an upper bound on KL(π_n‖p) for best-of-n and \
                 worst-of-n (arXiv 2401.01879 Thm 3.1), loose when p repeats outputs. \
                 kl_estimate = E[D̂(ε)], the estimator of 2401.01879 §4 averaged over the \
                 best-of-n (worst-of-n) law of the empirical distribution of this output's n \
                 candidates (one outcome per distinct text; ε = the share of the candidates \
                 whose reward ties the returned one): it estimates KL(π_n‖p) and falls below \
                 the bound when the candidates repeat (distinct_candidates < n)."
            }
            KlNote::SoftSelection => {
                "kl_bound = log n: soft best-of-n's density ratio to p is at most n, so its KL \
                 is at most log n. kl_estimate = the exact KL of soft best-of-n (its λ) applied \
                 to the empirical distribution of the n candidates: a plug-in estimate of \
                 KL(soft-bon‖p)."
            }
            KlNote::SoftSelectionBoundOnly => {
                "kl_bound = log n (soft best-of-n's density ratio to p is at most n). No \
                 kl_estimate: the exact soft best-of-n law of the candidates' empirical \
                 distribution was too large to enumerate."
            }
            KlNote::Rewind => {
                "Rewind-and-repeat returns p conditioned on A = {reward ≥ threshold}, whose KL \
                 from p is exactly log 1/p(A) (arXiv 2401.01879 §6); no bound is known before \
                 p(A) is (kl_bound null). kl_estimate = log(draws/accepted): the \
                 maximum-likelihood estimate of log 1/p(A) from the draws made, which stop \
                 after the first batch of n holding a draw in A. It is biased and its law \
                 depends on n: with n = 1 the number of draws is geometric and the estimate \
                 falls short of log 1/p(A) on average (by about 0.577 nats, Euler's γ, when \
                 p(A) is small); the bias vanishes as n·p(A) grows."
            }
            KlNote::RewindNotAccepted => {
                "Rewind-and-repeat: no draw cleared the threshold within max_draws, so p(A) is \
                 below about 1/draws and exact rewind's KL log 1/p(A) would be above about \
                 log(draws); the output is the best draw instead (accepted = false), and there \
                 is neither bound nor estimate (both null)."
            }
            KlNote::CdTokenLogRatio => {
                "kl_estimate = log π(y)/p(y) of this output under cd-token, summed exactly over \
                 its steps (p = the model at temperature 1 without truncation, so the top-k \
                 truncation is included): a single-sample estimate whose mean over outputs is \
                 an unbiased Monte-Carlo estimate of KL(π‖p) (arXiv 2310.17022). kl_bound: \
                 none (null)."
            }
            KlNote::CdBlockChainBound => {
                "kl_bound = B·(log K − (K−1)/K) for this output's B blocks of best-of-K. Each \
                 block is best-of-K of p's continuations under the scorer, so its KL given the \
                 prefix is at most log K − (K−1)/K (arXiv 2401.01879 Thm 3.1); by the chain \
                 rule KL(π‖p) ≤ E_π[B]·(log K − (K−1)/K). The bound is on the expected KL: this \
                 value's mean over outputs estimates it (it equals it when every output has the \
                 same B); it does not bound this output's own log π(y)/p(y). kl_estimate: none \
                 (null)."
            }
        }
    }
}

/// One output (a choice) of a request: what was returned, what it cost, what it bought.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Its index among the request's choices.
    pub choice: usize,
    /// The returned text.
    pub text: String,
    /// Its tokens (not serialised).
    #[serde(skip)]
    pub tokens: Vec<TokenId>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Its reward.
    pub reward: f64,
    /// Index of the returned candidate in `candidates`.
    pub selected: usize,
    /// The strategy's name.
    pub strategy: String,
    /// Candidates per draw batch (bon, won, soft-bon, rewind; absent for sample and the cd
    /// strategies, whose batches are their own parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// The request's seed.
    pub seed: u64,
    /// Candidates drawn (n, rewind's draws, cd-block's blocks × K, 1 for sample/cd-token).
    pub draws: usize,
    /// Distinct texts among the candidates (what `kl_estimate` of bon/won/soft-bon rests on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct_candidates: Option<usize>,
    /// Rewind only: whether a draw cleared the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
    /// cd-block only: the number of blocks B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<usize>,
    /// Upper bound on KL(π‖p), nats (null when there is none).
    pub kl_bound: Option<f64>,
    /// Estimate of KL(π‖p), nats (null when it cannot be formed).
    pub kl_estimate: Option<f64>,
    /// What `kl_bound` and `kl_estimate` are: see [`KlNote::explain`].
    pub kl_note: KlNote,
    /// Units of the divergences: always `nats`.
    pub units: String,
    /// Every candidate, in draw order (for cd strategies, the output itself).
    pub candidates: Vec<Candidate>,
    /// cd strategies: each prefix scorer's value at the output's last drawn token, with its
    /// weight (the guide was Σ weight·value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scorer_values: Vec<ScorerValue>,
    /// The output's value under each reward of the request's `report_rewards`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardValue>,
    /// Drawn from a remote engine: which, and what its numbers rest on (absent for the
    /// local model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<RemoteNote>,
}

/// What an output drawn from a remote engine rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteNote {
    /// The engine's API base.
    pub url: String,
    /// The model it served.
    pub model: String,
    /// How the candidates were drawn: `"n"` (one request with `n`, the engine's own
    /// seeding) or `"per-candidate"` (one request per candidate, each with its seed,
    /// because the engine ignores `n`).
    pub requests: String,
    /// Where each candidate's `log_prob` comes from: always `"engine"` (the sum of the
    /// token log-probabilities the engine returned). The KL numbers of the strategies that
    /// select among candidates (bon, won, soft-bon, rewind) do not depend on them.
    pub log_probs: String,
    /// How the prompt reached the engine: raw to `/completions`, a chat rendered by tilt
    /// with the model's chat template (named) to `/completions`, or a chat to
    /// `/chat/completions` rendered by the engine.
    pub prompt: String,
}

/// An output's value under one named reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardValue {
    /// The reward's name in the engine.
    pub name: String,
    /// The output's reward under it.
    pub value: f64,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt (after the chat template).
    pub prompt_tokens: usize,
    /// Tokens generated, over every candidate drawn (cd-block: every continuation).
    pub completion_tokens: usize,
}

/// The result of a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's index.
    pub index: u64,
    /// The prompt as the reward saw it ([`Input::reward_prompt`]).
    pub prompt: String,
    /// One per choice, in order.
    pub outputs: Vec<Output>,
    /// Token counts.
    pub usage: Usage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_round_trips() {
        let r = Request {
            input: Input::Messages(vec![
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::user("Name a fruit."),
            ]),
            index: 3,
            params: Params {
                strategy: Strategy::SoftBon {
                    n: 4,
                    lambda: 0.5,
                    sampling: tilt_models::sampling::SamplingParams::new(0.8, None, Some(0.9))
                        .unwrap(),
                },
                choices: 2,
                seed: 7,
                max_new_tokens: 9,
                stop: vec!["\n".into()],
                reward: Some("minilm".into()),
                report_rewards: vec!["other".into()],
            },
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r, "{j}");
        assert_eq!(r.input.reward_prompt(), "Name a fruit.");
        r.validate().unwrap();
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let ok = Request::new(
            Input::Prompt("x".into()),
            Params::new(Strategy::Sample {
                sampling: Default::default(),
            }),
        );
        ok.validate().unwrap();
        let mut cases: Vec<(Request, &str)> = Vec::new();
        let mut r = ok.clone();
        r.input = Input::Prompt("  ".into());
        cases.push((r, "prompt"));
        let mut r = ok.clone();
        r.input = Input::Messages(vec![ChatMessage::new(Role::System, "x")]);
        cases.push((r, "messages"));
        let mut r = ok.clone();
        r.params.choices = 0;
        cases.push((r, "choices"));
        let mut r = ok.clone();
        r.params.max_new_tokens = 0;
        cases.push((r, "max_new_tokens"));
        let mut r = ok.clone();
        r.params.stop = vec![String::new()];
        cases.push((r, "stop"));
        let mut r = ok.clone();
        r.index = 1 << 31;
        cases.push((r, "index"));
        for (r, param) in cases {
            assert_eq!(r.validate().unwrap_err().param(), Some(param));
        }
        for bad in [
            r#"{"input":{"prompt":"x"},"params":{"strategy":{"name":"sample"}},"extra":1}"#,
            r#"{"input":{"text":"x"},"params":{"strategy":{"name":"sample"}}}"#,
            r#"{"input":{"prompt":"x"},"params":{"strategy":{"name":"sample"},"max_new_tokens":"8"}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_kl_note_has_a_code_and_an_explanation() {
        for n in KlNote::ALL {
            assert_eq!(KlNote::from_code(n.code()), Some(n));
            let j = serde_json::to_string(&n).unwrap();
            assert_eq!(j, format!("\"{}\"", n.code()));
            assert!(n.explain().len() > 40);
        }
    }
}
