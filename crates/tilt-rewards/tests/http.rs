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
            "score 1 is null",
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
            msg.contains(expected) && msg.contains("http:"),
            "{expected}: {msg}"
        );
    }
    // 1e300 is valid JSON but overflows f32.
    let url = serve(1, |_| (200, "{\"scores\": [1e300]}".into()));
    let e = HttpReward::new(&url, T)
        .unwrap()
        .score(&[("p", "a")])
        .unwrap_err();
    assert!(matches!(e, RewardError::NonFinite { index: 0, .. }), "{e}");
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
