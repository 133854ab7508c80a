//! The `tilt eval` engine ([`evaluate`]) on the toy policy: its win rates and 95% intervals
//! against an independent computation from the rewards it was given, a strategy's results
//! not depending on what else is listed, and the size caps refused before any work.

use std::collections::VecDeque;
use std::sync::Mutex;
use tilt_decode::cd::scorer::Standardizer;
use tilt_decode::cd::{LinearHead, PrefixScorer, ScorerHead};
use tilt_decode::eval::{evaluate, parse_strategies, Batch, EvalConfig, StrategyResult};
use tilt_decode::generate::MAX_N;
use tilt_models::toy::ToyPolicy;
use tilt_rewards::{Reward, RewardError};

/// A reward that returns scripted values in call order, whatever the texts, and checks the
/// size of each batch it is asked to score.
struct Scripted(Mutex<VecDeque<Vec<f32>>>);

impl Reward for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let next = self
            .0
            .lock()
            .unwrap()
            .pop_front()
            .expect("more reward batches than scripted");
        assert_eq!(next.len(), pairs.len(), "unexpected batch size");
        Ok(next)
    }
}

/// Reward of a text: (number of `b`) − (number of `c`).
struct Letters;

impl Reward for Letters {
    fn name(&self) -> String {
        "letters".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, t)| {
                t.chars()
                    .map(|c| match c {
                        'b' => 1.0,
                        'c' => -1.0,
                        _ => 0.0,
                    })
                    .sum()
            })
            .collect())
    }
}

fn config(strategies: &str, m: usize, s: usize) -> EvalConfig {
    EvalConfig {
        strategies: parse_strategies(strategies).unwrap(),
        reference_samples: m,
        samples_per_prompt: s,
        max_new_tokens: 3,
        seed: 5,
        chat_template: true,
    }
}

fn prompts(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

/// Win rate of `r` over `refs`, ties ½, written out independently of the engine.
fn win(r: f64, refs: &[f64]) -> f64 {
    let mut w = 0.0;
    for &x in refs {
        if r > x {
            w += 1.0;
        } else if r == x {
            w += 0.5;
        }
    }
    w / refs.len() as f64
}

/// Mean and 95% normal interval (mean ± 1.96·s/√n, s the sample standard deviation).
fn mean_ci(xs: &[f64]) -> (f64, [f64; 2]) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let s2 = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    let half = 1.96 * (s2 / n).sqrt();
    (mean, [mean - half, mean + half])
}

#[test]
fn win_rates_and_intervals_match_an_independent_computation() {
    let f = |xs: &[f32]| xs.to_vec();
    // Per prompt: 4 reference rewards, then the 3 shared candidates of sample / bon:3.
    let refs: [[f32; 4]; 3] = [
        [0.1, 0.5, 0.5, 0.9],
        [0.3, 0.3, 0.3, 0.3],
        [0.0, 0.2, 0.4, 0.6],
    ];
    let cands: [[f32; 3]; 3] = [[0.5, 0.2, 0.95], [0.3, 0.4, 0.1], [0.1, 0.5, 0.3]];
    let mut script = VecDeque::new();
    for (r, c) in refs.iter().zip(&cands) {
        script.push_back(f(r));
        script.push_back(f(c));
    }
    let reward = Scripted(Mutex::new(script));
    let toy = ToyPolicy::new();
    let report = evaluate(
        &toy,
        &reward,
        None,
        &prompts(&["a", "b", "ab"]),
        &config("sample,bon:3", 4, 1),
        |_| {},
        |_, _| {},
    )
    .unwrap();
    assert!(reward.0.lock().unwrap().is_empty(), "every batch scored");
    let as64 = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let refs64: Vec<Vec<f64>> = refs.iter().map(|r| as64(r)).collect();
    // sample returns the first candidate, bon:3 the best (no ties among the candidates).
    let chosen = |bon: bool| -> Vec<f64> {
        cands
            .iter()
            .map(|c| {
                let c = as64(c);
                if bon {
                    c.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                } else {
                    c[0]
                }
            })
            .collect()
    };
    for (label, bon) in [("sample", false), ("bon:3", true)] {
        let got: &StrategyResult = report
            .strategies
            .iter()
            .find(|s| s.strategy == label)
            .unwrap();
        let rewards = chosen(bon);
        let wins: Vec<f64> = rewards
            .iter()
            .zip(&refs64)
            .map(|(&r, x)| win(r, x))
            .collect();
        let (w, ci) = mean_ci(&wins);
        let (mr, _) = mean_ci(&rewards);
        assert_eq!(got.outputs, 3);
        assert!(
            (got.win_rate - w).abs() < 1e-12,
            "{label}: {} vs {w}",
            got.win_rate
        );
        let [lo, hi] = got.win_rate_ci95.unwrap();
        assert!(
            (lo - ci[0]).abs() < 1e-12 && (hi - ci[1]).abs() < 1e-12,
            "{label}: [{lo}, {hi}] vs {ci:?}"
        );
        assert!((got.mean_reward - mr).abs() < 1e-12);
    }
    // The hand values: sample wins 1/2, 1/2 (all ties), 1/4; bon:3 wins 1, 1, 3/4.
    let sample = &report.strategies[0];
    assert!((sample.win_rate - 5.0 / 12.0).abs() < 1e-12);
    let half = 1.96 * (1.0f64 / 48.0).sqrt() / 3f64.sqrt();
    assert!((sample.win_rate_ci95.unwrap()[0] - (5.0 / 12.0 - half)).abs() < 1e-12);
    assert!((report.strategies[1].win_rate - 11.0 / 12.0).abs() < 1e-12);
    let ref_mean = refs64.iter().flatten().sum::<f64>() / 12.0;
    assert!((report.reference_mean_reward - ref_mean).abs() < 1e-12);
}

const HIDDEN: usize = ToyPolicy::VOCAB + 1;

fn toy_scorer() -> ScorerHead {
    ScorerHead::Linear(LinearHead {
        standardizer: Standardizer {
            mean: vec![0.0; HIDDEN],
            std: vec![1.0; HIDDEN],
        },
        weight: vec![0.3, -0.5, 1.0, 0.2, 2.0],
        bias: 0.1,
    })
}

#[test]
fn a_strategy_gives_the_same_results_whatever_else_is_listed() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer();
    let ps = prompts(&["a", "bc", "cab"]);
    let run = |spec: &str| {
        evaluate(
            &toy,
            &Letters,
            Some(&scorer as &dyn PrefixScorer),
            &ps,
            &config(spec, 4, 3),
            |_| {},
            |_, _| {},
        )
        .unwrap()
    };
    let a = run("bon:2,cd-token:lambda=1,k=2,cd-block:K=2,M=2");
    let b = run("cd-block:K=2,M=2,sample,bon:8,cd-token:lambda=1,k=2,bon:2");
    for label in ["bon:2", "cd-token:lambda=1,k=2", "cd-block:K=2,M=2"] {
        let find = |r: &tilt_decode::eval::EvalReport| {
            r.strategies
                .iter()
                .find(|s| s.strategy == label)
                .unwrap()
                .clone()
        };
        assert_eq!(
            find(&a),
            find(&b),
            "{label} depends on the other strategies"
        );
    }
    // Not trivially equal: the seed matters.
    let other = evaluate(
        &toy,
        &Letters,
        Some(&scorer as &dyn PrefixScorer),
        &ps,
        &EvalConfig {
            seed: 6,
            ..config("cd-token:lambda=1,k=2", 4, 3)
        },
        |_| {},
        |_, _| {},
    )
    .unwrap();
    assert_eq!(other.strategies[0].strategy, a.strategies[1].strategy);
    assert_ne!(
        other.strategies[0], a.strategies[1],
        "another seed should give other outputs"
    );
}

#[test]
fn sizes_above_the_caps_are_refused_before_any_work() {
    let toy = ToyPolicy::new();
    let big = MAX_N + 1;
    let cases: Vec<(EvalConfig, &str)> = vec![
        (config(&format!("sample,bon:{big}"), 4, 1), "bon:4097"),
        (config("sample", big, 1), "--reference-samples"),
        (config("sample", 1_000_000_000, 1), "--reference-samples"),
        (config("sample", 4, big), "--samples-per-prompt"),
        (config(&format!("cd-block:K={big},M=2"), 4, 1), "--block-k"),
    ];
    for (cfg, needle) in cases {
        let e = cfg.validate().unwrap_err();
        assert!(e.is_input_error());
        let msg = e.to_string();
        assert!(
            msg.contains(needle) && msg.contains("cap"),
            "{needle}: {msg}"
        );
        let scorer = toy_scorer();
        let e = evaluate(
            &toy,
            &Letters,
            Some(&scorer as &dyn PrefixScorer),
            &prompts(&["a"]),
            &cfg,
            |_| {},
            |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert_eq!(toy.prefill_calls(), 0, "refused before any model work");
    assert!(config(&format!("sample,bon:{MAX_N}"), MAX_N, 1)
        .validate()
        .is_ok());
}

#[test]
fn batches_list_every_simultaneous_batch_with_its_flag() {
    let cfg = config(
        "sample,bon:4,cd-block:K=3,M=2,cd-token:lambda=1,k=10",
        16,
        2,
    );
    let b = cfg.batches(4);
    let pairs: Vec<(&str, usize)> = b
        .iter()
        .map(|Batch { input, sequences }| (input.as_str(), *sequences))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("--reference-samples", 16),
            ("--strategies bon:4", 4),
            ("--strategies cd-block:K=3,M=2", 3),
            // S = 2 sequences, each with min(k, vocabulary) = 4 children per step.
            (
                "--strategies cd-token:lambda=1,k=10 (with --samples-per-prompt)",
                8
            ),
        ]
    );
}
