//! The server end to end on loopback, over the toy policy: the OpenAI shapes, every strategy
//! through the extra fields, errors that name their field, determinism among concurrent
//! requests, streaming, and the faults (full queue, deadline, hang-up, failing reward,
//! API key, shutdown), plus a bounded load test.
//!
//! Each test starts its own server on a free port of 127.0.0.1 and stops it at the end.

use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tilt_engine::cd::{ConstantScorer, PrefixScorer};
use tilt_engine::{Engine, Input, Params, Request, Strategy};
use tilt_models::sampling::SamplingParams;
use tilt_models::toy::ToyPolicy;
use tilt_models::{ChatMessage, ModelError, Policy, StepOutput, TokenId};
use tilt_rewards::{Reward, RewardError};
use tilt_server::ServerConfig;

// ---------------------------------------------------------------------------------------
// A toy policy that can be slowed down, and rewards
// ---------------------------------------------------------------------------------------

/// The toy policy, sleeping `delay` in every batched step (so that deadlines, hang-ups and
/// queues can be seen); `endless` takes away the end token (its probability moved onto the
/// letters), so that a sequence runs to its budget; `rows` counts the rows stepped.
struct Slow {
    toy: ToyPolicy,
    delay: Duration,
    endless: bool,
    rows: Arc<AtomicUsize>,
}

impl Slow {
    fn out(&self, mut o: StepOutput) -> StepOutput {
        if self.endless {
            let eos = tilt_models::toy::TOY_EOS as usize;
            let rest = 1.0 - o.log_probs[eos].exp();
            o.log_probs[eos] = f32::NEG_INFINITY;
            for (v, lp) in o.log_probs.iter_mut().enumerate() {
                if v != eos {
                    *lp -= rest.ln();
                }
            }
        }
        o
    }
}

impl Policy for Slow {
    type Cache = <ToyPolicy as Policy>::Cache;
    fn name(&self) -> &str {
        self.toy.name()
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
    fn prefill(&self, tokens: &[TokenId]) -> Result<(Self::Cache, StepOutput), ModelError> {
        let (c, o) = self.toy.prefill(tokens)?;
        Ok((c, self.out(o)))
    }
    fn step(
        &self,
        caches: &mut [Self::Cache],
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.rows.fetch_add(tokens.len(), Ordering::SeqCst);
        let outs = self.toy.step(caches, tokens)?;
        Ok(outs.into_iter().map(|o| self.out(o)).collect())
    }
    fn extend(
        &self,
        cache: &mut Self::Cache,
        tokens: &[TokenId],
    ) -> Result<Vec<StepOutput>, ModelError> {
        let outs = self.toy.extend(cache, tokens)?;
        Ok(outs.into_iter().map(|o| self.out(o)).collect())
    }
    fn cache_len(&self, cache: &Self::Cache) -> usize {
        self.toy.cache_len(cache)
    }
}

/// (number of `b`) − (number of `c`): a function of each text alone.
struct Letters;

impl Reward for Letters {
    fn name(&self) -> String {
        "letters".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, t)| {
                t.chars().filter(|&c| c == 'b').count() as f32
                    - t.chars().filter(|&c| c == 'c').count() as f32
            })
            .collect())
    }
    fn batch_invariant(&self) -> bool {
        true
    }
}

/// A backend that is down for every prompt holding a `c`.
struct DownForC;

impl Reward for DownForC {
    fn name(&self) -> String {
        "flaky".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        if pairs.iter().any(|(p, _)| p.contains('c')) {
            return Err(RewardError::Failed {
                reward: "flaky".into(),
                message: "connection refused".into(),
            });
        }
        Ok(pairs.iter().map(|(_, t)| t.len() as f32).collect())
    }
}

fn engine(delay_ms: u64) -> Engine<Slow> {
    slow_engine(delay_ms, false).0
}

/// An engine whose sequences never end before their budget, and its counter of rows.
fn endless(delay_ms: u64) -> (Engine<Slow>, Arc<AtomicUsize>) {
    slow_engine(delay_ms, true)
}

fn slow_engine(delay_ms: u64, endless: bool) -> (Engine<Slow>, Arc<AtomicUsize>) {
    slow_engine_with(delay_ms, endless, Vec::new())
}

/// As [`slow_engine`], with `more` rewards after `letters` and `flaky`.
fn slow_engine_with(
    delay_ms: u64,
    endless: bool,
    more: Vec<(String, Arc<dyn Reward>)>,
) -> (Engine<Slow>, Arc<AtomicUsize>) {
    let mut rewards: Vec<(String, Arc<dyn Reward>)> = vec![
        ("letters".into(), Arc::new(Letters)),
        ("flaky".into(), Arc::new(DownForC)),
    ];
    rewards.extend(more);
    let scorers: Vec<(String, Arc<dyn PrefixScorer>)> = vec![(
        "zero".into(),
        Arc::new(ConstantScorer {
            value: 0.0,
            hidden_size: ToyPolicy::VOCAB + 1,
        }),
    )];
    let rows = Arc::new(AtomicUsize::new(0));
    let policy = Slow {
        toy: ToyPolicy::new(),
        delay: Duration::from_millis(delay_ms),
        endless,
        rows: Arc::clone(&rows),
    };
    (
        Engine::from_parts(policy, rewards, scorers, 4096).unwrap(),
        rows,
    )
}

// ---------------------------------------------------------------------------------------
// A server on loopback
// ---------------------------------------------------------------------------------------

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

impl Server {
    async fn start(engine: Engine<Slow>, config: ServerConfig) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(tilt_server::serve(engine, config, listener, async move {
            let _ = stopped.await;
        }));
        Server {
            base,
            stop: Some(stop),
            done,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        self.post("/v1/chat/completions", &body).await
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Stop and wait for `serve` to return.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.done)
            .await
            .expect("the server stopped")
            .unwrap()
            .unwrap();
    }
}

/// After a fault, a plain request is served.
async fn assert_serves(s: &Server) {
    let (status, body) = s
        .chat(json!({"messages": user("ab"), "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// What a choice says, without the per-request id and clock.
fn answer(body: &Value) -> Value {
    json!({"choices": body["choices"], "usage": body["usage"]})
}

/// The engine's own answer to a request (what the server must return).
fn direct(strategy: Strategy, prompt: &str, seed: u64, max: usize) -> tilt_engine::Response {
    let mut p = Params::new(strategy);
    p.seed = seed;
    p.max_new_tokens = max;
    p.reward = Some("letters".into());
    engine(0)
        .generate(&Request::new(
            Input::Messages(vec![ChatMessage::user(prompt)]),
            p,
        ))
        .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

// ---------------------------------------------------------------------------------------
// Shapes and strategies
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_answer_has_openai_shape_and_the_engines_result() {
    let s = Server::start(engine(0), ServerConfig::default()).await;
    let (status, body) = s
        .chat(json!({
            "model": "toy-markov-abc", "messages": user("ab"), "max_tokens": 6, "seed": 5,
            "strategy": "bon", "candidates": 3, "reward": "letters", "return_candidates": true,
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "toy-markov-abc");
    assert!(body["system_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("tilt-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let want = direct(
        Strategy::Bon {
            n: 3,
            sampling: SamplingParams::default(),
        },
        "ab",
        5,
        6,
    );
    let o = &want.outputs[0];
    assert_eq!(choice["message"]["content"], o.text.as_str());
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(["stop", "length"].contains(&finish), "{finish}");
    let tilt = &choice["tilt"];
    assert_eq!(tilt["strategy"], "bon");
    assert_eq!(tilt["n"], 3);
    assert_eq!(tilt["units"], "nats");
    assert_eq!(tilt["seed"], 5);
    assert_eq!(tilt["selected"], o.selected);
    assert_eq!(tilt["reward"].as_f64().unwrap(), o.reward);
    // Best-of-3's bound, log 3 − 2/3 nats (Beirami et al., arXiv 2401.01879).
    let bound = tilt["kl_bound"].as_f64().unwrap();
    assert!(close(bound, 3f64.ln() - 2.0 / 3.0), "{bound}");
    let cands = tilt["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3);
    let best = cands
        .iter()
        .map(|c| c["reward"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(tilt["reward"].as_f64().unwrap(), best);
    // usage counts every candidate's tokens.
    let drawn: usize = o.candidates.iter().map(|c| c.new_tokens).sum();
    assert_eq!(body["usage"]["completion_tokens"], drawn);
    assert_eq!(
        body["usage"]["total_tokens"].as_u64().unwrap(),
        body["usage"]["completion_tokens"].as_u64().unwrap()
            + body["usage"]["prompt_tokens"].as_u64().unwrap()
    );

    // /v1/completions, n = 2, and /v1/models.
    let (status, body) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ca", "max_tokens": 4, "n": 2, "seed": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (choices[0]["index"].clone(), choices[1]["index"].clone()),
        (json!(0), json!(1))
    );
    assert!(choices.iter().all(|c| c["text"].is_string()));
    let models: Value = s
        .http
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "toy-markov-abc");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_is_reachable_through_the_extra_fields() {
    let s = Server::start(engine(0), ServerConfig::default()).await;
    for (extra, name) in [
        (json!({}), "sample"),
        (json!({"strategy": "bon", "candidates": 4}), "bon"),
        (json!({"strategy": "won", "candidates": 4}), "won"),
        (
            json!({"strategy": "soft-bon", "candidates": 4, "lambda": 2.0}),
            "soft-bon",
        ),
        (
            json!({"strategy": "rewind", "candidates": 2, "threshold": 1.0, "max_draws": 6}),
            "rewind",
        ),
        (
            json!({"strategy": "cd-token", "lambda": 1.0, "top_k": 3, "scorer": "zero"}),
            "cd-token",
        ),
        (
            json!({"strategy": "cd-block", "block_k": 3, "block_m": 2}),
            "cd-block",
        ),
        (
            json!({"strategy": "cd-block", "block_k": 2, "block_m": 2,
                   "scorer": [{"name": "zero", "weight": 0.5}],
                   "report_rewards": ["letters"]}),
            "cd-block",
        ),
    ] {
        let mut body =
            json!({"messages": user("ab"), "max_tokens": 6, "seed": 3, "reward": "letters"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, got) = s.chat(body).await;
        assert_eq!(status, 200, "{name}: {got}");
        let tilt = &got["choices"][0]["tilt"];
        assert_eq!(tilt["strategy"], name, "{got}");
        assert_eq!(tilt["units"], "nats");
        assert!(tilt["kl_note"].is_string());
        if name.starts_with("cd-") {
            // Each scorer's value (with its weight) at the answer's last token.
            let sv = tilt["scorer_values"].as_array().unwrap();
            assert_eq!(sv.len(), 1, "{got}");
            assert_eq!(sv[0]["name"], "zero");
            assert_eq!(sv[0]["value"], 0.0);
            let w = if extra.get("scorer").is_some_and(|v| v.is_array()) {
                0.5
            } else {
                1.0
            };
            assert_eq!(sv[0]["weight"], w, "{got}");
        }
        if extra.get("report_rewards").is_some() {
            assert_eq!(tilt["rewards"][0]["name"], "letters", "{got}");
            assert_eq!(tilt["rewards"][0]["value"], tilt["reward"], "{got}");
        } else {
            assert!(tilt.get("rewards").is_none(), "{got}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400s_naming_the_field_in_openai_error_objects() {
    let config = ServerConfig {
        body_limit: 4096,
        ..ServerConfig::default()
    };
    let s = Server::start(engine(0), config).await;
    let m = user("ab");
    for (body, param) in [
        (json!({"messages": m, "temprature": 1}), "temprature"),
        (json!({"messages": m, "max_tokens": "8"}), "max_tokens"),
        (
            json!({"messages": [{"role": "user", "content": "ab", "nam": "x"}]}),
            "messages[0].nam",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "ab"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": m, "strategy": "bon", "threshold": 0.5}),
            "threshold",
        ),
        (
            json!({"messages": m, "strategy": "bon", "candidates": 0}),
            "candidates",
        ),
        (json!({"messages": m, "candidates": 4}), "candidates"),
        (json!({"messages": m, "strategy": "beam"}), "strategy"),
        (json!({"messages": m, "n": 0}), "n"),
        (
            json!({"messages": m, "strategy": "bon", "candidates": 4096, "n": 2}),
            "n",
        ),
        (json!({"messages": m, "max_tokens": 100000}), "max_tokens"),
        (json!({"messages": m, "reward": "gold"}), "reward"),
        (
            json!({"messages": m, "strategy": "cd-token", "lambda": 1, "top_k": 2, "scorer": "v"}),
            "scorer",
        ),
        (
            json!({"messages": m, "strategy": "cd-block", "scorer": 3}),
            "scorer",
        ),
        (
            json!({"messages": m, "strategy": "cd-block",
                   "scorer": [{"name": "zero", "weight": "x"}]}),
            "scorer[0].weight",
        ),
        (
            json!({"messages": m, "strategy": "cd-block", "scorer": []}),
            "scorer",
        ),
        (
            json!({"messages": m, "strategy": "cd-block",
                   "scorer": [{"name": "zero"}, {"name": "zero"}]}),
            "scorer",
        ),
        (
            json!({"messages": m, "report_rewards": ["gold"]}),
            "report_rewards",
        ),
        (
            json!({"messages": m, "report_rewards": "letters"}),
            "report_rewards",
        ),
        (json!({"messages": m, "temperature": -1}), "temperature"),
        (json!({"messages": user("xyz")}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"prompt": "ab"}), "messages"),
        (json!([1, 2]), "body"),
    ] {
        let (status, got) = s.chat(body.clone()).await;
        assert_eq!(status, 400, "{body} → {got}");
        let e = &got["error"];
        assert_eq!(e["param"], param, "{body} → {got}");
        assert_eq!(e["type"], "invalid_request_error", "{got}");
        assert!(e["message"].as_str().unwrap().len() > 10, "{got}");
        assert!(e.get("code").is_some(), "{got}");
    }
    // Another model: 404 naming `model`.
    let (status, got) = s.chat(json!({"model": "gpt-9", "messages": m})).await;
    assert_eq!(
        (status, got["error"]["param"].clone()),
        (404, json!("model")),
        "{got}"
    );
    // An unknown path, a body over the limit, a body that is not JSON.
    let r = s
        .http
        .post(format!("{}/v1/embeddings", s.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let big = json!({"messages": user(&"a".repeat(10_000))});
    let (status, got) = s.chat(big).await;
    assert_eq!(status, 413, "{got}");
    assert!(got["error"]["message"].is_string());
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // And it still serves.
    let (status, _) = s.chat(json!({"messages": m, "max_tokens": 2})).await;
    assert_eq!(status, 200);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// Determinism and streaming
// ---------------------------------------------------------------------------------------

/// A mix of requests, `i` giving the i-th.
fn mixed(i: usize) -> Value {
    let strategies = [
        json!({}),
        json!({"strategy": "bon", "candidates": 3}),
        json!({"strategy": "soft-bon", "candidates": 3, "lambda": 0.5}),
        json!({"strategy": "rewind", "candidates": 2, "threshold": 2.0, "max_draws": 5}),
        json!({"strategy": "cd-token", "lambda": 2.0, "top_k": 3}),
        json!({"strategy": "cd-block", "block_k": 2, "block_m": 3}),
        json!({"strategy": "won", "candidates": 2, "n": 2}),
    ];
    let prompts = ["ab", "c", "bca", "aab"];
    let mut body = json!({
        "messages": user(prompts[i % prompts.len()]), "max_tokens": 4 + i % 9,
        "seed": 1000 + i as u64, "reward": "letters",
    });
    for (k, v) in strategies[i % strategies.len()].as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_request_gives_the_same_bytes_alone_and_among_63_others() {
    // A small delay per step, so that the 64 requests really share batches.
    let s = Arc::new(Server::start(engine(2), ServerConfig::default()).await);
    let mut alone = Vec::new();
    let steps_at_start = s.metric("tilt_steps_total").await;
    for i in 0..64 {
        let (status, body) = s.chat(mixed(i)).await;
        assert_eq!(status, 200, "{body}");
        alone.push(answer(&body));
    }
    let rows_before = s.metric("tilt_steps_total").await;
    let steps_alone = rows_before - steps_at_start;
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { (i, s.chat(mixed(i)).await) })
        })
        .collect();
    let mut ids = HashSet::new();
    for h in handles {
        let (i, (status, body)) = h.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(ids.insert(body["id"].as_str().unwrap().to_string()));
        assert_eq!(
            answer(&body),
            alone[i],
            "request {i} changed among the others"
        );
    }
    // They did share steps: far fewer steps than run alone.
    let steps = s.metric("tilt_steps_total").await - rows_before;
    assert!(
        steps > 0.0 && steps * 2.0 < steps_alone,
        "{steps} steps together, {steps_alone} one by one"
    );
    Arc::into_inner(s).unwrap().stop().await;
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_the_unstreamed_one() {
    let s = Server::start(engine(0), ServerConfig::default()).await;
    for extra in [
        json!({}),
        json!({"strategy": "cd-token", "lambda": 1.0, "top_k": 3}),
        json!({"strategy": "bon", "candidates": 3}),
        json!({"strategy": "rewind", "candidates": 2, "threshold": 1.0, "max_draws": 4}),
        json!({"stop": ["ca"]}),
    ] {
        for seed in 0..4 {
            let mut body = json!({"messages": user("ab"), "max_tokens": 10, "seed": seed, "reward": "letters", "n": 2});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (status, whole) = s.chat(body.clone()).await;
            assert_eq!(status, 200, "{whole}");
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let r = s
                .http
                .post(format!("{}/v1/chat/completions", s.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            assert!(r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"));
            let data = sse_data(&r.text().await.unwrap());
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{extra}");
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let mut text = [String::new(), String::new()];
            let mut last_tilt = [Value::Null, Value::Null];
            let mut finish = [Value::Null, Value::Null];
            for c in &chunks {
                assert_eq!(c["object"], "chat.completion.chunk");
                assert_eq!(c["id"], chunks[0]["id"]);
                for ch in c["choices"].as_array().unwrap() {
                    let j = ch["index"].as_u64().unwrap() as usize;
                    assert!(finish[j].is_null(), "a chunk after choice {j} finished");
                    if let Some(t) = ch["delta"]["content"].as_str() {
                        text[j].push_str(t);
                    }
                    if !ch["finish_reason"].is_null() {
                        finish[j] = ch["finish_reason"].clone();
                        last_tilt[j] = ch["tilt"].clone();
                    }
                }
            }
            for j in 0..2 {
                let w = &whole["choices"][j];
                assert_eq!(
                    text[j],
                    w["message"]["content"].as_str().unwrap(),
                    "{extra} seed {seed}"
                );
                assert_eq!(finish[j], w["finish_reason"]);
                assert_eq!(
                    last_tilt[j], w["tilt"],
                    "{extra}: the last chunk's tilt object"
                );
            }
            let usage = chunks.last().unwrap();
            assert_eq!(usage["choices"], json!([]));
            assert_eq!(usage["usage"], whole["usage"]);
        }
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_a_429_with_retry_after_and_nothing_is_lost() {
    let config = ServerConfig {
        max_queue: 3,
        ..ServerConfig::default()
    };
    let s = Arc::new(Server::start(endless(15).0, config).await);
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let r = s
                    .http
                    .post(format!("{}/v1/chat/completions", s.base))
                    .json(&json!({"messages": user("ab"), "max_tokens": 12, "seed": i}))
                    .send()
                    .await
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let (status, retry, body) = h.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                busy += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "queue_full", "{body}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(ok + busy, 12);
    assert!(ok >= 3 && busy >= 1, "{ok} answered, {busy} refused");
    // Once the queue drains, it serves again.
    assert_serves(&s).await;
    Arc::into_inner(s).unwrap().stop().await;
}

/// Wait until no request is running (the worker freed them), for at most 10 s.
async fn wait_idle(s: &Server) {
    for _ in 0..200 {
        if s.metric("tilt_running_requests").await == 0.0
            && s.metric("tilt_requests_outstanding").await == 0.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("requests still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_deadline_a_request_is_a_504_and_its_sequences_are_freed() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    // 20 ms a step: 28 tokens take over half a second.
    let (e, rows) = endless(20);
    let s = Server::start(e, config).await;
    let mut slow = json!({"messages": user("ab"), "max_tokens": 28, "seed": 1});
    let (status, got) = s.chat(slow.clone()).await;
    assert_eq!(status, 504, "{got}");
    assert!(got["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deadline"));
    wait_idle(&s).await;
    // Freed at the next step after the deadline, not run to its 28 tokens.
    let stepped = rows.load(Ordering::SeqCst);
    assert!(stepped < 24, "{stepped} rows stepped");
    // Streamed: an error event, then [DONE].
    slow["stream"] = json!(true);
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&slow)
        .send()
        .await
        .unwrap();
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{err}"
    );
    wait_idle(&s).await;
    assert_serves(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_frees_its_sequences() {
    // 30 ms a step: the 28 tokens would take 840 ms.
    let (e, rows) = endless(30);
    let s = Server::start(e, ServerConfig::default()).await;
    let body = json!({"messages": user("ab"), "max_tokens": 28, "seed": 2, "stream": true});
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    // The first token arrives, then the client goes.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") {
        let b = stream.next().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&b));
    }
    drop(stream);
    wait_idle(&s).await;
    let stepped = rows.load(Ordering::SeqCst);
    assert!(
        stepped < 20,
        "{stepped} of 28 rows stepped after the hang-up"
    );
    assert_serves(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reward_fails_only_the_requests_that_needed_it() {
    let s = Arc::new(Server::start(engine(2), ServerConfig::default()).await);
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let s = Arc::clone(&s);
            let prompt = if i % 2 == 0 { "ab" } else { "cab" };
            tokio::spawn(async move {
                let body = json!({"messages": user(prompt), "max_tokens": 5, "seed": i,
                                  "strategy": "bon", "candidates": 2, "reward": "flaky"});
                (i, s.chat(body).await)
            })
        })
        .collect();
    for h in handles {
        let (i, (status, body)) = h.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(status, 200, "{body}");
        } else {
            assert_eq!(status, 503, "{body}");
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("connection refused"));
            assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
        }
    }
    let (status, _) = s
        .chat(json!({"messages": user("ab"), "max_tokens": 3, "strategy": "bon", "candidates": 2}))
        .await;
    assert_eq!(status, 200);
    Arc::into_inner(s).unwrap().stop().await;
}

/// A reward child process (the command protocol, in Python) that writes its pid to `pid`
/// and answers each request with the response's length after a short pause.
fn child_reward(pid: &std::path::Path) -> Arc<dyn Reward> {
    let script = format!(
        "import json, os, sys, time\n\
         open({pid:?}, 'w').write(str(os.getpid()))\n\
         for line in sys.stdin:\n\
         \x20   r = json.loads(line)\n\
         \x20   time.sleep(0.002)\n\
         \x20   print(json.dumps({{'id': r['id'], 'score': len(r['response'])}}), flush=True)\n",
        pid = pid.display().to_string()
    );
    let argv = ["python3".to_string(), "-c".into(), script];
    Arc::new(tilt_rewards::CommandReward::spawn(&argv, Duration::from_secs(30)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reward_child_killed_mid_run_fails_only_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let child = child_reward(&pid_file);
    let (engine, _) = slow_engine_with(3, true, vec![("child".into(), child)]);
    let s = Arc::new(Server::start(engine, ServerConfig::default()).await);
    let req = |i: u64, reward: &str| {
        json!({"messages": user("ab"), "max_tokens": 12, "seed": i,
               "strategy": "bon", "candidates": 2, "reward": reward})
    };
    // The child answers before the kill.
    let (status, first) = s.chat(req(0, "child")).await;
    assert_eq!(status, 200, "{first}");
    let pid: String = std::fs::read_to_string(&pid_file).unwrap();
    // Requests for the child arrive one after another, and the child dies among them.
    let handles: Vec<_> = (1..=24)
        .map(|i| {
            let s = Arc::clone(&s);
            let body = req(i, if i % 3 == 0 { "letters" } else { "child" });
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(15 * i)).await;
                (i, s.chat(body).await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (mut ok, mut unavailable) = (0, 0);
    for h in handles {
        let (i, (status, body)) = h.await.unwrap();
        if i % 3 == 0 {
            assert_eq!(status, 200, "a request for another reward: {body}");
            continue;
        }
        match status {
            200 => ok += 1,
            503 => {
                unavailable += 1;
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("command:python3"), "{message}");
                assert_eq!(body["error"]["type"], "service_unavailable", "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    eprintln!("before the kill {ok} answered, after it {unavailable} failed");
    assert!(
        unavailable > 0,
        "the kill failed no request ({ok} answered)"
    );
    // The child stays dead: its requests fail at once, naming that it died; the others,
    // and the health check, are served as before.
    let (status, body) = s.chat(req(99, "child")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("died"),
        "{body}"
    );
    let (status, body) = s.chat(req(100, "letters")).await;
    assert_eq!(status, 200, "{body}");
    assert_serves(&s).await;
    let health = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    Arc::into_inner(s).unwrap().stop().await;
}

/// The toy's next-token law after `prev` (a, b, c = 0, 1, 2; columns a, b, c, end).
fn toy_row(prev: char) -> [f64; 4] {
    match prev {
        'a' => [0.10, 0.40, 0.30, 0.20],
        'b' => [0.30, 0.10, 0.40, 0.20],
        _ => [0.40, 0.30, 0.10, 0.20],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_logprobs_are_the_policys_law_at_each_token() {
    let s = Server::start(engine(0), ServerConfig::default()).await;
    // Completions on the raw prompt "ab": logprobs = 3 alternatives per token, as a
    // token → logprob map, the law of the toy after the token before.
    let (status, body) = s
        .post(
            "/v1/completions",
            &json!({"prompt": "ab", "max_tokens": 6, "seed": 3, "logprobs": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    let text = body["choices"][0]["text"].as_str().unwrap();
    let mut prev = 'b';
    for (i, t) in top.iter().enumerate() {
        let row = toy_row(prev);
        let mut want: Vec<(usize, f64)> = row.iter().copied().enumerate().collect();
        want.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        let map = t.as_object().unwrap();
        for &(tok, p) in &want[..3] {
            let piece = ["a", "b", "c", ""][tok];
            let got = map[piece].as_f64().unwrap();
            assert!(
                (got - p.ln()).abs() < 1e-6,
                "position {i}: {piece} {got} vs {}",
                p.ln()
            );
        }
        // The chosen token's log-probability is its entry in the law.
        let chosen = tokens[i].as_str().unwrap();
        let lp_chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let col = ["a", "b", "c"]
            .iter()
            .position(|&c| c == chosen)
            .unwrap_or(3);
        assert!((lp_chosen - row[col].ln()).abs() < 1e-6);
        if let Some(c) = chosen.chars().next() {
            prev = c;
        }
    }
    assert!(!text.is_empty());
    // Chat: per token a list of the k most likely, most likely first.
    let (status, body) = s
        .chat(json!({"messages": user("ab"), "max_tokens": 4, "seed": 1,
                     "logprobs": true, "top_logprobs": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
    for entry in body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
    {
        let alts = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), 2, "{entry}");
        assert!(alts[0]["logprob"].as_f64() >= alts[1]["logprob"].as_f64());
        let sum: f64 = alts
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap().exp())
            .sum();
        assert!(sum <= 1.0 + 1e-9);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_every_v1_request_needs_the_bearer_token() {
    let config = ServerConfig {
        api_key: Some("sesame".into()),
        ..ServerConfig::default()
    };
    let s = Server::start(engine(0), config).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let body = json!({"messages": user("ab"), "max_tokens": 2});
    for auth in [
        None,
        Some("Bearer sesamf"),
        Some("Bearer sesame2"),
        Some("sesame"),
    ] {
        let mut r = s.http.post(&url).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "invalid_api_key"
        );
    }
    let r = s
        .http
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http
        .post(&url)
        .header("authorization", "Bearer sesame")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_requests_in_flight_finish_and_new_ones_are_refused() {
    let s = Server::start(endless(20).0, ServerConfig::default()).await;
    let http = s.http.clone();
    let url = format!("{}/v1/chat/completions", s.base);
    let in_flight = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http
                .post(&url)
                .json(&json!({"messages": user("ab"), "max_tokens": 15, "seed": 4}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    // Let it be admitted, then signal.
    for _ in 0..100 {
        if s.metric("tilt_running_requests").await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Server { mut stop, done, .. } = s;
    let _ = stop.take().unwrap().send(());
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        15
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    tokio::time::timeout(Duration::from_secs(30), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The listener is closed.
    assert!(http
        .post(&url)
        .json(&json!({"messages": user("ab")}))
        .send()
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_times_four_requests_lose_and_duplicate_nothing() {
    let config = ServerConfig {
        max_queue: 48,
        ..ServerConfig::default()
    };
    let s = Arc::new(Server::start(engine(1), config).await);
    // The seeded request every client sends last, and its bytes alone.
    let probe = mixed(5);
    let (_, alone) = s.chat(probe.clone()).await;
    let alone = answer(&alone);
    let t = std::time::Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let s = Arc::clone(&s);
            let probe = probe.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for k in 0..4 {
                    let body = if k == 3 {
                        probe.clone()
                    } else {
                        mixed(c * 4 + k)
                    };
                    got.push((k, s.chat(body).await));
                }
                got
            })
        })
        .collect();
    let (mut ok, mut busy, mut ids) = (0, 0, HashSet::new());
    for c in clients {
        for (k, (status, body)) in c.await.unwrap() {
            match status {
                200 => {
                    ok += 1;
                    assert!(
                        ids.insert(body["id"].as_str().unwrap().to_string()),
                        "a duplicate id"
                    );
                    if k == 3 {
                        assert_eq!(answer(&body), alone, "the probe changed under load");
                    }
                }
                429 => busy += 1,
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert_eq!(ok + busy, 256, "every request answered once");
    assert!(ok > 64, "only {ok} of 256 answered");
    assert!(t.elapsed() < Duration::from_secs(120));
    wait_idle(&s).await;
    assert_eq!(s.metric("tilt_queue_depth").await, 0.0);
    Arc::into_inner(s).unwrap().stop().await;
}
