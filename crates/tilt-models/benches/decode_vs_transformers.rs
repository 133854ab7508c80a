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
//! Each tilt setting runs 3 times; the table shows the medians. At every N it also runs
//! llama.cpp on the same file (the prebuilt CPU engine of the npm package `node-llama-cpp`,
//! N sequences in one context decoding together, token by token through its sequence API:
//! the engine, not a high-level sampling loop), at the same thread count and at 1 thread
//! (llama.cpp's best for one sequence here), and prints the decode ratios. llama.cpp
//! prefills each sequence's own copy of the prompt (node-llama-cpp shares no cache between
//! sequences); tilt prefills it once and forks: the prefill columns show that difference,
//! the decode ratios leave it out.
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

use tilt_models::{LlamaPolicy, Policy, TokenId};

mod common;
use common::{
    bench_tilt, fma_peak, handoff_s, median, profile_decode, prompt_tokens, read_bandwidth, Row,
    NEW_TOKENS, PROMPT_TOKENS,
};

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
    // For crates/tilt-cli/benches/bon_vs_transformers.py, which runs in this venv.
    "sentence-transformers==6.3.0",
];

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

/// llama.cpp on `gguf`, `n` sequences in one context: (median prefill s of all but the last
/// prompt token, each sequence its own copy, evaluated together; median aggregated decode
/// tok/s) over the script's 3 runs.
fn bench_llama_cpp(
    gguf: &Path,
    prompt: &[TokenId],
    threads: usize,
    n: usize,
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
        .arg(n.to_string())
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

/// Print where one decode step of `n` sequences spends its time, beside what the cores
/// could do: the weights' bytes over the measured read bandwidth, and the step's
/// multiply-adds over the measured FMA peak.
fn print_profile(
    policy: &LlamaPolicy,
    prompt: &[TokenId],
    n: usize,
    threads: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let model = policy.model();
    profile_decode(policy, prompt, n, 8)?; // warm-up
    let p = profile_decode(policy, prompt, n, NEW_TOKENS)?;
    let handoff = handoff_s(model);
    let bandwidth = read_bandwidth(threads);
    let peak = fma_peak(threads);
    let (bytes, macs) = model.step_footprint();
    let ms = |s: f64| s * 1e3;
    println!(
        "one decode step, N = {n}, {threads} threads, mean of {} steps: {:.2} ms",
        NEW_TOKENS - 1,
        ms(p.step_s)
    );
    println!("| part | ms per step | share |");
    println!("|---|---|---|");
    let mut matmul = 0.0;
    for (phase, s) in &p.phases {
        if phase.is_matmul() {
            matmul += s;
        }
        println!(
            "| {} | {:.3} | {:.1}% |",
            phase.name(),
            ms(*s),
            100.0 * s / p.step_s
        );
    }
    println!(
        "| sampling ({n} rows, temperature 1) | {:.3} | {:.1}% |",
        ms(p.sampling_s),
        100.0 * p.sampling_s / p.step_s
    );
    let counted: f64 = p.phases.iter().map(|(_, s)| s).sum::<f64>() + p.sampling_s;
    println!(
        "| the rest (batch bookkeeping, the caller) | {:.3} | {:.1}% |",
        ms(p.step_s - counted),
        100.0 * (p.step_s - counted) / p.step_s
    );
    println!(
        "thread hand-offs: {:.0} parallel regions per step × {:.1} µs (an empty one, measured) \
         = {:.3} ms, inside the parts above",
        p.regions_per_step,
        handoff * 1e6,
        ms(p.regions_per_step * handoff)
    );
    println!(
        "waiting in the matrix products for the last block of another thread: {:.3} ms a step",
        ms(p.wait_s)
    );
    let mem_s = bytes as f64 / bandwidth;
    println!(
        "limits: the matrix products read {:.1} MB of weights a step; at the measured read \
         bandwidth of {:.1} GB/s ({threads} threads) that is {:.2} ms",
        bytes as f64 / 1e6,
        bandwidth / 1e9,
        ms(mem_s)
    );
    if let Some(peak) = peak {
        let fma_s = (macs * n) as f64 / peak;
        println!(
            "limits: {n} rows × {:.1} M multiply-adds = {:.2} G a step; at the measured FMA peak \
             of {:.1} G/s ({threads} threads) that is {:.2} ms",
            macs as f64 / 1e6,
            (macs * n) as f64 / 1e9,
            peak / 1e9,
            ms(fma_s)
        );
        println!(
            "the matrix products take {:.2} ms a step: {:.1}× the larger of the two limits",
            ms(matmul),
            matmul / mem_s.max(fma_s)
        );
    }
    Ok(())
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
    let profile_n = *batches().iter().max().unwrap_or(&16);
    print_profile(&policy, &prompt, profile_n, threads)?;
    // llama.cpp at every N, at the bench's thread count and at 1 thread (its best for one
    // sequence on these cores).
    let llama_cpp = if std::env::var_os("TILT_BENCH_SKIP_LLAMACPP").is_some() {
        Vec::new()
    } else {
        let mut rows = Vec::new();
        'outer: for n in batches() {
            for t in [threads, 1]
                .into_iter()
                .take(if threads == 1 { 1 } else { 2 })
            {
                match bench_llama_cpp(&path, &prompt, t, n) {
                    Ok(r) => rows.push((n, t, r)),
                    Err(e) => {
                        eprintln!("llama.cpp baseline unavailable: {e}");
                        break 'outer;
                    }
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
    for r in &tilt {
        let rows: Vec<_> = llama_cpp.iter().filter(|(n, ..)| *n == r.n).collect();
        for (n, t, (prefill, decode)) in &rows {
            println!(
                "N = {n}: llama.cpp ({LLAMA_CPP_PACKAGE}, one context, {t} thread{}) prefill {prefill:.3} s \
                 ({n} × {} tokens), decode {decode:.1} tok/s; tilt ({threads} threads) decodes {:.2}x that",
                if *t == 1 { "" } else { "s" },
                PROMPT_TOKENS - 1,
                r.decode_tok_s / decode
            );
        }
        if let Some(best) = rows.iter().map(|(_, _, (_, d))| *d).max_by(f64::total_cmp) {
            println!(
                "N = {}: tilt / llama.cpp at its best thread count: {:.2}x",
                r.n,
                r.decode_tok_s / best
            );
        }
    }
    Ok(())
}
