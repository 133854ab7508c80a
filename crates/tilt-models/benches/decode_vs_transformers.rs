//! Decode throughput of tilt's Llama against Hugging Face `transformers` `generate`, in one
//! run, on the same GGUF file (SmolLM2-135M-Instruct Q4_1 by default) and thread count.
//!
//! For N = 1, 4, 16 sequences: a 64-token prompt is prefilled once, forked N times, and 64
//! new tokens are decoded per sequence (greedy for tilt: the sampler is not what is
//! measured; transformers samples at temperature 1, as it refuses N > 1 greedy). We
//! print the prefill time and the aggregated decode rate (N × 64 tokens / decode time), and
//! transformers' `generate(num_return_sequences = N)` rate (prefill included, as it reports
//! it), with the ratios.
//!
//! ```text
//! cargo bench -p tilt-models --bench decode_vs_transformers
//! ```
//! Each tilt setting runs 3 times; the table shows the medians. For one sequence it also
//! runs llama.cpp on the same file (the prebuilt CPU engine of the npm package
//! `node-llama-cpp`, token by token through its sequence API: the engine, not a
//! high-level sampling loop), at the same thread count and at 1 thread (llama.cpp's best
//! here), and prints the ratio.
//!
//! Environment: `TILT_BENCH_MODEL` (a GGUF path; default: the embedded SmolLM2),
//! `TILT_BENCH_THREADS` (default 2), `TILT_BENCH_BATCHES` (default `1,4,16`),
//! `TILT_BENCH_SKIP_HF=1`, `TILT_BENCH_SKIP_LLAMACPP=1`, `TILT_BENCH_VENV` (default
//! `target/tilt-bench-venv`: created with `python3 -m venv` and filled from PyPI on first
//! use, then reused), `TILT_BENCH_NODE_DIR` (default `target/llamacpp-bench`: `npm install`
//! there on first use).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tilt_models::{Llama, LlamaPolicy, Outputs, Policy, TokenId};

const PROMPT_TOKENS: usize = 64;
const NEW_TOKENS: usize = 64;
const BATCHES: [usize; 3] = [1, 4, 16];

/// `TILT_BENCH_BATCHES` (e.g. `16` or `1,16`: profile one setting), else [`BATCHES`].
fn batches() -> Vec<usize> {
    std::env::var("TILT_BENCH_BATCHES")
        .ok()
        .and_then(|s| s.split(',').map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| BATCHES.to_vec())
}
const LLAMA_CPP_PACKAGE: &str = "node-llama-cpp@3.22.1";
const REPEATS: usize = 3;
const HF_REQUIREMENTS: &[&str] = &[
    "torch==2.15.0",
    "transformers==5.23.0",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "numpy",
];

struct Row {
    n: usize,
    prefill_s: f64,
    decode_tok_s: f64,
    total_tok_s: f64,
    /// CPU seconds of the decode (tilt only).
    decode_cpu_s: Option<f64>,
}

/// CPU seconds this process has used (user + system, all threads), from `/proc/self/stat`
/// (Linux; 10 ms ticks). Beside wall time it shows when another process took the cores.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn argmax(v: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as TokenId
}

fn prompt_tokens(policy: &LlamaPolicy) -> Result<Vec<TokenId>, Box<dyn std::error::Error>> {
    let text = "The history of computing is a story of people and machines. ".repeat(20);
    let ids = policy.encode(&text)?;
    Ok(ids[..PROMPT_TOKENS].to_vec())
}

fn bench_tilt(
    policy: &LlamaPolicy,
    prompt: &[TokenId],
    n: usize,
    new_tokens: usize,
) -> Result<Row, Box<dyn std::error::Error>> {
    let model: &Llama = policy.model();
    let t0 = Instant::now();
    let (cache, first) = policy.prefill(prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut caches = vec![cache; n];
    let mut next: Vec<TokenId> = vec![argmax(&first.log_probs); n];
    let t1 = Instant::now();
    let cpu0 = cpu_seconds();
    for _ in 0..new_tokens - 1 {
        let lists: Vec<&[TokenId]> = next.iter().map(std::slice::from_ref).collect();
        let outs = model.forward(&mut caches, &lists, Outputs::Last)?;
        next = outs.iter().map(|o| argmax(&o[0].log_probs)).collect();
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_cpu_s = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    // The first new token came from the prefill; new_tokens - 1 decode steps follow.
    let decode_tok_s = (n * (new_tokens - 1)) as f64 / decode_s;
    let total_tok_s = (n * new_tokens) as f64 / (prefill_s + decode_s);
    Ok(Row {
        n,
        prefill_s,
        decode_tok_s,
        total_tok_s,
        decode_cpu_s,
    })
}

fn venv_python() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let venv = std::env::var_os("TILT_BENCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tilt-bench-venv")
        });
    let python = venv.join("bin/python");
    let ready = venv.join(".tilt-ready");
    if !ready.exists() {
        eprintln!(
            "creating the transformers venv in {} (once)…",
            venv.display()
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !ok.success() {
            return Err(format!("python3 -m venv {} failed", venv.display()).into());
        }
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(HF_REQUIREMENTS)
            .status()?;
        if !ok.success() {
            return Err("pip install of the transformers requirements failed".into());
        }
        std::fs::write(&ready, HF_REQUIREMENTS.join("\n"))?;
    }
    Ok(python)
}

fn bench_transformers(
    gguf: &Path,
    prompt: &[TokenId],
    threads: usize,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let python = venv_python()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/transformers_generate.py");
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let ns: Vec<String> = batches().iter().map(|n| n.to_string()).collect();
    let out = Command::new(python)
        .arg(script)
        .arg(gguf)
        .args(["--threads", &threads.to_string()])
        .args(["--new-tokens", &NEW_TOKENS.to_string()])
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--batches", &ns.join(",")])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "transformers_generate.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let get = |k: &str| v[k].as_f64().ok_or(format!("missing {k} in {line}"));
        rows.push(Row {
            n: get("n")? as usize,
            prefill_s: get("prefill_s")?,
            decode_tok_s: get("decode_tok_s")?,
            total_tok_s: get("total_tok_s")?,
            decode_cpu_s: None,
        });
    }
    Ok(rows)
}

/// Median of a non-empty list.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// llama.cpp on `gguf`, one sequence: (median prefill s of all but the last prompt token,
/// median decode tok/s) over the script's 3 runs.
fn bench_llama_cpp(
    gguf: &Path,
    prompt: &[TokenId],
    threads: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let dir = std::env::var_os("TILT_BENCH_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/llamacpp-bench")
        });
    std::fs::create_dir_all(&dir)?;
    if !dir.join("node_modules/node-llama-cpp").exists() {
        eprintln!(
            "installing {LLAMA_CPP_PACKAGE} into {} (once)…",
            dir.display()
        );
        let ok = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", LLAMA_CPP_PACKAGE])
            .current_dir(&dir)
            .status()?;
        if !ok.success() {
            return Err(format!("npm install {LLAMA_CPP_PACKAGE} failed").into());
        }
    }
    // ES modules resolve packages from the script's own folder.
    let script = dir.join("llamacpp_eval.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/llamacpp_eval.mjs"),
        &script,
    )?;
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let out = Command::new("node")
        .arg(&script)
        .arg(gguf)
        .arg(threads.to_string())
        .arg(ids.join(","))
        .arg(NEW_TOKENS.to_string())
        .current_dir(&dir)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "llamacpp_eval.mjs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for line in String::from_utf8(out.stdout)?
        .lines()
        .filter(|l| l.starts_with('{'))
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let get = |k: &str| v[k].as_f64().ok_or(format!("missing {k} in {line}"));
        prefill.push(get("prefill_s")?);
        decode.push(get("decode_tok_s")?);
    }
    if decode.is_empty() {
        return Err("llamacpp_eval.mjs printed no result".into());
    }
    Ok((median(prefill), median(decode)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::var_os("TILT_BENCH_MODEL") {
        Some(p) => PathBuf::from(p),
        None => tilt_assets::default_policy_gguf()?,
    };
    let threads: usize = std::env::var("TILT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let t = Instant::now();
    let policy = LlamaPolicy::load(&path, threads)?;
    println!(
        "model {} ({}), {threads} threads, load {:.2} s",
        policy.name(),
        path.display(),
        t.elapsed().as_secs_f64()
    );
    let prompt = prompt_tokens(&policy)?;
    // Warm-up (page in the weights, start the pool).
    bench_tilt(&policy, &prompt[..8], 2, 4)?;
    let mut tilt = Vec::new();
    for n in batches() {
        let mut runs = Vec::new();
        for _ in 0..REPEATS {
            let r = bench_tilt(&policy, &prompt, n, NEW_TOKENS)?;
            let cpu = r.decode_cpu_s.map_or("?".into(), |c| format!("{c:.2}"));
            eprintln!(
                "tilt N={n}: prefill {:.3} s, decode {:.1} tok/s ({:.2} s wall, {cpu} s CPU)",
                r.prefill_s,
                r.decode_tok_s,
                (n * (NEW_TOKENS - 1)) as f64 / r.decode_tok_s,
            );
            runs.push(r);
        }
        tilt.push(Row {
            n,
            prefill_s: median(runs.iter().map(|r| r.prefill_s).collect()),
            decode_tok_s: median(runs.iter().map(|r| r.decode_tok_s).collect()),
            total_tok_s: median(runs.iter().map(|r| r.total_tok_s).collect()),
            decode_cpu_s: None,
        });
    }
    let llama_cpp = if std::env::var_os("TILT_BENCH_SKIP_LLAMACPP").is_some() {
        Vec::new()
    } else {
        let mut rows = Vec::new();
        for t in [threads, 1]
            .into_iter()
            .take(if threads == 1 { 1 } else { 2 })
        {
            match bench_llama_cpp(&path, &prompt, t) {
                Ok(r) => rows.push((t, r)),
                Err(e) => {
                    eprintln!("llama.cpp baseline unavailable: {e}");
                    break;
                }
            }
        }
        rows
    };
    let hf = if std::env::var_os("TILT_BENCH_SKIP_HF").is_some() {
        Vec::new()
    } else {
        match bench_transformers(&path, &prompt, threads) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("transformers baseline unavailable: {e}");
                Vec::new()
            }
        }
    };
    println!(
        "{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens per sequence, {threads} threads; total = prefill + decode"
    );
    println!(
        "{:>3} | {:>14} {:>16} {:>16} | {:>14} {:>16} {:>16} | {:>9}",
        "N",
        "tilt prefill s",
        "tilt decode t/s",
        "tilt total t/s",
        "HF prefill s",
        "HF decode t/s",
        "HF total t/s",
        "total x"
    );
    for r in &tilt {
        let h = hf.iter().find(|h| h.n == r.n);
        let (hp, hd, ht, ratio) = match h {
            Some(h) => (
                format!("{:.3}", h.prefill_s),
                format!("{:.1}", h.decode_tok_s),
                format!("{:.1}", h.total_tok_s),
                format!("{:.2}", r.total_tok_s / h.total_tok_s),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>3} | {:>14.3} {:>16.1} {:>16.1} | {:>14} {:>16} {:>16} | {:>9}",
            r.n, r.prefill_s, r.decode_tok_s, r.total_tok_s, hp, hd, ht, ratio
        );
    }
    if let Some(one) = tilt.iter().find(|r| r.n == 1) {
        for (t, (prefill, decode)) in &llama_cpp {
            println!(
                "one sequence: llama.cpp ({LLAMA_CPP_PACKAGE}, {t} thread{}) prefill {prefill:.3} s \
                 ({} tokens), decode {decode:.1} tok/s; tilt ({threads} threads) decodes {:.2}x that",
                if *t == 1 { "" } else { "s" },
                PROMPT_TOKENS - 1,
                one.decode_tok_s / decode
            );
        }
    }
    Ok(())
}
