//! The OpenAI request and response shapes, and their translation to and from the engine's
//! types. One request type serves both `/v1/chat/completions` (`messages`) and
//! `/v1/completions` (`prompt`); every field is checked, and an unknown or misspelt one is
//! a 400 naming it (a silently ignored `n` is what users of other servers complain of).
//!
//! Alignment parameters sit at the top level of the request, which is where the openai
//! Python client's `extra_body` puts them: `strategy` (`sample` by default, `bon`, `won`,
//! `soft-bon`, `rewind`, `cd-token`, `cd-block`), `candidates` (the strategy's n),
//! `lambda`, `threshold`, `max_draws`, `top_k`, `block_k`, `block_m`, `scorer` (a name or a
//! list of `{name, weight}`: the weighted sum), `reward`, `report_rewards`,
//! `return_candidates`.

use crate::api_error::ApiError;
use serde::{Deserialize, Serialize};
use tilt_engine::cd::ScorerValue;
use tilt_engine::request::FinishReason;
use tilt_engine::{
    ChatMessage, EngineError, Input, Output, Params, Response, RewardValue, Role, ScorerSpec,
    Strategy, StrategyOptions,
};

/// Most alternatives per token a chat request may ask (`top_logprobs`), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most alternatives per token a completion may ask (`logprobs`), as OpenAI allows.
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A chat message as OpenAI clients send it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    /// `system`, `developer` (read as system), `user` or `assistant`.
    pub role: String,
    /// The text (a string, or a list of `{"type": "text", "text": …}` parts).
    pub content: serde_json::Value,
    /// Ignored name of the speaker.
    #[serde(default)]
    pub name: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A completion request, chat or not (see the module docs).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The model's id (as `/v1/models` lists it).
    pub model: Option<String>,
    /// The conversation (chat completions).
    pub messages: Option<Vec<WireMessage>>,
    /// The text to continue (completions).
    pub prompt: Option<OneOrMany>,
    /// Most new tokens per candidate.
    pub max_tokens: Option<usize>,
    /// The same, newer name.
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Choices to return.
    pub n: Option<usize>,
    /// Seed of every random choice (absent: a fresh one, reported back).
    pub seed: Option<u64>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Stop sequences.
    pub stop: Option<OneOrMany>,
    /// Chat: whether to return log-probabilities; completions: how many alternatives (only
    /// 0 is supported).
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token (only 0 is supported).
    pub top_logprobs: Option<u32>,
    /// The end user (recorded in logs only).
    pub user: Option<String>,
    /// The alignment strategy.
    pub strategy: Option<String>,
    /// Candidates per choice (the strategy's n).
    pub candidates: Option<usize>,
    /// soft-bon's temperature or cd-token's guidance.
    pub lambda: Option<f64>,
    /// rewind's acceptance threshold.
    pub threshold: Option<f64>,
    /// rewind's cap on draws.
    pub max_draws: Option<usize>,
    /// Sampling top-k; cd-token's candidates per step.
    pub top_k: Option<usize>,
    /// cd-block's K.
    pub block_k: Option<usize>,
    /// cd-block's M.
    pub block_m: Option<usize>,
    /// A configured prefix scorer's name, or a weighted sum of several:
    /// `[{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}]`.
    pub scorer: Option<ScorerSpec>,
    /// A configured reward's name.
    pub reward: Option<String>,
    /// Further configured rewards each choice is scored with, reported in its `tilt.rewards`.
    pub report_rewards: Option<Vec<String>>,
    /// Return every candidate (text and reward) in each choice's `tilt` object.
    pub return_candidates: Option<bool>,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// The request field that sets an engine parameter.
pub fn field_of(param: &str, endpoint: Endpoint) -> String {
    match param {
        "n" => "candidates".into(),
        "choices" => "n".into(),
        "max_new_tokens" => "max_tokens".into(),
        "prompt" if endpoint == Endpoint::Chat => "messages".into(),
        other => other.into(),
    }
}

/// Parse a request body, naming the field of any error.
///
/// # Errors
/// A 400 naming the field (unknown, misspelt, or of the wrong type).
pub fn parse(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    // serde reads a struct from a JSON array too (fields by position): refuse anything but
    // an object first, so `[1]` is not answered with an error about `model`.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid(
            "body",
            "the request body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // An unknown field: serde says which.
        let unknown = text
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string);
        match unknown {
            Some(f) => ApiError::invalid(
                // serde_path_to_error's path already ends at the unknown key.
                if path == "." || path.is_empty() {
                    f.clone()
                } else if path == f || path.ends_with(&format!(".{f}")) {
                    path.clone()
                } else {
                    format!("{path}.{f}")
                },
                format!("unknown field {f:?} (not an OpenAI or tilt request field)"),
            )
            .code("unknown_field"),
            None if path == "." || path.is_empty() => {
                ApiError::invalid("body", format!("not a JSON request object: {text}"))
            }
            None => ApiError::invalid(path, text),
        }
    })
}

/// A request translated for the engine, with what the answer needs.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The engine's requests (one per prompt of a completions `prompt` list).
    pub requests: Vec<tilt_engine::Request>,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Return per-token log-probabilities.
    pub logprobs: bool,
    /// With them, this many most likely alternatives per token.
    pub top_logprobs: usize,
    /// Return every candidate.
    pub return_candidates: bool,
}

fn text_of(content: &serde_json::Value, i: usize) -> Result<String, ApiError> {
    let field = format!("messages[{i}].content");
    match content {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(|t| t.as_str()), p.get("text")) {
                    (Some("text"), Some(serde_json::Value::String(t))) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}[{j}]"),
                            "only text parts ({\"type\": \"text\", \"text\": …}) are supported",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            field,
            "must be a string or a list of text parts",
        )),
    }
}

impl CompletionRequest {
    /// Check the request for `endpoint` and translate it for the engine (`model_id` is the
    /// served model; `default_max_tokens` the budget when none is given).
    ///
    /// # Errors
    /// A 400 naming the field, or 404 for another model.
    pub fn translate(
        self,
        endpoint: Endpoint,
        model_id: &str,
        default_max_tokens: usize,
        fresh_seed: u64,
    ) -> Result<Translated, ApiError> {
        if let Some(m) = &self.model {
            if m != model_id {
                return Err(ApiError {
                    param: Some("model".into()),
                    ..ApiError::new(
                        axum::http::StatusCode::NOT_FOUND,
                        format!(
                            "model: {m:?} is not served here (this server serves {model_id:?})"
                        ),
                    )
                }
                .code("model_not_found"));
            }
        }
        let inputs: Vec<Input> = match (endpoint, self.messages, self.prompt) {
            (Endpoint::Chat, Some(msgs), None) => {
                let mut out = Vec::with_capacity(msgs.len());
                for (i, m) in msgs.iter().enumerate() {
                    let role = match m.role.as_str() {
                        "system" | "developer" => Role::System,
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        other => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].role"),
                                format!(
                                "{other:?} is not supported (system, developer, user, assistant)"
                            ),
                            ))
                        }
                    };
                    out.push(ChatMessage::new(role, text_of(&m.content, i)?));
                }
                vec![Input::Messages(out)]
            }
            (Endpoint::Chat, None, _) => {
                return Err(ApiError::invalid(
                    "messages",
                    "a chat completion needs messages",
                ))
            }
            (Endpoint::Chat, Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "a chat completion takes messages, not prompt",
                ))
            }
            (Endpoint::Completions, None, Some(p)) => {
                let v = p.into_vec();
                if v.is_empty() {
                    return Err(ApiError::invalid("prompt", "an empty list of prompts"));
                }
                v.into_iter().map(Input::Raw).collect()
            }
            (Endpoint::Completions, _, None) => {
                return Err(ApiError::invalid("prompt", "a completion needs a prompt"))
            }
            (Endpoint::Completions, Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "a completion takes prompt, not messages",
                ))
            }
        };
        // Chat: `logprobs: true` and `top_logprobs` 0–20 alternatives; completions: `logprobs`
        // is itself the number of alternatives, 0–5 (OpenAI's limits).
        let (logprobs, top_logprobs) = match (endpoint, &self.logprobs) {
            (Endpoint::Chat, None | Some(serde_json::Value::Null)) => (false, 0),
            (Endpoint::Chat, Some(serde_json::Value::Bool(b))) => (*b, 0),
            (Endpoint::Completions, Some(v)) if v.is_u64() => {
                let k = v.as_u64().unwrap_or(0);
                if k > MAX_COMPLETION_LOGPROBS {
                    return Err(ApiError::invalid(
                        "logprobs",
                        format!("{k} alternatives; at most {MAX_COMPLETION_LOGPROBS}"),
                    ));
                }
                (true, k as usize)
            }
            (Endpoint::Completions, None | Some(serde_json::Value::Null)) => (false, 0),
            _ => {
                return Err(ApiError::invalid(
                    "logprobs",
                    match endpoint {
                        Endpoint::Chat => "must be true or false",
                        Endpoint::Completions => "must be a whole number from 0 to 5",
                    },
                ))
            }
        };
        let top_logprobs = match (endpoint, self.top_logprobs) {
            (_, None) => top_logprobs,
            (Endpoint::Completions, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "a completion takes the number of alternatives as logprobs",
                ))
            }
            (Endpoint::Chat, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("{k} alternatives; at most {MAX_TOP_LOGPROBS}"),
                ))
            }
            (Endpoint::Chat, Some(k)) if k > 0 && !logprobs => {
                return Err(ApiError::invalid("top_logprobs", "needs logprobs: true"))
            }
            (Endpoint::Chat, Some(k)) => k as usize,
        };
        if logprobs && self.stream == Some(true) {
            return Err(ApiError::invalid(
                "logprobs",
                "log-probabilities are not sent in streamed chunks yet; leave stream out",
            ));
        }
        let max_new_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "max_completion_tokens",
                    "give max_tokens or max_completion_tokens, not both",
                ))
            }
            (Some(m), None) | (None, Some(m)) => m,
            (None, None) => default_max_tokens,
        };
        let name = self.strategy.as_deref().unwrap_or("sample");
        let options = StrategyOptions {
            n: self.candidates,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            lambda: self.lambda,
            threshold: self.threshold,
            max_draws: self.max_draws,
            block_k: self.block_k,
            block_m: self.block_m,
            scorer: self.scorer.clone(),
        };
        let field = |p: &str| field_of(p, endpoint);
        let strategy =
            Strategy::from_options(name, &options).map_err(|e| ApiError::from_engine(&e, field))?;
        let params = Params {
            strategy,
            choices: self.n.unwrap_or(1),
            seed: self.seed.unwrap_or(fresh_seed),
            max_new_tokens,
            stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            reward: self.reward.clone(),
            report_rewards: self.report_rewards.clone().unwrap_or_default(),
        };
        params
            .validate()
            .map_err(|e| ApiError::from_engine(&e, field))?;
        if let Some(u) = &self.user {
            tracing::debug!(user = %u, "request");
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "only with stream: true",
            ));
        }
        Ok(Translated {
            requests: inputs
                .into_iter()
                .map(|input| tilt_engine::Request::new(input, params.clone()))
                .collect(),
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs,
            top_logprobs,
            return_candidates: self.return_candidates.unwrap_or(false),
        })
    }
}

/// OpenAI's finish reason.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One candidate in the `tilt` object.
#[derive(Debug, Clone, Serialize)]
pub struct TiltCandidate {
    /// Its text.
    pub text: String,
    /// Its reward.
    pub reward: f64,
    /// Its tokens generated.
    pub new_tokens: usize,
    /// log p(text | prompt) under the policy at temperature 1 (a remote engine's: as it
    /// reported it), nats.
    pub log_prob: f64,
}

/// The per-choice `tilt` object: what the answer cost (KL, nats) and bought (reward).
#[derive(Debug, Clone, Serialize)]
pub struct TiltInfo {
    /// The strategy.
    pub strategy: String,
    /// Candidates drawn.
    pub n: usize,
    /// The answer's reward.
    pub reward: f64,
    /// Upper bound on KL(π‖p), nats (null: none).
    pub kl_bound: Option<f64>,
    /// Estimate of KL(π‖p), nats (null: none).
    pub kl_estimate: Option<f64>,
    /// What the two are (`tilt explain CODE`).
    pub kl_note: &'static str,
    /// `nats`.
    pub units: &'static str,
    /// The seed.
    pub seed: u64,
    /// The returned candidate's index among the candidates.
    pub selected: usize,
    /// rewind: whether a draw cleared the threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
    /// cd-block: its blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<usize>,
    /// Every candidate, with `return_candidates`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<TiltCandidate>>,
    /// cd strategies: each prefix scorer's value at the answer's last token, with its weight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scorer_values: Vec<ScorerValue>,
    /// The answer's value under each of `report_rewards`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardValue>,
    /// In front of a remote engine: which, and how the candidates were drawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<tilt_engine::RemoteNote>,
}

impl TiltInfo {
    /// The `tilt` object of an output.
    pub fn of(o: &Output, with_candidates: bool) -> Self {
        TiltInfo {
            strategy: o.strategy.clone(),
            n: o.draws,
            reward: o.reward,
            kl_bound: o.kl_bound,
            kl_estimate: o.kl_estimate,
            kl_note: o.kl_note.code(),
            units: "nats",
            seed: o.seed,
            selected: o.selected,
            accepted: o.accepted,
            blocks: o.blocks,
            candidates: with_candidates.then(|| {
                o.candidates
                    .iter()
                    .map(|c| TiltCandidate {
                        text: c.text.clone(),
                        reward: c.reward,
                        new_tokens: c.new_tokens,
                        log_prob: c.log_prob,
                    })
                    .collect()
            }),
            scorer_values: o.scorer_values.clone(),
            rewards: o.rewards.clone(),
            engine: o.engine.clone(),
        }
    }
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WireUsage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated, over every candidate drawn.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl WireUsage {
    /// The usage of several engine responses.
    pub fn of(responses: &[Response]) -> Self {
        let mut u = WireUsage::default();
        for r in responses {
            u.prompt_tokens += r.usage.prompt_tokens;
            u.completion_tokens += r.usage.completion_tokens;
        }
        u.total_tokens = u.prompt_tokens + u.completion_tokens;
        u
    }
}

/// An engine error for a request at `endpoint`.
pub fn engine_error(e: &EngineError, endpoint: Endpoint) -> ApiError {
    ApiError::from_engine(e, |p| field_of(p, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let e = parse(br#"{"messages": [], "temprature": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temprature"));
        assert_eq!(e.status, 400);
        let e = parse(br#"{"messages": [], "max_tokens": "8"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
        let e =
            parse(br#"{"messages": [{"role": "user", "content": "x", "extra": 1}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].extra"));
        let e = parse(b"[1]").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body"));
    }

    fn translate(body: &str, endpoint: Endpoint) -> Result<Translated, ApiError> {
        parse(body.as_bytes())?.translate(endpoint, "m", 16, 7)
    }

    #[test]
    fn a_field_the_strategy_does_not_read_is_a_400_naming_it() {
        let chat = r#""messages": [{"role": "user", "content": "hi"}]"#;
        for (extra, param) in [
            (r#""strategy": "bon", "threshold": 0.5"#, "threshold"),
            (r#""strategy": "sample", "candidates": 4"#, "candidates"),
            (r#""strategy": "cd-token", "temperature": 1"#, "temperature"),
            (r#""strategy": "beam""#, "strategy"),
            (r#""n": 0"#, "n"),
            (r#""max_tokens": 0"#, "max_tokens"),
            (r#""top_logprobs": 2"#, "top_logprobs"),
            (r#""logprobs": true, "top_logprobs": 21"#, "top_logprobs"),
            (
                r#""logprobs": true, "top_logprobs": 2, "stream": true"#,
                "logprobs",
            ),
            (r#""logprobs": true, "stream": true"#, "logprobs"),
            (r#""logprobs": 2"#, "logprobs"),
            (r#""model": "other""#, "model"),
        ] {
            let e = translate(&format!("{{{chat}, {extra}}}"), Endpoint::Chat).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
        let t = translate(
            &format!(r#"{{{chat}, "strategy": "bon", "candidates": 3, "n": 2, "seed": 5}}"#),
            Endpoint::Chat,
        )
        .unwrap();
        let p = &t.requests[0].params;
        assert_eq!((p.choices, p.seed, p.max_new_tokens), (2, 5, 16));
        assert_eq!(p.strategy.label(), "bon:3");
        let t = translate(r#"{"prompt": ["a", "b"]}"#, Endpoint::Completions).unwrap();
        assert_eq!(t.requests.len(), 2);
        for (body, k) in [(r#""logprobs": 5"#, 5), (r#""logprobs": 0"#, 0)] {
            let t = translate(
                &format!(r#"{{"prompt": "a", {body}}}"#),
                Endpoint::Completions,
            )
            .unwrap();
            assert!(t.logprobs);
            assert_eq!(t.top_logprobs, k);
        }
        for body in [r#""logprobs": 6"#, r#""logprobs": 1, "top_logprobs": 1"#] {
            let e = translate(
                &format!(r#"{{"prompt": "a", {body}}}"#),
                Endpoint::Completions,
            )
            .unwrap_err();
            assert!(e.param.is_some(), "{body}: {}", e.message);
        }
        let t = translate(
            &format!(r#"{{{chat}, "logprobs": true, "top_logprobs": 20}}"#),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(t.top_logprobs, 20);
        assert_eq!(
            t.requests[0].params.seed, 7,
            "a fresh seed when none is given"
        );
    }
}
