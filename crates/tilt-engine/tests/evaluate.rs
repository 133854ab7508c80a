//! The `tilt eval` engine ([`evaluate`]) on the toy policy: its win rates, their standard
//! errors and 95% intervals against an independent computation from the rewards it was
//! given, a strategy's results not depending on what else is listed, and the size caps and
//! memory refused before any work, naming the input.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tilt_core::bounds::bon_kl_bound;
use tilt_engine::eval::{evaluate, parse_strategies, EvalConfig, EvalReport, StrategyResult};
use tilt_engine::strategy::MAX_N;
use tilt_engine::{Engine, ErrorKind, Input, NoProgress, Strategy};
use tilt_models::toy::ToyPolicy;
use tilt_rewards::{Reward, RewardError};

/// A reward that returns scripted values whatever the texts: per prompt, one batch of each
/// size (the engine scores each job's texts in one call: the reference samples, then the
/// shared candidates; which of the two finishes first depends on their lengths, so the script
/// is keyed by prompt and batch size, not by call order). It checks that each scripted batch
/// is asked for exactly once.
struct Scripted(Mutex<HashMap<(String, usize), Vec<f32>>>);

impl Reward for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        let prompt = pairs[0].0.to_string();
        assert!(pairs.iter().all(|(p, _)| *p == prompt), "one prompt a call");
        let next = self
            .0
            .lock()
            .unwrap()
            .remove(&(prompt.clone(), pairs.len()))
            .unwrap_or_else(|| panic!("unscripted batch: {prompt:?} × {}", pairs.len()));
        Ok(next)
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
        reward: None,
        gold_reward: None,
    }
}

fn prompts(xs: &[&str]) -> Vec<Input> {
    xs.iter().map(|s| Input::Prompt(s.to_string())).collect()
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

/// Mean and standard error s/√n (s the sample standard deviation).
fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let s2 = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (s2 / n).sqrt())
}

/// The 2.5% and 97.5% quantiles of the *exact* bootstrap distribution of the mean of `xs`
/// (every one of the n^n resamples with replacement, equally likely): what a percentile
/// bootstrap with many resamples converges to.
fn exact_bootstrap_ci95(xs: &[f64]) -> [f64; 2] {
    let n = xs.len();
    let total = n.pow(n as u32);
    let mut means: Vec<f64> = (0..total)
        .map(|mut code| {
            let mut s = 0.0;
            for _ in 0..n {
                s += xs[code % n];
                code /= n;
            }
            s / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * total as f64).ceil() as usize).clamp(1, total) - 1];
    [q(0.025), q(0.975)]
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
    let names = ["a", "b", "ab"];
    let mut script = HashMap::new();
    for ((r, c), p) in refs.iter().zip(&cands).zip(names) {
        script.insert((p.to_string(), 4), f(r));
        script.insert((p.to_string(), 3), f(c));
    }
    let scripted = Arc::new(Scripted(Mutex::new(script)));
    let e = toy_engine(
        vec![("scripted", Arc::clone(&scripted) as Arc<_>)],
        vec![],
        4096,
    );
    let report = evaluate(
        &e,
        &prompts(&names),
        &config("sample; bon:3", 4, 1),
        &NoProgress,
    )
    .unwrap();
    assert!(scripted.0.lock().unwrap().is_empty(), "every batch scored");
    assert_eq!(e.policy().prefill_calls(), 3, "one prefill per prompt");
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
        let (w, se) = mean_se(&wins);
        let (mr, mr_se) = mean_se(&rewards);
        assert_eq!(got.outputs, 3);
        assert!(
            (got.win_rate - w).abs() < 1e-12,
            "{label}: {} vs {w}",
            got.win_rate
        );
        // The old report gave the normal interval w ± 1.96·se; the standard error is still
        // reported, the interval is now the percentile bootstrap over prompts (inside
        // [0, 1]): here, the quantiles of the exact bootstrap distribution.
        assert!((got.win_rate_stderr.unwrap() - se).abs() < 1e-12, "{label}");
        let [lo, hi] = got.win_rate_ci95.unwrap();
        let [elo, ehi] = exact_bootstrap_ci95(&wins);
        assert!(
            (lo - elo).abs() < 1e-12 && (hi - ehi).abs() < 1e-12,
            "{label}: [{lo}, {hi}] vs the exact bootstrap's [{elo}, {ehi}]"
        );
        assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi));
        assert!(lo <= w && w <= hi, "{label}: {w} outside [{lo}, {hi}]");
        assert!((got.mean_reward - mr).abs() < 1e-12);
        assert!((got.mean_reward_stderr.unwrap() - mr_se).abs() < 1e-12);
    }
    // The hand values: sample wins 1/2, 1/2 (all ties), 1/4; bon:3 wins 1, 1, 3/4.
    let sample = &report.strategies[0];
    assert!((sample.win_rate - 5.0 / 12.0).abs() < 1e-12);
    let se = (1.0f64 / 48.0).sqrt() / 3f64.sqrt();
    assert!((sample.win_rate_stderr.unwrap() - se).abs() < 1e-12);
    assert_eq!(sample.win_rate_ci95, Some([0.25, 0.5]));
    assert!((report.strategies[1].win_rate - 11.0 / 12.0).abs() < 1e-12);
    assert_eq!(report.strategies[1].win_rate_ci95, Some([0.75, 1.0]));
    let ref_mean = refs64.iter().flatten().sum::<f64>() / 12.0;
    assert!((report.reference_mean_reward - ref_mean).abs() < 1e-12);
    assert_eq!((sample.kl, sample.kl_kind.as_str()), (0.0, "exact"));
}

fn letters_engine() -> Engine<ToyPolicy> {
    toy_engine(
        vec![("letters", reward(LetterReward))],
        vec![("linear", scorer(toy_scorer(W, B)))],
        4096,
    )
}

fn find(r: &EvalReport, label: &str) -> StrategyResult {
    r.strategies
        .iter()
        .find(|s| s.strategy == label)
        .unwrap_or_else(|| panic!("{label} missing"))
        .clone()
}

#[test]
fn a_strategy_gives_the_same_results_whatever_else_is_listed() {
    let e = letters_engine();
    let ps = prompts(&["a", "bc", "cab"]);
    let run = |spec: &str| evaluate(&e, &ps, &config(spec, 4, 3), &NoProgress).unwrap();
    let a = run("bon:2; won:2; soft-bon:n=2,lambda=0.5; cd-token:lambda=1,k=2; cd-block:K=2,M=2");
    let b = run(
        "cd-block:K=2,M=2; sample; soft-bon:n=2,lambda=0.5; bon:8; cd-token:lambda=1,k=2; \
         won:2; bon:2",
    );
    for label in [
        "bon:2",
        "won:2",
        "soft-bon:n=2,lambda=0.5",
        "cd-token:lambda=1,k=2",
        "cd-block:K=2,M=2",
    ] {
        assert_eq!(
            find(&a, label),
            find(&b, label),
            "{label} depends on the other strategies"
        );
    }
    // Not trivially equal: the seed matters.
    let other = evaluate(
        &e,
        &ps,
        &EvalConfig {
            seed: 6,
            ..config("cd-token:lambda=1,k=2", 4, 3)
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!(other.strategies[0].strategy, a.strategies[3].strategy);
    assert_ne!(
        other.strategies[0], a.strategies[3],
        "another seed should give other outputs"
    );
    // The same seed and configuration, the same bytes.
    let again =
        run("bon:2; won:2; soft-bon:n=2,lambda=0.5; cd-token:lambda=1,k=2; cd-block:K=2,M=2");
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&again).unwrap()
    );
}

#[test]
fn won_and_soft_bon_are_evaluated_and_rewind_is_refused() {
    let e = letters_engine();
    let ps = prompts(&["a", "bc", "cab", "b"]);
    let report = evaluate(
        &e,
        &ps,
        &config("sample; bon:2; won:2; soft-bon:n=2,lambda=0.5", 8, 4),
        &NoProgress,
    )
    .unwrap();
    let (s, b, w, soft) = (
        find(&report, "sample"),
        find(&report, "bon:2"),
        find(&report, "won:2"),
        find(&report, "soft-bon:n=2,lambda=0.5"),
    );
    // They share candidates: sample is the first, bon:2 / won:2 the best / worst of the first
    // two, soft-bon one of the two; so their rewards are ordered output by output.
    assert!(w.mean_reward <= s.mean_reward && s.mean_reward <= b.mean_reward);
    assert!(w.mean_reward <= soft.mean_reward && soft.mean_reward <= b.mean_reward);
    assert!(w.mean_reward < b.mean_reward, "not all ties");
    assert!(w.win_rate <= s.win_rate && s.win_rate <= b.win_rate);
    // Their KL: the bound log n − (n−1)/n for bon and won, log n for soft-bon.
    let bound = bon_kl_bound(2).unwrap();
    assert!((bound - (2f64.ln() - 0.5)).abs() < 1e-15);
    for r in [&b, &w] {
        assert!(
            (r.kl - bound).abs() < 1e-12 && r.kl_kind == "bound",
            "{r:?}"
        );
    }
    assert!((soft.kl - 2f64.ln()).abs() < 1e-12 && soft.kl_kind == "bound");
    for r in [&s, &b, &w, &soft] {
        assert_eq!(r.outputs, 16);
        let [lo, hi] = r.win_rate_ci95.unwrap();
        assert!(
            0.0 <= lo && lo <= r.win_rate && r.win_rate <= hi && hi <= 1.0,
            "{r:?}"
        );
    }
    // rewind is refused, by the parser and by the configuration.
    let err = parse_strategies("sample; rewind:n=2").unwrap_err();
    assert_eq!(err.param(), Some("strategies"));
    assert!(err.to_string().contains("not evaluated"), "{err}");
    let cfg = EvalConfig {
        strategies: vec![sample(), rewind(2, 1.0, 8)],
        ..config("sample", 4, 1)
    };
    let err = evaluate(&e, &ps, &cfg, &NoProgress).unwrap_err();
    assert_eq!(err.param(), Some("strategies"), "{err}");
    assert!(err.to_string().contains("rewind"), "{err}");
}

#[test]
fn sizes_above_the_caps_are_refused_before_any_work() {
    let e = letters_engine();
    let big = MAX_N + 1;
    let with = |strategies: Vec<Strategy>| EvalConfig {
        strategies,
        ..config("sample", 4, 1)
    };
    let cases: Vec<(EvalConfig, &str, &str)> = vec![
        (with(vec![sample(), bon(big)]), "strategies", "bon:4097"),
        (config("sample", big, 1), "reference_samples", "4097"),
        (
            config("sample", 1_000_000_000, 1),
            "reference_samples",
            "1000000000",
        ),
        (config("sample", 4, big), "samples_per_prompt", "4097"),
        (with(vec![cd_block(big, 2)]), "strategies", "block_k"),
    ];
    for (cfg, param, needle) in cases {
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(err.param(), Some(param), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(needle) && msg.contains("cap"),
            "{needle}: {msg}"
        );
        let err = evaluate(&e, &prompts(&["a"]), &cfg, &NoProgress).unwrap_err();
        assert_eq!(err.param(), Some(param), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    // The list parser refuses them too, naming the item.
    for spec in ["sample; bon:4097", "cd-block:K=4097,M=2"] {
        let err = parse_strategies(spec).unwrap_err();
        assert_eq!(err.param(), Some("strategies"));
        assert!(err.to_string().contains("cap"), "{err}");
    }
    assert_eq!(
        e.policy().prefill_calls(),
        0,
        "refused before any model work"
    );
    assert!(config(&format!("sample; bon:{MAX_N}"), MAX_N, 1)
        .validate()
        .is_ok());
}

#[test]
fn the_memory_refusal_names_the_input_that_sets_the_batch() {
    // The old `EvalConfig::batches` listed every simultaneous batch with the input that sets
    // it; the engine now refuses, before any work, a batch that does not fit, naming that
    // input. A toy whose KV cache per token is a thousandth of the memory available: about
    // 1000 tokens of the sequences stepped at once fill it.
    let Some(heavy) = heavy_engine() else {
        eprintln!("no /proc/meminfo: the engine's memory check is off here");
        return;
    };
    let ps = prompts(&["a", "b"]);
    for (cfg, param) in [
        (config("sample", 4000, 1), "reference_samples"),
        (config("sample; bon:4000", 4, 1), "strategies"),
        (config("cd-block:K=4000,M=2", 4, 1), "strategies"),
    ] {
        let err = evaluate(&heavy, &ps, &cfg, &NoProgress).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert_eq!(err.param(), Some(param), "{err}");
        assert!(err.to_string().contains("GiB"), "{err}");
    }
    assert_eq!(heavy.policy().toy.prefill_calls(), 0, "no model work");
    // A cd-token output steps min(k, vocabulary) = 4 children at once, not k = 10: 1 + 30·4
    // sequences of 4 tokens fit (~480 tokens), 1 + 30·10 would not (~1200).
    let fits = EvalConfig {
        max_new_tokens: 4,
        ..config("cd-token:lambda=1,k=10", 1, 30)
    };
    evaluate(&heavy, &prompts(&["a"]), &fits, &NoProgress).unwrap();
}

#[test]
fn the_memory_refusal_does_not_blame_the_reference_samples_for_the_strategies_batch() {
    // The jobs of a prompt step together (up to max_batch rows): 8 reference samples beside
    // 300 cd-token outputs of 4 children each. The batch that does not fit is the outputs'
    // (samples_per_prompt × the strategy's rows); lowering reference_samples cannot make it
    // fit (with 1 it is still refused), so the refusal must not tell the caller to.
    let Some(heavy) = heavy_engine() else {
        return;
    };
    let ps = prompts(&["a"]);
    for m in [8, 1] {
        let cfg = config("cd-token:lambda=1,k=10", m, 300);
        let err = evaluate(&heavy, &ps, &cfg, &NoProgress).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(
            matches!(err.param(), Some("samples_per_prompt" | "strategies")),
            "reference_samples = {m}: {err}"
        );
    }
}

/// An affine function of the letter reward, a·r + c: a gold reward whose relation to the
/// proxy is known exactly.
struct AffineLetters(f64, f64);

impl Reward for AffineLetters {
    fn name(&self) -> String {
        format!("{}·letters + {}", self.0, self.1)
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, t)| (self.0 * letter_reward(t) + self.1) as f32)
            .collect())
    }
}

#[test]
fn gold_improvements_follow_a_known_relation_to_the_proxy() {
    let strategies = "sample; bon:2,4; won:2; cd-token:lambda=1,k=3; cd-block:K=2,M=2";
    let ps = prompts(&["a", "bc", "cab", "b"]);
    let run = |a: f64, c: f64| {
        let e = toy_engine(
            vec![
                ("letters", reward(LetterReward)),
                ("gold", reward(AffineLetters(a, c))),
            ],
            vec![("linear", scorer(toy_scorer(W, B)))],
            4096,
        );
        let cfg = EvalConfig {
            gold_reward: Some("gold".into()),
            ..config(strategies, 6, 3)
        };
        evaluate(&e, &ps, &cfg, &NoProgress).unwrap()
    };
    let plain = evaluate(
        &letters_engine(),
        &ps,
        &config(strategies, 6, 3),
        &NoProgress,
    )
    .unwrap();
    assert!(plain.gold.is_none());
    for (a, c) in [(1.0, -3.0), (-1.0, 0.0), (0.5, 2.0)] {
        let r = run(a, c);
        // The gold scoring changes nothing else in the report.
        assert_eq!(r.strategies, plain.strategies, "a={a}");
        let g = r.gold.as_ref().unwrap();
        assert!((g.reference_mean_reward - (a * r.reference_mean_reward + c)).abs() < 1e-5);
        for (s, sg) in r.strategies.iter().zip(&g.strategies) {
            assert_eq!(s.strategy, sg.strategy);
            // Gold = a·proxy + c output by output, so the improvements scale by a.
            assert!(
                (sg.gold_improvement - a * sg.proxy_improvement).abs() < 1e-5,
                "{a}: {sg:?}"
            );
            assert!((sg.gold_mean_reward - (a * s.mean_reward + c)).abs() < 1e-5);
            assert!((sg.kl - s.kl).abs() < 1e-12 * (1.0 + s.kl), "{sg:?}");
            // e = (1 − a)·r: the transfer's lower end is Δ_r − |1 − a|·(r's one-sided
            // bound, of r or of −r as the sign of 1 − a says); with a = 1 it is Δ_r.
            if a == 1.0 {
                let [lo, hi] = sg.gold_transfer_interval;
                assert!((lo - sg.proxy_improvement).abs() < 1e-9, "{sg:?}");
                assert!(hi >= lo - 1e-9);
            }
            if a == 1.0 || a == 0.5 {
                assert!(
                    (sg.gold_bound - a * sg.proxy_bound).abs() < 1e-6 * (1.0 + sg.proxy_bound),
                    "{a}: {sg:?}"
                );
            }
        }
        // Every bound holds on the exact curve.
        assert_eq!(g.best_of_n.len(), 64);
        for pt in &g.best_of_n {
            assert!(pt.proxy_improvement <= pt.proxy_bound + 1e-9, "{pt:?}");
            assert!(pt.gold_improvement <= pt.gold_bound + 1e-9, "{pt:?}");
            assert!(
                pt.gold_improvement >= pt.gold_transfer_lower - 1e-9,
                "{pt:?}"
            );
            assert!((pt.gold_improvement - a * pt.proxy_improvement).abs() < 1e-5);
        }
    }
    // Naming the proxy itself, or no such reward, as gold is refused by name.
    let e = letters_engine();
    for name in ["letters", "nope"] {
        let cfg = EvalConfig {
            gold_reward: Some(name.into()),
            ..config("sample", 2, 1)
        };
        let err = evaluate(&e, &ps, &cfg, &NoProgress).unwrap_err();
        assert_eq!(err.param(), Some("gold_reward"), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
}
