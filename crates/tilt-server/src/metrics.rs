//! `GET /metrics`: Prometheus text (exposition format 0.0.4). A handful of counters and
//! gauges, kept in atomics and written out by hand: the format is a few lines of text, and
//! a metrics crate would bring a registry this server does not need.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    by_status: Mutex<BTreeMap<u16, u64>>,
    /// Requests accepted and not yet answered.
    pub outstanding: AtomicU64,
    /// Requests waiting to be admitted to the batch.
    pub queued: AtomicU64,
    /// Requests in the batch.
    pub running: AtomicU64,
    /// Rows of the last step.
    pub batch_rows: AtomicU64,
    /// Steps run.
    pub steps: AtomicU64,
    /// Tokens generated (every candidate).
    pub generated_tokens: AtomicU64,
    /// Prompt tokens.
    pub prompt_tokens: AtomicU64,
    ttft_micros_sum: AtomicU64,
    ttft_count: AtomicU64,
    kl_bound_micronats: AtomicU64,
    kl_estimate_micronats: AtomicU64,
}

impl Metrics {
    /// Count an answer with `status`.
    pub fn answered(&self, status: u16) {
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// Record a time to first token.
    pub fn first_token(&self, seconds: f64) {
        self.ttft_micros_sum
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Add an output's KL figures (nats).
    pub fn kl(&self, bound: Option<f64>, estimate: Option<f64>) {
        let micro = |x: f64| (x.max(0.0) * 1e6) as u64;
        if let Some(b) = bound.filter(|b| b.is_finite()) {
            self.kl_bound_micronats
                .fetch_add(micro(b), Ordering::Relaxed);
        }
        if let Some(e) = estimate.filter(|e| e.is_finite()) {
            self.kl_estimate_micronats
                .fetch_add(micro(e), Ordering::Relaxed);
        }
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in lines {
                s.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let statuses: Vec<(String, String)> = self
            .by_status
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("{{status=\"{k}\"}}"), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        metric(
            "tilt_requests_total",
            "counter",
            "Requests answered, by HTTP status.",
            statuses,
        );
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "tilt_requests_outstanding",
            "gauge",
            "Requests accepted and not yet answered.",
            one(g(&self.outstanding)),
        );
        metric(
            "tilt_queue_depth",
            "gauge",
            "Requests waiting to join the batch.",
            one(g(&self.queued)),
        );
        metric(
            "tilt_running_requests",
            "gauge",
            "Requests in the batch.",
            one(g(&self.running)),
        );
        metric(
            "tilt_batch_rows",
            "gauge",
            "Sequences stepped together in the last step.",
            one(g(&self.batch_rows)),
        );
        metric(
            "tilt_steps_total",
            "counter",
            "Batched steps run.",
            one(g(&self.steps)),
        );
        metric(
            "tilt_generated_tokens_total",
            "counter",
            "Tokens generated, over every candidate (rate() gives tokens/s).",
            one(g(&self.generated_tokens)),
        );
        metric(
            "tilt_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            one(g(&self.prompt_tokens)),
        );
        metric(
            "tilt_time_to_first_token_seconds",
            "summary",
            "Time from accepting a streamed request to its first token.",
            // A summary's lines are its name with `_sum` and `_count`.
            vec![
                (
                    "_sum".into(),
                    format!("{}", g(&self.ttft_micros_sum) as f64 / 1e6),
                ),
                ("_count".into(), g(&self.ttft_count).to_string()),
            ],
        );
        metric(
            "tilt_kl_spent_nats_total",
            "counter",
            "KL(π‖p) spent by the answers, nats: the sum of their bounds and of their estimates.",
            vec![
                (
                    "{kind=\"bound\"}".into(),
                    format!("{}", g(&self.kl_bound_micronats) as f64 / 1e6),
                ),
                (
                    "{kind=\"estimate\"}".into(),
                    format!("{}", g(&self.kl_estimate_micronats) as f64 / 1e6),
                ),
            ],
        );
        s
    }
}
