//! The transport: JSON over plain HTTP with a timeout, a bound on requests in flight, and
//! bounded retries with exponential backoff on the answers that mean "try again later"
//! (429, 502, 503, 504) and on dropped connections. A timeout is not retried (the engine
//! may still be working on it); no other status is retried.

use crate::quote_excerpt;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// At most this many characters of an answer are quoted in an error.
pub(crate) const QUOTED: usize = 300;
/// The longest answer read, in bytes.
pub(crate) const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// A counting semaphore: at most `limit` holders at once.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn take(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// What a request came back with: the status and the body's text.
pub(crate) struct Answer {
    pub status: u16,
    pub text: String,
    /// Attempts made (1 without retries).
    pub attempts: usize,
}

/// One engine's HTTP client.
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
    api_key: Option<String>,
    timeout: Duration,
    retries: u32,
    slots: Slots,
}

/// A failure of one attempt: whether it may be retried, and what happened.
struct Attempt {
    retry: bool,
    message: String,
}

impl Client {
    pub fn new(
        base: &str,
        api_key: Option<String>,
        timeout: Duration,
        retries: u32,
        max_concurrency: usize,
    ) -> Client {
        Client {
            base: base.to_string(),
            agent: crate::net::new_agent(base, timeout),
            api_key,
            timeout,
            retries,
            slots: Slots {
                free: Mutex::new(max_concurrency.max(1)),
                freed: Condvar::new(),
            },
        }
    }

    /// The server's root: the base without a trailing `/v1` (where engines put their native
    /// routes, SGLang's `/generate`).
    fn root(&self) -> &str {
        self.base.strip_suffix("/v1").unwrap_or(&self.base)
    }

    /// POST `body` to `base/path` (GET when `body` is None), retrying as the module docs
    /// say. Returns the last answer whatever its status, or the transport failure.
    fn call_at(
        &self,
        base: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, String> {
        let url = format!("{base}{path}");
        let mut attempts = 0usize;
        loop {
            attempts += 1;
            let outcome = {
                let _slot = self.slots.take();
                self.attempt(&url, body)
            };
            let backoff = crate::net::backoff(attempts as u32 - 1);
            match outcome {
                Ok((status, text)) => {
                    let again = matches!(status, 429 | 502 | 503 | 504);
                    if again && attempts <= self.retries as usize {
                        tracing::warn!(%url, status, attempts, "engine busy; retrying");
                        std::thread::sleep(backoff);
                        continue;
                    }
                    return Ok(Answer {
                        status,
                        text,
                        attempts,
                    });
                }
                Err(a) if a.retry && attempts <= self.retries as usize => {
                    tracing::warn!(%url, attempts, error = %a.message, "retrying");
                    std::thread::sleep(backoff);
                }
                Err(a) => {
                    return Err(if attempts > 1 {
                        format!("{} (after {attempts} attempts)", a.message)
                    } else {
                        a.message
                    })
                }
            }
        }
    }

    fn attempt(
        &self,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), Attempt> {
        let sent = match body {
            Some(b) => {
                let mut req = self.agent.post(url);
                if let Some(k) = &self.api_key {
                    req = req.header("Authorization", &format!("Bearer {k}"));
                }
                req.send_json(b)
            }
            None => {
                let mut req = self.agent.get(url);
                if let Some(k) = &self.api_key {
                    req = req.header("Authorization", &format!("Bearer {k}"));
                }
                req.call()
            }
        };
        let timeout = || Attempt {
            retry: false,
            message: format!(
                "POST {url}: no complete answer within {:.1} s (timeout)",
                self.timeout.as_secs_f64()
            ),
        };
        let mut response = sent.map_err(|e| match e {
            ureq::Error::Timeout(_) => timeout(),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => Attempt {
                retry: true,
                message: format!("{url}: cannot connect ({e})"),
            },
            ureq::Error::Io(io) => Attempt {
                retry: matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ),
                message: format!("{url}: {io}"),
            },
            other => Attempt {
                retry: false,
                message: format!("{url}: request failed: {other}"),
            },
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => timeout(),
                ureq::Error::BodyExceedsLimit(_) => Attempt {
                    retry: false,
                    message: format!(
                        "{url}: the answer (HTTP {status}) is longer than {MAX_ANSWER_BYTES} bytes"
                    ),
                },
                other => Attempt {
                    retry: false,
                    message: format!(
                        "{url}: the answer (HTTP {status}) ended early or could not be read: \
                         {other}"
                    ),
                },
            })?;
        Ok((status, text))
    }

    /// POST (or GET) `base/path` as [`Client::call_at`] does, then the body as JSON when the
    /// status is 2xx; otherwise an error quoting the answer (OpenAI-style
    /// `{"error": {"message": …}}` quoted as the engine's error).
    pub fn json(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(serde_json::Value, usize), String> {
        self.json_at(&self.base, path, body)
    }

    /// [`Client::json`] on a route of the server's root (`http://host:port/generate` for a
    /// base `http://host:port/v1`).
    pub fn json_root(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(serde_json::Value, usize), String> {
        self.json_at(self.root(), path, body)
    }

    fn json_at(
        &self,
        base: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(serde_json::Value, usize), String> {
        let a = self.call_at(base, path, body)?;
        let tries = if a.attempts > 1 {
            format!(" (after {} attempts)", a.attempts)
        } else {
            String::new()
        };
        if !(200..300).contains(&a.status) {
            let said = serde_json::from_str::<serde_json::Value>(&a.text)
                .ok()
                .and_then(|v| {
                    let e = v.get("error")?;
                    Some(match e.get("message").and_then(|m| m.as_str()) {
                        Some(m) => m.to_string(),
                        None => e.to_string(),
                    })
                });
            return Err(match said {
                Some(m) => format!(
                    "{path}: HTTP {}{tries}: the engine said {}",
                    a.status,
                    quote_excerpt(&m, QUOTED)
                ),
                None => format!(
                    "{path}: HTTP {}{tries}: {}",
                    a.status,
                    quote_excerpt(&a.text, QUOTED)
                ),
            });
        }
        let v = serde_json::from_str(&a.text).map_err(|e| {
            format!(
                "{path}: the answer is not JSON ({e}): {}",
                quote_excerpt(&a.text, QUOTED)
            )
        })?;
        Ok((v, a.attempts))
    }
}
