//! Rewards served by the inference servers reward models usually run behind: vLLM's
//! pooling runner (`vllm:`), Hugging Face text-embeddings-inference (`tei:`) and
//! OpenRLHF's `serve_rm` (`openrlhf:`). Each speaks the server's own API, so a reward
//! model served for training or evaluation scores tilt's candidates unchanged.
//!
//! `URL` is the server's base (`http://host:port`, or `http://host:port/prefix` behind a
//! reverse proxy), with or without a trailing `/`: trailing slashes are removed and the
//! path of the endpoint (`/classify`, `/v1/models`, `/predict`, `/rerank`, `/get_reward`)
//! is appended. A URL with a query (`?`) or a fragment (`#`) is refused.
//!
//! | spec | request | answer |
//! |---|---|---|
//! | `vllm:URL` | `POST URL/classify` `{"model": M, "input": [text, …], "use_activation": false}` | `{"data": [{"index": i, "probs": [logit, …], …}, …]}` |
//! | `tei:URL` | `POST URL/predict` `{"inputs": [[prompt, response], …], "raw_scores": true}` | `[[{"score": s, "label": "L"}, …], …]` |
//! | `tei:URL,endpoint=rerank` | `POST URL/rerank` `{"query": prompt, "texts": [response, …], "raw_scores": true}` | `[{"index": i, "score": s}, …]` |
//! | `openrlhf:URL` | `POST URL/get_reward` `{"query": [text, …], "prompts": [prompt, …]}` | `{"rewards": [r, …], …}` |
//!
//! vLLM and OpenRLHF take one text per input: a pair is sent as `text` =
//! `prompt + "\n\n" + response` ([`PAIR_SEPARATOR`]). TEI takes the pair as a pair (a
//! cross-encoder sees both, with its own separator tokens).
//!
//! Sources for the shapes (checked against the projects' code):
//! - vLLM: the Classification API, <https://docs.vllm.ai/en/latest/serving/openai_compatible_server/>;
//!   the route `POST /classify` in `vllm/entrypoints/pooling/classify/api_router.py`;
//!   `ClassificationResponse`/`ClassificationData` (`index`, `label`, `probs`,
//!   `num_classes`) in `vllm/entrypoints/pooling/classify/protocol.py`; `use_activation`
//!   (default true: softmax/sigmoid applied; false: the raw logits) in
//!   `ClassifyRequestMixin`, `vllm/entrypoints/pooling/base/protocol.py`; the model name
//!   from `GET /v1/models` (`data[0].id`) as in the example client
//!   `examples/pooling/classify/` (<https://docs.vllm.ai/en/latest/examples/pooling/classify/>).
//!   Versions before `use_activation` existed ignore the field (with a warning in their
//!   log) and answer probabilities.
//! - TEI: `PredictRequest`, `Prediction`, `PredictResponse`, `RerankRequest`, `Rank` in
//!   `router/src/http/types.rs` and the handlers `predict`/`rerank` in
//!   `router/src/http/server.rs` of huggingface/text-embeddings-inference (API reference:
//!   <https://huggingface.github.io/text-embeddings-inference/>). A batch of pairs is
//!   answered with one list per input, in input order, each list sorted by score
//!   (highest first); `raw_scores: true` skips the softmax (sigmoid for one label). Rerank
//!   answers are sorted by score, so they are mapped back by `index`.
//! - OpenRLHF: `openrlhf/cli/serve_rm.py` of OpenRLHF/OpenRLHF (`POST /get_reward`, reads
//!   `query`, answers `{"rewards": […], "scores": […], "extra_logs": …}`; older versions
//!   `{"rewards": […]}`), and the client in `openrlhf/utils/agent.py`, which sends
//!   `query` with `prompts` (and `labels`, which tilt has none of).
//!
//! A batch is split into requests of at most `batch` pairs (for `endpoint=rerank`: one
//! request per distinct prompt, at most `batch` texts each), sent `concurrency` at a time
//! ([`std::thread::scope`]), and put back in order. A request is retried, after 0.2 s ·
//! 2^k (at most 5 s), up to `retries` times on HTTP 429, 502, 503 and 504 and on a
//! refused, reset or closed connection or a timeout; never on another status and never
//! on an answer that arrived but is wrong. Every failure is a [`RewardError`] naming the
//! reward (`kind:URL`), the request (endpoint and pairs) and what the server answered
//! (status and quoted body, the number of attempts when retries ran out, a wrong count, a
//! missing or repeated index, a label not found with the labels present, a value that is
//! not a number); a non-finite score is [`RewardError::NonFinite`] and a number beyond
//! `f32`'s range [`RewardError::OutOfRange`], both with the pair's index in the whole
//! batch. No partial result is ever returned.

use crate::http::{answer, check_url, new_agent, Failure, QUOTED_BODY};
use crate::json::{self, Sent};
use crate::{quote, quote_excerpt, Reward, RewardError, RewardSpec};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How a pair is made one text for the APIs that take one (vLLM, OpenRLHF):
/// `prompt + PAIR_SEPARATOR + response`.
pub const PAIR_SEPARATOR: &str = "\n\n";
/// Default pairs per request (`batch=`); TEI's default `--max-client-batch-size` is 32.
pub const DEFAULT_BATCH: usize = 32;
/// The most pairs per request `batch=` allows.
pub const MAX_BATCH: usize = 4096;
/// Default requests in flight at once (`concurrency=`).
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The most requests in flight `concurrency=` allows.
pub const MAX_CONCURRENCY: usize = 64;
/// Default time for one request, connection and whole answer included (`timeout=`).
pub const DEFAULT_SERVED_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest `timeout=` allowed, in seconds.
pub const MAX_TIMEOUT_SECS: f64 = 86_400.0;
/// Default retries of a request that failed transiently (`retries=`).
pub const DEFAULT_RETRIES: u32 = 2;
/// The most retries `retries=` allows.
pub const MAX_RETRIES: u32 = 10;
use tilt_remote::net::backoff;
pub use tilt_remote::net::{FIRST_BACKOFF, MAX_BACKOFF};

/// How requests to a served reward are made: the options common to every kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedOptions {
    /// Pairs per request (`batch=`, 1 to [`MAX_BATCH`]).
    pub batch: usize,
    /// Requests in flight at once (`concurrency=`, 1 to [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Time for one request, connection and whole answer included (`timeout=SECS`).
    pub timeout: Duration,
    /// Retries of a request that failed transiently (`retries=`, 0 to [`MAX_RETRIES`]).
    pub retries: u32,
}

impl Default for ServedOptions {
    fn default() -> Self {
        Self {
            batch: DEFAULT_BATCH,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_SERVED_TIMEOUT,
            retries: DEFAULT_RETRIES,
        }
    }
}

impl ServedOptions {
    /// Why these options are out of range, if they are.
    fn check(&self) -> Result<(), String> {
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(format!("batch={} is not 1 to {MAX_BATCH}", self.batch));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!(
                "concurrency={} is not 1 to {MAX_CONCURRENCY}",
                self.concurrency
            ));
        }
        let secs = self.timeout.as_secs_f64();
        if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
            return Err(format!(
                "timeout={secs} is not more than 0 and at most {MAX_TIMEOUT_SECS} seconds"
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(format!(
                "retries={} is more than {MAX_RETRIES}",
                self.retries
            ));
        }
        Ok(())
    }
}

/// Which TEI endpoint a `tei:` reward asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TeiEndpoint {
    /// `POST /predict`: a sequence-classification model over (prompt, response) pairs.
    #[default]
    Predict,
    /// `POST /rerank`: a reranker (one score per text), the prompt as the query.
    Rerank,
}

/// Which server's API a [`ServedReward`] speaks, with its own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServedApi {
    /// vLLM's pooling runner, `POST /classify`.
    Vllm {
        /// The model name to send (`model=`); `None`: the first of `GET /v1/models`.
        model: Option<String>,
        /// Which entry of `probs` is the score (`label=I`); `None`: the only one.
        label: Option<usize>,
    },
    /// text-embeddings-inference, `POST /predict` or `POST /rerank`.
    Tei {
        /// The endpoint (`endpoint=predict|rerank`).
        endpoint: TeiEndpoint,
        /// The label whose score is the reward (`label=NAME`, `/predict` only); `None`:
        /// the only one.
        label: Option<String>,
    },
    /// OpenRLHF's `serve_rm`, `POST /get_reward`.
    OpenRlhf,
}

impl ServedApi {
    /// The spec's kind: `vllm`, `tei` or `openrlhf`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Vllm { .. } => "vllm",
            Self::Tei { .. } => "tei",
            Self::OpenRlhf => "openrlhf",
        }
    }
}

/// Parse what follows `vllm:`, `tei:` or `openrlhf:` in a spec: `URL[,key=value…]`.
/// The error is the reason, naming the option.
pub(crate) fn parse_spec(kind: &str, arg: &str) -> Result<RewardSpec, String> {
    let mut parts = arg.split(',');
    let url = parts.next().unwrap_or("").trim();
    if url.is_empty() {
        return Err(format!(
            "{kind} needs a URL after ':' (e.g. {kind}:http://127.0.0.1:8000)"
        ));
    }
    check_base_url(url)?;
    let mut options = ServedOptions::default();
    let (mut model, mut vllm_label, mut tei_label, mut endpoint) = (None, None, None, None);
    let mut seen: Vec<&str> = Vec::new();
    let known: &[&str] = match kind {
        "vllm" => &[
            "model",
            "label",
            "batch",
            "concurrency",
            "timeout",
            "retries",
        ],
        "tei" => &[
            "label",
            "endpoint",
            "batch",
            "concurrency",
            "timeout",
            "retries",
        ],
        _ => &["batch", "concurrency", "timeout", "retries"],
    };
    for option in parts {
        let Some((key, value)) = option.split_once('=') else {
            return Err(format!(
                "option {} is not key=value (options of {kind}: {})",
                quote(option),
                known.join(", ")
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if !known.contains(&key) {
            return Err(format!(
                "unknown option {} (options of {kind}: {})",
                quote(option),
                known.join(", ")
            ));
        }
        if seen.contains(&key) {
            return Err(format!("option {key} is given twice"));
        }
        seen.push(key);
        let bad = |what: &str| format!("option {}: {what}", quote(option));
        let number = |max: u64| -> Result<u64, String> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| bad(&format!("{key} must be a whole number up to {max}")))
        };
        match key {
            "batch" => {
                options.batch = number(MAX_BATCH as u64)? as usize;
                if options.batch == 0 {
                    return Err(bad(&format!("batch must be 1 to {MAX_BATCH}")));
                }
            }
            "concurrency" => {
                options.concurrency = number(MAX_CONCURRENCY as u64)? as usize;
                if options.concurrency == 0 {
                    return Err(bad(&format!("concurrency must be 1 to {MAX_CONCURRENCY}")));
                }
            }
            "retries" => options.retries = number(u64::from(MAX_RETRIES))? as u32,
            "timeout" => {
                let secs = value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT_SECS)
                    .ok_or_else(|| {
                        bad(&format!(
                            "timeout must be a number of seconds, more than 0 and at most \
                             {MAX_TIMEOUT_SECS}"
                        ))
                    })?;
                options.timeout = Duration::from_secs_f64(secs);
            }
            "model" if value.is_empty() => return Err(bad("the model name is empty")),
            "model" => model = Some(value.to_string()),
            "label" if kind == "vllm" => {
                vllm_label = Some(value.parse::<usize>().map_err(|_| {
                    bad("label must be the index of a label in \"probs\" (0, 1, …)")
                })?);
            }
            "label" if value.is_empty() => return Err(bad("the label name is empty")),
            "label" => tei_label = Some(value.to_string()),
            "endpoint" => {
                endpoint = Some(match value {
                    "predict" => TeiEndpoint::Predict,
                    "rerank" => TeiEndpoint::Rerank,
                    _ => return Err(bad("endpoint must be predict or rerank")),
                });
            }
            _ => unreachable!("every known option is matched"),
        }
    }
    let url = url.to_string();
    Ok(match kind {
        "vllm" => RewardSpec::Vllm {
            url,
            model,
            label: vllm_label,
            options,
        },
        "tei" => {
            let endpoint = endpoint.unwrap_or_default();
            if endpoint == TeiEndpoint::Rerank && tei_label.is_some() {
                return Err(
                    "option label has no meaning with endpoint=rerank (a reranker answers \
                     one score per text, without labels)"
                        .into(),
                );
            }
            RewardSpec::Tei {
                url,
                endpoint,
                label: tei_label,
                options,
            }
        }
        _ => RewardSpec::OpenRlhf { url, options },
    })
}

/// Why `url` cannot be a server's base URL, if it cannot.
fn check_base_url(url: &str) -> Result<(), String> {
    check_url(url).map_err(|m| format!("{m} ({})", quote(url)))?;
    if url.contains(['?', '#']) {
        return Err(format!(
            "the URL {} has a query or fragment: give the server's base URL \
             (http://host:port), to which the endpoint's path is appended",
            quote(url)
        ));
    }
    Ok(())
}

/// A reward computed by a vLLM, TEI or OpenRLHF server (APIs in the [module docs](self)).
#[derive(Debug)]
pub struct ServedReward {
    api: ServedApi,
    /// The URL as given (for the name).
    url: String,
    /// The URL without trailing slashes, to which paths are appended.
    base: String,
    /// vLLM's model name, given or asked.
    model: Option<String>,
    options: ServedOptions,
    agent: ureq::Agent,
}

/// One request of a batch: which pairs it scores, where it goes and what it says.
struct Job {
    /// Indices in the whole batch of the pairs it scores, in the order it sends them.
    pairs: Vec<usize>,
    path: &'static str,
    body: Value,
}

impl ServedReward {
    /// A reward asking the server at `url` (its base URL) with `api`'s protocol. For vLLM
    /// without a model name, asks `GET URL/v1/models` once (with `options`' timeout and
    /// retries) and keeps the first id.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] for a URL that is not a valid `http://` base URL or
    /// options out of range; [`RewardError::Failed`] if vLLM's model name cannot be asked.
    pub fn new(api: ServedApi, url: &str, options: ServedOptions) -> Result<Self, RewardError> {
        let name = format!("{}:{url}", api.kind());
        let invalid = |message: String| RewardError::Invalid {
            reward: name.clone(),
            message,
        };
        check_base_url(url).map_err(invalid)?;
        options.check().map_err(invalid)?;
        if let ServedApi::Tei {
            endpoint: TeiEndpoint::Rerank,
            label: Some(_),
        } = &api
        {
            return Err(invalid(
                "a label has no meaning with endpoint=rerank (a reranker answers one score \
                 per text)"
                    .into(),
            ));
        }
        let mut reward = Self {
            base: url.trim_end_matches('/').to_string(),
            url: url.to_string(),
            model: None,
            agent: new_agent(url, options.timeout),
            options,
            api,
        };
        if let ServedApi::Vllm { model, .. } = &reward.api {
            reward.model = Some(match model {
                Some(m) => m.clone(),
                None => reward.ask_model()?,
            });
        }
        Ok(reward)
    }

    /// The server's base URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API it speaks, with its options.
    pub fn api(&self) -> &ServedApi {
        &self.api
    }

    /// The options of its requests.
    pub fn options(&self) -> &ServedOptions {
        &self.options
    }

    /// vLLM's model name (given as `model=`, or the first of `GET /v1/models`).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn fail(&self, message: String) -> RewardError {
        RewardError::Failed {
            reward: self.name(),
            message,
        }
    }

    /// Send with retries (on transient failures only): the 2xx answer's body, or what
    /// failed, with the number of attempts when retries ran out.
    fn exchange(
        &self,
        what: &str,
        send: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<String, String> {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match answer(send(), self.options.timeout) {
                Ok(text) => return Ok(text),
                Err(Failure {
                    message,
                    transient: true,
                }) if attempt <= self.options.retries => {
                    let wait = backoff(attempt - 1);
                    tracing::warn!(
                        reward = %self.name(),
                        "{what}: {message}; retry {attempt} of {} in {:.1} s",
                        self.options.retries,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                }
                Err(Failure {
                    message,
                    transient: true,
                }) => {
                    return Err(format!(
                        "{what}: {message}; gave up after {attempt} attempt{} (retries={})",
                        if attempt == 1 { "" } else { "s" },
                        self.options.retries
                    ))
                }
                Err(Failure { message, .. }) => return Err(format!("{what}: {message}")),
            }
        }
    }

    /// [`Self::exchange`], then the answer's text and its JSON (Python's NaN literals
    /// accepted, so that a non-finite score is named by its index).
    fn exchange_json(
        &self,
        what: &str,
        send: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(String, Value), RewardError> {
        let text = self.exchange(what, send).map_err(|m| self.fail(m))?;
        let value = json::parse(&text).map_err(|e| {
            self.fail(format!(
                "{what}: the answer is not JSON ({e}): {}",
                quote_excerpt(&text, QUOTED_BODY)
            ))
        })?;
        Ok((text, value))
    }

    /// The first model id of `GET /v1/models` (`{"data": [{"id": …}, …]}`).
    fn ask_model(&self) -> Result<String, RewardError> {
        let url = format!("{}/v1/models", self.base);
        let what = format!("GET {url} (to learn the model name; give model=NAME to skip it)");
        let (text, value) = self.exchange_json(&what, || self.agent.get(&url).call())?;
        match value.pointer("/data/0/id") {
            Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
            _ => Err(self.fail(format!(
                "{what}: the answer has no model id (expected {{\"data\": [{{\"id\": …}}]}}): {}",
                quote_excerpt(&text, QUOTED_BODY)
            ))),
        }
    }

    /// The requests that score `pairs`.
    fn plan(&self, pairs: &[(&str, &str)]) -> Vec<Job> {
        let batch = self.options.batch;
        let joined = |i: usize| format!("{}{PAIR_SEPARATOR}{}", pairs[i].0, pairs[i].1);
        let chunks = || {
            (0..pairs.len())
                .step_by(batch)
                .map(move |start| (start..(start + batch).min(pairs.len())).collect::<Vec<_>>())
        };
        match &self.api {
            ServedApi::Vllm { .. } => chunks()
                .map(|idx| Job {
                    path: "/classify",
                    body: json!({
                        "model": self.model.as_deref().unwrap_or_default(),
                        "input": idx.iter().map(|&i| joined(i)).collect::<Vec<_>>(),
                        "use_activation": false,
                    }),
                    pairs: idx,
                })
                .collect(),
            ServedApi::Tei {
                endpoint: TeiEndpoint::Predict,
                ..
            } => chunks()
                .map(|idx| Job {
                    path: "/predict",
                    body: json!({
                        "inputs": idx.iter().map(|&i| [pairs[i].0, pairs[i].1]).collect::<Vec<_>>(),
                        "raw_scores": true,
                    }),
                    pairs: idx,
                })
                .collect(),
            ServedApi::Tei {
                endpoint: TeiEndpoint::Rerank,
                ..
            } => {
                // One request per distinct prompt (in order of first appearance), at most
                // `batch` texts each.
                let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
                for (i, &(prompt, _)) in pairs.iter().enumerate() {
                    match groups.iter_mut().find(|(p, _)| *p == prompt) {
                        Some((_, idx)) => idx.push(i),
                        None => groups.push((prompt, vec![i])),
                    }
                }
                groups
                    .into_iter()
                    .flat_map(|(prompt, idx)| {
                        idx.chunks(batch)
                            .map(|c| Job {
                                path: "/rerank",
                                body: json!({
                                    "query": prompt,
                                    "texts": c.iter().map(|&i| pairs[i].1).collect::<Vec<_>>(),
                                    "raw_scores": true,
                                }),
                                pairs: c.to_vec(),
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
            ServedApi::OpenRlhf => chunks()
                .map(|idx| Job {
                    path: "/get_reward",
                    body: json!({
                        "query": idx.iter().map(|&i| joined(i)).collect::<Vec<_>>(),
                        "prompts": idx.iter().map(|&i| pairs[i].0).collect::<Vec<_>>(),
                    }),
                    pairs: idx,
                })
                .collect(),
        }
    }

    /// Send `job` (with retries) and read its scores, one per pair in `job.pairs`' order.
    fn run(&self, job: &Job, total: usize) -> Result<Vec<Sent>, RewardError> {
        let url = format!("{}{}", self.base, job.path);
        let what = format!("POST {url} ({})", describe(&job.pairs, total));
        let (_, value) =
            self.exchange_json(&what, || self.agent.post(&url).send_json(&job.body))?;
        self.read(job, &value)
            .map_err(|m| self.fail(format!("{what}: {m}")))
    }

    /// The scores in an answer, one per pair of `job`, in its order.
    fn read(&self, job: &Job, value: &Value) -> Result<Vec<Sent>, String> {
        let n = job.pairs.len();
        let shape = |expected: &str| match value.get("error") {
            Some(Value::String(e)) => {
                format!(
                    "the server reported an error: {}",
                    quote_excerpt(e, QUOTED_BODY)
                )
            }
            // vLLM's ErrorResponse: {"error": {"message": …, "type": …, "code": …}}.
            Some(e @ Value::Object(o)) => match o.get("message") {
                Some(Value::String(m)) => format!(
                    "the server reported an error: {}",
                    quote_excerpt(m, QUOTED_BODY)
                ),
                _ => format!("the server reported an error: {}", json::shown(e)),
            },
            Some(e) => format!("the server reported an error: {}", json::shown(e)),
            None => format!("the answer is not {expected}: {}", json::shown(value)),
        };
        let count = |got: usize| -> Result<(), String> {
            if got == n {
                Ok(())
            } else {
                Err(format!("returned {got} scores for {n} pairs"))
            }
        };
        let score = |at: usize, v: &Value| {
            json::sent(v).map_err(|m| format!("the score for pair {} is {m}", job.pairs[at]))
        };
        match &self.api {
            ServedApi::Vllm { label, .. } => {
                let Some(Value::Array(data)) = value.get("data") else {
                    return Err(shape("{\"data\": [{\"index\": i, \"probs\": […]}, …]}"));
                };
                count(data.len())?;
                by_index(data, n, |k| job.pairs[k])?
                    .into_iter()
                    .enumerate()
                    .map(|(at, item)| {
                        let Some(Value::Array(probs)) = item.get("probs") else {
                            return Err(format!(
                                "the item for pair {} has no \"probs\" array: {}",
                                job.pairs[at],
                                json::shown(item)
                            ));
                        };
                        let k = probs.len();
                        let chosen = match label {
                            Some(l) if *l < k => *l,
                            Some(l) => {
                                return Err(format!(
                                    "label={l} is not in the answer: \"probs\" for pair {} has \
                                     {k} label{} (0 to {})",
                                    job.pairs[at],
                                    if k == 1 { "" } else { "s" },
                                    k.saturating_sub(1)
                                ))
                            }
                            None if k == 1 => 0,
                            None => {
                                return Err(format!(
                                    "the answer has {k} labels (\"probs\" of length {k} for pair \
                                     {}): give label=I (0 to {}) to choose one",
                                    job.pairs[at],
                                    k.saturating_sub(1)
                                ))
                            }
                        };
                        score(at, &probs[chosen])
                    })
                    .collect()
            }
            ServedApi::Tei {
                endpoint: TeiEndpoint::Predict,
                label,
            } => {
                let Value::Array(lists) = value else {
                    return Err(shape("[[{\"score\": s, \"label\": \"L\"}, …], …]"));
                };
                count(lists.len())?;
                lists
                    .iter()
                    .enumerate()
                    .map(|(at, list)| {
                        let pair = job.pairs[at];
                        let Value::Array(predictions) = list else {
                            return Err(format!(
                                "the answer for pair {pair} is {}, not a list of \
                                 {{\"score\": s, \"label\": \"L\"}}",
                                json::shown(list)
                            ));
                        };
                        let labels: Vec<&str> = predictions
                            .iter()
                            .map(|p| p.get("label").and_then(Value::as_str).unwrap_or("?"))
                            .collect();
                        let listed = || {
                            labels
                                .iter()
                                .map(|l| quote(l))
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        let found = match label {
                            Some(name) => predictions
                                .iter()
                                .find(|p| p.get("label").and_then(Value::as_str) == Some(name))
                                .ok_or_else(|| {
                                    format!(
                                        "label {} is not in the answer for pair {pair} (its \
                                         labels: {})",
                                        quote(name),
                                        listed()
                                    )
                                })?,
                            None if predictions.len() == 1 => &predictions[0],
                            None => {
                                return Err(format!(
                                    "the answer for pair {pair} has {} labels ({}): give \
                                     label=NAME to choose one",
                                    predictions.len(),
                                    listed()
                                ))
                            }
                        };
                        match found.get("score") {
                            Some(v) => score(at, v),
                            None => Err(format!(
                                "the prediction for pair {pair} has no \"score\": {}",
                                json::shown(found)
                            )),
                        }
                    })
                    .collect()
            }
            ServedApi::Tei {
                endpoint: TeiEndpoint::Rerank,
                ..
            } => {
                let Value::Array(ranks) = value else {
                    return Err(shape("[{\"index\": i, \"score\": s}, …]"));
                };
                count(ranks.len())?;
                by_index(ranks, n, |k| job.pairs[k])?
                    .into_iter()
                    .enumerate()
                    .map(|(at, rank)| match rank.get("score") {
                        Some(v) => score(at, v),
                        None => Err(format!(
                            "the rank for pair {} has no \"score\": {}",
                            job.pairs[at],
                            json::shown(rank)
                        )),
                    })
                    .collect()
            }
            ServedApi::OpenRlhf => {
                let Some(Value::Array(rewards)) = value.get("rewards") else {
                    return Err(shape("{\"rewards\": [r, …]}"));
                };
                count(rewards.len())?;
                rewards
                    .iter()
                    .enumerate()
                    .map(|(at, v)| score(at, v))
                    .collect()
            }
        }
    }
}

/// `items` (each with an `"index"`) in index order, each index 0..n exactly once.
/// `pair(k)` is the whole batch's index of the request's `k`-th pair (for messages).
fn by_index(
    items: &[Value],
    n: usize,
    pair: impl Fn(usize) -> usize,
) -> Result<Vec<&Value>, String> {
    let mut slots: Vec<Option<&Value>> = vec![None; n];
    let mut repeated: Vec<usize> = Vec::new();
    for item in items {
        let index = match item.get("index") {
            Some(Value::Number(i)) => i.as_u64(),
            _ => None,
        };
        let Some(index) = index else {
            return Err(format!(
                "an item has no whole-number \"index\": {}",
                json::shown(item)
            ));
        };
        let slot = usize::try_from(index)
            .ok()
            .filter(|&i| i < n)
            .ok_or_else(|| {
                format!(
                    "\"index\": {index} is outside the request's indices (0 to {})",
                    n.saturating_sub(1)
                )
            })?;
        if slots[slot].is_some() {
            repeated.push(slot);
        } else {
            slots[slot] = Some(item);
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&k| slots[k].is_none()).collect();
    if !missing.is_empty() || !repeated.is_empty() {
        let list = |ks: &[usize]| {
            ks.iter()
                .map(|&k| format!("{k} (pair {})", pair(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("no item has \"index\" {}", list(&missing)));
        }
        if !repeated.is_empty() {
            repeated.sort_unstable();
            repeated.dedup();
            problems.push(format!(
                "\"index\" {} appears more than once",
                list(&repeated)
            ));
        }
        return Err(format!(
            "{} (each index 0 to {} must appear exactly once)",
            problems.join(" and "),
            n - 1
        ));
    }
    Ok(slots.into_iter().flatten().collect())
}

/// `pairs 4 to 7 of 10`, or `pairs 0, 2, 5 of 10` when they are not a range.
fn describe(pairs: &[usize], total: usize) -> String {
    let contiguous = pairs.windows(2).all(|w| w[1] == w[0] + 1);
    match pairs {
        [one] => format!("pair {one} of {total}"),
        [first, .., last] if contiguous => format!("pairs {first} to {last} of {total}"),
        _ => {
            let mut shown: Vec<String> = pairs.iter().take(8).map(usize::to_string).collect();
            if pairs.len() > 8 {
                shown.push(format!("… ({} in all)", pairs.len()));
            }
            format!("pairs {} of {total}", shown.join(", "))
        }
    }
}

/// Run `jobs` jobs with `f`, at most `concurrency` at once, and return their results in
/// order, or the error of the first job (in order) that failed. After a failure no new
/// job is started.
fn run_all<T: Send>(
    jobs: usize,
    concurrency: usize,
    f: impl Fn(usize) -> Result<T, RewardError> + Sync,
) -> Result<Vec<T>, RewardError> {
    let threads = concurrency.min(jobs);
    if threads <= 1 {
        return (0..jobs).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<T, RewardError>>>> =
        Mutex::new((0..jobs).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    if j >= jobs {
                        break;
                    }
                    let result = f(j);
                    if result.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    results.lock().unwrap_or_else(|e| e.into_inner())[j] = Some(result);
                }
            });
        }
    });
    // Jobs start in order, so every job before one that never started has run: the first
    // error in order comes before the first job missing.
    let mut out = Vec::with_capacity(jobs);
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r {
            Some(r) => out.push(r?),
            None => unreachable!("a job was skipped although none before it failed"),
        }
    }
    Ok(out)
}

impl Reward for ServedReward {
    fn name(&self) -> String {
        format!("{}:{}", self.api.kind(), self.url)
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let jobs = self.plan(pairs);
        let results = run_all(jobs.len(), self.options.concurrency, |j| {
            self.run(&jobs[j], pairs.len())
        })?;
        let mut scores: Vec<Option<Sent>> = vec![None; pairs.len()];
        for (job, sent) in jobs.iter().zip(results) {
            for (&i, s) in job.pairs.iter().zip(sent) {
                scores[i] = Some(s);
            }
        }
        let scores = scores
            .into_iter()
            .map(|s| s.expect("every pair is in exactly one request"))
            .collect();
        json::check_sent(&self.name(), pairs.len(), scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<RewardSpec, String> {
        let (kind, arg) = spec.split_once(':').unwrap();
        parse_spec(kind, arg)
    }

    #[test]
    fn options_parse_with_defaults() {
        assert_eq!(
            parse("vllm:http://127.0.0.1:8000").unwrap(),
            RewardSpec::Vllm {
                url: "http://127.0.0.1:8000".into(),
                model: None,
                label: None,
                options: ServedOptions::default(),
            }
        );
        assert_eq!(
            parse("vllm:http://h:1/,model=org/rm:v2,label=1,batch=8,concurrency=2,timeout=1.5,retries=0")
                .unwrap(),
            RewardSpec::Vllm {
                url: "http://h:1/".into(),
                model: Some("org/rm:v2".into()),
                label: Some(1),
                options: ServedOptions {
                    batch: 8,
                    concurrency: 2,
                    timeout: Duration::from_millis(1500),
                    retries: 0
                },
            }
        );
        assert_eq!(
            parse("tei:http://h:8080,label=LABEL_1").unwrap(),
            RewardSpec::Tei {
                url: "http://h:8080".into(),
                endpoint: TeiEndpoint::Predict,
                label: Some("LABEL_1".into()),
                options: ServedOptions::default(),
            }
        );
        assert_eq!(
            parse("tei:http://h:8080,endpoint=rerank,batch=4096").unwrap(),
            RewardSpec::Tei {
                url: "http://h:8080".into(),
                endpoint: TeiEndpoint::Rerank,
                label: None,
                options: ServedOptions {
                    batch: 4096,
                    ..ServedOptions::default()
                },
            }
        );
        assert_eq!(
            parse("openrlhf:http://[::1]:5000,retries=10,concurrency=64").unwrap(),
            RewardSpec::OpenRlhf {
                url: "http://[::1]:5000".into(),
                options: ServedOptions {
                    concurrency: 64,
                    retries: 10,
                    ..ServedOptions::default()
                },
            }
        );
    }

    #[test]
    fn bad_options_are_named() {
        for (spec, expected) in [
            ("vllm:", "vllm needs a URL"),
            ("tei:,label=x", "tei needs a URL"),
            ("vllm:127.0.0.1:8000", "must start with http://"),
            ("tei:https://h", "https is not supported"),
            ("tei:http://h:0", "port \"0\""),
            ("tei:http://h:1/?x=1", "query or fragment"),
            (
                "openrlhf:http://h:1,batch",
                "option \"batch\" is not key=value",
            ),
            ("openrlhf:http://h:1,", "option \"\" is not key=value"),
            (
                "openrlhf:http://h:1,label=x",
                "unknown option \"label=x\" (options of openrlhf: batch",
            ),
            (
                "vllm:http://h:1,endpoint=rerank",
                "unknown option \"endpoint=rerank\"",
            ),
            ("tei:http://h:1,model=m", "unknown option \"model=m\""),
            (
                "tei:http://h:1,batch=0",
                "option \"batch=0\": batch must be 1 to 4096",
            ),
            (
                "tei:http://h:1,batch=4097",
                "option \"batch=4097\": batch must be a whole number up to 4096",
            ),
            ("tei:http://h:1,batch=-1", "option \"batch=-1\""),
            (
                "tei:http://h:1,concurrency=0",
                "concurrency must be 1 to 64",
            ),
            (
                "tei:http://h:1,concurrency=65",
                "concurrency must be a whole number up to 64",
            ),
            (
                "tei:http://h:1,retries=11",
                "retries must be a whole number up to 10",
            ),
            (
                "tei:http://h:1,timeout=0",
                "option \"timeout=0\": timeout must be a number of seconds",
            ),
            ("tei:http://h:1,timeout=nan", "option \"timeout=nan\""),
            ("tei:http://h:1,timeout=x", "option \"timeout=x\""),
            (
                "tei:http://h:1,batch=2,batch=3",
                "option batch is given twice",
            ),
            (
                "tei:http://h:1,endpoint=embed",
                "endpoint must be predict or rerank",
            ),
            ("tei:http://h:1,label=", "the label name is empty"),
            (
                "tei:http://h:1,endpoint=rerank,label=a",
                "label has no meaning with endpoint=rerank",
            ),
            (
                "vllm:http://h:1,label=first",
                "option \"label=first\": label must be the index",
            ),
            ("vllm:http://h:1,model=", "the model name is empty"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(expected), "{spec}: {e}");
        }
    }

    #[test]
    fn a_constructed_reward_checks_its_options_too() {
        let api = ServedApi::OpenRlhf;
        let e = ServedReward::new(
            api.clone(),
            "http://127.0.0.1:9",
            ServedOptions {
                batch: 0,
                ..ServedOptions::default()
            },
        )
        .unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("batch=0"),
            "{e}"
        );
        let e = ServedReward::new(api.clone(), "ftp://x", ServedOptions::default()).unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("openrlhf:ftp://x"),
            "{e}"
        );
        let e = ServedReward::new(
            ServedApi::Tei {
                endpoint: TeiEndpoint::Rerank,
                label: Some("x".into()),
            },
            "http://127.0.0.1:9",
            ServedOptions::default(),
        )
        .unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
        let r = ServedReward::new(api, "http://127.0.0.1:9//", ServedOptions::default()).unwrap();
        assert_eq!(r.name(), "openrlhf:http://127.0.0.1:9//");
        assert_eq!(r.base, "http://127.0.0.1:9");
        assert!(!r.batch_invariant());
        // No request for no pairs (nothing listens on port 9).
        assert_eq!(r.score(&[]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(3), Duration::from_millis(1600));
        assert_eq!(backoff(5), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn requests_are_described_by_their_pairs() {
        assert_eq!(describe(&[3], 10), "pair 3 of 10");
        assert_eq!(describe(&[4, 5, 6, 7], 10), "pairs 4 to 7 of 10");
        assert_eq!(describe(&[0, 2, 5], 10), "pairs 0, 2, 5 of 10");
        let many: Vec<usize> = (0..20).map(|i| i * 2).collect();
        assert_eq!(
            describe(&many, 40),
            "pairs 0, 2, 4, 6, 8, 10, 12, 14, … (20 in all) of 40"
        );
    }

    #[test]
    fn jobs_run_concurrently_come_back_in_order_and_the_first_error_wins() {
        let out = run_all(10, 4, |j| Ok::<_, RewardError>(j * j)).unwrap();
        assert_eq!(out, (0..10).map(|j| j * j).collect::<Vec<_>>());
        let e = run_all(10, 3, |j| {
            if j == 2 || j == 5 {
                Err(RewardError::Failed {
                    reward: "r".into(),
                    message: format!("job {j}"),
                })
            } else {
                Ok(j)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("job 2"), "{e}");
        assert_eq!(run_all(3, 1, Ok::<_, RewardError>).unwrap(), vec![0, 1, 2]);
    }
}
