//! The one worker that owns the model: a thread running the engine's [`Scheduler`], which
//! steps the union of every active sequence of every request as one batch. HTTP handlers
//! hand it [`Work`] through a channel; it admits new requests between steps (their prefills
//! included), answers each as soon as it is done, and sends streamed tokens as they are
//! drawn. A finished or cancelled request leaves the batch at once.
//!
//! Why a thread and not a tokio task: a step is a few milliseconds to a second of CPU work
//! on the model's own thread pool; on the async runtime it would stall every connection.

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tilt_engine::{CancelToken, Engine, EngineError, Request, RequestId, Response, TokenEvent};
use tilt_models::Policy;
use tokio::sync::{mpsc, oneshot};

/// A token drawn for a streamed request.
#[derive(Debug, Clone)]
pub struct Token {
    /// The choice.
    pub choice: usize,
    /// The candidate within the choice.
    pub candidate: usize,
    /// The text it completes.
    pub text: String,
}

/// What a streamed request receives, in order.
#[derive(Debug)]
pub enum StreamMsg {
    /// A token.
    Token(Token),
    /// The end: the response or the error.
    Done(Result<Response, EngineError>),
}

/// Where a request's answer goes.
pub enum Reply {
    /// All at once.
    Once(oneshot::Sender<Result<Response, EngineError>>),
    /// Token by token, then the response.
    Stream(mpsc::UnboundedSender<StreamMsg>),
}

/// A request for the worker.
pub struct Work {
    /// The request.
    pub request: Request,
    /// Where its answer goes.
    pub reply: Reply,
    /// Set when the client hangs up or the deadline passes.
    pub cancel: CancelToken,
    /// When it was accepted (for the time to first token).
    pub accepted: Instant,
}

/// Run the worker until the channel closes and every request is answered.
pub fn run<P: Policy>(engine: Arc<Engine<P>>, rx: Receiver<Work>, metrics: Arc<Metrics>) {
    let mut scheduler = engine.scheduler();
    let mut replies: HashMap<RequestId, Reply> = HashMap::new();
    let mut open = true;
    loop {
        // Idle: wait for work. Busy: take what has arrived, then step.
        if scheduler.is_idle() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(w) => submit(&mut scheduler, &mut replies, w, &metrics),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(w) => submit(&mut scheduler, &mut replies, w, &metrics),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.step()));
        match stepped {
            Ok(done) => {
                for (id, result) in done {
                    if let Some(reply) = replies.remove(&id) {
                        answer(reply, result, &metrics);
                    }
                }
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!(panic = %what, "the worker's step panicked; failing its requests");
                for (_, reply) in replies.drain() {
                    answer(
                        reply,
                        Err(EngineError::Internal(format!("the step failed: {what}"))),
                        &metrics,
                    );
                }
                scheduler = engine.scheduler();
            }
        }
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        metrics
            .batch_rows
            .store(scheduler.batch_rows() as u64, Ordering::Relaxed);
        metrics
            .queued
            .store(scheduler.queued() as u64, Ordering::Relaxed);
        metrics
            .running
            .store(scheduler.running() as u64, Ordering::Relaxed);
    }
}

fn submit<P: Policy>(
    scheduler: &mut tilt_engine::Scheduler<'_, P>,
    replies: &mut HashMap<RequestId, Reply>,
    w: Work,
    metrics: &Arc<Metrics>,
) {
    let Work {
        request,
        reply,
        cancel,
        accepted,
    } = w;
    let events = match &reply {
        Reply::Stream(tx) => {
            let tx = tx.clone();
            let metrics = Arc::clone(metrics);
            let mut first = true;
            Some(Box::new(move |ev: &TokenEvent<'_>| {
                if first {
                    first = false;
                    metrics.first_token(accepted.elapsed().as_secs_f64());
                }
                let _ = tx.send(StreamMsg::Token(Token {
                    choice: ev.choice,
                    candidate: ev.candidate,
                    text: ev.text.to_string(),
                }));
            }) as tilt_engine::TokenSink<'_>)
        }
        Reply::Once(_) => None,
    };
    match scheduler.submit(request, events, cancel) {
        Ok(id) => {
            replies.insert(id, reply);
        }
        Err(e) => answer(reply, Err(e), metrics),
    }
}

fn answer(reply: Reply, result: Result<Response, EngineError>, metrics: &Metrics) {
    if let Ok(r) = &result {
        metrics
            .generated_tokens
            .fetch_add(r.usage.completion_tokens as u64, Ordering::Relaxed);
        metrics
            .prompt_tokens
            .fetch_add(r.usage.prompt_tokens as u64, Ordering::Relaxed);
        for o in &r.outputs {
            metrics.kl(o.kl_bound, o.kl_estimate);
        }
    }
    // A client that left has dropped its receiver: nothing to do.
    match reply {
        Reply::Once(tx) => {
            let _ = tx.send(result);
        }
        Reply::Stream(tx) => {
            let _ = tx.send(StreamMsg::Done(result));
        }
    }
}

/// Run the worker of a server in front of a remote engine until the channel closes and
/// every request is answered: each request runs on a thread of its own (the remote
/// engine's client bounds what is in flight to it; the server's `max_queue` bounds the
/// threads), and is answered whole. A request cancelled before it starts is not sent.
pub fn run_remote(
    engine: Arc<tilt_engine::RemoteEngine>,
    rx: Receiver<Work>,
    metrics: Arc<Metrics>,
) {
    std::thread::scope(|s| {
        for w in rx {
            let (engine, metrics) = (Arc::clone(&engine), Arc::clone(&metrics));
            s.spawn(move || {
                let Work {
                    request,
                    reply,
                    cancel,
                    ..
                } = w;
                metrics.running.fetch_add(1, Ordering::Relaxed);
                let result = if cancel.is_cancelled() {
                    Err(EngineError::Cancelled)
                } else {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.generate(&request)
                    }))
                    .unwrap_or_else(|_| {
                        Err(EngineError::Internal("the remote request panicked".into()))
                    })
                };
                metrics.running.fetch_sub(1, Ordering::Relaxed);
                answer(reply, result, &metrics);
            });
        }
    });
}
