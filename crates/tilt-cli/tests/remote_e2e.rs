//! `tilt generate --engine` and `tilt score --engine` against real OpenAI-compatible servers
//! on loopback: another `tilt serve` (which honours `n`), and llama-cpp-python's server
//! (`llama-cpp-python[server]==0.3.36`, built from PyPI into a venv under $TILT_HOME on first
//! use, ≈10 minutes on 2 cores, then reused), which ignores `n`. Every server runs under
//! `timeout` and is killed when its test ends.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{lines, stderr, Server};

fn binary() -> &'static Path {
    common::binary("remote_e2e_tilt")
}

fn tilt(args: &[&str]) -> Output {
    common::run(binary(), args)
}

fn tilt_serve() -> (Server, String) {
    let (server, url, _) = common::tilt_serve(binary(), &["--threads", "1"]);
    (server, format!("{url}/v1"))
}

#[test]
fn tilt_serve_is_the_engine_of_another_tilt() {
    let (_server, url) = tilt_serve();
    let engine = format!("openai:{url}");
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Name a fruit that is rich in vitamin C.\"}\n\"How do I boil an egg?\"\n",
    )
    .unwrap();
    let manifest = dir.path().join("m.json");
    let args = |m: Option<&Path>| {
        let mut a = vec![
            "generate".to_string(),
            "--engine".into(),
            engine.clone(),
            "--prompts".into(),
            prompts.display().to_string(),
            "--strategy".into(),
            "bon".into(),
            "--n".into(),
            "4".into(),
            "--max-new-tokens".into(),
            "12".into(),
            "--seed".into(),
            "3".into(),
        ];
        if let Some(m) = m {
            a.extend(["--manifest".into(), m.display().to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| tilt(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(args(Some(&manifest)));
    assert!(out.status.success(), "{}", stderr(&out));
    let ls = lines(&out);
    assert_eq!(ls.len(), 2);
    for l in &ls {
        assert_eq!(l["strategy"], "bon");
        assert_eq!(l["engine"]["requests"], "n", "tilt serve honours n");
        assert_eq!(l["engine"]["url"], url.as_str());
        let cands = l["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), 4);
        let best = cands
            .iter()
            .map(|c| c["reward"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(l["reward"].as_f64().unwrap(), best);
        for c in cands {
            let lp = c["log_prob"].as_f64().unwrap();
            assert!(lp.is_finite() && lp < 0.0, "{c}");
            assert!(c["new_tokens"].as_u64().unwrap() >= 1);
        }
        let bound = l["kl_bound"].as_f64().unwrap();
        assert!((bound - (4f64.ln() - 0.75)).abs() < 1e-12);
    }
    // The same request again: the same bytes (tilt serve is deterministic by seed), and the
    // manifest reproduces.
    let again = run(args(None));
    assert_eq!(again.stdout, out.stdout);
    let r = tilt(&["reproduce", manifest.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m["engine"]["engine"], engine.as_str());
    // cd-block on a raw prompt: blocks continued through /completions, valued by the reward.
    let out = tilt(&[
        "generate",
        "--engine",
        &engine,
        "--no-chat-template",
        "--prompt",
        "Q: How do I boil an egg?\nA:",
        "--strategy",
        "cd-block",
        "--block-k",
        "2",
        "--block-m",
        "4",
        "--max-new-tokens",
        "12",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = &lines(&out)[0];
    let b = l["blocks"].as_u64().unwrap();
    assert!((1..=3).contains(&b), "{l}");
    assert_eq!(l["draws"].as_u64().unwrap(), 2 * b);
    assert_eq!(l["kl_note"], "cd-block-chain-bound");
    let bound = b as f64 * (2f64.ln() - 0.5);
    assert!((l["kl_bound"].as_f64().unwrap() - bound).abs() < 1e-12);
    // What a remote engine cannot do: clear errors, exit 2 (bad input) or 1 (the engine).
    let bad = tilt(&[
        "generate",
        "--engine",
        &engine,
        "--prompt",
        "hi",
        "--strategy",
        "cd-block",
        "--scorer",
        "/nonexistent.safetensors",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    // eval on the engine, chat prompts rendered by tilt with the served model's template
    // (tilt serve runs the default model), so that cd-block runs on them too; its manifest
    // reproduces.
    let templated = format!("{engine},chat-template=default");
    let eval_manifest = dir.path().join("eval.json");
    let eval = |strategies: &str, m: &Path| {
        tilt(&[
            "eval",
            "--engine",
            &templated,
            "--prompts",
            prompts.to_str().unwrap(),
            "--strategies",
            strategies,
            "--reference-samples",
            "4",
            "--samples-per-prompt",
            "2",
            "--max-new-tokens",
            "8",
            "--manifest",
            m.to_str().unwrap(),
        ])
    };
    let out = eval("sample; bon:2; cd-block:K=2,M=4", &eval_manifest);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["engine"]["url"], url.as_str());
    assert!(
        report["engine"]["prompt"]
            .as_str()
            .unwrap()
            .contains("rendered by tilt"),
        "{report}"
    );
    let names: Vec<&str> = report["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sample", "bon:2", "cd-block:K=2,M=4"]);
    for s in report["strategies"].as_array().unwrap() {
        assert_eq!(s["outputs"], 4, "{s}");
        let w = s["win_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "{s}");
    }
    let r = tilt(&["reproduce", eval_manifest.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    // cd-token cannot run there: exit 2 before any request, naming the strategy.
    let bad = eval("sample; cd-token:lambda=1,k=4", &dir.path().join("x.json"));
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("cd-token"), "{}", stderr(&bad));
    let bad = tilt(&[
        "generate",
        "--engine",
        "openai:http://127.0.0.1:1/v1,retries=0",
        "--prompt",
        "hi",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("http://127.0.0.1:1/v1"),
        "{}",
        stderr(&bad)
    );
    let bad = tilt(&["generate", "--engine", "vllm:http://h", "--prompt", "hi"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let bad = tilt(&[
        "generate",
        "--engine",
        &format!("{engine},model=nope"),
        "--prompt",
        "hi",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("\"nope\" is not among"),
        "{}",
        stderr(&bad)
    );
    // tilt serve does not echo: scoring a given text there is refused, naming the engine.
    let bad = tilt(&[
        "score",
        "--engine",
        &engine,
        "--no-chat-template",
        "--prompt",
        "The cat",
        "--response",
        " sat",
    ]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(stderr(&bad).contains(&url), "{}", stderr(&bad));
}

/// A venv under `$TILT_HOME/test-venvs/NAME` with `requirement` pip-installed (with `env`),
/// made once: built under a temporary name, marked complete, then renamed into place (so an
/// interrupted build is never taken for a finished one).
fn test_venv(name: &str, requirement: &str, env: &[(&str, &str)]) -> PathBuf {
    let root = tilt_assets::tilt_home().join("test-venvs");
    let venv = root.join(name);
    let ready = venv.join(".installed");
    if !ready.exists() {
        std::fs::create_dir_all(&root).unwrap();
        let partial = root.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&partial)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "creating the venv {}", partial.display());
        let mut pip = Command::new(partial.join("bin/python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
        ]);
        for (k, v) in env {
            pip.env(k, v);
        }
        let out = pip.output().expect("pip install");
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&partial);
            panic!(
                "pip install {requirement}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(partial.join(".installed"), requirement).unwrap();
        let _ = std::fs::remove_dir_all(&venv);
        if std::fs::rename(&partial, &venv).is_err() {
            let _ = std::fs::remove_dir_all(&partial);
            assert!(ready.exists(), "cannot move the venv to {}", venv.display());
        }
    }
    venv.join("bin/python")
}

/// llama-cpp-python's server, built from source on first use (about ten minutes) for AVX2
/// and without llama.cpp's AMX kernels: the native build of 0.3.36 crashes on a CPU that
/// reports AMX (SIGSEGV in `ggml_backend_amx_mul_mat` at the first matrix product of this
/// Q4_1 model, seen here).
fn llama_cpp_python() -> PathBuf {
    test_venv(
        "llama-cpp-python-0.3.36-avx2",
        "llama-cpp-python[server]==0.3.36",
        &[
            (
                "CMAKE_ARGS",
                "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
             -DGGML_AVX512=OFF",
            ),
            ("CMAKE_BUILD_PARALLEL_LEVEL", "2"),
        ],
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn default_gguf() -> PathBuf {
    let out = tilt(&["models", "fetch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tilt_assets::tilt_home().join("models/smollm2-135m-instruct-q4_1");
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn llama_cpp_pythons_server_is_an_engine_that_ignores_n() {
    let python = llama_cpp_python();
    let gguf = default_gguf();
    let port = free_port();
    let child = Command::new("timeout")
        .arg("600")
        .arg(&python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(&gguf)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama_cpp.server");
    let _server = Server(child);
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "llama_cpp.server did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!("http://127.0.0.1:{port}/v1");
    let engine = format!("openai:{url},max-concurrency=2");
    // Its chat endpoint returns no log-probabilities (logprobs: null): refused, saying
    // that /completions does; a raw prompt goes there.
    let out = tilt(&[
        "generate",
        "--engine",
        &engine,
        "--prompt",
        "Name a fruit.",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/completions does"),
        "{}",
        stderr(&out)
    );
    // With the model's chat template on tilt's side, the same chat prompt is rendered by
    // tilt and continued by /completions, which does return log-probabilities.
    let templated = format!("{engine},chat-template={}", gguf.display());
    let out = tilt(&[
        "generate",
        "--engine",
        &templated,
        "--prompt",
        "Name a fruit.",
        "--max-new-tokens",
        "4",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = &lines(&out)[0];
    assert!(
        l["engine"]["prompt"]
            .as_str()
            .unwrap()
            .contains("rendered by tilt"),
        "{l}"
    );
    assert!(
        l["candidates"][0]["log_prob"].as_f64().unwrap() < 0.0,
        "{l}"
    );
    let prompt = "<|im_start|>user\nName a fruit that is rich in vitamin C.<|im_end|>\n\
                  <|im_start|>assistant\n";
    let out = tilt(&[
        "generate",
        "--engine",
        &engine,
        "--no-chat-template",
        "--prompt",
        prompt,
        "--strategy",
        "bon",
        "--n",
        "3",
        "--max-new-tokens",
        "12",
        "--seed",
        "5",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = &lines(&out)[0];
    assert_eq!(
        l["engine"]["requests"], "per-candidate",
        "llama-cpp-python ignores n"
    );
    let cands = l["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3);
    for c in cands {
        let lp = c["log_prob"].as_f64().unwrap();
        assert!(lp.is_finite() && lp < 0.0, "{c}");
    }
    // log p of a given text: llama.cpp's against tilt's own kernels on the same file. Its
    // echo is shifted by one position unless the text starts with the BOS token: tilt sees
    // that (the generated token is missing) and refuses; with echo-prefix=<|im_start|> the
    // two agree with tilt scoring the same text.
    let prompt = "The capital of France is";
    let response = " Paris, a city on the Seine.";
    let shifted = tilt(&[
        "score",
        "--engine",
        &engine,
        "--no-chat-template",
        "--prompt",
        prompt,
        "--response",
        response,
    ]);
    assert_eq!(shifted.status.code(), Some(2), "{}", stderr(&shifted));
    assert!(
        stderr(&shifted).contains("echo-prefix"),
        "{}",
        stderr(&shifted)
    );
    let with_bos = format!("{engine},echo-prefix=<|im_start|>");
    let remote = tilt(&[
        "score",
        "--engine",
        &with_bos,
        "--no-chat-template",
        "--prompt",
        prompt,
        "--response",
        response,
    ]);
    assert!(remote.status.success(), "{}", stderr(&remote));
    let local = tilt(&[
        "score",
        "--no-chat-template",
        "--prompt",
        &format!("<|im_start|>{prompt}"),
        "--response",
        response,
    ]);
    assert!(local.status.success(), "{}", stderr(&local));
    let (r, l) = (&lines(&remote)[0], &lines(&local)[0]);
    assert_eq!(r["tokens"], l["tokens"], "{r}\n{l}");
    let (rt, lt) = (
        r["log_prob"].as_f64().unwrap(),
        l["log_prob"].as_f64().unwrap(),
    );
    let worst = r["token_log_probs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(l["token_log_probs"].as_array().unwrap())
        .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "log p(response | prompt): llama.cpp {rt:.4} nats, tilt {lt:.4} nats, largest per-token \
         difference {worst:.4}"
    );
    assert!(
        (rt - lt).abs() < 0.05 * lt.abs().max(1.0),
        "llama.cpp {rt} vs tilt {lt}"
    );
    // A chat prompt scored through the template: the rendered text starts with the BOS
    // token, so llama.cpp's echo is not shifted; it agrees with tilt's score of the same
    // chat.
    let chat = |extra: &[&str]| {
        let mut a = vec!["score"];
        a.extend_from_slice(extra);
        a.extend(["--prompt", "Name a fruit.", "--response", "An orange."]);
        tilt(&a)
    };
    let remote = chat(&["--engine", &templated]);
    assert!(remote.status.success(), "{}", stderr(&remote));
    let local = chat(&[]);
    assert!(local.status.success(), "{}", stderr(&local));
    let (r, l) = (&lines(&remote)[0], &lines(&local)[0]);
    assert_eq!(r["tokens"], l["tokens"], "{r}\n{l}");
    let (rt, lt) = (
        r["log_prob"].as_f64().unwrap(),
        l["log_prob"].as_f64().unwrap(),
    );
    eprintln!("log p(chat answer): llama.cpp {rt:.4} nats, tilt {lt:.4} nats");
    assert!(
        (rt - lt).abs() < 0.05 * lt.abs().max(1.0),
        "llama.cpp {rt} vs tilt {lt}"
    );
}

/// The TEI-shaped server over PyPI's `alt-profanity-check` classifier (tilt-rewards' test
/// fixture), on a free port; stops by itself after 60 s idle.
fn profanity_server() -> (Server, String, PathBuf, PathBuf) {
    let python = test_venv(
        "alt-profanity-check-1.9.1",
        "alt-profanity-check==1.9.1",
        &[],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tilt-rewards/tests/fixtures/tei_profanity_server.py");
    let mut child = Command::new("timeout")
        .arg("600")
        .arg(&python)
        .arg(&script)
        .args(["0", "--idle-seconds", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the TEI profanity server");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("the server prints its port");
    (
        Server(child),
        format!("http://127.0.0.1:{port}"),
        python,
        script,
    )
}

#[test]
fn a_remote_engine_with_a_served_classifier_as_its_reward() {
    // Candidates from one server (tilt serve), rewards from another (a learned classifier
    // behind TEI's /predict): worst-of-4 under the profanity logit returns the least
    // profane, and every candidate's reward is the classifier's own value for its text.
    let (_engine, url) = tilt_serve();
    let (_tei, tei, python, script) = profanity_server();
    let reward = format!("tei:{tei},label=profane,batch=2,concurrency=2");
    let out = tilt(&[
        "generate",
        "--engine",
        &format!("openai:{url}"),
        "--reward",
        &reward,
        "--prompt",
        "Tell me what you think of my neighbour.",
        "--strategy",
        "won",
        "--n",
        "4",
        "--max-new-tokens",
        "16",
        "--seed",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = &lines(&out)[0];
    let cands = l["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4);
    let texts: Vec<&str> = cands.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let own = Command::new(&python)
        .arg(&script)
        .arg("--print-scores")
        .args(&texts)
        .output()
        .unwrap();
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let own: Vec<f64> = String::from_utf8(own.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["profane_logit"]
                .as_f64()
                .unwrap()
        })
        .collect();
    for (c, o) in cands.iter().zip(&own) {
        let r = c["reward"].as_f64().unwrap();
        assert!((r - o).abs() < 1e-4 * o.abs().max(1.0), "{r} vs {o}");
    }
    let least = own.iter().cloned().fold(f64::MAX, f64::min);
    assert!((l["reward"].as_f64().unwrap() - least).abs() < 1e-4 * least.abs().max(1.0));
    // The reward server gone: a failure naming it, exit 1, nothing printed as complete.
    drop(_tei);
    let out = tilt(&[
        "generate",
        "--engine",
        &format!("openai:{url}"),
        "--reward",
        &format!("tei:{tei},retries=0"),
        "--prompt",
        "hi",
        "--strategy",
        "bon",
        "--n",
        "2",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&tei), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

/// POST `body` to `url` with Python's urllib; returns (status, JSON answer).
fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let script = r#"
import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=300) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let out = Command::new("python3")
        .args(["-c", script, url, &body.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, json) = text.split_once('\n').unwrap();
    (
        status.trim().parse().unwrap(),
        serde_json::from_str(json).unwrap(),
    )
}

#[test]
fn tilt_serve_in_front_of_a_remote_engine() {
    // A serves the model; B serves the OpenAI API in front of A, with its own reward.
    let (_a, a) = tilt_serve();
    let (_b, b, line) = common::tilt_serve(binary(), &["--engine", &format!("openai:{a}")]);
    assert!(line.contains(&format!("from {a}")), "{line}");
    let b = format!("{b}/v1");
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Name a fruit that is rich in vitamin C."}],
        "max_tokens": 12, "seed": 4, "strategy": "bon", "candidates": 4,
        "return_candidates": true,
    });
    let (status, r) = post_json(&format!("{b}/chat/completions"), &body);
    assert_eq!(status, 200, "{r}");
    let t = &r["choices"][0]["tilt"];
    assert_eq!(t["strategy"], "bon");
    assert_eq!(t["engine"]["url"], a.as_str());
    let cands = t["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4);
    let best = cands
        .iter()
        .map(|c| c["reward"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(t["reward"].as_f64().unwrap(), best);
    assert!(cands.iter().all(|c| c["log_prob"].as_f64().unwrap() < 0.0));
    assert_eq!(
        r["choices"][0]["message"]["content"],
        t["candidates"][t["selected"].as_u64().unwrap() as usize]["text"]
    );
    // The same request, the same answer (seeded all the way down).
    let (_, again) = post_json(&format!("{b}/chat/completions"), &body);
    assert_eq!(again["choices"], r["choices"]);
    // What cannot be served in front of a remote engine: 400s naming the field.
    let mut cd = body.clone();
    cd["strategy"] = "cd-token".into();
    cd.as_object_mut().unwrap().remove("candidates");
    let (status, e) = post_json(&format!("{b}/chat/completions"), &cd);
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "strategy", "{e}");
    let mut lp = body.clone();
    lp["logprobs"] = true.into();
    lp["top_logprobs"] = 2.into();
    let (status, e) = post_json(&format!("{b}/chat/completions"), &lp);
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "top_logprobs", "{e}");
    // Each returned token's log-probability is passed on from the engine: they sum to the
    // chosen candidate's log_prob.
    lp.as_object_mut().unwrap().remove("top_logprobs");
    let (status, r2) = post_json(&format!("{b}/chat/completions"), &lp);
    assert_eq!(status, 200, "{r2}");
    let sum: f64 = r2["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .sum();
    let t2 = &r2["choices"][0]["tilt"];
    let chosen = t2["candidates"][t2["selected"].as_u64().unwrap() as usize]["log_prob"]
        .as_f64()
        .unwrap();
    assert!((sum - chosen).abs() < 1e-9, "{sum} vs {chosen}");
    // And tilt as a client of tilt in front of tilt: generate --engine B.
    let out = tilt(&[
        "generate",
        "--engine",
        &format!("openai:{b}"),
        "--prompt",
        "How do I boil an egg?",
        "--strategy",
        "bon",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["engine"]["url"], b.as_str());
    // The server in front keeps serving after its engine is gone: each request a 503.
    drop(_a);
    let (status, e) = post_json(&format!("{b}/chat/completions"), &body);
    assert_eq!(status, 503, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains(&a), "{e}");
}
