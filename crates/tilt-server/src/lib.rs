//! # tilt-server: `tilt serve`, an OpenAI-compatible alignment server
//!
//! Every answer is an aligned answer: a request picks a strategy (`sample` by default, or
//! best-of-N, worst-of-N, soft best-of-N, rewind, controlled decoding) with the fields the
//! openai Python client's `extra_body` sends, and each choice carries a `tilt` object with
//! what it cost (KL from the reference, nats) and bought (reward).
//!
//! ```text
//! HTTP (axum, tokio) ──▶ parse + check every field ──▶ bounded queue ──▶ worker thread
//!   POST /v1/chat/completions                              (429 when full)   Scheduler:
//!   POST /v1/completions                                                     one batch of
//!   GET  /v1/models  /health  /metrics                                       every request
//! ```
//!
//! The server copies no strategy, loading or manifest logic: requests become the engine's
//! [`tilt_engine::Request`]s, and one worker runs the engine's
//! [`tilt_engine::Scheduler`] (continuous batching: new requests are prefilled between
//! steps, the union of all active sequences is stepped as one batch, finished and cancelled
//! ones leave at once). Because the engine's batches do not change any row's bits, a request
//! with a seed returns the same choices alone or among 63 others.
//!
//! Faults: a body over the limit is a 413, a full queue a 429 with `Retry-After`, a request
//! past its deadline a 504 (its sequences freed at the next step), a client that hangs up
//! frees its sequences at the next step, a reward backend that fails fails only the requests
//! that needed it (503), a panic in a step is a 500 for the requests of that step and a log
//! line, and every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
#![deny(missing_docs)]

pub mod api_error;
pub mod metrics;
pub mod openai;
pub mod worker;

use api_error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use metrics::Metrics;
use openai::{engine_error, finish_reason, Endpoint, TiltInfo, Translated, WireUsage};
use serde_json::json;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tilt_engine::{CancelToken, Engine, RemoteEngine};
use tilt_models::{Policy, TokenId};
use worker::{Reply, StreamMsg, Work};

/// The default most new tokens when a request gives none (capped by the context).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most requests accepted and not yet answered (running or waiting); beyond it, 429.
    pub max_queue: usize,
    /// A request's deadline; past it, 504 and its sequences are freed.
    pub request_timeout: Duration,
    /// A bearer token every `/v1/` request must carry (None: no authentication).
    pub api_key: Option<String>,
    /// The largest request body, in bytes; beyond it, 413.
    pub body_limit: usize,
    /// After a shutdown signal, how long in-flight requests may take to finish.
    pub shutdown_timeout: Duration,
    /// Most new tokens when a request gives none (capped by the context).
    pub default_max_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_queue: 256,
            request_timeout: Duration::from_secs(300),
            api_key: None,
            body_limit: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            default_max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

/// What a handler needs.
struct App<P: Policy> {
    /// The local engine, or None in front of a remote one (which its worker holds).
    engine: Option<Arc<Engine<P>>>,
    work: SyncSender<Work>,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    model_id: String,
    fingerprint: String,
    next_id: AtomicU64,
}

/// The id the server lists its model under: the policy's name.
pub fn model_id<P: Policy>(engine: &Engine<P>) -> String {
    engine.policy().name().to_string()
}

/// Serve `engine` on `listener` until `shutdown` resolves; then stop accepting, let the
/// requests in flight finish (for at most `shutdown_timeout`), and return.
///
/// # Errors
/// The listener failing.
pub async fn serve<P: Policy + 'static>(
    engine: Engine<P>,
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = Arc::new(engine);
    let (tx, metrics, worker) = {
        let engine = Arc::clone(&engine);
        spawn_worker("tilt-worker", &config, move |rx, m| {
            worker::run(engine, rx, m)
        })?
    };
    let sha = engine
        .hashed_files()
        .ok()
        .and_then(|f| f.into_iter().find(|f| f.role == "policy"))
        .map(|f| f.sha256[..12].to_string())
        .unwrap_or_else(|| "unhashed".into());
    let app = Arc::new(App {
        model_id: model_id(&engine),
        fingerprint: format!("tilt-{}-{sha}", env!("CARGO_PKG_VERSION")),
        engine: Some(engine),
        work: tx,
        metrics,
        config: config.clone(),
        next_id: AtomicU64::new(0),
    });
    serve_app(app, worker, listener, shutdown).await
}

/// [`serve`] in front of a remote engine: the same API, every candidate drawn from the
/// engine ([`RemoteEngine`]), the rewards, selection and KL accounting here. The model is
/// listed under the remote model's id. Per-token `logprobs` are refused (400), and a
/// streamed request receives its answer whole once it is chosen.
///
/// # Errors
/// The listener failing.
pub async fn serve_remote(
    engine: RemoteEngine,
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = Arc::new(engine);
    let (tx, metrics, worker) = {
        let engine = Arc::clone(&engine);
        spawn_worker("tilt-remote-worker", &config, move |rx, m| {
            worker::run_remote(engine, rx, m)
        })?
    };
    let app: Arc<App<tilt_models::LlamaPolicy>> = Arc::new(App {
        model_id: engine.info().model.clone(),
        fingerprint: format!("tilt-{}-remote", env!("CARGO_PKG_VERSION")),
        engine: None,
        work: tx,
        metrics,
        config: config.clone(),
        next_id: AtomicU64::new(0),
    });
    serve_app(app, worker, listener, shutdown).await
}

/// The worker thread `run` and the channel that hands it work, with the metrics both see.
/// The channel only hands work over: the bound that matters is `max_queue`, counted in
/// `outstanding`.
#[allow(clippy::type_complexity)]
fn spawn_worker(
    name: &str,
    config: &ServerConfig,
    run: impl FnOnce(std::sync::mpsc::Receiver<Work>, Arc<Metrics>) + Send + 'static,
) -> std::io::Result<(SyncSender<Work>, Arc<Metrics>, std::thread::JoinHandle<()>)> {
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = sync_channel::<Work>(config.max_queue.max(1));
    let m = Arc::clone(&metrics);
    let worker = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(rx, m))?;
    Ok((tx, metrics, worker))
}

async fn serve_app<P: Policy + 'static>(
    app: Arc<App<P>>,
    worker: std::thread::JoinHandle<()>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = app.config.clone();
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::<P>))
        .route("/v1/completions", post(completions::<P>))
        .route("/v1/models", get(models::<P>))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text::<P>))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(Arc::clone(&app));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        tracing::info!("shutting down: no new requests; finishing those in flight");
    });
    let mut stopped = stop_rx.clone();
    let grace = config.shutdown_timeout;
    tokio::select! {
        r = server => r?,
        _ = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("shutdown deadline passed with requests still in flight"),
    }
    drop(app);
    // The worker ends once its channel closes and what it runs is answered.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    Ok(())
}

/// [`run`] in front of a remote engine ([`serve_remote`]).
///
/// # Errors
/// Binding or serving failed.
pub fn run_remote(
    engine: RemoteEngine,
    config: ServerConfig,
    addr: std::net::SocketAddr,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    on_runtime(addr, on_ready, |listener| {
        serve_remote(engine, config, listener, shutdown_signal())
    })
}

/// Bind `addr` on a new tokio runtime, say where (`on_ready`), and run `serve` on the
/// listener until it returns.
fn on_runtime<F: Future<Output = std::io::Result<()>>>(
    addr: std::net::SocketAddr,
    on_ready: impl FnOnce(std::net::SocketAddr),
    serve: impl FnOnce(tokio::net::TcpListener) -> F,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_ready(listener.local_addr()?);
        serve(listener).await
    })
}

/// Serve on a new tokio runtime until SIGTERM or Ctrl-C (for the CLI).
///
/// # Errors
/// Binding or serving failed.
pub fn run<P: Policy + 'static>(
    engine: Engine<P>,
    config: ServerConfig,
    addr: std::net::SocketAddr,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    on_runtime(addr, on_ready, |listener| {
        serve(engine, config, listener, shutdown_signal())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)")
        .code("not_found")
        .into_response()
}

async fn models<P: Policy + 'static>(
    State(app): State<Arc<App<P>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&app.config, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": app.model_id, "object": "model", "created": 0, "owned_by": "tilt"}],
    }))
    .into_response()
}

async fn metrics_text<P: Policy + 'static>(State(app): State<Arc<App<P>>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Compare in time independent of where the two differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(config: &ServerConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key (send Authorization: Bearer KEY)",
        )
        .code("invalid_api_key")),
    }
}

async fn chat<P: Policy + 'static>(
    State(app): State<Arc<App<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(app, headers, body, Endpoint::Chat).await
}

async fn completions<P: Policy + 'static>(
    State(app): State<Arc<App<P>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(app, headers, body, Endpoint::Completions).await
}

async fn respond<P: Policy + 'static>(
    app: Arc<App<P>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let r = match handle(&app, &headers, body, endpoint).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    app.metrics.answered(r.status().as_u16());
    r
}

/// Cancels its requests when dropped before `disarm` — the client hung up, or the
/// deadline passed.
struct CancelOnDrop(Vec<CancelToken>, bool);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.1 = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.1 {
            self.0.iter().for_each(CancelToken::cancel);
        }
    }
}

/// Counts a request as outstanding until dropped.
struct Outstanding(Arc<Metrics>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn handle<P: Policy + 'static>(
    app: &Arc<App<P>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    authorize(&app.config, headers)?;
    let body = body.map_err(|r| {
        ApiError::new(r.status(), format!("request body: {}", r.body_text())).code(
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "body_too_large"
            } else {
                "bad_body"
            },
        )
    })?;
    let req = openai::parse(&body)?;
    let max_given = req.max_tokens.is_some() || req.max_completion_tokens.is_some();
    let serial = app.next_id.fetch_add(1, Ordering::Relaxed);
    let fresh_seed = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(format!("{serial} {:?}", SystemTime::now()).as_bytes());
        u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
    };
    let mut t: Translated = req.translate(
        endpoint,
        &app.model_id,
        app.config.default_max_tokens,
        fresh_seed,
    )?;
    match &app.engine {
        Some(engine) if !max_given => {
            // No budget given: the default, within what the context leaves after the prompt.
            let ctx = engine.policy().context_length();
            for r in &mut t.requests {
                let len = engine
                    .encode(&r.input, 0)
                    .map_err(|e| engine_error(&e, endpoint))?
                    .len();
                r.params.max_new_tokens =
                    r.params.max_new_tokens.min(ctx.saturating_sub(len)).max(1);
            }
        }
        None if t.top_logprobs > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "alternatives per token are not served in front of a remote engine (each \
                 returned token's own log-probability is, as the engine reported it)",
            ))
        }
        _ => {}
    }
    if t.stream && t.requests.len() > 1 {
        return Err(ApiError::invalid(
            "prompt",
            "streaming takes one prompt (send the others as their own requests)",
        ));
    }
    // The bound on work accepted and not answered.
    let before = app.metrics.outstanding.fetch_add(1, Ordering::SeqCst);
    let outstanding = Outstanding(Arc::clone(&app.metrics));
    if before as usize >= app.config.max_queue {
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server has {} requests in hand (its queue bound); try again shortly",
                    app.config.max_queue
                ),
            )
        }
        .code("queue_full"));
    }
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{serial:012x}"),
        Endpoint::Completions => format!("cmpl-{serial:012x}"),
    };
    let created = now_secs();
    let accepted = Instant::now();
    let tokens: Vec<CancelToken> = t.requests.iter().map(|_| CancelToken::new()).collect();
    let mut guard = CancelOnDrop(tokens.clone(), true);
    if t.stream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = t.requests.remove(0);
        // A remote engine's answers arrive whole.
        let streams_tokens = app.engine.is_some() && request.params.strategy.streams_tokens();
        let choices = request.params.choices;
        send(
            app,
            Work {
                request,
                reply: Reply::Stream(tx),
                cancel: tokens[0].clone(),
                accepted,
            },
        )?;
        let head = ChunkHead {
            id,
            created,
            model: app.model_id.clone(),
            fingerprint: app.fingerprint.clone(),
            endpoint,
        };
        let include_usage = t.include_usage;
        let return_candidates = t.return_candidates;
        let deadline = tokio::time::Instant::now() + app.config.request_timeout;
        // Each message's events, until the batch that holds [DONE]; at the deadline
        // (however often tokens arrive) an error event and [DONE]. The guard and the
        // outstanding count live in the stream's state: a client that hangs up drops the
        // stream, which cancels the request.
        struct Live {
            rx: tokio::sync::mpsc::UnboundedReceiver<StreamMsg>,
            deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
            state: StreamState,
            ended: bool,
            guard: CancelOnDrop,
            _outstanding: Outstanding,
        }
        let live = Live {
            rx,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            state: StreamState::new(choices, streams_tokens),
            ended: false,
            guard,
            _outstanding: outstanding,
        };
        let events = futures_util::stream::unfold(live, move |mut live| {
            let head = head.clone();
            async move {
                if live.ended {
                    return None;
                }
                tokio::select! {
                    m = live.rx.recv() => {
                        let msg = m?;
                        let (batch, last) =
                            live.state.events(&head, msg, include_usage, return_candidates);
                        live.ended = last;
                        Some((batch, live))
                    }
                    () = &mut live.deadline => {
                        live.guard.0.iter().for_each(CancelToken::cancel);
                        let e = ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "the request passed its deadline (the server's request timeout); its sequences were freed",
                        )
                        .code("timeout");
                        live.ended = true;
                        Some((vec![error_event(&e), Event::default().data("[DONE]")], live))
                    }
                }
            }
        })
            .flat_map(futures_util::stream::iter)
            .map(Ok::<Event, std::convert::Infallible>);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
            .into_response());
    }
    let top_logprobs = t.top_logprobs;
    let inputs: Vec<tilt_engine::Input> = if top_logprobs > 0 {
        t.requests.iter().map(|r| r.input.clone()).collect()
    } else {
        Vec::new()
    };
    let mut pending = Vec::with_capacity(t.requests.len());
    for (request, cancel) in t.requests.into_iter().zip(&tokens) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        send(
            app,
            Work {
                request,
                reply: Reply::Once(tx),
                cancel: cancel.clone(),
                accepted,
            },
        )?;
        pending.push(rx);
    }
    let all = futures_util::future::join_all(pending);
    let results = match tokio::time::timeout(app.config.request_timeout, all).await {
        Ok(r) => r,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the request passed its deadline (the server's request timeout); its sequences were freed",
            )
            .code("timeout"))
        }
    };
    guard.disarm();
    let mut responses = Vec::with_capacity(results.len());
    for r in results {
        let r = r.map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the worker dropped the request",
            )
        })?;
        responses.push(r.map_err(|e| engine_error(&e, endpoint))?);
    }
    drop(outstanding);
    // serde_json would send a NaN as null; a result that holds one is a fault of ours.
    if let Err(e) = tilt_output::check_no_nan(&responses) {
        tracing::error!(field = e.path(), "a response held a NaN");
        return Err(nan_error(&e));
    }
    let alternatives = if top_logprobs > 0 {
        Some(alternatives_of(app, inputs, &responses, top_logprobs, endpoint).await?)
    } else {
        None
    };
    Ok(Json(full_body(
        &id,
        created,
        &app.model_id,
        &app.fingerprint,
        endpoint,
        &responses,
        t.logprobs,
        alternatives.as_deref(),
        t.return_candidates,
        app.engine.as_deref().map(Engine::policy),
    ))
    .into_response())
}

/// The `k` most likely tokens at each position of each output's answer (per response, per
/// output, per token), from the policy on a blocking thread.
type Alternatives = Vec<Vec<Vec<(TokenId, f64)>>>;

async fn alternatives_of<P: Policy + 'static>(
    app: &Arc<App<P>>,
    inputs: Vec<tilt_engine::Input>,
    responses: &[tilt_engine::Response],
    k: usize,
    endpoint: Endpoint,
) -> Result<Vec<Alternatives>, ApiError> {
    let work: Vec<(tilt_engine::Input, Vec<Vec<TokenId>>)> = inputs
        .into_iter()
        .zip(responses)
        .map(|(input, r)| {
            let answers = r
                .outputs
                .iter()
                .map(|o| o.candidates[o.selected].tokens.clone())
                .collect();
            (input, answers)
        })
        .collect();
    let engine = app.engine.clone().ok_or_else(|| {
        ApiError::invalid("top_logprobs", "not served in front of a remote engine")
    })?;
    let found = tokio::task::spawn_blocking(move || {
        work.into_iter()
            .map(|(input, answers)| {
                answers
                    .iter()
                    .map(|tokens| engine.top_log_probs(&input, tokens, k))
                    .collect::<tilt_engine::Result<Vec<_>>>()
            })
            .collect::<tilt_engine::Result<Vec<_>>>()
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the log-probability pass failed",
        )
    })?;
    found.map_err(|e| engine_error(&e, endpoint))
}

/// A result holding a NaN (which serde_json would send as null) is a fault of ours: 500.
fn nan_error(e: &tilt_output::ValueError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "internal error: the result's field {} is not a number",
            e.path()
        ),
    )
}

fn send<P: Policy>(app: &App<P>, w: Work) -> Result<(), ApiError> {
    app.work.try_send(w).map_err(|e| match e {
        TrySendError::Full(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full; try again shortly",
            )
        }
        .code("queue_full"),
        TrySendError::Disconnected(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
        .code("shutting_down"),
    })
}

/// Per-token log-probabilities of an output, in the endpoint's shape.
/// `alternatives`: the most likely tokens at each position (`top_logprobs`), if asked.
fn logprobs_json<P: Policy>(
    policy: Option<&P>,
    o: &tilt_engine::Output,
    endpoint: Endpoint,
    alternatives: Option<&[Vec<(TokenId, f64)>]>,
) -> serde_json::Value {
    let c = &o.candidates[o.selected];
    let piece = |t: TokenId| policy.and_then(|p| p.decode(&[t]).ok()).unwrap_or_default();
    // A remote engine's tokens come as text (no ids).
    let pieces: Vec<String> = match policy {
        Some(_) => c.tokens.iter().map(|&t| piece(t)).collect(),
        None => c.token_texts.clone(),
    };
    let alts = |i: usize| {
        alternatives
            .and_then(|a| a.get(i))
            .map_or(&[][..], Vec::as_slice)
    };
    match endpoint {
        Endpoint::Chat => json!({
            "content": pieces.iter().zip(&c.token_log_probs).enumerate().map(|(i, (p, lp))| json!({
                "token": p, "logprob": lp, "bytes": p.as_bytes(),
                "top_logprobs": alts(i).iter().map(|&(t, alp)| {
                    let a = piece(t);
                    json!({"token": a, "logprob": alp, "bytes": a.as_bytes()})
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        Endpoint::Completions => {
            let mut offset = 0usize;
            let offsets: Vec<usize> = pieces
                .iter()
                .map(|p| {
                    let o = offset;
                    offset += p.len();
                    o
                })
                .collect();
            let top = alternatives.map(|_| {
                (0..pieces.len())
                    .map(|i| {
                        alts(i)
                            .iter()
                            .map(|&(t, alp)| (piece(t), json!(alp)))
                            .collect::<serde_json::Map<_, _>>()
                    })
                    .collect::<Vec<_>>()
            });
            json!({
                "tokens": pieces,
                "token_logprobs": c.token_log_probs,
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn full_body<P: Policy>(
    id: &str,
    created: u64,
    model: &str,
    fingerprint: &str,
    endpoint: Endpoint,
    responses: &[tilt_engine::Response],
    logprobs: bool,
    alternatives: Option<&[Alternatives]>,
    with_candidates: bool,
    policy: Option<&P>,
) -> serde_json::Value {
    let mut choices = Vec::new();
    for (ri, r) in responses.iter().enumerate() {
        for (oi, o) in r.outputs.iter().enumerate() {
            let index = choices.len();
            let alts = alternatives
                .and_then(|a| a.get(ri))
                .and_then(|a| a.get(oi))
                .map(Vec::as_slice);
            let lp = if logprobs {
                logprobs_json(policy, o, endpoint, alts)
            } else {
                serde_json::Value::Null
            };
            let tilt = TiltInfo::of(o, with_candidates);
            choices.push(match endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": o.text},
                    "finish_reason": finish_reason(o.finish_reason),
                    "logprobs": lp,
                    "tilt": tilt,
                }),
                Endpoint::Completions => json!({
                    "index": index,
                    "text": o.text,
                    "finish_reason": finish_reason(o.finish_reason),
                    "logprobs": lp,
                    "tilt": tilt,
                }),
            });
        }
    }
    json!({
        "id": id,
        "object": match endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": WireUsage::of(responses),
    })
}

/// What every chunk of a stream repeats.
#[derive(Clone)]
struct ChunkHead {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    endpoint: Endpoint,
}

impl ChunkHead {
    fn chunk(&self, choices: serde_json::Value, usage: Option<WireUsage>) -> Event {
        let mut v = json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        Event::default().data(v.to_string())
    }

    fn delta(&self, index: usize, text: &str, first: bool) -> serde_json::Value {
        match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({"content": text});
                if first {
                    delta["role"] = json!("assistant");
                }
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}])
            }
            Endpoint::Completions => {
                json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}])
            }
        }
    }
}

/// What a stream has sent so far, per choice.
struct StreamState {
    streams_tokens: bool,
    sent: Vec<String>,
    started: Vec<bool>,
    done: bool,
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(e.body())
}

impl StreamState {
    fn new(choices: usize, streams_tokens: bool) -> Self {
        StreamState {
            streams_tokens,
            sent: vec![String::new(); choices],
            started: vec![false; choices],
            done: false,
        }
    }

    /// The events a message gives, and whether they end the stream: a token of a choice's
    /// output (streaming strategies), or at the end the rest of each choice's text, its last
    /// chunk with the `tilt` object, the usage when asked for, and `[DONE]`.
    fn events(
        &mut self,
        head: &ChunkHead,
        msg: StreamMsg,
        include_usage: bool,
        with_candidates: bool,
    ) -> (Vec<Event>, bool) {
        (
            self.events_of(head, msg, include_usage, with_candidates),
            self.done,
        )
    }

    fn events_of(
        &mut self,
        head: &ChunkHead,
        msg: StreamMsg,
        include_usage: bool,
        with_candidates: bool,
    ) -> Vec<Event> {
        match msg {
            StreamMsg::Token(t) => {
                if !self.streams_tokens || t.candidate != 0 || t.text.is_empty() {
                    return Vec::new();
                }
                let Some(sent) = self.sent.get_mut(t.choice) else {
                    return Vec::new();
                };
                sent.push_str(&t.text);
                let first = !self.started[t.choice];
                self.started[t.choice] = true;
                vec![head.chunk(head.delta(t.choice, &t.text, first), None)]
            }
            StreamMsg::Done(result) => {
                self.done = true;
                let r = match result {
                    Ok(r) => r,
                    Err(e) => {
                        return vec![
                            error_event(&engine_error(&e, head.endpoint)),
                            Event::default().data("[DONE]"),
                        ]
                    }
                };
                if let Err(e) = tilt_output::check_no_nan(&r) {
                    tracing::error!(field = e.path(), "a response held a NaN");
                    return vec![error_event(&nan_error(&e)), Event::default().data("[DONE]")];
                }
                let mut out = Vec::new();
                for o in &r.outputs {
                    let j = o.choice;
                    // Whatever the token stream did not show (all of a selection's answer,
                    // or text held back at the end).
                    let sent = self.sent.get(j).map_or("", String::as_str);
                    let rest = o.text.strip_prefix(sent).unwrap_or_else(|| {
                        tracing::warn!(choice = j, "streamed text is not a prefix of the answer");
                        ""
                    });
                    if !rest.is_empty() || !self.started.get(j).copied().unwrap_or(true) {
                        out.push(head.chunk(head.delta(j, rest, !self.started[j]), None));
                    }
                    let tilt = TiltInfo::of(o, with_candidates);
                    let last = match head.endpoint {
                        Endpoint::Chat => json!([{"index": j, "delta": {}, "logprobs": null,
                            "finish_reason": finish_reason(o.finish_reason), "tilt": tilt}]),
                        Endpoint::Completions => json!([{"index": j, "text": "", "logprobs": null,
                            "finish_reason": finish_reason(o.finish_reason), "tilt": tilt}]),
                    };
                    out.push(head.chunk(last, None));
                }
                if include_usage {
                    out.push(head.chunk(json!([]), Some(WireUsage::of(std::slice::from_ref(&r)))));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
        }
    }
}
