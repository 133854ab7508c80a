//! The HTTP reward against a tiny server on 127.0.0.1 (protocol in the crate README).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use tilt_rewards::{HttpReward, Reward, RewardError};

/// Serve `handler(request body) -> (status line, body)` on a free loopback port, for up to
/// `requests` connections; returns the URL.
fn serve(requests: usize, handler: fn(&serde_json::Value) -> (u16, String)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(stream) = stream else { break };
            let _ = handle(stream, handler);
        }
    });
    url
}

fn handle(
    stream: TcpStream,
    handler: fn(&serde_json::Value) -> (u16, String),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    assert!(request_line.starts_with("POST /score "), "{request_line}");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let (status, reply) = handler(&request);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    stream.flush()
}

fn lengths(req: &serde_json::Value) -> Vec<usize> {
    req["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["prompt"].is_string());
            p["response"].as_str().unwrap().chars().count()
        })
        .collect()
}

const T: Duration = Duration::from_secs(20);

#[test]
fn scores_come_back_in_order() {
    let url = serve(2, |req| {
        (
            200,
            serde_json::json!({ "scores": lengths(req) }).to_string(),
        )
    });
    let r = HttpReward::new(&url, T).unwrap();
    assert_eq!(r.name(), format!("http:{url}"));
    assert_eq!(
        r.score(&[("p", "ab"), ("q", "héllo\n")]).unwrap(),
        vec![2.0, 6.0]
    );
    assert_eq!(r.score(&[("p", "")]).unwrap(), vec![0.0]);
    assert_eq!(
        r.score(&[]).unwrap(),
        Vec::<f32>::new(),
        "no request for no pairs"
    );
}

#[test]
fn http_errors_quote_the_body() {
    let url = serve(1, |_| (500, "{\"detail\": \"model crashed\"}".into()));
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "r")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 500") && e.contains("model crashed") && e.contains(&url),
        "{e}"
    );
}

#[test]
fn malformed_answers_are_named() {
    type Handler = fn(&serde_json::Value) -> (u16, String);
    let cases: Vec<(Handler, &str)> = vec![
        (|_| (200, "not json".into()), "not JSON"),
        (|_| (200, "{\"score\": [1]}".into()), "no \"scores\" array"),
        (
            |_| (200, "{\"scores\": [1, 2, 3]}".into()),
            "3 scores for 2 pairs",
        ),
        (
            |_| (200, "{\"scores\": [1, null]}".into()),
            "score 1 is null, not a number",
        ),
        (
            |_| (200, "{\"scores\": [1, \"2\"]}".into()),
            "score 1 is \"2\", not a number",
        ),
        (
            |_| (200, "{\"scores\": [1]}".into()),
            "1 scores for 2 pairs",
        ),
        (
            |_| (200, "{\"scores\": \"1,2\"}".into()),
            "\"scores\" in the answer is \"1,2\", not an array",
        ),
        (
            |_| (200, "[1, 2]".into()),
            "no \"scores\" array: \"[1, 2]\"",
        ),
        (|_| (200, "".into()), "the answer is not JSON"),
        (
            |_| (200, "{\"error\": \"model not loaded\"}".into()),
            "the service reported an error: \"model not loaded\"",
        ),
    ];
    for (handler, expected) in cases {
        let url = serve(1, handler);
        let e = HttpReward::new(&url, T)
            .unwrap()
            .score(&[("p", "a"), ("p", "b")])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(expected) && msg.contains("http:") && !e.is_invalid_input(),
            "{expected}: {msg}"
        );
        assert!(!msg.contains("Ok(") && !msg.contains("Some("), "{msg}");
    }
    // 1e300 is valid JSON, finite, but beyond f32: out of range, quoted, not "inf".
    // 1e400 is beyond even f64 (serde_json alone refuses it): the same, as written.
    let cases: [(Handler, usize, &str); 2] = [
        (|_| (200, "{\"scores\": [1e300, 1]}".into()), 0, "1e300"),
        (|_| (200, "{\"scores\": [1, -1e400]}".into()), 1, "-1e400"),
    ];
    for (handler, index, quoted) in cases {
        let url = serve(1, handler);
        let e = HttpReward::new(&url, T)
            .unwrap()
            .score(&[("p", "a"), ("p", "b")])
            .unwrap_err();
        assert!(
            matches!(&e, RewardError::OutOfRange { index: i, value, .. } if *i == index && value == quoted),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "score {index} is {quoted}, outside the range of f32"
            )) && !msg.contains("inf")
                && msg.contains(&url),
            "{msg}"
        );
    }
}

/// A Python service answering `json.dumps({"scores": [1.0, float("nan")]})` sends `NaN`,
/// which is not JSON: it is read as the non-finite score it stands for, and named by index.
#[test]
fn python_nan_and_infinity_are_named_non_finite_scores() {
    let url = serve(2, |_| (200, "{\"scores\": [1.0, NaN]}".into()));
    let r = HttpReward::new(&url, T).unwrap();
    let e = r.score(&[("p", "a"), ("p", "b")]).unwrap_err();
    assert!(
        matches!(e, RewardError::NonFinite { index: 1, value, .. } if value.is_nan()),
        "{e}"
    );
    assert!(e.to_string().contains(&url), "{e}");
    // The reward stays usable: the next batch is asked anew.
    let e = r.score(&[("p", "a"), ("p", "b")]).unwrap_err();
    assert!(matches!(e, RewardError::NonFinite { index: 1, .. }), "{e}");

    let url = serve(1, |_| (200, "{\"scores\": [-Infinity, 2]}".into()));
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "a"), ("p", "b")])
        .unwrap_err();
    assert!(
        matches!(e, RewardError::NonFinite { index: 0, value, .. } if value == f32::NEG_INFINITY),
        "{e}"
    );
}

#[test]
fn a_slow_service_times_out() {
    let url = serve(1, |req| {
        std::thread::sleep(Duration::from_secs(3));
        (
            200,
            serde_json::json!({ "scores": lengths(req) }).to_string(),
        )
    });
    let r = HttpReward::new(&url, Duration::from_millis(300)).unwrap();
    let start = std::time::Instant::now();
    let e = r.score(&[("p", "r")]).unwrap_err().to_string();
    assert!(e.contains("timeout"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "gave up before the server answered"
    );
}

#[test]
fn a_closed_port_is_a_clear_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/score");
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "r")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("request failed") && e.contains(&url), "{e}");
}

/// The README's example service (Python standard library), on a free port.
#[test]
fn the_readme_python_service_works() {
    let script = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Reward(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        scores = [len(p["response"].split()) for p in body["pairs"]]
        out = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Reward)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url = format!("http://127.0.0.1:{}/score", port.trim());
    let r = HttpReward::new(&url, T).unwrap();
    let got = r.score(&[
        ("Name a fruit.", "An apple."),
        ("Name a fruit.", "A red car, fast."),
    ]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.unwrap(), vec![2.0, 4.0]);
}

/// Serve each of up to `requests` connections with `respond`, after reading the request
/// head and body; returns the URL.
fn serve_raw(requests: usize, respond: fn(&mut TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            respond(&mut stream);
            let _ = stream.flush();
        }
    });
    url
}

/// A redirect is not followed (a POST may come back as a GET): an error naming where it
/// points.
#[test]
fn redirects_are_reported_not_followed() {
    let url = serve_raw(1, |s| {
        let _ = write!(
            s,
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/elsewhere\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    });
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "r")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 307")
            && e.contains(r#""http://127.0.0.1:9/elsewhere""#)
            && e.contains("does not follow redirects"),
        "{e}"
    );
}

/// A service that sends its headers at once and then trickles the body: the timeout
/// covers the whole answer, not only its first byte.
#[test]
fn a_service_trickling_its_body_times_out() {
    let url = serve_raw(1, |s| {
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        );
        for _ in 0..30 {
            let _ = s.write_all(b" ");
            let _ = s.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = HttpReward::new(&url, Duration::from_millis(500)).unwrap();
    let start = std::time::Instant::now();
    let e = r.score(&[("p", "r")]).unwrap_err().to_string();
    assert!(
        e.contains("timeout") && e.contains("complete answer"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn an_oversized_answer_is_refused() {
    let url = serve_raw(1, |s| {
        let n = tilt_rewards::MAX_ANSWER_BYTES as usize + 10;
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
        let _ = s.write_all(&vec![b' '; n]);
    });
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "r")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than 10485760 bytes"), "{e}");
}

/// A service that closes the connection half-way through its answer.
#[test]
fn a_cut_answer_is_a_clear_error() {
    let url = serve_raw(1, |s| {
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{{\"scores\": [1"
        );
    });
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "r")])
        .unwrap_err();
    assert!(!e.is_invalid_input(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("cannot read the answer") && msg.contains(&url),
        "{msg}"
    );
}
