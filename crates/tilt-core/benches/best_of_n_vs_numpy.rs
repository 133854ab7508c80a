//! Exact best-of-n + KL + win rate on 10^7 outcomes, against a vectorised NumPy version of
//! the same formulas (benches/numpy_best_of_n.py), on the same data, side by side.
//!
//! `cargo bench -p tilt-core --bench best_of_n_vs_numpy` does everything: generates the data
//! (distinct rewards, and rewards heavily tied into 1000 levels), writes it under
//! `target/bench-data/`, times the Rust path (median of 5), creates a venv with NumPy under
//! `target/numpy-venv` if needed, times NumPy (median of 5), checks both agree, and prints
//! the ratio; it fails (exit 1) unless both agree on KL, win rate, expected reward and the
//! number of levels to a relative 1e-9. Set `TILT_BENCH_OUTCOMES` to change the size, and
//! `TILT_BENCH_RUST_ONLY=1` to time the Rust side alone (profiling).

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tilt_core::best_of_n::{order_statistic_levels, Selection};
use tilt_core::levels::Levels;
use tilt_core::RewardDistribution;

const N_DRAWS: u64 = 1000;
const REPEATS: usize = 5;
/// Largest relative difference accepted between the Rust and NumPy results.
const AGREEMENT: f64 = 1e-9;

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn generate(outcomes: usize, tied: bool, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = SplitMix(seed);
    let mut probs: Vec<f64> = (0..outcomes).map(|_| rng.unit() + 1e-3).collect();
    let s: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= s);
    let rewards: Vec<f64> = (0..outcomes)
        .map(|_| {
            let u = rng.unit();
            if tied {
                (u * 1000.0).floor()
            } else {
                u * 10.0 - 5.0
            }
        })
        .collect();
    (probs, rewards)
}

fn write_f64(path: &PathBuf, v: &[f64]) {
    let mut bytes = Vec::with_capacity(v.len() * 8);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write bench data");
}

struct RustResult {
    seconds: f64,
    kl: f64,
    win_rate: f64,
    expected_reward: f64,
    levels: usize,
}

fn run_rust(d: &RewardDistribution) -> RustResult {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        let levels = Levels::new(d).expect("levels");
        let lp = order_statistic_levels(&levels, N_DRAWS, Selection::Best).expect("bon");
        let pmf = levels.spread_to_outcomes(d.probs(), &lp.level_pmf);
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&pmf);
        last = Some((lp, levels.len()));
    }
    times.sort_by(f64::total_cmp);
    let (lp, nlevels) = last.expect("ran");
    // Where the time goes (one extra run, phase by phase).
    let t0 = Instant::now();
    let levels = Levels::new(d).expect("levels");
    let t1 = Instant::now();
    let lp2 = order_statistic_levels(&levels, N_DRAWS, Selection::Best).expect("bon");
    let t2 = Instant::now();
    let pmf = levels.spread_to_outcomes(d.probs(), &lp2.level_pmf);
    let t3 = Instant::now();
    std::hint::black_box(&pmf);
    println!(
        "      phases: levels (sort + group + tails) {:.3} s, per-level pmf/KL/W {:.3} s, pmf to outcomes {:.3} s",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64()
    );
    RustResult {
        seconds: times[REPEATS / 2],
        kl: lp.kl,
        win_rate: lp.win_rate,
        expected_reward: lp.expected_reward,
        levels: nlevels,
    }
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "best_of_n_vs_numpy: run with `cargo bench -p tilt-core --bench best_of_n_vs_numpy`"
        );
        return;
    }
    let outcomes: usize = std::env::var("TILT_BENCH_OUTCOMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("../../target"));
    let data_dir = target.join("bench-data");
    std::fs::create_dir_all(&data_dir).expect("create target/bench-data");
    println!(
        "best-of-n (n = {N_DRAWS}) + KL + win rate + pmf on {outcomes} outcomes; rayon threads: {}",
        rayon::current_num_threads()
    );
    let mut rust = Vec::new();
    for (case, tied, seed) in [("distinct", false, 1u64), ("tied", true, 2)] {
        let (p, r) = generate(outcomes, tied, seed);
        write_f64(&data_dir.join(format!("{case}_probs.f64")), &p);
        write_f64(&data_dir.join(format!("{case}_rewards.f64")), &r);
        let d = RewardDistribution::new(p, r).expect("valid bench data");
        let res = run_rust(&d);
        println!(
            "rust  {case:>8}: {:>8.3} s  ({} levels, KL {:.12} nats, win rate {:.12})",
            res.seconds, res.levels, res.kl, res.win_rate
        );
        std::io::stdout().flush().ok();
        rust.push((case, res));
    }
    if std::env::var_os("TILT_BENCH_RUST_ONLY").is_some() {
        return; // profiling the Rust side alone
    }
    let script = manifest.join("benches/numpy_best_of_n.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&target)
        .arg(&data_dir)
        .arg(N_DRAWS.to_string())
        .arg(REPEATS.to_string())
        .args(["distinct", "tied"])
        .output()
        .expect("run the NumPy baseline");
    if !out.status.success() {
        eprintln!(
            "NumPy baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(1);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut disagreements = Vec::new();
    let mut compared = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("NumPy JSON");
        let case = v["case"].as_str().unwrap_or("?");
        let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
        let Some((_, r)) = rust.iter().find(|(c, _)| *c == case) else {
            continue;
        };
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-300);
        println!(
            "numpy {case:>8}: {secs:>8.3} s  (numpy {}; KL {:.12}, win rate {:.12})",
            v["numpy"].as_str().unwrap_or("?"),
            v["kl"].as_f64().unwrap_or(f64::NAN),
            v["win_rate"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "ratio {case:>8}: rust is {:.2}x faster than numpy; |ΔKL|/KL = {:.1e}, |ΔW|/W = {:.1e}, |ΔE r|/|E r| = {:.1e}",
            secs / r.seconds,
            rel(r.kl, v["kl"].as_f64().unwrap_or(f64::NAN)),
            rel(r.win_rate, v["win_rate"].as_f64().unwrap_or(f64::NAN)),
            rel(r.expected_reward, v["expected_reward"].as_f64().unwrap_or(f64::NAN)),
        );
        // Both sides compute the same quantities: they must agree to rounding (NumPy's
        // uncompensated sums differ in the last digits only).
        compared += 1;
        for (what, ours, theirs) in [
            ("KL", r.kl, v["kl"].as_f64().unwrap_or(f64::NAN)),
            (
                "win rate",
                r.win_rate,
                v["win_rate"].as_f64().unwrap_or(f64::NAN),
            ),
            (
                "expected reward",
                r.expected_reward,
                v["expected_reward"].as_f64().unwrap_or(f64::NAN),
            ),
            (
                "levels",
                r.levels as f64,
                v["levels"].as_f64().unwrap_or(f64::NAN),
            ),
        ] {
            let agree = rel(ours, theirs) <= AGREEMENT; // false for NaN too
            if !agree {
                disagreements.push(format!("{case} {what}: rust {ours}, numpy {theirs}"));
            }
        }
    }
    if compared != rust.len() || !disagreements.is_empty() {
        eprintln!(
            "Rust and NumPy disagree (relative tolerance {AGREEMENT:e}; {compared} of {} cases compared): {disagreements:?}",
            rust.len()
        );
        std::process::exit(1);
    }
    println!("rust and numpy agree on KL, win rate, expected reward and level count (relative tolerance {AGREEMENT:e})");
}
