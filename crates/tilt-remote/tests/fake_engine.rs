//! `OpenAiEngine` against small fake OpenAI-style servers on 127.0.0.1: the probe, `n`
//! honoured or ignored, and every fault the engine can show (500, 503 then success, a
//! timeout, fewer choices than asked, malformed JSON, a body cut short, missing
//! log-probabilities). Each server stops by itself after a bounded number of connections.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tilt_remote::{Ask, EngineSpec, OpenAiEngine, Prompt, RemotePolicy};

enum Reply {
    Json(u16, String),
    /// Accept, read, never answer (until the connection is dropped).
    Hang,
    /// Announce a longer body than is sent, then close.
    CutShort,
}

type Handler = Arc<dyn Fn(&str, &Value) -> Reply + Send + Sync>;
/// What a server received: (path, body) of each request.
type Log = Arc<Mutex<Vec<(String, Value)>>>;

/// Serve `handler(path, body)` for up to `connections` connections; returns the base URL
/// (`http://127.0.0.1:PORT/v1`) and a log of (path, body) received.
fn serve(connections: usize, handler: Handler) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = Arc::clone(&log);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(stream) = stream else { break };
            let (h, log) = (Arc::clone(&handler), Arc::clone(&log2));
            std::thread::spawn(move || {
                let _ = handle(stream, h, log);
            });
        }
    });
    (url, log)
}

fn handle(stream: TcpStream, handler: Handler, log: Log) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .trim_start_matches("/v1")
        .to_string();
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
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    log.lock().unwrap().push((path.clone(), body.clone()));
    let mut stream = stream;
    match handler(&path, &body) {
        Reply::Json(status, text) => write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )?,
        Reply::Hang => {
            std::thread::sleep(Duration::from_secs(8));
        }
        Reply::CutShort => write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{{\"choices\": [",
        )?,
    }
    stream.flush()
}

/// A well-behaved engine: `/models` lists "m"; completions return `n` choices (or one when
/// `honour_n` is false) whose text is "s{seed}c{i}", with two tokens of log-prob −0.5 each.
fn good(path: &str, body: &Value, honour_n: bool) -> Reply {
    if path == "/models" {
        return Reply::Json(200, json!({"data": [{"id": "m"}]}).to_string());
    }
    if body.get("echo") == Some(&json!(true)) {
        // "The cat" + " sat": tokens "The", " cat", " sat", then one generated.
        let prompt = body["prompt"].as_str().unwrap();
        let (toks, offs): (Vec<&str>, Vec<u64>) = match prompt {
            "The cat sat" => (vec!["The", " cat", " sat", "."], vec![0, 3, 7, 11]),
            // llama-cpp-python without a BOS token: the generated token left out.
            "A cat sat" => (vec!["A", " cat", " sat"], vec![0, 1, 5]),
            _ => (vec!["Th", "e cat sat", "."], vec![0, 2, 11]),
        };
        let mut lps: Vec<Value> = vec![Value::Null];
        lps.extend((1..toks.len()).map(|i| json!(-(i as f64))));
        return Reply::Json(
            200,
            json!({"choices": [{"index": 0, "text": format!("{prompt}."), "finish_reason": "length",
                "logprobs": {"tokens": toks, "token_logprobs": lps, "text_offset": offs}}]})
            .to_string(),
        );
    }
    let n = if honour_n {
        body["n"].as_u64().unwrap_or(1) as usize
    } else {
        1
    };
    let seed = body["seed"].as_u64().unwrap_or(0);
    let chat = path == "/chat/completions";
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let text = format!("s{seed}c{i}");
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": text},
                       "finish_reason": "stop",
                       "logprobs": {"content": [{"token": "s", "logprob": -0.5}, {"token": "x", "logprob": -0.5}]}})
            } else {
                json!({"index": i, "text": text, "finish_reason": "length",
                       "logprobs": {"tokens": ["s", "x"], "token_logprobs": [-0.5, -0.5]}})
            }
        })
        .collect();
    Reply::Json(
        200,
        json!({"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 2 * n}})
            .to_string(),
    )
}

fn spec(url: &str, extra: &str) -> EngineSpec {
    EngineSpec::parse(&format!("openai:{url}{extra}")).unwrap()
}

fn ask<'a>(prompt: &'a Prompt, seeds: &'a [u64]) -> Ask<'a> {
    Ask {
        prompt,
        max_tokens: 4,
        temperature: 1.0,
        top_p: None,
        top_k: None,
        stop: &[],
        seeds,
    }
}

fn chat() -> Prompt {
    Prompt::Chat(vec![tilt_remote::Message {
        role: "user".into(),
        content: "hi".into(),
    }])
}

#[test]
fn an_engine_that_honours_n_gets_one_request_per_batch() {
    let (url, log) = serve(20, Arc::new(|p: &str, b: &Value| good(p, b, true)));
    let e = OpenAiEngine::connect(&spec(&url, "")).unwrap();
    let info = e.info();
    assert_eq!(info.model, "m");
    assert!(info.chat.honours_n && info.completions.honours_n);
    assert!(info.chat.log_probs && info.completions.log_probs);
    assert_eq!(info.scoring, Some(tilt_remote::Scoring::Echo));
    let before = log.lock().unwrap().len();
    let prompt = chat();
    let got = e.complete(&ask(&prompt, &[7, 8, 9])).unwrap();
    let texts: Vec<&str> = got.candidates.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["s7c0", "s7c1", "s7c2"]);
    assert_eq!(got.candidates[0].log_prob(), -1.0);
    assert_eq!(
        (got.prompt_tokens, got.completion_tokens, got.requests),
        (5, 6, 1)
    );
    let log = log.lock().unwrap();
    assert_eq!(log.len(), before + 1);
    let (path, body) = &log[before];
    assert_eq!(path, "/chat/completions");
    assert_eq!(
        (body["n"].clone(), body["logprobs"].clone()),
        (json!(3), json!(true))
    );
    assert_eq!(body["model"], json!("m"));
}

#[test]
fn an_engine_that_ignores_n_gets_one_request_per_candidate_with_its_seed() {
    let (url, log) = serve(40, Arc::new(|p: &str, b: &Value| good(p, b, false)));
    let e = OpenAiEngine::connect(&spec(&url, ",max-concurrency=2")).unwrap();
    assert!(!e.info().chat.honours_n && !e.info().completions.honours_n);
    let before = log.lock().unwrap().len();
    let prompt = Prompt::Text("Once".into());
    let seeds = [11, 12, 13, 14, 15];
    let got = e.complete(&ask(&prompt, &seeds)).unwrap();
    let texts: Vec<String> = got.candidates.iter().map(|c| c.text.clone()).collect();
    assert_eq!(texts, ["s11c0", "s12c0", "s13c0", "s14c0", "s15c0"]);
    assert_eq!(got.requests, 5);
    let log = log.lock().unwrap();
    let mut sent: Vec<u64> = log[before..]
        .iter()
        .map(|(p, b)| {
            assert_eq!(p, "/completions");
            assert_eq!(b["n"], json!(1));
            b["seed"].as_u64().unwrap()
        })
        .collect();
    sent.sort();
    assert_eq!(sent, seeds);
}

#[test]
fn a_given_text_is_scored_from_the_echo_at_the_prompts_end() {
    let (url, _) = serve(20, Arc::new(|p: &str, b: &Value| good(p, b, true)));
    let e = OpenAiEngine::connect(&spec(&url, "")).unwrap();
    let s = e.log_prob("The cat", " sat").unwrap();
    assert_eq!(s.tokens, [" sat"]);
    assert_eq!((s.token_log_probs.clone(), s.total), (vec![-2.0], -2.0));
    // A prompt that ends inside a token: refused, saying where.
    // An echo that leaves the generated token out is shifted: refused, saying what to do.
    let err = e.log_prob("A cat", " sat").unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(err.to_string().contains("echo-prefix"), "{err}");
    let err = e.log_prob("The c", "at sat").unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(
        err.to_string().contains("do not split at the prompt's end"),
        "{err}"
    );
}

/// An engine whose completions endpoints answer with `fault` (the probe's one-token
/// requests included, unless `probe_ok`); `/models` always works.
fn faulty(fault: fn(usize) -> Reply, probe_ok: bool) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let (url, _) = serve(
        60,
        Arc::new(move |p: &str, b: &Value| {
            let probing = b["max_tokens"] == json!(1);
            if p == "/models" || (probing && probe_ok) {
                return good(p, b, true);
            }
            fault(c.fetch_add(1, Ordering::SeqCst))
        }),
    );
    (url, calls)
}

fn failure(url: &str, extra: &str) -> String {
    let e = OpenAiEngine::connect(&spec(url, extra)).unwrap();
    let prompt = chat();
    let err = e.complete(&ask(&prompt, &[1, 2])).unwrap_err();
    assert!(!err.is_invalid_input(), "{err}");
    let m = err.to_string();
    assert!(m.contains(url), "names the engine: {m}");
    m
}

#[test]
fn faults_are_errors_naming_the_engine_and_what_it_said() {
    let (url, calls) = faulty(
        |_| Reply::Json(500, r#"{"error": {"message": "out of memory"}}"#.into()),
        true,
    );
    let m = failure(&url, "");
    assert!(m.contains("HTTP 500") && m.contains("out of memory"), "{m}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "500 is not retried");

    let (url, _) = faulty(
        |_| {
            Reply::Json(
                200,
                json!({"choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop",
                    "logprobs": {"content": [{"token": "a", "logprob": -1.0}]}}]})
                .to_string(),
            )
        },
        true,
    );
    let m = failure(&url, "");
    assert!(m.contains("returned 1 choices for n = 2"), "{m}");

    let (url, _) = faulty(|_| Reply::Json(200, "{\"choices\": [".into()), true);
    let m = failure(&url, "");
    assert!(m.contains("not JSON"), "{m}");

    let (url, _) = faulty(|_| Reply::CutShort, true);
    let m = failure(&url, ",retries=0");
    assert!(
        m.contains("ended early") || m.contains("could not be read"),
        "{m}"
    );

    let (url, _) = faulty(
        |_| {
            Reply::Json(
                200,
                json!({"choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
                                   {"index": 1, "message": {"content": "b"}, "finish_reason": "stop"}]})
                .to_string(),
            )
        },
        true,
    );
    let m = failure(&url, "");
    assert!(m.contains("no logprobs"), "{m}");

    let (url, _) = faulty(
        |_| {
            Reply::Json(
                200,
                json!({"choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop",
                    "logprobs": {"content": [{"token": "a", "logprob": "NaN"}]}},
                    {"index": 1, "message": {"content": "b"}, "finish_reason": "abort",
                    "logprobs": {"content": [{"token": "b", "logprob": -1.0}]}}]})
                .to_string(),
            )
        },
        true,
    );
    let m = failure(&url, "");
    assert!(m.contains("not a finite number"), "{m}");
}

#[test]
fn busy_answers_are_retried_with_backoff_and_then_given_up() {
    // 503 twice, then the good answer: one ask succeeds after three attempts.
    let (url, calls) = faulty(
        |i| {
            if i < 2 {
                Reply::Json(503, "busy".into())
            } else {
                good("/chat/completions", &json!({"n": 2, "seed": 1}), true)
            }
        },
        true,
    );
    let e = OpenAiEngine::connect(&spec(&url, "")).unwrap();
    let prompt = chat();
    let got = e.complete(&ask(&prompt, &[1, 2])).unwrap();
    assert_eq!((got.candidates.len(), got.requests), (2, 3));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // 429 forever: retries + 1 attempts, then the error says so.
    let (url, calls) = faulty(|_| Reply::Json(429, "slow down".into()), true);
    let m = failure(&url, ",retries=2");
    assert!(
        m.contains("HTTP 429") && m.contains("after 3 attempts"),
        "{m}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn a_silent_engine_times_out_and_a_dead_one_fails_the_probe() {
    let (url, calls) = faulty(|_| Reply::Hang, true);
    let t = Instant::now();
    let m = failure(&url, ",timeout=1");
    assert!(m.contains("timeout"), "{m}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a timeout is not retried");
    // Nothing listening: the probe fails, after the retries, naming the engine.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let err = OpenAiEngine::connect(&spec(&url, ",retries=1")).unwrap_err();
    let m = err.to_string();
    assert!(
        m.contains(&url) && m.contains("probe") && m.contains("after 2 attempts"),
        "{m}"
    );
    // A model the engine does not serve is the caller's mistake.
    let (url, _) = serve(5, Arc::new(|p: &str, b: &Value| good(p, b, true)));
    let err = OpenAiEngine::connect(&spec(&url, ",model=other")).unwrap_err();
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("\"other\" is not among"), "{err}");
}

/// The fake tokenizer of the scoring routes: "The big cat" → "The", " big", " cat"; token
/// i has log-probability −i (the first none).
fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, w) in text.split(' ').enumerate() {
        out.push(if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        });
    }
    out
}

/// vLLM without `echo` (an older one answered 500 to it), with `prompt_logprobs`; or, with
/// `sglang`, an engine that ignores both `echo` and `prompt_logprobs` on `/completions`
/// (as llama.cpp's server does with echo) and answers SGLang's native `/generate`.
fn no_echo(path: &str, body: &Value, sglang: bool) -> Reply {
    let prompt = body["prompt"].as_str().unwrap_or("");
    if path == "/completions" && !sglang && body.get("echo") == Some(&json!(true)) {
        return Reply::Json(
            500,
            json!({"error": {"message": "echo is not supported"}}).to_string(),
        );
    }
    if path == "/completions" && !sglang && body.get("prompt_logprobs").is_some() {
        let mut entries = vec![Value::Null];
        for (i, t) in words(prompt).iter().enumerate().skip(1) {
            entries.push(
                json!({ (100 + i).to_string(): {"logprob": -(i as f64), "rank": 1,
                                                          "decoded_token": t} }),
            );
        }
        return Reply::Json(
            200,
            json!({"choices": [{"index": 0, "text": ".", "finish_reason": "length",
                "logprobs": null, "prompt_logprobs": entries}]})
            .to_string(),
        );
    }
    if path == "/generate" {
        if !sglang {
            return Reply::Json(404, json!({"detail": "Not Found"}).to_string());
        }
        let text = body["text"].as_str().unwrap();
        let entries: Vec<Value> = words(text)
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let lp = if i == 0 {
                    Value::Null
                } else {
                    json!(-(i as f64))
                };
                json!([lp, 100 + i, t])
            })
            .collect();
        return Reply::Json(
            200,
            json!({"text": ".", "meta_info": {"input_token_logprobs": entries}}).to_string(),
        );
    }
    // Everything else (echo included, on the SGLang-like one) is a plain completion.
    let mut plain = body.clone();
    if let Some(o) = plain.as_object_mut() {
        o.remove("echo");
    }
    good(path, &plain, true)
}

#[test]
fn where_echo_fails_a_text_is_scored_by_prompt_logprobs_or_sglangs_generate() {
    for (sglang, route) in [
        (false, tilt_remote::Scoring::PromptLogprobs),
        (true, tilt_remote::Scoring::SglangGenerate),
    ] {
        let (url, log) = serve(
            30,
            Arc::new(move |p: &str, b: &Value| no_echo(p, b, sglang)),
        );
        let e = OpenAiEngine::connect(&spec(&url, "")).unwrap();
        assert_eq!(e.info().scoring, Some(route), "sglang: {sglang}");
        let s = e.log_prob("The big cat", " sat on").unwrap();
        assert_eq!(s.tokens, [" sat", " on"]);
        assert_eq!(
            (s.token_log_probs.clone(), s.total),
            (vec![-3.0, -4.0], -7.0)
        );
        // The request each route sent, as the engines document it.
        let log = log.lock().unwrap();
        let (path, body) = log.last().unwrap();
        if sglang {
            assert_eq!(path, "/generate");
            assert_eq!(body["text"], json!("The big cat sat on"));
            assert_eq!(
                (
                    body["return_logprob"].clone(),
                    body["logprob_start_len"].clone()
                ),
                (json!(true), json!(0))
            );
        } else {
            assert_eq!(path, "/completions");
            assert_eq!(body["prompt_logprobs"], json!(0));
        }
        drop(log);
        // A prompt that ends inside a token is refused as with echo.
        let err = e.log_prob("The big c", "at sat").unwrap_err();
        assert!(err.to_string().contains("do not split"), "{err}");
    }
    // An engine with none of the three routes: scoring is refused, naming the engine.
    let (url, _) = serve(
        30,
        Arc::new(|p: &str, b: &Value| {
            if p == "/generate" {
                return Reply::Json(404, "{}".into());
            }
            let mut plain = b.clone();
            if let Some(o) = plain.as_object_mut() {
                o.remove("echo");
                o.remove("prompt_logprobs");
            }
            good(p, &plain, true)
        }),
    );
    let e = OpenAiEngine::connect(&spec(&url, "")).unwrap();
    assert_eq!(e.info().scoring, None);
    let err = e.log_prob("The cat", " sat").unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
}
