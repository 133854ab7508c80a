//! The served rewards (`vllm:`, `tei:`, `openrlhf:`) against tiny servers on 127.0.0.1
//! speaking each project's API as its code documents it (see `src/served.rs` for the
//! sources), then against a real learned classifier (PyPI `alt-profanity-check==1.9.1`,
//! installed on first use into a venv cached under `$TILT_HOME/test-venvs`) behind TEI's
//! `/predict`.
//!
//! Every test server stops by itself: it takes at most a given number of connections, and
//! gives up accepting after [`SERVER_LIFETIME`]; a connection's read times out.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tilt_rewards::{Reward, RewardError, RewardSpec};

/// How long a test server accepts connections at most.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);

/// One request as the server read it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    body: Value,
}

/// What the server does with a request.
enum Reply {
    /// Answer with this status and body.
    Json(u16, String),
    /// Read the request, then say nothing for this long and close.
    Hang(Duration),
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// A test server: its base URL (`http://127.0.0.1:PORT`) and the requests it read.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
    fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }
}

/// Serve up to `connections` connections (one request each, each on its own thread) with
/// `handler(request, n)`, `n` counting the requests from 0.
fn serve(
    connections: usize,
    handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let handler: Arc<Handler> = Arc::new(handler);
    let seen = Arc::new(AtomicUsize::new(0));
    let log = Arc::clone(&requests);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut accepted = 0;
        while accepted < connections && start.elapsed() < SERVER_LIFETIME {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted += 1;
                    let (handler, log, seen) =
                        (Arc::clone(&handler), Arc::clone(&log), Arc::clone(&seen));
                    std::thread::spawn(move || {
                        let _ = handle(stream, &*handler, &log, &seen);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
    });
    Server { url, requests }
}

fn handle(
    stream: TcpStream,
    handler: &Handler,
    log: &Mutex<Vec<Request>>,
    seen: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let request = Request {
        method,
        path,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    log.lock().unwrap().push(request.clone());
    let n = seen.fetch_add(1, Ordering::SeqCst);
    let mut stream = stream;
    match handler(&request, n) {
        Reply::Json(status, reply) => {
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{reply}",
                reply.len()
            )?;
            stream.flush()
        }
        Reply::Hang(d) => {
            std::thread::sleep(d);
            Ok(())
        }
    }
}

fn ok(value: Value) -> Reply {
    Reply::Json(200, value.to_string())
}

fn build(spec: &str) -> Box<dyn Reward> {
    RewardSpec::parse(spec)
        .unwrap_or_else(|e| panic!("{e}"))
        .build()
        .unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn chars(s: &str) -> f64 {
    s.chars().count() as f64
}

/// The strings of a JSON array.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

const PAIRS: [(&str, &str); 5] = [
    ("Name a fruit.", "An apple."),
    ("Name a fruit.", "A red car, fast."),
    ("Say hi.", "héllo\nthere"),
    ("", "no prompt"),
    ("Name a colour.", ""),
];

fn joined(p: &str, r: &str) -> String {
    format!("{p}\n\n{r}")
}

// ---------------------------------------------------------------------------------------
// vLLM

/// The classify handler: probs = [-len, len + 0.5] for each input text (raw logits),
/// answered in reverse order so that only `index` puts them back.
fn vllm_classify(req: &Request) -> Reply {
    assert_eq!(req.body["use_activation"], false, "{}", req.body);
    assert_eq!(req.body["model"], "org/reward-model", "{}", req.body);
    let data: Vec<Value> = strings(&req.body["input"])
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| {
            json!({"index": i, "label": "LABEL_1", "probs": [-chars(t), chars(t) + 0.5],
                   "num_classes": 2})
        })
        .collect();
    ok(
        json!({"id": "classify-1", "object": "list", "created": 1, "model": "org/reward-model",
              "data": data, "usage": {"prompt_tokens": 3, "total_tokens": 3}}),
    )
}

fn vllm_handler(req: &Request, _: usize) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/models") => ok(json!({"object": "list", "data": [
            {"id": "org/reward-model", "object": "model", "owned_by": "vllm"},
            {"id": "other", "object": "model"}]})),
        ("POST", "/classify") => vllm_classify(req),
        _ => Reply::Json(404, "{\"detail\": \"Not Found\"}".into()),
    }
}

#[test]
fn vllm_sends_texts_in_batches_and_reads_the_chosen_logit_by_index() {
    let server = serve(8, vllm_handler);
    // A trailing slash on the base URL: the paths are appended without doubling it.
    let spec = format!("{}/,label=1,batch=2,concurrency=3", server.url);
    let r = build(&format!("vllm:{spec}"));
    assert_eq!(r.name(), format!("vllm:{}/", server.url));
    assert!(!r.batch_invariant());
    assert_eq!(
        server.count("GET", "/v1/models"),
        1,
        "the model name is asked once"
    );
    let scores = r.score(&PAIRS).unwrap();
    let expected: Vec<f32> = PAIRS
        .iter()
        .map(|(p, r)| (chars(&joined(p, r)) + 0.5) as f32)
        .collect();
    assert_eq!(scores, expected);
    let posts: Vec<Request> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/classify")
        .collect();
    assert_eq!(posts.len(), 3, "5 pairs in batches of 2");
    let mut sizes: Vec<usize> = posts
        .iter()
        .map(|r| strings(&r.body["input"]).len())
        .collect();
    sizes.sort();
    assert_eq!(sizes, [1, 2, 2]);
    let mut sent: Vec<String> = posts
        .iter()
        .flat_map(|r| strings(&r.body["input"]))
        .collect();
    let mut want: Vec<String> = PAIRS.iter().map(|(p, r)| joined(p, r)).collect();
    sent.sort();
    want.sort();
    assert_eq!(sent, want, "prompt, a blank line, response");
    for post in &posts {
        let mut keys: Vec<&String> = post.body.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["input", "model", "use_activation"]);
    }

    // With model= given, nothing is asked.
    let server = serve(2, vllm_handler);
    let r = build(&format!(
        "vllm:{},model=org/reward-model,label=0",
        server.url
    ));
    assert_eq!(
        r.score(&PAIRS[..1]).unwrap(),
        vec![-chars(&joined(PAIRS[0].0, PAIRS[0].1)) as f32]
    );
    assert_eq!(server.count("GET", "/v1/models"), 0);
}

#[test]
fn vllm_labels_default_to_the_only_one_and_are_errors_otherwise() {
    // One label: no label= needed.
    let server = serve(2, |req, _| {
        let data: Vec<Value> = strings(&req.body["input"])
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"index": i, "label": null, "probs": [chars(t)], "num_classes": 1}))
            .collect();
        ok(json!({"data": data}))
    });
    let r = build(&format!("vllm:{},model=m", server.url));
    assert_eq!(r.score(&[("p", "abc")]).unwrap(), vec![6.0]);

    // Two labels without label=, or a label beyond them.
    for (option, expected) in [
        (
            "",
            "the answer has 2 labels (\"probs\" of length 2 for pair 0): give label=I (0 to 1)",
        ),
        (
            ",label=5",
            "label=5 is not in the answer: \"probs\" for pair 0 has 2 labels (0 to 1)",
        ),
    ] {
        let server = serve(2, vllm_handler);
        let r = build(&format!("vllm:{}{option}", server.url));
        let e = r.score(&PAIRS[..2]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(expected) && msg.contains(&format!("vllm:{}", server.url)),
            "{msg}"
        );
        assert!(!e.is_invalid_input(), "{e}");
    }
}

#[test]
fn vllm_without_a_model_list_fails_at_construction_naming_the_endpoint() {
    let server = serve(1, |_, _| ok(json!({"object": "list", "data": []})));
    let e = RewardSpec::parse(&format!("vllm:{}", server.url))
        .unwrap()
        .build()
        .err()
        .expect("no model");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("GET {}/v1/models", server.url))
            && msg.contains("give model=NAME")
            && msg.contains("no model id"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// TEI /predict

/// TEI's predictions for one pair, sorted by score, highest first, as TEI sorts them:
/// "helpful" = len(response), "harmful" = -len(response), "neutral" = 0.25.
fn tei_predictions(pair: &Value) -> Value {
    let pair = strings(pair);
    assert_eq!(pair.len(), 2, "{pair:?}");
    let n = chars(&pair[1]);
    let mut preds = [("helpful", n), ("harmful", -n), ("neutral", 0.25)];
    preds.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
    preds.reverse();
    Value::Array(
        preds
            .iter()
            .map(|(l, s)| json!({"score": s, "label": l}))
            .collect(),
    )
}

fn tei_predict(req: &Request, _: usize) -> Reply {
    assert_eq!(req.path, "/predict");
    assert_eq!(req.body["raw_scores"], true, "{}", req.body);
    let lists: Vec<Value> = req.body["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(tei_predictions)
        .collect();
    ok(Value::Array(lists))
}

#[test]
fn tei_predict_sends_pairs_and_picks_the_label_by_name() {
    let server = serve(8, tei_predict);
    let r = build(&format!(
        "tei:{},label=harmful,batch=2,concurrency=2",
        server.url
    ));
    assert_eq!(r.name(), format!("tei:{}", server.url));
    let scores = r.score(&PAIRS).unwrap();
    let expected: Vec<f32> = PAIRS.iter().map(|(_, r)| -chars(r) as f32).collect();
    assert_eq!(scores, expected);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let mut sent: Vec<Vec<String>> = requests
        .iter()
        .flat_map(|r| r.body["inputs"].as_array().unwrap().iter().map(strings))
        .collect();
    sent.sort();
    let mut want: Vec<Vec<String>> = PAIRS
        .iter()
        .map(|(p, r)| vec![p.to_string(), r.to_string()])
        .collect();
    want.sort();
    assert_eq!(sent, want, "each pair as [prompt, response]");
    for r in &requests {
        let mut keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["inputs", "raw_scores"]);
    }
}

#[test]
fn tei_labels_are_found_by_name_or_listed() {
    // One label: the default.
    let server = serve(1, |req, _| {
        let n = req.body["inputs"].as_array().unwrap().len();
        ok(Value::Array(vec![
            json!([{"score": 1.5, "label": "LABEL_0"}]);
            n
        ]))
    });
    let r = build(&format!("tei:{}", server.url));
    assert_eq!(r.score(&PAIRS[..2]).unwrap(), vec![1.5, 1.5]);

    for (option, expected) in [
        (
            "",
            "the answer for pair 0 has 3 labels (\"helpful\", \"neutral\", \"harmful\"): give \
             label=NAME to choose one",
        ),
        (
            ",label=toxic",
            "label \"toxic\" is not in the answer for pair 0 (its labels: \"helpful\", \
             \"neutral\", \"harmful\")",
        ),
    ] {
        let server = serve(1, tei_predict);
        let e = build(&format!("tei:{}{option}", server.url))
            .score(&PAIRS[..1])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(expected) && msg.contains(&format!("tei:{}", server.url)),
            "{msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// TEI /rerank

/// Ranks sorted by score (highest first): score = 10 len(text) + len(query).
fn tei_rerank(req: &Request, _: usize) -> Reply {
    assert_eq!(req.path, "/rerank");
    assert_eq!(req.body["raw_scores"], true, "{}", req.body);
    let query = req.body["query"].as_str().unwrap();
    let mut ranks: Vec<(usize, f64)> = strings(&req.body["texts"])
        .iter()
        .enumerate()
        .map(|(i, t)| (i, 10.0 * chars(t) + chars(query)))
        .collect();
    ranks.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    ok(Value::Array(
        ranks
            .iter()
            .map(|(i, s)| json!({"index": i, "score": s}))
            .collect(),
    ))
}

#[test]
fn tei_rerank_asks_once_per_prompt_and_maps_back_by_index() {
    let pairs = [
        ("A?", "one"),
        ("Bb?", "two two"),
        ("A?", "three"),
        ("C", ""),
        ("A?", "four four four"),
        ("A?", "5"),
    ];
    let server = serve(8, tei_rerank);
    let r = build(&format!(
        "tei:{},endpoint=rerank,batch=2,concurrency=4",
        server.url
    ));
    let scores = r.score(&pairs).unwrap();
    let expected: Vec<f32> = pairs
        .iter()
        .map(|(q, t)| (10.0 * chars(t) + chars(q)) as f32)
        .collect();
    assert_eq!(scores, expected);
    let mut sent: Vec<(String, Vec<String>)> = server
        .requests()
        .iter()
        .map(|r| {
            let mut keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
            keys.sort();
            assert_eq!(keys, ["query", "raw_scores", "texts"]);
            (
                r.body["query"].as_str().unwrap().to_string(),
                strings(&r.body["texts"]),
            )
        })
        .collect();
    sent.sort();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        sent,
        vec![
            ("A?".to_string(), s(&["four four four", "5"])),
            ("A?".to_string(), s(&["one", "three"])),
            ("Bb?".to_string(), s(&["two two"])),
            ("C".to_string(), s(&[""])),
        ],
        "one request per prompt, at most batch=2 texts each"
    );
}

#[test]
fn tei_rerank_indices_must_each_appear_once() {
    type Answer = fn() -> Value;
    let cases: [(Answer, &str); 3] = [
        (
            || json!([{"index": 0, "score": 1.0}, {"index": 0, "score": 2.0}]),
            "no item has \"index\" 1 (pair 2) and \"index\" 0 (pair 0) appears more than once",
        ),
        (
            || json!([{"index": 0, "score": 1.0}, {"index": 7, "score": 2.0}]),
            "\"index\": 7 is outside the request's indices (0 to 1)",
        ),
        (
            || json!([{"index": 0, "score": 1.0}]),
            "returned 1 scores for 2 pairs",
        ),
    ];
    for (answer, expected) in cases {
        let server = serve(2, move |req, _| {
            if req.body["query"] == "p" {
                ok(answer())
            } else {
                tei_rerank(req, 0)
            }
        });
        let e = build(&format!("tei:{},endpoint=rerank,concurrency=1", server.url))
            .score(&[("p", "a"), ("q", "b"), ("p", "c")])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(expected)
                && msg.contains(&format!("tei:{}", server.url))
                && msg.contains("POST ")
                && msg.contains("/rerank (pairs 0, 2 of 3)"),
            "{msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// OpenRLHF

fn openrlhf_handler(req: &Request, _: usize) -> Reply {
    assert_eq!(req.path, "/get_reward");
    let rewards: Vec<f64> = strings(&req.body["query"])
        .iter()
        .map(|q| chars(q) * 0.25)
        .collect();
    // The newest serve_rm's answer: rewards, scores and extra_logs.
    ok(json!({"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards}}))
}

#[test]
fn openrlhf_sends_queries_and_reads_rewards_in_order() {
    let server = serve(8, openrlhf_handler);
    let r = build(&format!("openrlhf:{},batch=2,concurrency=2", server.url));
    assert_eq!(r.name(), format!("openrlhf:{}", server.url));
    let scores = r.score(&PAIRS).unwrap();
    let expected: Vec<f32> = PAIRS
        .iter()
        .map(|(p, r)| (chars(&joined(p, r)) * 0.25) as f32)
        .collect();
    assert_eq!(scores, expected);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        let queries = strings(&r.body["query"]);
        let prompts = strings(&r.body["prompts"]);
        assert_eq!(queries.len(), prompts.len());
        for (q, p) in queries.iter().zip(&prompts) {
            assert!(q.starts_with(&format!("{p}\n\n")), "{q:?} {p:?}");
        }
    }
    // The older answer, rewards alone, reads the same.
    let server = serve(1, |req, _| {
        let n = strings(&req.body["query"]).len();
        ok(json!({"rewards": vec![-1.25; n]}))
    });
    let r = build(&format!("openrlhf:{}", server.url));
    assert_eq!(r.score(&PAIRS[..2]).unwrap(), vec![-1.25, -1.25]);
}

// ---------------------------------------------------------------------------------------
// Faults, for each kind

/// The three kinds on a server, as specs with `extra` options.
fn specs(url: &str, extra: &str) -> [String; 3] {
    [
        format!("vllm:{url},model=org/reward-model,label=1{extra}"),
        format!("tei:{url},label=harmful{extra}"),
        format!("openrlhf:{url}{extra}"),
    ]
}

/// The right answer for whichever kind `req` is.
fn good(req: &Request) -> Reply {
    match req.path.as_str() {
        "/classify" => vllm_classify(req),
        "/predict" => tei_predict(req, 0),
        "/rerank" => tei_rerank(req, 0),
        _ => openrlhf_handler(req, 0),
    }
}

/// The name a spec's reward has: `kind:URL`.
fn name_of(spec: &str) -> &str {
    spec.split(',').next().unwrap()
}

#[test]
fn http_500_is_not_retried_and_its_body_is_quoted() {
    for status in [500, 400, 404, 422] {
        let server = serve(4, move |_, _| {
            Reply::Json(
                status,
                "{\"error\": \"model crashed\", \"error_type\": \"backend\"}".into(),
            )
        });
        for spec in specs(&server.url, "") {
            let before = server.requests().len();
            let e = build(&spec).score(&PAIRS[..2]).unwrap_err();
            let msg = e.to_string();
            assert_eq!(
                server.requests().len() - before,
                1,
                "{spec}: not retried: {msg}"
            );
            assert!(
                msg.contains(&format!("HTTP {status}"))
                    && msg.contains(r#"\"model crashed\""#)
                    && msg.contains(name_of(&spec))
                    && !msg.contains("gave up"),
                "{msg}"
            );
            assert!(!e.is_invalid_input());
        }
    }
}

#[test]
fn transient_statuses_are_retried_until_they_pass() {
    for status in [503, 429, 502, 504] {
        for (k, spec) in specs("URL", "").iter().enumerate() {
            let attempts = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&attempts);
            let server = serve(4, move |req, n| {
                counted.fetch_add(1, Ordering::SeqCst);
                if n < 2 {
                    Reply::Json(status, "{\"error\": \"Model is overloaded\"}".into())
                } else {
                    good(req)
                }
            });
            let spec = spec.replace("URL", &server.url);
            let start = Instant::now();
            let scores = build(&spec).score(&PAIRS[..2]).unwrap();
            assert_eq!(attempts.load(Ordering::SeqCst), 3, "{spec}: 503, 503, 200");
            assert_eq!(scores.len(), 2);
            if k == 0 && status == 503 {
                // Waits of 0.2 s then 0.4 s.
                let t = start.elapsed();
                assert!(
                    t >= Duration::from_millis(550) && t < Duration::from_secs(5),
                    "{t:?}"
                );
            }
        }
    }
}

#[test]
fn a_server_unavailable_for_ever_fails_after_retries_plus_one_attempts() {
    for (retries, attempts) in [(None, 3), (Some(0), 1), (Some(1), 2)] {
        let server = serve(12, |_, _| {
            Reply::Json(503, "{\"error\": \"Service Unavailable\"}".into())
        });
        let extra = retries.map_or(String::new(), |r| format!(",retries={r}"));
        for spec in specs(&server.url, &extra) {
            let before = server.requests().len();
            let msg = build(&spec).score(&PAIRS[..1]).unwrap_err().to_string();
            eprintln!("{msg}");
            assert_eq!(server.requests().len() - before, attempts, "{msg}");
            let plural = if attempts == 1 { "" } else { "s" };
            assert!(
                msg.contains("HTTP 503")
                    && msg.contains("Service Unavailable")
                    && msg.contains(&format!("gave up after {attempts} attempt{plural}"))
                    && msg.contains(name_of(&spec)),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_server_that_never_answers_times_out() {
    let server = serve(3, |_, _| Reply::Hang(Duration::from_secs(8)));
    let spec = format!("tei:{},label=harmful,timeout=1", server.url);
    let start = Instant::now();
    let e = build(&spec).score(&PAIRS[..1]).unwrap_err();
    let t = start.elapsed();
    let msg = e.to_string();
    eprintln!("{t:?}: {msg}");
    // Three attempts of 1 s, waits of 0.2 s and 0.4 s.
    assert!(t < Duration::from_secs(6), "{t:?}: {msg}");
    assert!(
        msg.contains("within 1.000 s (timeout)")
            && msg.contains("gave up after 3 attempts")
            && msg.contains(&format!("tei:{}", server.url)),
        "{msg}"
    );
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn a_refused_connection_is_retried_then_named() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for spec in specs(&url, ",retries=1") {
        let msg = build(&spec).score(&PAIRS[..1]).unwrap_err().to_string();
        assert!(
            msg.contains("request failed")
                && msg.contains("gave up after 2 attempts")
                && msg.contains(name_of(&spec)),
            "{msg}"
        );
    }
}

#[test]
fn malformed_answers_are_named_and_not_retried() {
    type Answer = fn(&Request) -> Reply;
    let cases: [(Answer, &str); 3] = [
        (
            |_| Reply::Json(200, "not json".into()),
            "the answer is not JSON",
        ),
        (
            |_| Reply::Json(200, "{\"other\": 1}".into()),
            "the answer is not ",
        ),
        (
            // One score too few, whatever the kind.
            |req| {
                let Reply::Json(_, body) = good(req) else {
                    unreachable!()
                };
                let mut v: Value = serde_json::from_str(&body).unwrap();
                match req.path.as_str() {
                    "/classify" => {
                        v["data"].as_array_mut().unwrap().pop();
                    }
                    "/get_reward" => {
                        v["rewards"].as_array_mut().unwrap().pop();
                    }
                    _ => {
                        v.as_array_mut().unwrap().pop();
                    }
                }
                ok(v)
            },
            "returned 3 scores for 4 pairs",
        ),
    ];
    for (answer, expected) in cases {
        let server = serve(3, move |req, _| answer(req));
        for spec in specs(&server.url, "") {
            let before = server.requests().len();
            let e = build(&spec).score(&PAIRS[..4]).unwrap_err();
            let msg = e.to_string();
            eprintln!("{msg}");
            assert_eq!(server.requests().len() - before, 1, "{msg}");
            assert!(
                msg.contains(expected) && msg.contains(name_of(&spec)) && !msg.contains("gave up"),
                "{spec}: {msg}"
            );
        }
    }
    // A score that is not a number names its pair in the whole batch.
    let server = serve(2, |req, _| {
        let n = strings(&req.body["query"]).len();
        let mut rewards = vec![json!(1.0); n];
        if strings(&req.body["prompts"]).contains(&"Say hi.".to_string()) {
            rewards[0] = json!("high");
        }
        ok(json!({"rewards": rewards}))
    });
    let msg = build(&format!("openrlhf:{},batch=2", server.url))
        .score(&PAIRS[..4])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("the score for pair 2 is \"high\", not a number"),
        "{msg}"
    );
}

/// A non-finite or huge score in the second request is named by its index in the whole
/// batch, for every kind; nothing is returned for the other pairs.
#[test]
fn bad_scores_are_named_by_their_index_in_the_whole_batch() {
    // Pair 3 ("", "no prompt") is the second of the second request with batch=2.
    for (literal, index) in [("NaN", 3usize), ("1e300", 3), ("-Infinity", 3)] {
        let server = serve(6, move |req, _| {
            let Reply::Json(_, body) = good(req) else {
                unreachable!()
            };
            let bad = req.body.to_string().contains("no prompt");
            let mut v: Value = serde_json::from_str(&body).unwrap();
            let marker = 123456.5;
            if bad {
                match req.path.as_str() {
                    "/classify" => v["data"][0]["probs"][1] = json!(marker),
                    "/get_reward" => v["rewards"][1] = json!(marker),
                    _ => {
                        for p in v[1].as_array_mut().unwrap() {
                            if p["label"] == "harmful" {
                                p["score"] = json!(marker);
                            }
                        }
                    }
                }
            }
            // serde_json cannot write NaN or 1e300 as a literal: put it in the text, as a
            // Python server's json.dumps writes it.
            ok_literal(v.to_string().replace("123456.5", literal))
        });
        for spec in specs(&server.url, ",batch=2,concurrency=2") {
            let e = build(&spec).score(&PAIRS[..4]).unwrap_err();
            match (&e, literal) {
                (
                    RewardError::NonFinite {
                        index: i, value, ..
                    },
                    "NaN",
                ) => {
                    assert!(value.is_nan() && *i == index, "{e}")
                }
                (
                    RewardError::NonFinite {
                        index: i, value, ..
                    },
                    _,
                ) if literal.contains("Inf") => {
                    assert!(value.is_infinite() && *i == index, "{e}")
                }
                (
                    RewardError::OutOfRange {
                        index: i, value, ..
                    },
                    "1e300",
                ) => {
                    assert!(value == "1e300" && *i == index, "{e}")
                }
                _ => panic!("{spec}: {literal}: {e}"),
            }
            assert!(e.to_string().contains(name_of(&spec)), "{e}");
        }
    }
}

fn ok_literal(body: String) -> Reply {
    Reply::Json(200, body)
}

/// vLLM reports errors as `{"error": {"message": …}}` (or `{"object": "error", …}` in
/// older versions), with a 4xx status: quoted as the body.
#[test]
fn vllm_errors_are_quoted() {
    let server = serve(1, |_, _| {
        Reply::Json(
            400,
            json!({"error": {"message": "The model does not support Classification API",
                             "type": "BadRequestError", "param": null, "code": 400}})
            .to_string(),
        )
    });
    let msg = build(&format!("vllm:{},model=m", server.url))
        .score(&PAIRS[..1])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("HTTP 400") && msg.contains("does not support Classification API"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// A real classifier

mod real {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    const PIN: &str = "alt-profanity-check==1.9.1";

    /// Run `cmd` to the end within `limit`, failing the test with its output otherwise.
    fn run(what: &str, cmd: &mut Command, limit: Duration) -> String {
        let log_path = std::env::temp_dir().join(format!(
            "tilt-rewards-{}-{}.log",
            std::process::id(),
            what.replace(' ', "-")
        ));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what}: still running after {limit:?}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        assert!(status.success(), "{what} failed ({status}):\n{text}");
        text
    }

    /// The venv's python, the venv made once under `$TILT_HOME/test-venvs` (built under a
    /// temporary name, marked complete, then renamed into place).
    fn python() -> PathBuf {
        let root = tilt_assets::tilt_home().join("test-venvs");
        let venv = root.join("alt-profanity-check-1.9.1");
        let ready = venv.join(".installed");
        if !ready.exists() {
            std::fs::create_dir_all(&root).unwrap();
            let partial = root.join(format!(
                ".alt-profanity-check-1.9.1.partial-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&partial);
            run(
                "python3 -m venv",
                Command::new("python3").args(["-m", "venv"]).arg(&partial),
                Duration::from_secs(300),
            );
            let installed = std::panic::catch_unwind(|| {
                run(
                    "pip install",
                    Command::new(partial.join("bin/python"))
                        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                        .arg(PIN),
                    Duration::from_secs(900),
                )
            });
            if let Err(e) = installed {
                let _ = std::fs::remove_dir_all(&partial);
                std::panic::resume_unwind(e);
            }
            std::fs::write(partial.join(".installed"), PIN).unwrap();
            if !ready.exists() {
                // An incomplete copy left by an interrupted run.
                let _ = std::fs::remove_dir_all(&venv);
            }
            if std::fs::rename(&partial, &venv).is_err() {
                // Another test process got there first.
                let _ = std::fs::remove_dir_all(&partial);
                assert!(ready.exists(), "cannot move the venv to {}", venv.display());
            }
        }
        venv.join("bin/python")
    }

    /// The fixture server, killed when dropped.
    struct Served(Child);

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tei_profanity_server.py")
    }

    #[test]
    fn a_real_classifier_behind_the_tei_shape() {
        let python = python();
        let mut child = Command::new(&python)
            .arg(script())
            .args(["0", "--idle-seconds", "60", "--max-requests", "50"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the fixture server");
        let mut port = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let mut served = Served(child);
        if port.trim().is_empty() {
            let mut err = String::new();
            let _ = served.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the fixture server did not start:\n{err}");
        }
        let url = format!("http://127.0.0.1:{}", port.trim());

        let prompt = "What do you think of my essay?";
        let responses = [
            "It is a clear and thoughtful essay, well done.",
            "This is shit, you fucking idiot.",
            "Thank you, have a nice day!",
            "What a load of crap, you stupid moron.",
            "Merci, c'est très bien écrit.",
        ];
        let pairs: Vec<(&str, &str)> = responses.iter().map(|r| (prompt, *r)).collect();
        let spec = format!("tei:{url},label=profane,batch=2,concurrency=2");
        let r = RewardSpec::parse(&spec).unwrap().build().unwrap();
        let scores = r.score(&pairs).unwrap();
        drop(served);

        assert!(scores[1] > scores[0] && scores[3] > scores[2], "{scores:?}");
        assert!(scores[1] > 0.0 && scores[0] < 0.0, "{scores:?}");

        // The classifier's own values, from the same script.
        let out = run(
            "print scores",
            Command::new(&python)
                .arg(script())
                .arg("--print-scores")
                .args(responses),
            Duration::from_secs(120),
        );
        let own: Vec<Value> = out
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(own.len(), responses.len(), "{out}");
        for ((score, own), text) in scores.iter().zip(&own).zip(responses) {
            assert_eq!(own["text"], text);
            let logit = own["profane_logit"].as_f64().unwrap();
            let prob = own["profane_prob"].as_f64().unwrap();
            let s = f64::from(*score);
            assert!((s - logit).abs() <= 1e-5, "{text:?}: {s} vs {logit}");
            // The raw score is the logit of the package's own probability.
            let sigmoid = 1.0 / (1.0 + (-s).exp());
            assert!(
                (sigmoid - prob).abs() <= 1e-5,
                "{text:?}: {sigmoid} vs {prob}"
            );
            eprintln!("{text:?}: logit {s:.6}, P(profane) {prob:.6}");
        }
    }
}
