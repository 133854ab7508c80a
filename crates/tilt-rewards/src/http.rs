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
//! One finite score per pair, in order. Any status other than 2xx is an error (its body is
//! quoted), as are a body that is not this JSON, a wrong number of scores, a non-finite or
//! non-numeric score, and no complete answer within the timeout (default 60 s). Proxies
//! from `HTTP_PROXY`/`NO_PROXY` are honoured except for loopback hosts. This build speaks
//! plain `http://` only (no TLS library is linked): put a local TLS-terminating proxy in
//! front of an `https://` service.

use crate::{check_scores, json, Reward, RewardError};
use std::time::Duration;

/// Default time allowed for one whole request (connect, send, answer).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many bytes of an error response's body are quoted in the error.
const QUOTED_BODY: usize = 300;

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

/// Whether `url`'s host is exactly a loopback address: `localhost` (any case, with or
/// without a trailing dot), an IPv4 address in 127.0.0.0/8, or `[::1]` (also as an
/// IPv4-mapped `[::ffff:127.x.y.z]`). Only these skip the proxy: `localhost.example.com` or
/// `127.0.0.1.example.com` are names like any other.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let Some((v6, after)) = bracketed.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || after.starts_with(':')) {
            return false;
        }
        return v6.parse::<std::net::Ipv6Addr>().is_ok_and(|a| {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        });
    }
    let host = host_port.split_once(':').map_or(host_port, |(h, _)| h);
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

impl HttpReward {
    /// A reward posting to `url` (an `http://` URL), each request allowed `timeout`.
    ///
    /// # Errors
    /// [`RewardError::Failed`] if `url` is not an `http://` URL.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RewardError> {
        if !url.starts_with("http://") {
            return Err(RewardError::Failed {
                reward: format!("http:{url}"),
                message: if url.starts_with("https://") {
                    "https is not supported by this build (no TLS library); use http:// or a local TLS proxy".into()
                } else {
                    "the URL must start with http://".into()
                },
            });
        }
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false);
        if is_loopback(url) {
            config = config.proxy(None);
        }
        Ok(Self {
            url: url.to_string(),
            timeout,
            agent: config.build().new_agent(),
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
        let mut response = self
            .agent
            .post(&self.url)
            .send_json(&body)
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => self.fail(format!(
                    "no answer within {:.3} s (timeout)",
                    self.timeout.as_secs_f64()
                )),
                other => self.fail(format!("request failed: {other}")),
            })?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|e| match e {
            ureq::Error::Timeout(_) => self.fail(format!(
                "no complete answer within {:.3} s (timeout)",
                self.timeout.as_secs_f64()
            )),
            other => self.fail(format!("cannot read the answer (HTTP {status}): {other}")),
        })?;
        if !status.is_success() {
            let quoted: String = text.chars().take(QUOTED_BODY).collect();
            return Err(self.fail(format!("HTTP {status}: {quoted}")));
        }
        // Python's json.dumps writes NaN/Infinity for non-finite floats: accepted here so
        // that check_scores names the item, as for the command reward.
        let value = json::parse(&text).map_err(|e| {
            let quoted: String = text.chars().take(QUOTED_BODY).collect();
            self.fail(format!("the answer is not JSON ({e}): {quoted}"))
        })?;
        let Some(list) = value.get("scores").and_then(|s| s.as_array()) else {
            let quoted: String = text.chars().take(QUOTED_BODY).collect();
            return Err(self.fail(format!("the answer has no \"scores\" array: {quoted}")));
        };
        let scores = list
            .iter()
            .enumerate()
            .map(|(i, v)| json::score(v).map_err(|m| self.fail(format!("score {i} is {m}"))))
            .collect::<Result<Vec<f32>, _>>()?;
        check_scores(&self.name(), pairs.len(), scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for yes in [
            "http://127.0.0.1:8080/score",
            "http://127.255.0.9/",
            "http://localhost/x",
            "http://LocalHost:80",
            "http://localhost.:8000/s",
            "http://user:pw@localhost:1/",
            "http://[::1]:9/",
            "http://[::1]",
            "http://[::ffff:127.0.0.1]:9/",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "http://example.com/127.0.0.1",
            "http://localhost.evil.com/score",
            "http://localhost.evil.com:8000",
            "http://localhostx/",
            "http://evil.localhost/",
            "http://127.0.0.1.evil.com/",
            "http://127.evil.com/",
            "http://128.0.0.1/",
            "http://[::1].evil.com/",
            "http://[::2]/",
            "http://localhost@evil.com/",
            "http://evil.com/?localhost",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn non_http_urls_are_rejected() {
        let e = HttpReward::new("https://example.com", DEFAULT_HTTP_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("https is not supported"), "{e}");
        let e = HttpReward::new("example.com", DEFAULT_HTTP_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("must start with http://"), "{e}");
    }
}
