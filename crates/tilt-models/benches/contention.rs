//! Decode throughput when another process keeps one of the cores busy, against the same
//! decode on a quiet machine, side by side in one run.
//!
//! For N = 1 and 16 sequences (a 64-token prompt forked N times, 64 greedy tokens each) and
//! for the model's pool at 2 threads with the thread count fixed, at 2 threads adapting to
//! the busy core (`tilt_models::threads`), and at 1 thread, the decode runs alternately quiet and beside
//! a busy loop (`sh -c 'while :; do :; done'`, one process that wants a whole core), 3
//! times each; the table gives the medians and the slowdown quiet / busy. A perfectly fair
//! share of 2 cores between 3 runnable threads leaves a 2-thread pool 4/3 of a core each
//! way, a slowdown of 1.5; a pool whose threads wait on each other at every step falls far
//! below that (earlier kernels went from 21 to 541 ms per token). The goal: at most 2×.
//!
//! ```text
//! cargo bench -p tilt-models --bench contention
//! ```
//! `TILT_BENCH_MODEL` (a GGUF path; default: the embedded SmolLM2), `TILT_BENCH_BATCHES`
//! (default `1,16`).

use std::process::{Child, Command};

use tilt_models::LlamaPolicy;

mod common;
use common::{bench_tilt, median, prompt_tokens, NEW_TOKENS};

const REPEATS: usize = 3;

/// A process that keeps one core busy until it is dropped.
struct Busy(Child);

impl Busy {
    fn start() -> std::io::Result<Busy> {
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .map(Busy)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::var_os("TILT_BENCH_MODEL") {
        Some(p) => std::path::PathBuf::from(p),
        None => tilt_assets::default_policy_gguf()?,
    };
    let batches: Vec<usize> = std::env::var("TILT_BENCH_BATCHES")
        .ok()
        .and_then(|s| s.split(',').map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "decode beside a busy core, {} ({cores} cores), {NEW_TOKENS} new tokens per sequence, \
         medians of {REPEATS}",
        path.display()
    );
    println!("| N | pool threads | threads adapt | quiet tok/s | one core busy tok/s | slowdown |");
    println!("|---|---|---|---|---|---|");
    for (threads, adapt) in [(2usize, false), (2, true), (1, false)] {
        tilt_models::threads::set_adaptive(adapt);
        let policy = LlamaPolicy::load(&path, threads)?;
        let prompt = prompt_tokens(&policy)?;
        bench_tilt(&policy, &prompt[..8], 2, 4)?; // warm-up
        for &n in &batches {
            let (mut quiet, mut busy) = (Vec::new(), Vec::new());
            for _ in 0..REPEATS {
                quiet.push(bench_tilt(&policy, &prompt, n, NEW_TOKENS)?.decode_tok_s);
                let load = Busy::start()?;
                std::thread::sleep(std::time::Duration::from_millis(100));
                busy.push(bench_tilt(&policy, &prompt, n, NEW_TOKENS)?.decode_tok_s);
                if adapt {
                    eprintln!(
                        "N = {n}: threads held back at the end of the busy run: {}",
                        tilt_models::threads::held_back()
                    );
                }
                drop(load);
            }
            let (q, b) = (median(quiet), median(busy));
            println!(
                "| {n} | {threads} | {} | {q:.1} | {b:.1} | {:.2}× |",
                if adapt { "yes" } else { "no" },
                q / b
            );
        }
    }
    Ok(())
}
