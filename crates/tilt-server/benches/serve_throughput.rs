//! The server's throughput, beside the engine in-process and beside llama-cpp-python's
//! OpenAI server, in one run, on the same GGUF (SmolLM2-135M-Instruct Q4_1) and cores.
//!
//! ```text
//! cargo bench -p tilt-server --bench serve_throughput
//! ```
//!
//! For C = 1, 4, 16, 64 concurrent clients, each sends one chat request asking for 64
//! sampled tokens (`strategy` sample, temperature 1, its own seed); the aggregated rate is
//! the completion tokens of all the answers (from `usage`) over the wall time from the
//! first request to the last answer. Beside it: the same C requests run in-process by
//! `Engine::generate_many` (the batch the server's worker steps), and the same clients
//! against llama-cpp-python's server (PyPI `llama-cpp-python[server]==0.3.36`, built from
//! source into `target/tilt-bench-llamacpp-venv` on first use, without its AMX kernels (which
//! crash on this model; see [`LLAMACPP_CMAKE_ARGS`]): about 10 minutes on 2 cores;
//! `TILT_BENCH_SKIP_LLAMACPP=1` skips it). Then the time to first token of one new streamed
//! request sent once 16 others decode (their prefills done), beside its prefill alone plus
//! two steps of the 16.
//!
//! Environment: `TILT_BENCH_THREADS` (default 2), `TILT_BENCH_CLIENTS` (default
//! `1,4,16,64`), `TILT_BENCH_SKIP_LLAMACPP=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tilt_engine::{Engine, EngineConfig, Input, NoProgress, Params, Request, Strategy};

const NEW_TOKENS: usize = 64;
const LLAMACPP: &str = "llama-cpp-python[server]==0.3.36";
/// llama.cpp's CPU build for this kind of machine: every x86 vector extension it has, but
/// not the AMX kernels. With `-march=native` on a CPU reporting AMX, 0.3.36 crashes
/// (SIGSEGV in `ggml_backend_amx_mul_mat`) at the first matrix product of this Q4_1 model.
const LLAMACPP_CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
     -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
     -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
     -DGGML_AMX_BF16=OFF";

fn prompt(i: usize) -> String {
    let topics = [
        "the sea", "a forest", "the moon", "a city", "rain", "music", "bread", "trains",
    ];
    format!("Write a few sentences about {}.", topics[i % topics.len()])
}

fn body(i: usize, model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": NEW_TOKENS,
        "temperature": 1.0,
        "seed": i as u64,
        "stream": stream,
    })
}

/// One load run: completion tokens of the answers, wall seconds, requests that failed.
#[derive(Clone, Copy)]
struct Load {
    tokens: usize,
    seconds: f64,
    failed: usize,
}

impl Load {
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// Send `clients` requests at once to `who` at `url`. A request that fails is counted and
/// its first error printed (naming the server), so that one server's fault cannot pass for
/// another's or end the run.
async fn load(who: &str, url: &str, model: &str, clients: usize) -> Load {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let http = http.clone();
        let url = url.to_string();
        let b = body(i, model, false);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&b)
                .send()
                .await
                .map_err(|e| format!("send: {e:?}"))?;
            let status = r.status();
            let v: serde_json::Value = r.json().await.map_err(|e| format!("body: {e:?}"))?;
            if !status.is_success() {
                return Err(format!("status {status}: {v}"));
            }
            Ok(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize)
        }));
    }
    let (mut tokens, mut failed) = (0, 0);
    for t in tasks {
        match t.await.expect("join") {
            Ok(n) => tokens += n,
            Err(e) => {
                if failed == 0 {
                    eprintln!("{who}, {clients} clients: a request failed: {e}");
                }
                failed += 1;
            }
        }
    }
    Load {
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        failed,
    }
}

/// The same requests in-process.
fn in_process(engine: &Engine, clients: usize) -> (usize, f64) {
    let requests: Vec<Request> = (0..clients)
        .map(|i| {
            let mut p = Params::new(Strategy::Sample {
                sampling: Default::default(),
            });
            p.seed = i as u64;
            p.max_new_tokens = NEW_TOKENS;
            Request::new(Input::Prompt(prompt(i)), p)
        })
        .collect();
    let t0 = Instant::now();
    let mut tokens = 0;
    engine.generate_many(requests, |_, r| {
        tokens += r.expect("in-process request").usage.completion_tokens;
        true
    });
    (tokens, t0.elapsed().as_secs_f64())
}

/// Time to the first streamed chunk of one request while `busy` others decode.
async fn ttft_under_load(url: &str, model: &str, busy: usize) -> f64 {
    let background = {
        let (url, model) = (url.to_string(), model.to_string());
        tokio::spawn(async move { load("tilt serve", &url, &model, busy).await })
    };
    // Wait until all of them decode (their prefills done: the last step had `busy` rows).
    let http = reqwest::Client::new();
    let t_wait = Instant::now();
    loop {
        let text = match http.get(format!("{url}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let rows = text.lines().find_map(|l| {
            l.strip_prefix("tilt_batch_rows ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if rows.is_some_and(|r| r >= busy as f64) || t_wait.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let mut r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body(999, model, true))
        .send()
        .await
        .expect("send");
    let mut first = None;
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        if String::from_utf8_lossy(&chunk).contains("\"content\"") && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64());
        }
    }
    background.await.expect("join");
    first.unwrap_or(f64::NAN)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// llama-cpp-python's server on `model`, built into a venv on first use.
fn llamacpp_server(model: &Path, threads: usize) -> Option<(Kill, String)> {
    let venv = target_dir().join("tilt-bench-llamacpp-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!(
            "building {LLAMACPP} into {} (once; about 10 minutes)",
            venv.display()
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--no-cache-dir", LLAMACPP])
                .env("CMAKE_BUILD_PARALLEL_LEVEL", "2")
                .env("CMAKE_ARGS", LLAMACPP_CMAKE_ARGS)
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not build {LLAMACPP}; skipping it");
            let _ = std::fs::remove_dir_all(&venv);
            return None;
        }
    }
    let port = free_port();
    let child = Command::new(&python)
        .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .arg("--model")
        .arg(model)
        .args(["--n_threads", &threads.to_string(), "--n_ctx", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let url = format!("http://127.0.0.1:{port}");
    let guard = Kill(child);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if http_ok(&format!("{url}/v1/models")) {
            return Some((guard, url));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("llama-cpp-python's server did not start; skipping it");
    None
}

/// Whether GET `url` answers 200 (a small probe on its own runtime).
fn http_ok(url: &str) -> bool {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .and_then(|rt| rt.block_on(async { reqwest::get(url).await.ok() }))
        .is_some_and(|r| r.status().is_success())
}

fn main() {
    let threads: usize = std::env::var("TILT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let clients: Vec<usize> = std::env::var("TILT_BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.split(',').map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    let config = EngineConfig {
        threads,
        max_batch: 64,
        ..EngineConfig::default()
    };
    let engine = Engine::load(&config, &NoProgress).expect("load the engine");
    let model_path = tilt_models::Policy::artifacts(engine.policy())[0].clone();
    let inproc: Vec<(usize, usize, f64)> = clients
        .iter()
        .map(|&c| {
            let (t, s) = in_process(&engine, c);
            (c, t, s)
        })
        .collect();
    // The prefill of the TTFT probe's prompt alone, and a step of 16 sequences.
    let probe = Input::Prompt(prompt(999));
    let tokens = engine.encode(&probe, NEW_TOKENS).expect("encode");
    let t0 = Instant::now();
    let _ = tilt_models::Policy::prefill(engine.policy(), &tokens);
    let prefill_s = t0.elapsed().as_secs_f64();
    let step16_s = inproc
        .iter()
        .find(|r| r.0 == 16)
        .map(|r| r.2 / NEW_TOKENS as f64)
        .unwrap_or(f64::NAN);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let model = tilt_server::model_id(&engine);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        tilt_server::serve(
            engine,
            tilt_server::ServerConfig::default(),
            listener,
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    std::thread::sleep(Duration::from_millis(300));
    let served: Vec<Load> = clients
        .iter()
        .map(|&c| rt.block_on(load("tilt serve", &url, &model, c)))
        .collect();
    let ttft = rt.block_on(ttft_under_load(&url, &model, 16));
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);

    let llama: Option<Vec<Load>> =
        if std::env::var("TILT_BENCH_SKIP_LLAMACPP").is_ok_and(|v| v == "1") {
            None
        } else {
            llamacpp_server(&model_path, threads).map(|(_guard, url)| {
                clients
                    .iter()
                    .map(|&c| rt.block_on(load("llama-cpp-python", &url, "llama", c)))
                    .collect()
            })
        };

    println!("tilt serve: {model}, {threads} threads, {NEW_TOKENS} sampled tokens per request");
    println!(
        "| clients | server tok/s | in-process tok/s | server / in-process | llama-cpp-python tok/s | tilt / llama-cpp-python |"
    );
    println!("|---|---|---|---|---|---|");
    let failed = |l: &Load| {
        if l.failed > 0 {
            format!(" ({} failed)", l.failed)
        } else {
            String::new()
        }
    };
    for (i, (&c, l)) in clients.iter().zip(&served).enumerate() {
        let rate = l.rate();
        let (_, it, is) = inproc[i];
        let irate = it as f64 / is;
        let (lrate, ratio) = match llama.as_ref().map(|ll| ll[i]) {
            Some(ll) => (
                format!("{:.1}{}", ll.rate(), failed(&ll)),
                format!("{:.2}×", rate / ll.rate()),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {c} | {rate:.1}{} | {irate:.1} | {:.2}× | {lrate} | {ratio} |",
            failed(l),
            rate / irate
        );
    }
    println!(
        "time to first token of a new request while 16 decode: {ttft:.3} s; its prefill alone \
         {prefill_s:.3} s + two steps of 16 ({:.3} s) = {:.3} s",
        2.0 * step16_s,
        prefill_s + 2.0 * step16_s
    );
}
