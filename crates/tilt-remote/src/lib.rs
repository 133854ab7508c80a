//! # tilt-remote: candidates from engines tilt does not run itself
//!
//! Users who outgrow one CPU already serve their models with vLLM, SGLang or a llama.cpp
//! server, all of which speak OpenAI's HTTP API. tilt's place is in front of them: it draws
//! candidates from the engine, scores them with its rewards, selects, and accounts for KL,
//! so that scale comes from the engine and not from a cluster of tilt's own.
//!
//! [`RemotePolicy`] is what the strategies need of such an engine: `n` candidates for a
//! prompt, each with its text, why it stopped and the log-probability of each of its
//! tokens, and (where the engine can) the log-probability of a given text. [`OpenAiEngine`]
//! implements it over `/v1/completions` and `/v1/chat/completions`, from an
//! [`EngineSpec`] (`openai:URL[,model=NAME][,api-key-env=VAR][,max-concurrency=K]…`).
//!
//! What an engine offers is found out once, at connection ([`EngineInfo`], the probe):
//! its models (`GET /models`), whether it honours `n` (a two-candidate, one-token
//! completion must come back with two choices; llama-cpp-python returns one, so tilt then
//! sends one request per candidate, each with its own seed), whether it returns token
//! log-probabilities, and whether it can score a given text (`echo` with `logprobs`).
//! Every later answer is checked against what was asked: a wrong number of choices, a
//! missing log-probability, malformed JSON or a status other than 2xx is a
//! [`RemoteError`] naming the engine and quoting what it answered; nothing partial is
//! returned as complete.
#![deny(missing_docs)]

mod http;
pub mod net;
mod openai;

pub use openai::OpenAiEngine;

use std::time::Duration;

/// Default time allowed for one HTTP request to an engine (connect, generate, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default number of requests in flight at once to one engine.
pub const DEFAULT_MAX_CONCURRENCY: usize = 8;
/// Most requests in flight at once to one engine.
pub const MAX_CONCURRENCY: usize = 256;
/// Default number of retries of a request that met 429, 502, 503, 504 or a dropped
/// connection.
pub const DEFAULT_RETRIES: u32 = 3;
/// Most retries of one request.
pub const MAX_RETRIES: u32 = 10;

/// What can go wrong with a remote engine. Every variant names the engine (its URL).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The engine cannot be used as given: a malformed spec, an API key variable that is
    /// not set, a model the engine does not serve, a strategy it cannot run. Trying again
    /// will not help.
    #[error("engine {engine}: {message}")]
    Invalid {
        /// The engine (its spec or URL).
        engine: String,
        /// What is wrong.
        message: String,
    },
    /// The engine failed or answered something unusable: a status other than 2xx (after
    /// the retries, for 429/5xx), a timeout, a dropped connection, malformed JSON, fewer
    /// choices than asked, a missing log-probability.
    #[error("engine {engine}: {message}")]
    Failed {
        /// The engine's URL.
        engine: String,
        /// What happened, with what it answered.
        message: String,
    },
}

impl RemoteError {
    /// Whether the error is the caller's configuration rather than the engine failing.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, RemoteError::Invalid { .. })
    }
}

pub(crate) use net::{quote, quote_excerpt};

/// A remote engine as data: `openai:URL` followed by comma-separated options.
///
/// `URL` is the API's base, the part before `/completions` (`http://host:8000/v1`).
/// Options: `model=NAME` (default: the first model the engine lists), `api-key-env=VAR`
/// (send `Authorization: Bearer $VAR`), `max-concurrency=K` (requests in flight at once,
/// default [`DEFAULT_MAX_CONCURRENCY`]), `timeout=SECS` (per request, default 300),
/// `retries=R` (default [`DEFAULT_RETRIES`]), `echo-prefix=TEXT` (put before a text scored
/// by `echo`: the model's BOS token where the engine's echo needs it),
/// `chat-template=FILE.gguf|default` (render chat prompts with the chat template that GGUF
/// file ships, `default` the embedded default model's, and send them to `/completions`:
/// for an engine serving that model whose chat endpoint lacks log-probabilities or `n`).
/// The template is loaded by the caller; this crate keeps the value.
///
/// ```
/// use tilt_remote::EngineSpec;
/// let s = EngineSpec::parse("openai:http://127.0.0.1:8000/v1,model=m,max-concurrency=4").unwrap();
/// assert_eq!((s.url.as_str(), s.model.as_deref(), s.max_concurrency), ("http://127.0.0.1:8000/v1", Some("m"), 4));
/// assert!(EngineSpec::parse("vllm:http://x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineSpec {
    /// The API base (no trailing `/`).
    pub url: String,
    /// The model to ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The environment variable holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// Per-request timeout in seconds.
    pub timeout_s: u64,
    /// Retries on 429/502/503/504 and dropped connections.
    pub retries: u32,
    /// Text put before what [`RemotePolicy::log_prob`] scores (the model's BOS token, for an
    /// engine whose echo is right only after it, as llama-cpp-python's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_prefix: Option<String>,
    /// Where the model's chat template comes from (a GGUF path, or `default`), when tilt
    /// renders chat prompts itself and sends them to `/completions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

impl EngineSpec {
    /// Parse `openai:URL[,key=value…]` (options in the type's docs).
    ///
    /// # Errors
    /// [`RemoteError::Invalid`] naming the spec and what is wrong with it.
    pub fn parse(spec: &str) -> Result<EngineSpec, RemoteError> {
        let bad = |message: String| RemoteError::Invalid {
            engine: spec.to_string(),
            message,
        };
        let Some(rest) = spec.strip_prefix("openai:") else {
            return Err(bad(
                "expected openai:URL[,model=NAME][,api-key-env=VAR][,max-concurrency=K]\
                 [,timeout=SECS][,retries=R][,echo-prefix=TEXT][,chat-template=FILE.gguf|default] (only OpenAI-compatible engines are supported)"
                    .into(),
            ));
        };
        let mut parts = rest.split(',');
        let url = parts.next().unwrap_or("").trim_end_matches('/').to_string();
        net::check_url(&url).map_err(|m| bad(format!("URL {}: {m}", quote(&url))))?;
        let mut out = EngineSpec {
            url,
            model: None,
            api_key_env: None,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            timeout_s: DEFAULT_TIMEOUT.as_secs(),
            retries: DEFAULT_RETRIES,
            echo_prefix: None,
            chat_template: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for part in parts {
            let Some((k, v)) = part.split_once('=') else {
                return Err(bad(format!("option {} is not key=value", quote(part))));
            };
            if seen.contains(&k) {
                return Err(bad(format!("option {k} is given twice")));
            }
            seen.push(k);
            let number = |max: u64| -> Result<u64, RemoteError> {
                match v.parse::<u64>() {
                    Ok(x) if (1..=max).contains(&x) => Ok(x),
                    _ => Err(bad(format!(
                        "{k}={} is not a whole number from 1 to {max}",
                        quote(v)
                    ))),
                }
            };
            match k {
                "model" if !v.is_empty() => out.model = Some(v.to_string()),
                "echo-prefix" if !v.is_empty() => out.echo_prefix = Some(v.to_string()),
                "chat-template" if !v.is_empty() => out.chat_template = Some(v.to_string()),
                "api-key-env" if !v.is_empty() => out.api_key_env = Some(v.to_string()),
                "max-concurrency" => out.max_concurrency = number(MAX_CONCURRENCY as u64)? as usize,
                "timeout" => out.timeout_s = number(24 * 3600)?,
                "retries" => {
                    out.retries = match v.parse::<u32>() {
                        Ok(r) if r <= MAX_RETRIES => r,
                        _ => {
                            return Err(bad(format!(
                                "retries={} is not a whole number from 0 to {MAX_RETRIES}",
                                quote(v)
                            )))
                        }
                    }
                }
                "model" | "api-key-env" | "echo-prefix" | "chat-template" => {
                    return Err(bad(format!("{k} is empty")))
                }
                other => {
                    return Err(bad(format!(
                        "unknown option {} (options: model, api-key-env, max-concurrency, \
                         timeout, retries, echo-prefix, chat-template)",
                        quote(other)
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The spec written back (`openai:URL,model=…`), as manifests record it.
    pub fn to_spec_string(&self) -> String {
        let mut s = format!("openai:{}", self.url);
        if let Some(m) = &self.model {
            s.push_str(&format!(",model={m}"));
        }
        if let Some(k) = &self.api_key_env {
            s.push_str(&format!(",api-key-env={k}"));
        }
        if self.max_concurrency != DEFAULT_MAX_CONCURRENCY {
            s.push_str(&format!(",max-concurrency={}", self.max_concurrency));
        }
        if self.timeout_s != DEFAULT_TIMEOUT.as_secs() {
            s.push_str(&format!(",timeout={}", self.timeout_s));
        }
        if self.retries != DEFAULT_RETRIES {
            s.push_str(&format!(",retries={}", self.retries));
        }
        if let Some(p) = &self.echo_prefix {
            s.push_str(&format!(",echo-prefix={p}"));
        }
        if let Some(t) = &self.chat_template {
            s.push_str(&format!(",chat-template={t}"));
        }
        s
    }
}

/// One chat message, as the engine's `/chat/completions` takes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to continue: a raw text (`/completions`) or a conversation (`/chat/completions`,
/// rendered by the engine's own chat template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A text continued as it is.
    Text(String),
    /// A conversation.
    Chat(Vec<Message>),
}

/// A request for candidates: one per seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask<'a> {
    /// What to continue.
    pub prompt: &'a Prompt,
    /// Most new tokens per candidate.
    pub max_tokens: usize,
    /// Sampling temperature (1: the model's own law).
    pub temperature: f64,
    /// Nucleus mass, when truncating.
    pub top_p: Option<f64>,
    /// Top-k, when truncating (not part of OpenAI's API; vLLM, SGLang, llama.cpp and tilt
    /// accept it).
    pub top_k: Option<usize>,
    /// Stop sequences.
    pub stop: &'a [String],
    /// One seed per candidate: the number of candidates is their count. Where the engine
    /// honours `n`, one request asks for all with the first seed; otherwise each candidate
    /// is its own request with its own seed.
    pub seeds: &'a [u64],
}

/// Why a candidate stopped, as the engine says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end token or a stop sequence (`finish_reason: "stop"`).
    Stop,
    /// The token budget (`finish_reason: "length"`).
    Length,
}

/// One candidate from the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The text.
    pub text: String,
    /// Why it stopped.
    pub finish: Finish,
    /// The engine's log-probability of each generated token, nats.
    pub token_log_probs: Vec<f64>,
    /// The generated tokens as the engine spells them.
    pub tokens: Vec<String>,
}

impl Completion {
    /// log p(text | prompt) as the engine reports it: the sum of the token log-probabilities.
    pub fn log_prob(&self) -> f64 {
        self.token_log_probs.iter().sum()
    }
}

/// The candidates of one [`Ask`], with the engine's token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Completions {
    /// One per seed, in order.
    pub candidates: Vec<Completion>,
    /// Tokens of the prompt as the engine counted them (from its `usage`; 0 if it sent none).
    pub prompt_tokens: usize,
    /// Tokens generated over all candidates.
    pub completion_tokens: usize,
    /// HTTP requests it took (retries included).
    pub requests: usize,
}

/// log p(response | prompt) of a given text under the engine ([`RemotePolicy::log_prob`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TextLogProb {
    /// The response's tokens as the engine spells them.
    pub tokens: Vec<String>,
    /// log p of each, nats.
    pub token_log_probs: Vec<f64>,
    /// Their sum, nats.
    pub total: f64,
}

/// What the probe found one endpoint (`/completions` or `/chat/completions`) offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EndpointInfo {
    /// Whether it answered the probe at all.
    pub available: bool,
    /// Whether one request with `n = 2` returned two choices (else: one request per
    /// candidate, each with its own seed).
    pub honours_n: bool,
    /// Whether it returns each generated token's log-probability.
    pub log_probs: bool,
}

/// What the probe found an engine offers; every output drawn from it reports this.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineInfo {
    /// The API base.
    pub url: String,
    /// The model asked for.
    pub model: String,
    /// `/completions` (raw text prompts).
    pub completions: EndpointInfo,
    /// `/chat/completions` (conversations, templated by the engine).
    pub chat: EndpointInfo,
    /// How the engine scores a given text (None: the probe found no way).
    pub scoring: Option<Scoring>,
}

/// A route by which an engine gives the log-probabilities of a given text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// `/completions` with `echo` and `logprobs` (OpenAI's completions API; vLLM,
    /// llama-cpp-python after a BOS token).
    Echo,
    /// `/completions` with vLLM's `prompt_logprobs` extension.
    PromptLogprobs,
    /// SGLang's native `/generate` with `return_logprob` and `logprob_start_len: 0`.
    SglangGenerate,
}

/// A language model behind an API, as tilt's strategies use it.
pub trait RemotePolicy: Send + Sync {
    /// What the engine offers (found at connection).
    fn info(&self) -> &EngineInfo;
    /// One candidate per seed of `ask`, each with its token log-probabilities.
    ///
    /// # Errors
    /// [`RemoteError`] naming the engine; never fewer candidates than seeds.
    fn complete(&self, ask: &Ask<'_>) -> Result<Completions, RemoteError>;
    /// log p(response | prompt) token by token, where the engine can score a given text.
    ///
    /// # Errors
    /// [`RemoteError::Invalid`] when it cannot ([`EngineInfo::scoring`] None);
    /// [`RemoteError::Failed`] when it fails.
    fn log_prob(&self, prompt: &str, response: &str) -> Result<TextLogProb, RemoteError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_round_trip_and_reject() {
        let s = EngineSpec::parse(
            "openai:http://h:8000/v1/,model=a,api-key-env=K,max-concurrency=3,timeout=9,retries=0,echo-prefix=<s>,chat-template=default",
        )
        .unwrap();
        assert_eq!(s.url, "http://h:8000/v1");
        assert_eq!(
            (s.model.as_deref(), s.api_key_env.as_deref()),
            (Some("a"), Some("K"))
        );
        assert_eq!((s.max_concurrency, s.timeout_s, s.retries), (3, 9, 0));
        assert_eq!(s.chat_template.as_deref(), Some("default"));
        assert_eq!(EngineSpec::parse(&s.to_spec_string()).unwrap(), s);
        let d = EngineSpec::parse("openai:http://127.0.0.1:1/v1").unwrap();
        assert_eq!(d.to_spec_string(), "openai:http://127.0.0.1:1/v1");
        for (bad, says) in [
            ("http://h/v1", "expected openai:URL"),
            ("openai:", "URL \"\""),
            ("openai:ftp://h", "http://"),
            ("openai:https://h/v1", "https"),
            ("openai:http://h/v1,model", "not key=value"),
            ("openai:http://h/v1,model=", "model is empty"),
            (
                "openai:http://h/v1,chat-template=",
                "chat-template is empty",
            ),
            (
                "openai:http://h/v1,max-concurrency=0",
                "max-concurrency=\"0\"",
            ),
            ("openai:http://h/v1,max-concurrency=x", "from 1 to 256"),
            ("openai:http://h/v1,retries=11", "retries=\"11\""),
            ("openai:http://h/v1,colour=red", "unknown option \"colour\""),
            ("openai:http://h/v1,model=a,model=b", "given twice"),
        ] {
            let e = EngineSpec::parse(bad).unwrap_err();
            assert!(e.is_invalid_input(), "{bad}");
            let m = e.to_string();
            assert!(m.contains(says) && m.contains(bad), "{bad}: {m}");
        }
    }
}
