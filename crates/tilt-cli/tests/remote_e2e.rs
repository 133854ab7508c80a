//! `tilt generate --engine` and `tilt score --engine` against real OpenAI-compatible servers
//! on loopback: another `tilt serve` (which honours `n`), and llama-cpp-python's server
//! (`llama-cpp-python[server]==0.3.36`, built from PyPI into a venv under $TILT_HOME on first
//! use, ≈10 minutes on 2 cores, then reused), which ignores `n`. Every server runs under
//! `timeout` and is killed when its test ends.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn binary() -> &'static Path {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("remote_e2e_tilt");
        std::fs::copy(env!("CARGO_BIN_EXE_tilt"), &path).unwrap();
        path
    })
}

fn tilt(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run the tilt binary")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is JSON"))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server child, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tilt_serve() -> (Server, String) {
    let mut child = Command::new("timeout")
        .args(["600"])
        .arg(binary())
        .args(["serve", "--port", "0", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tilt serve");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("tilt serve ended before it served")
            .unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break format!("http://{}/v1", rest.split_whitespace().next().unwrap());
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Server(child), url)
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
    let bad = tilt(&[
        "eval",
        "--engine",
        &engine,
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("remote engine"), "{}", stderr(&bad));
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

/// The llama-cpp-python server the test drives.
const LLAMA_CPP: &str = "llama-cpp-python[server]==0.3.36";

/// A venv with llama-cpp-python's server, built on first use (from source: about ten
/// minutes) and cached. Built for AVX2 without AVX-512: the native build of 0.3.36 crashed
/// in `llama_decode` on this machine's AVX-512 cores.
fn llama_cpp_python() -> PathBuf {
    let venv = tilt_assets::tilt_home().join("test-venvs/llama-cpp-python-0.3.36-avx2");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&venv);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "creating the venv {}", venv.display());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                LLAMA_CPP,
            ])
            .env(
                "CMAKE_ARGS",
                "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                 -DGGML_AVX512=OFF",
            )
            .output()
            .expect("pip install llama-cpp-python");
        assert!(
            out.status.success(),
            "pip install {LLAMA_CPP}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&ready, LLAMA_CPP).unwrap();
    }
    python
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
    let out = tilt(&[
        "generate",
        "--engine",
        &engine,
        "--prompt",
        "Name a fruit that is rich in vitamin C.",
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
    // log p of a given text: llama.cpp's against tilt's own kernels on the same file (the
    // model adds no BOS token, so both score the raw text from its first token).
    let prompt = "The capital of France is";
    let response = " Paris, a city on the Seine.";
    let remote = tilt(&[
        "score",
        "--engine",
        &engine,
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
        prompt,
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
    assert!(
        (rt - lt).abs() < 0.05 * lt.abs().max(1.0),
        "llama.cpp {rt} vs tilt {lt}"
    );
    eprintln!("log p(response | prompt): llama.cpp {rt:.4} nats, tilt {lt:.4} nats");
}
