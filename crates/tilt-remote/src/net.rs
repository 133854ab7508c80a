//! Reaching a service over plain HTTP, as both the remote engines and the reward services
//! are reached: the URL check, the loopback test (loopback skips any proxy), the agent's
//! settings, and how messages quote what a user or a service wrote.

use std::time::Duration;

/// The first wait before a retry; it doubles with each retry, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The wait before retry `k` (from 0): [`FIRST_BACKOFF`] · 2^k, at most [`MAX_BACKOFF`]
/// (the backoff of every retried request to an engine or a reward service).
pub fn backoff(k: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32.checked_shl(k).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF)
}

/// `text` as a JSON string literal (`"a \"b\"\n"`): how messages quote what a user or a
/// reward wrote, never Rust's `Debug`.
pub fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// [`quote`] of at most `max_chars` characters of `text`, saying how long it was when cut.
pub fn quote_excerpt(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => quote(text),
        Some((cut, _)) => format!("{}… ({} bytes in all)", quote(&text[..cut]), text.len()),
    }
}

/// Whether `url`'s host is exactly a loopback address: `localhost` (any case, with or
/// without a trailing dot), an IPv4 address in 127.0.0.0/8, or `[::1]` (also as an
/// IPv4-mapped `[::ffff:127.x.y.z]`). Only these skip the proxy: `localhost.example.com` or
/// `127.0.0.1.example.com` are names like any other.
pub fn is_loopback(url: &str) -> bool {
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

/// Why `url` is not an `http://` URL with a host (and a port from 1 to 65535, if it has
/// one) that tilt can send to, if it is not.
///
/// # Errors
/// What is wrong with it.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err(
            "https is not supported by this build (no TLS library); use http:// or a \
                    local TLS proxy"
                .into(),
        );
    }
    if !url.starts_with("http://") {
        return Err("the URL must start with http://".into());
    }
    let uri: ureq::http::Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
    match uri.host() {
        None | Some("") => return Err("the URL has no host".into()),
        Some(_) => {}
    }
    if let Some(port) = uri.authority().and_then(|a| a.as_str().rsplit_once(':')) {
        // `[::1]` has colons too: only a suffix after the last `]` is a port.
        if !port.1.contains(']') && port.1.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "port {} is not a port number (1 to 65535)",
                quote(port.1)
            ));
        }
    }
    Ok(())
}

/// The agent tilt sends with to `url`: `timeout` for a whole request (connect, send,
/// answer with its body), statuses as answers rather than errors, no redirects followed
/// (a redirected POST may arrive as a GET), and no proxy for a loopback `url` (proxies from
/// `HTTP_PROXY`/`NO_PROXY` are honoured otherwise).
pub fn new_agent(url: &str, timeout: Duration) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0);
    if is_loopback(url) {
        config = config.proxy(None);
    }
    config.build().new_agent()
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
}
