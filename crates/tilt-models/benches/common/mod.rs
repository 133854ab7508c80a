//! What the decode benches share: the prompt, one timed decode of N forked sequences, and
//! the median.

// Each bench binary uses its own part of this module.
#![allow(dead_code)]

use std::time::Instant;

use tilt_models::{Llama, LlamaPolicy, Outputs, Policy, TokenId};

pub const PROMPT_TOKENS: usize = 64;
pub const NEW_TOKENS: usize = 64;

/// One timed decode.
pub struct Row {
    /// Sequences.
    pub n: usize,
    /// Seconds of the prompt's prefill.
    pub prefill_s: f64,
    /// Tokens per second of the decode, all sequences together.
    pub decode_tok_s: f64,
    /// Tokens per second, prefill included.
    pub total_tok_s: f64,
    /// CPU seconds of the decode (tilt only).
    pub decode_cpu_s: Option<f64>,
}

/// CPU seconds this process has used (user + system, all threads), from `/proc/self/stat`
/// (Linux; 10 ms ticks). Beside wall time it shows when another process took the cores.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The index of the largest value (the first of ties).
pub fn argmax(v: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as TokenId
}

/// The benches' prompt: the first [`PROMPT_TOKENS`] tokens of a repeated sentence.
pub fn prompt_tokens(policy: &LlamaPolicy) -> Result<Vec<TokenId>, Box<dyn std::error::Error>> {
    let text = "The history of computing is a story of people and machines. ".repeat(20);
    let ids = policy.encode(&text)?;
    Ok(ids[..PROMPT_TOKENS].to_vec())
}

/// Prefill `prompt` once, fork it `n` times and decode `new_tokens` greedy tokens per
/// sequence, one batched step at a time; timed.
pub fn bench_tilt(
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

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where one decode step of `n` sequences spends its time: the mean per step of each phase
/// of the forward (from [`tilt_models::profile`]), of sampling each row at temperature 1
/// with the seeded sampler the engine uses, on the model's threads as the engine does, and
/// of the whole step.
pub struct StepProfile {
    /// (phase, seconds per step).
    pub phases: Vec<(tilt_models::profile::Phase, f64)>,
    /// Hand-offs to the thread pool per step.
    pub regions_per_step: f64,
    /// Seconds per step the caller of a matrix product waited for the pool's other threads
    /// with no block left for it.
    pub wait_s: f64,
    /// Seconds per step of sampling all `n` rows.
    pub sampling_s: f64,
    /// Seconds per step, all of it.
    pub step_s: f64,
}

/// Decode `new_tokens` tokens of `n` forked sequences with the profile on (sampled at
/// temperature 1, seed 0), and return the mean step.
pub fn profile_decode(
    policy: &LlamaPolicy,
    prompt: &[TokenId],
    n: usize,
    new_tokens: usize,
) -> Result<StepProfile, Box<dyn std::error::Error>> {
    use tilt_models::profile;
    use tilt_models::sampling::{SamplingParams, SequenceSampler};
    let model: &Llama = policy.model();
    let params = SamplingParams::default();
    let mut samplers: Vec<SequenceSampler> =
        (0..n).map(|i| SequenceSampler::new(0, i as u64)).collect();
    let (cache, first) = policy.prefill(prompt)?;
    let mut caches = vec![cache; n];
    let mut next = Vec::with_capacity(n);
    for s in &mut samplers {
        next.push(s.sample(&first.log_probs, &params)?.token);
    }
    let steps = new_tokens - 1;
    profile::set_enabled(true);
    profile::take();
    let mut sampling = 0f64;
    let t = Instant::now();
    for _ in 0..steps {
        let lists: Vec<&[TokenId]> = next.iter().map(std::slice::from_ref).collect();
        let outs = model.forward(&mut caches, &lists, Outputs::Last)?;
        // As the engine samples: each row on the model's threads.
        let ts = Instant::now();
        let mut rows: Vec<(&mut SequenceSampler, &[f32])> = samplers
            .iter_mut()
            .zip(&outs)
            .map(|(s, o)| (s, o[0].log_probs.as_slice()))
            .collect();
        let drawn = policy.map_parallel(&mut rows, |(s, lp)| s.sample(lp, &params));
        for (d, tok) in drawn.into_iter().zip(&mut next) {
            *tok = d?.token;
        }
        sampling += ts.elapsed().as_secs_f64();
    }
    let step_s = t.elapsed().as_secs_f64() / steps as f64;
    profile::set_enabled(false);
    let taken = profile::take();
    Ok(StepProfile {
        phases: taken
            .phases
            .into_iter()
            .map(|(p, d)| (p, d.as_secs_f64() / steps as f64))
            .collect(),
        regions_per_step: taken.regions as f64 / steps as f64,
        wait_s: taken.wait.as_secs_f64() / steps as f64,
        sampling_s: sampling / steps as f64,
        step_s,
    })
}

/// Seconds of one empty parallel region inside `model`'s pool (one trivial task per
/// thread, started from a pool thread as the forward's regions are), the median of 20
/// batches of 100 after a warm-up: what handing work to the other threads and waiting for
/// them costs a step, per region.
pub fn handoff_s(model: &Llama) -> f64 {
    use rayon::prelude::*;
    let threads = model.num_threads();
    model.install(|| {
        let mut v = Vec::new();
        for i in 0..22 {
            let t = Instant::now();
            for _ in 0..100 {
                (0..threads).into_par_iter().for_each(|j| {
                    std::hint::black_box(j);
                });
            }
            if i >= 2 {
                v.push(t.elapsed().as_secs_f64() / 100.0);
            }
        }
        median(v)
    })
}

/// Read bandwidth of main memory in bytes/s: `threads` threads each summing their share of
/// a 1 GiB buffer (far larger than any cache), the best of 3 passes.
pub fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // Four independent sums so that the adds keep up with the loads.
                        let mut a = [0u64; 4];
                        for q in c.chunks_exact(4) {
                            for k in 0..4 {
                                a[k] = a[k].wrapping_add(q[k]);
                            }
                        }
                        a.iter().fold(0u64, |x, y| x.wrapping_add(*y))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best
}

/// Peak f32 multiply-adds per second of `threads` threads: each runs 12 independent chains
/// of 8-lane fused multiply-adds (AVX2 + FMA; 16 lanes with AVX-512), enough to cover the
/// FMA latency on two ports; the best of 3. None without FMA.
pub fn fma_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return None;
        }
        let wide = std::is_x86_feature_detected!("avx512f");
        const ITERS: usize = 20_000_000;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(move || {
                        // SAFETY: the features were detected above.
                        let r = unsafe {
                            if wide {
                                fma::chains512(ITERS)
                            } else {
                                fma::chains256(ITERS)
                            }
                        };
                        std::hint::black_box(r);
                    });
                }
            });
            best = best.min(t.elapsed().as_secs_f64());
        }
        let lanes = if wide { 16 } else { 8 };
        Some((threads * ITERS * 12 * lanes) as f64 / best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains256(iters: usize) -> f32 {
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut a = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in &mut a {
                *x = _mm256_fmadd_ps(*x, m, c);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in a {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains512(iters: usize) -> f32 {
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let mut a = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in &mut a {
                *x = _mm512_fmadd_ps(*x, m, c);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in a {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
}
