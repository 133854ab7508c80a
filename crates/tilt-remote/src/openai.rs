//! [`OpenAiEngine`]: a [`RemotePolicy`] over an OpenAI-compatible HTTP API.
//!
//! Requests follow OpenAI's API reference for `/v1/completions` and `/v1/chat/completions`
//! (<https://platform.openai.com/docs/api-reference/completions>), which vLLM, SGLang,
//! llama.cpp's server, llama-cpp-python and `tilt serve` implement:
//!
//! ```text
//! POST {url}/completions       {"model", "prompt", "max_tokens", "temperature", "n", "seed",
//!                               "logprobs": 1, "stop", ["top_p"], ["top_k"]}
//!   → {"choices": [{"index", "text", "finish_reason",
//!                   "logprobs": {"tokens": [..], "token_logprobs": [..]}}], "usage"}
//! POST {url}/chat/completions  {"model", "messages", …, "logprobs": true}
//!   → {"choices": [{"index", "message": {"content"}, "finish_reason",
//!                   "logprobs": {"content": [{"token", "logprob"}, …]}}], "usage"}
//! POST {url}/completions       {"prompt": PROMPT + RESPONSE, "echo": true, "logprobs": 1,
//!                               "max_tokens": 1}       (scoring a given text)
//!   → "logprobs": {"tokens", "token_logprobs", "text_offset"} over the prompt and the
//!     generated token
//! ```
//!
//! Where `echo` does not work, a given text is scored by one of the two engine-specific
//! routes the probe tries next:
//!
//! ```text
//! POST {url}/completions   {"prompt": TEXT, "max_tokens": 1, "prompt_logprobs": 0}   (vLLM)
//!   → "choices": [{"prompt_logprobs": [null, {"ID": {"logprob", "decoded_token"}}, …]}]
//! POST {root}/generate     {"text": TEXT, "sampling_params": {"max_new_tokens": 1},
//!                           "return_logprob": true, "logprob_start_len": 0,
//!                           "return_text_in_logprobs": true}                  (SGLang)
//!   → {"meta_info": {"input_token_logprobs": [[LOGPROB|null, ID, TOKEN], …]}}
//! ```
//! (`root` is the URL without its trailing `/v1`.)

use crate::http::{Client, QUOTED};
use crate::{
    quote, quote_excerpt, Ask, Completion, Completions, EndpointInfo, EngineInfo, EngineSpec,
    Finish, Prompt, RemoteError, RemotePolicy, Scoring, TextLogProb,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// An engine behind an OpenAI-compatible API: `/completions` and `/chat/completions` as
/// OpenAI's API reference gives them (<https://platform.openai.com/docs/api-reference/completions>),
/// which vLLM, SGLang, llama.cpp's server, llama-cpp-python and `tilt serve` implement.
pub struct OpenAiEngine {
    spec: EngineSpec,
    client: Client,
    info: EngineInfo,
}

impl std::fmt::Debug for OpenAiEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEngine")
            .field("info", &self.info)
            .finish()
    }
}

/// Which endpoint a request goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Completions,
    Chat,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Completions => "/completions",
            Route::Chat => "/chat/completions",
        }
    }
}

impl OpenAiEngine {
    /// Connect to the engine `spec` describes and probe what it offers (module docs of the
    /// crate): `GET /models`, then one-token completions on both endpoints with `n = 2` and
    /// log-probabilities, then an `echo` request.
    ///
    /// # Errors
    /// [`RemoteError::Invalid`] when the API key variable is not set or the engine does not
    /// serve the model asked for; [`RemoteError::Failed`] when `/models` fails or neither
    /// endpoint answers.
    pub fn connect(spec: &EngineSpec) -> Result<OpenAiEngine, RemoteError> {
        let api_key = match &spec.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => {
                    return Err(RemoteError::Invalid {
                        engine: spec.url.clone(),
                        message: format!(
                            "api-key-env={var}, but the environment variable {var} is not set"
                        ),
                    })
                }
            },
        };
        let client = Client::new(
            &spec.url,
            api_key,
            Duration::from_secs(spec.timeout_s),
            spec.retries,
            spec.max_concurrency,
        );
        let fail = |message: String| RemoteError::Failed {
            engine: spec.url.clone(),
            message,
        };
        let (models, _) = client
            .json("/models", None)
            .map_err(|m| fail(format!("probe: {m}")))?;
        let ids: Vec<String> = models
            .get("data")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let model = match &spec.model {
            Some(m) if ids.contains(m) => m.clone(),
            Some(m) => {
                return Err(RemoteError::Invalid {
                    engine: spec.url.clone(),
                    message: format!(
                        "model {} is not among the models it serves ({})",
                        quote(m),
                        ids.iter().map(|i| quote(i)).collect::<Vec<_>>().join(", ")
                    ),
                })
            }
            None => ids.first().cloned().ok_or_else(|| {
                fail(format!(
                    "probe: /models lists no model: {}",
                    quote_excerpt(&models.to_string(), QUOTED)
                ))
            })?,
        };
        let mut engine = OpenAiEngine {
            spec: spec.clone(),
            client,
            info: EngineInfo {
                url: spec.url.clone(),
                model,
                completions: EndpointInfo::default(),
                chat: EndpointInfo::default(),
                scoring: None,
            },
        };
        engine.info.completions = engine.probe(Route::Completions);
        engine.info.chat = engine.probe(Route::Chat);
        if !engine.info.completions.available && !engine.info.chat.available {
            return Err(fail(
                "probe: neither /completions nor /chat/completions answered a one-token request \
                 (see the log for what they said)"
                    .into(),
            ));
        }
        // The first route that scores a probe text correctly is the one used.
        engine.info.scoring = [
            Scoring::Echo,
            Scoring::PromptLogprobs,
            Scoring::SglangGenerate,
        ]
        .into_iter()
        .find(|&route| engine.score_by(route, "The cat", " sat").is_ok());
        tracing::info!(info = ?engine.info, "remote engine probed");
        Ok(engine)
    }

    /// The spec it was made from.
    pub fn spec(&self) -> &EngineSpec {
        &self.spec
    }

    fn fail(&self, message: String) -> RemoteError {
        RemoteError::Failed {
            engine: self.info.url.clone(),
            message,
        }
    }

    fn probe(&self, route: Route) -> EndpointInfo {
        let prompt = match route {
            Route::Completions => Prompt::Text("Hello".into()),
            Route::Chat => Prompt::Chat(vec![crate::Message {
                role: "user".into(),
                content: "Hello".into(),
            }]),
        };
        let ask = Ask {
            prompt: &prompt,
            max_tokens: 1,
            temperature: 1.0,
            top_p: None,
            top_k: None,
            stop: &[],
            seeds: &[1, 2],
        };
        let body = self.body(route, &ask, 2, 1, true);
        match self.client.json(route.path(), Some(&body)) {
            Ok((v, _)) => {
                let choices = v.get("choices").and_then(Value::as_array);
                let n = choices.map_or(0, Vec::len);
                let log_probs = choices
                    .and_then(|c| c.first())
                    .is_some_and(|c| parse_choice(route, c, true).is_ok());
                EndpointInfo {
                    available: n > 0,
                    honours_n: n == 2,
                    log_probs,
                }
            }
            Err(m) => {
                tracing::info!(endpoint = route.path(), error = %m, "probe: endpoint not usable");
                EndpointInfo::default()
            }
        }
    }

    fn body(&self, route: Route, ask: &Ask<'_>, n: usize, seed: u64, log_probs: bool) -> Value {
        let mut b = json!({
            "model": self.info.model,
            "max_tokens": ask.max_tokens,
            "temperature": ask.temperature,
            "n": n,
            "seed": seed,
        });
        match (route, ask.prompt) {
            (Route::Completions, Prompt::Text(t)) => {
                b["prompt"] = json!(t);
                if log_probs {
                    b["logprobs"] = json!(1);
                }
            }
            (_, Prompt::Chat(m)) => {
                b["messages"] = json!(m);
                if log_probs {
                    b["logprobs"] = json!(true);
                }
            }
            (Route::Chat, Prompt::Text(t)) => {
                b["messages"] = json!([{"role": "user", "content": t}]);
                if log_probs {
                    b["logprobs"] = json!(true);
                }
            }
        }
        if !ask.stop.is_empty() {
            b["stop"] = json!(ask.stop);
        }
        if let Some(p) = ask.top_p {
            b["top_p"] = json!(p);
        }
        if let Some(k) = ask.top_k {
            b["top_k"] = json!(k);
        }
        b
    }

    /// One request for `seeds.len()` candidates; checked complete.
    fn request(
        &self,
        route: Route,
        ask: &Ask<'_>,
        n: usize,
        seed: u64,
    ) -> Result<(Vec<Completion>, usize, usize, usize), RemoteError> {
        let body = self.body(route, ask, n, seed, true);
        let (v, attempts) = self
            .client
            .json(route.path(), Some(&body))
            .map_err(|m| self.fail(m))?;
        let choices = v.get("choices").and_then(Value::as_array).ok_or_else(|| {
            self.fail(format!(
                "{}: the answer has no \"choices\" array: {}",
                route.path(),
                quote_excerpt(&v.to_string(), QUOTED)
            ))
        })?;
        if choices.len() != n {
            return Err(self.fail(format!(
                "{}: returned {} choices for n = {n}",
                route.path(),
                choices.len()
            )));
        }
        let mut out: Vec<Option<Completion>> = vec![None; n];
        for (j, c) in choices.iter().enumerate() {
            let i = match c.get("index") {
                None => j,
                Some(x) => x.as_u64().map_or(usize::MAX, |x| x as usize),
            };
            if i >= n || out[i].is_some() {
                return Err(self.fail(format!(
                    "{}: choice {j} has index {}, not a new index below n = {n}",
                    route.path(),
                    c.get("index").map_or("none".into(), Value::to_string)
                )));
            }
            out[i] = Some(
                parse_choice(route, c, true)
                    .map_err(|m| self.fail(format!("{}: choice {i}: {m}", route.path())))?,
            );
        }
        let usage = |k: &str| {
            v.get("usage")
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize
        };
        let completions: Vec<Completion> = out.into_iter().flatten().collect();
        let generated = match usage("completion_tokens") {
            0 => completions.iter().map(|c| c.tokens.len()).sum(),
            u => u,
        };
        Ok((completions, usage("prompt_tokens"), generated, attempts))
    }

    fn route_for(&self, prompt: &Prompt) -> Result<Route, RemoteError> {
        let (route, e) = match prompt {
            Prompt::Text(_) => (Route::Completions, self.info.completions),
            Prompt::Chat(_) => (Route::Chat, self.info.chat),
        };
        if !e.available {
            return Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: format!(
                    "{} did not answer the probe, so {} prompts cannot be sent to it",
                    route.path(),
                    if route == Route::Chat {
                        "chat"
                    } else {
                        "raw-text"
                    }
                ),
            });
        }
        if !e.log_probs {
            return Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: format!(
                    "{} returns no token log-probabilities; tilt reports log p(y) of every \
                     candidate and needs them{}",
                    route.path(),
                    if route == Route::Chat && self.info.completions.log_probs {
                        " (/completions does: send the prompt raw, with the chat template \
                         written out if the model needs one, e.g. --no-chat-template)"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(route)
    }
}

/// A choice's text, finish and token log-probabilities.
fn parse_choice(route: Route, c: &Value, need_log_probs: bool) -> Result<Completion, String> {
    let text = match route {
        Route::Completions => c.get("text").and_then(Value::as_str),
        Route::Chat => c
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str),
    }
    .ok_or_else(|| {
        format!(
            "no text ({}): {}",
            if route == Route::Chat {
                "message.content"
            } else {
                "text"
            },
            quote_excerpt(&c.to_string(), QUOTED)
        )
    })?
    .to_string();
    let finish = match c.get("finish_reason").and_then(Value::as_str) {
        Some("stop") | Some("eos") => Finish::Stop,
        Some("length") => Finish::Length,
        other => {
            return Err(format!(
                "finish_reason is {}, not \"stop\" or \"length\" (a candidate that did not \
                 finish is not a candidate)",
                other.map_or("missing".into(), quote)
            ))
        }
    };
    let lp = c.get("logprobs").filter(|l| !l.is_null());
    let (tokens, token_log_probs) = match (route, lp) {
        (_, None) if !need_log_probs => (Vec::new(), Vec::new()),
        (_, None) => return Err("no logprobs, though they were asked for".into()),
        (Route::Completions, Some(l)) => {
            let toks = l.get("tokens").and_then(Value::as_array);
            let lps = l.get("token_logprobs").and_then(Value::as_array);
            match (toks, lps) {
                (Some(t), Some(p)) if t.len() == p.len() => (
                    t.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect(),
                    numbers(p)?,
                ),
                _ => {
                    return Err(format!(
                        "logprobs has no tokens and token_logprobs of one length: {}",
                        quote_excerpt(&l.to_string(), QUOTED)
                    ))
                }
            }
        }
        (Route::Chat, Some(l)) => {
            let content = l.get("content").and_then(Value::as_array).ok_or_else(|| {
                format!(
                    "logprobs has no content array: {}",
                    quote_excerpt(&l.to_string(), QUOTED)
                )
            })?;
            let mut toks = Vec::with_capacity(content.len());
            let mut lps = Vec::with_capacity(content.len());
            for e in content {
                toks.push(
                    e.get("token")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                );
                lps.push(e.get("logprob").cloned().unwrap_or(Value::Null));
            }
            (toks, numbers(&lps)?)
        }
    };
    if need_log_probs && token_log_probs.is_empty() && !text.is_empty() {
        return Err("a non-empty text with no token log-probabilities".into());
    }
    Ok(Completion {
        text,
        finish,
        token_log_probs,
        tokens,
    })
}

/// Finite log-probabilities (≤ 0, allowing rounding) or an error naming the first bad one.
fn numbers(values: &[Value]) -> Result<Vec<f64>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) if x.is_finite() && x <= 1e-6 => Ok(x.min(0.0)),
            _ => Err(format!(
                "token log-probability {i} is {v}, not a finite number ≤ 0"
            )),
        })
        .collect()
}

impl RemotePolicy for OpenAiEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn complete(&self, ask: &Ask<'_>) -> Result<Completions, RemoteError> {
        let route = self.route_for(ask.prompt)?;
        let k = ask.seeds.len();
        if k == 0 {
            return Ok(Completions {
                candidates: Vec::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                requests: 0,
            });
        }
        let honours_n = match route {
            Route::Completions => self.info.completions.honours_n,
            Route::Chat => self.info.chat.honours_n,
        };
        if honours_n || k == 1 {
            let (candidates, prompt_tokens, completion_tokens, requests) =
                self.request(route, ask, k, ask.seeds[0])?;
            return Ok(Completions {
                candidates,
                prompt_tokens,
                completion_tokens,
                requests,
            });
        }
        // One request per candidate, each with its seed, at most max-concurrency in flight
        // (the client's slots bound them across callers too).
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<_, RemoteError>>>> =
            Mutex::new((0..k).map(|_| None).collect());
        let workers = self.spec.max_concurrency.min(k);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= k {
                        break;
                    }
                    let r = self.request(route, ask, 1, ask.seeds[i]);
                    let failed = r.is_err();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    if failed {
                        // Stop handing out work: the whole ask fails anyway.
                        next.store(k, Ordering::SeqCst);
                    }
                });
            }
        });
        let mut out = Completions {
            candidates: Vec::with_capacity(k),
            prompt_tokens: 0,
            completion_tokens: 0,
            requests: 0,
        };
        for (i, r) in results
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .enumerate()
        {
            match r {
                Some(Ok((mut c, p, g, a))) => {
                    out.candidates.append(&mut c);
                    out.prompt_tokens = p;
                    out.completion_tokens += g;
                    out.requests += a;
                }
                Some(Err(e)) => {
                    return Err(match e {
                        RemoteError::Failed { engine, message } => RemoteError::Failed {
                            engine,
                            message: format!("candidate {i} of {k}: {message}"),
                        },
                        other => other,
                    })
                }
                None => continue, // not started after another candidate failed
            }
        }
        if out.candidates.len() != k {
            return Err(self.fail(format!(
                "{} of {k} candidates came back",
                out.candidates.len()
            )));
        }
        Ok(out)
    }

    fn log_prob(&self, prompt: &str, response: &str) -> Result<TextLogProb, RemoteError> {
        if response.is_empty() {
            return Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: "an empty response has nothing to score".into(),
            });
        }
        match self.info.scoring {
            Some(route) => self.score_by(route, prompt, response),
            // No route passed the probe: echo says best why (a shifted echo, say).
            None if self.info.completions.available => {
                self.score_by(Scoring::Echo, prompt, response)
            }
            None => Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: "it cannot score a given text: /completions did not answer the probe, \
                          and neither vLLM's prompt_logprobs nor SGLang's /generate did"
                    .into(),
            }),
        }
    }
}

impl OpenAiEngine {
    /// log p(response | prompt) through `route` (the spec's `echo-prefix` put first).
    fn score_by(
        &self,
        route: Scoring,
        prompt: &str,
        response: &str,
    ) -> Result<TextLogProb, RemoteError> {
        let prefix = self.spec.echo_prefix.as_deref().unwrap_or("");
        let full = format!("{prefix}{prompt}{response}");
        let bad = |m: String| self.fail(format!("scoring a text: {m}"));
        match route {
            Scoring::Echo => self.score_by_echo(&full, response),
            Scoring::PromptLogprobs => {
                let body = json!({
                    "model": self.info.model,
                    "prompt": full,
                    "max_tokens": 1,
                    "temperature": 1.0,
                    "prompt_logprobs": 0,
                });
                let (v, _) = self
                    .client
                    .json("/completions", Some(&body))
                    .map_err(&bad)?;
                let entries = v
                    .pointer("/choices/0/prompt_logprobs")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("the answer has no choices[0].prompt_logprobs".into()))?;
                // Each entry after the first (null) holds the prompt's own token.
                let mut toks = Vec::with_capacity(entries.len());
                let mut lps = Vec::with_capacity(entries.len());
                for (i, e) in entries.iter().enumerate().skip(1) {
                    let one = e.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
                        bad(format!(
                            "prompt_logprobs[{i}] is not one token's entry: {}",
                            quote_excerpt(&e.to_string(), QUOTED)
                        ))
                    })?;
                    let (_, t) = one.iter().next().expect("one entry");
                    toks.push(t.get("decoded_token").and_then(Value::as_str).unwrap_or(""));
                    lps.push(t.get("logprob").cloned().unwrap_or(Value::Null));
                }
                self.response_tail(&toks, &lps, response)
            }
            Scoring::SglangGenerate => {
                let body = json!({
                    "text": full,
                    "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
                    "return_logprob": true,
                    "logprob_start_len": 0,
                    "return_text_in_logprobs": true,
                });
                let (v, _) = self
                    .client
                    .json_root("/generate", Some(&body))
                    .map_err(&bad)?;
                let entries = v
                    .pointer("/meta_info/input_token_logprobs")
                    .and_then(Value::as_array)
                    .ok_or_else(
                        || bad("the answer has no meta_info.input_token_logprobs".into()),
                    )?;
                let mut toks = Vec::with_capacity(entries.len());
                let mut lps = Vec::with_capacity(entries.len());
                for (i, e) in entries.iter().enumerate() {
                    let (Some(lp), Some(t)) = (e.get(0), e.get(2).and_then(Value::as_str)) else {
                        return Err(bad(format!(
                            "input_token_logprobs[{i}] is not [logprob, id, text]: {}",
                            quote_excerpt(&e.to_string(), QUOTED)
                        )));
                    };
                    toks.push(t);
                    lps.push(lp.clone());
                }
                self.response_tail(&toks, &lps, response)
            }
        }
    }

    /// [`OpenAiEngine::score_by`] through `echo` on `/completions`.
    fn score_by_echo(&self, full: &str, response: &str) -> Result<TextLogProb, RemoteError> {
        if !self.info.completions.available {
            return Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: "/completions did not answer the probe: it cannot score a given text"
                    .into(),
            });
        }
        let body = json!({
            "model": self.info.model,
            "prompt": full,
            "max_tokens": 1,
            "temperature": 1.0,
            "echo": true,
            "logprobs": 1,
        });
        let (v, _) = self
            .client
            .json("/completions", Some(&body))
            .map_err(|m| self.fail(format!("scoring a text: {m}")))?;
        let bad = |m: String| self.fail(format!("scoring a text: {m}"));
        let choice = v.pointer("/choices/0").cloned().unwrap_or(Value::Null);
        let l = choice
            .get("logprobs")
            .filter(|l| !l.is_null())
            .ok_or_else(|| {
                bad(format!(
                    "the answer has no choices[0].logprobs (the engine does not support echo \
                 with logprobs?): {}",
                    quote_excerpt(&v.to_string(), QUOTED)
                ))
            })?;
        let (Some(toks), Some(lps)) = (
            l.get("tokens").and_then(Value::as_array),
            l.get("token_logprobs").and_then(Value::as_array),
        ) else {
            return Err(bad(format!(
                "logprobs lacks tokens or token_logprobs: {}",
                quote_excerpt(&l.to_string(), QUOTED)
            )));
        };
        if toks.len() != lps.len() {
            return Err(bad("tokens and token_logprobs differ in length".into()));
        }
        let toks: Vec<&str> = toks.iter().map(|t| t.as_str().unwrap_or("")).collect();
        // The echo is the text followed by the one generated token, which must be the last
        // entry of the list: an engine that leaves it out has shifted every value by one
        // position (llama-cpp-python does, unless the text starts with the BOS token).
        let echoed = choice.get("text").and_then(Value::as_str).unwrap_or("");
        let Some(generated) = echoed.strip_prefix(full) else {
            return Err(bad(format!(
                "the echoed text does not start with the text sent: {}",
                quote_excerpt(echoed, QUOTED)
            )));
        };
        let mut end = toks.len();
        if !generated.is_empty() {
            let mut tail = String::new();
            while end > 0 && tail.len() < generated.len() {
                end -= 1;
                tail.insert_str(0, toks[end]);
            }
            if tail != generated {
                return Err(RemoteError::Invalid {
                    engine: self.info.url.clone(),
                    message: format!(
                        "its echo leaves the generated token {} out of the log-probabilities, \
                         so they are shifted by one position and cannot be used; start the \
                         scored text with the model's BOS token (option echo-prefix=TEXT, \
                         e.g. echo-prefix=<|im_start|> for SmolLM2 on llama-cpp-python)",
                        quote(generated)
                    ),
                });
            }
        }
        self.response_tail(&toks[..end], &lps[..end], response)
    }

    /// The log-probabilities of `response` as the last tokens of a scored text's `toks`
    /// (with their `lps`): the tokens read from the end until they spell it.
    fn response_tail(
        &self,
        toks: &[&str],
        lps: &[Value],
        response: &str,
    ) -> Result<TextLogProb, RemoteError> {
        let bad = |m: String| self.fail(format!("scoring a text: {m}"));
        let end = toks.len();
        // The response is the last tokens before it.
        let mut start = end;
        let mut acc = String::new();
        while start > 0 && acc.len() < response.len() {
            start -= 1;
            acc.insert_str(0, toks[start]);
        }
        if acc != response {
            return Err(RemoteError::Invalid {
                engine: self.info.url.clone(),
                message: format!(
                    "the engine's tokens of the prompt followed by the response do not split \
                     at the prompt's end (its last tokens spell {}, not the response); end the \
                     prompt where a token ends (e.g. before a space)",
                    quote_excerpt(&acc, 80)
                ),
            });
        }
        let token_log_probs = numbers(&lps[start..end]).map_err(&bad)?;
        Ok(TextLogProb {
            tokens: toks[start..end].iter().map(|t| t.to_string()).collect(),
            total: token_log_probs.iter().sum(),
            token_log_probs,
        })
    }
}
