//! A reward served over HTTP: one POST per batch.
//!
//! Protocol (also in this crate's README):
//!
//! ```text
//! POST <url>
//! Content-Type: application/json
//!
//! {"pairs": [{"prompt": "...", "response": "..."}, ...]}
//!
//! 200 OK
//! Content-Type: application/json
//!
//! {"scores": [1.5, -0.25, ...]}
//! ```
//! One finite score per pair, in order. The URL is checked when the reward is made: it
//! must be a valid `http://` URL with a host ([`RewardError::Invalid`] otherwise). While it
//! runs, each of these is a [`RewardError`] naming the reward and URL: any status other
//! than 2xx (its body is quoted; redirects are not followed, since a redirected POST may
//! arrive as a GET: give the final URL), a body that is not this JSON (`{"error": "…"}`
//! is quoted as the service's error), a wrong number of scores, a score that is not a
//! number, a non-finite score ([`RewardError::NonFinite`]), one beyond `f32`'s range
//! ([`RewardError::OutOfRange`]), a body longer than [`MAX_ANSWER_BYTES`], and no complete
//! answer (body included) within the timeout (default 60 s). Proxies from
//! `HTTP_PROXY`/`NO_PROXY` are honoured except for loopback hosts. This build speaks plain
//! `http://` only (no TLS library is linked): put a local TLS-terminating proxy in front of
//! an `https://` service.
//!
//! The transport (`new_agent`, `answer`: proxy, redirects, body limit, timeout, the
//! quoted body of an error status) is shared with the served rewards of
//! [`crate::served`], which add retries on top of it.

use crate::json::{self, Sent};
use crate::{quote, quote_excerpt, Reward, RewardError};
use std::time::Duration;

/// Default time allowed for one whole request (connect, send, answer).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many characters of an answer's body are quoted in an error.
pub(crate) const QUOTED_BODY: usize = 300;

/// The longest answer body read, in bytes (ureq's default limit, stated).
pub const MAX_ANSWER_BYTES: u64 = 10 << 20;

/// A reward computed by an HTTP service (protocol in the [module docs](self)).
#[derive(Debug)]
pub struct HttpReward {
    url: String,
    timeout: Duration,
    agent: ureq::Agent,
}

#[derive(serde::Serialize)]
struct Pair<'a> {
    prompt: &'a str,
    response: &'a str,
}

#[derive(serde::Serialize)]
struct Request<'a> {
    pairs: Vec<Pair<'a>>,
}

// The URL check, the loopback test and the agent are shared with the remote engines'
// client (tilt-remote), so that a reward service and an engine are reached the same way.
pub(crate) use tilt_remote::net::{check_url, new_agent};

/// Why an exchange with a service failed: what to say, and whether asking again may help.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What happened, for a [`RewardError::Failed`] message.
    pub(crate) message: String,
    /// A timeout, a refused, reset or closed connection, or HTTP 429, 502, 503 or 504:
    /// what a service that is starting, restarting or overloaded answers. Never a 4xx other
    /// than 429, and never an answer that arrived whole.
    pub(crate) transient: bool,
}

/// Whether a transport error is one that asking again may cure.
fn transient(e: &ureq::Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::BrokenPipe
                | K::TimedOut
                | K::UnexpectedEof
        ),
        _ => false,
    }
}

/// The body of the answer to a request `agent` sent (`sent`: what `send_json` or `call`
/// returned), if its status is 2xx. Everything else is a [`Failure`] saying what came
/// back: a transport error, no complete answer within `timeout`, a body longer than
/// [`MAX_ANSWER_BYTES`] or unreadable, a redirect (never followed: a POST may be
/// redirected as a GET), or another status with the first [`QUOTED_BODY`] characters of
/// its body quoted.
pub(crate) fn answer(
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    timeout: Duration,
) -> Result<String, Failure> {
    let timed_out = |what: &str| Failure {
        message: format!("no {what} within {:.3} s (timeout)", timeout.as_secs_f64()),
        transient: true,
    };
    let mut response = sent.map_err(|e| match e {
        ureq::Error::Timeout(_) => timed_out("answer"),
        other => Failure {
            transient: transient(&other),
            message: format!("request failed: {other}"),
        },
    })?;
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .map_err(|e| match e {
            ureq::Error::Timeout(_) => timed_out("complete answer"),
            ureq::Error::BodyExceedsLimit(_) => Failure {
                message: format!(
                    "the answer (HTTP {status}) is longer than {MAX_ANSWER_BYTES} bytes"
                ),
                transient: false,
            },
            other => Failure {
                transient: transient(&other),
                message: format!("cannot read the answer (HTTP {status}): {other}"),
            },
        })?;
    if status.is_redirection() {
        return Err(Failure {
            message: format!(
                "HTTP {status}, a redirect to {}: tilt does not follow redirects (a POST may \
                 be redirected as a GET); give the final URL",
                location
                    .as_deref()
                    .map_or_else(|| "nowhere".to_string(), quote)
            ),
            transient: false,
        });
    }
    if !status.is_success() {
        return Err(Failure {
            message: format!("HTTP {status}: {}", quote_excerpt(&text, QUOTED_BODY)),
            transient: matches!(status.as_u16(), 429 | 502 | 503 | 504),
        });
    }
    Ok(text)
}

impl HttpReward {
    /// A reward posting to `url` (an `http://` URL), each request allowed `timeout`.
    ///
    /// # Errors
    /// [`RewardError::Invalid`] if `url` is not a valid `http://` URL with a host (and a
    /// port from 1 to 65535, if it has one).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RewardError> {
        check_url(url).map_err(|message| RewardError::Invalid {
            reward: format!("http:{url}"),
            message,
        })?;
        Ok(Self {
            url: url.to_string(),
            timeout,
            agent: new_agent(url, timeout),
        })
    }

    /// The service's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn fail(&self, message: String) -> RewardError {
        RewardError::Failed {
            reward: self.name(),
            message,
        }
    }
}

impl Reward for HttpReward {
    fn name(&self) -> String {
        format!("http:{}", self.url)
    }

    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let body = Request {
            pairs: pairs
                .iter()
                .map(|&(prompt, response)| Pair { prompt, response })
                .collect(),
        };
        let sent = self.agent.post(&self.url).send_json(&body);
        let text = answer(sent, self.timeout).map_err(|f| self.fail(f.message))?;
        let quoted = || quote_excerpt(&text, QUOTED_BODY);
        // Python's json.dumps writes NaN/Infinity for non-finite floats: accepted here so
        // that the score is named by its index, as for the command reward.
        let value = json::parse(&text)
            .map_err(|e| self.fail(format!("the answer is not JSON ({e}): {}", quoted())))?;
        let list = match value.get("scores") {
            Some(serde_json::Value::Array(list)) => list,
            Some(other) => {
                return Err(self.fail(format!(
                    "\"scores\" in the answer is {}, not an array",
                    json::shown(other)
                )))
            }
            None => {
                return Err(self.fail(match value.get("error") {
                    Some(serde_json::Value::String(e)) => format!(
                        "the service reported an error: {}",
                        quote_excerpt(e, QUOTED_BODY)
                    ),
                    Some(e) => format!("the service reported an error: {}", json::shown(e)),
                    None => format!("the answer has no \"scores\" array: {}", quoted()),
                }))
            }
        };
        let scores = list
            .iter()
            .enumerate()
            .map(|(i, v)| json::sent(v).map_err(|m| self.fail(format!("score {i} is {m}"))))
            .collect::<Result<Vec<Sent>, _>>()?;
        json::check_sent(&self.name(), pairs.len(), scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_urls_are_invalid_input() {
        for (url, expected) in [
            ("https://example.com", "https is not supported"),
            ("example.com", "must start with http://"),
            ("HTTP://example.com", "must start with http://"),
            ("http://", "not a valid URL"),
            ("http:///score", "not a valid URL"),
            ("http://exa mple.com/", "not a valid URL"),
            ("http://127.0.0.1:99999/score", "port \"99999\""),
            ("http://127.0.0.1:0/score", "port \"0\""),
            ("http://127.0.0.1:x/", "port \"x\""),
        ] {
            let e = HttpReward::new(url, DEFAULT_HTTP_TIMEOUT).unwrap_err();
            assert!(e.is_invalid_input(), "{url}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(expected) && msg.contains(url), "{url}: {msg}");
        }
        for ok in [
            "http://127.0.0.1:8000/score",
            "http://localhost/score?x=1",
            "http://[::1]:9/",
            "http://[::1]/",
            "http://example.com",
        ] {
            HttpReward::new(ok, DEFAULT_HTTP_TIMEOUT).unwrap();
        }
    }
}
