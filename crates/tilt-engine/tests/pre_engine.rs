//! The move of the strategies onto one engine changed structure, not results: every output
//! recorded on the toy policy by the code before the engine library existed
//! (`fixtures/pre_engine_toy.jsonl`: every strategy, two sampling settings, two prompts at
//! two indices, two seeds; controlled decoding with a fixed linear scorer; an evaluation;
//! scorer training) is reproduced here bit for bit through the new API.

use serde_json::Value;
use std::sync::Arc;
use tilt_engine::cd::scorer::Standardizer;
use tilt_engine::cd::{HeadKind, LinearHead, PrefixScorer, ScorerHead, TrainConfig};
use tilt_engine::eval::{evaluate, parse_strategies, EvalConfig};
use tilt_engine::scorer_training::{collect_rollouts, TrainScorerConfig};
use tilt_engine::{Engine, Input, NoProgress, Params, Request, Strategy};
use tilt_models::sampling::SamplingParams;
use tilt_models::toy::ToyPolicy;
use tilt_rewards::{Reward, RewardError};

/// The reward the fixture was recorded with: the number of `c`s plus a tenth of the length.
struct CCount;

impl Reward for CCount {
    fn name(&self) -> String {
        "c-count".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, t)| t.matches('c').count() as f32 + 0.1 * t.len() as f32)
            .collect())
    }
}

fn scorer() -> ScorerHead {
    ScorerHead::Linear(LinearHead {
        standardizer: Standardizer {
            mean: vec![0.0; 5],
            std: vec![1.0; 5],
        },
        weight: vec![0.1, -0.2, 0.9, -0.5, 0.3],
        bias: 0.05,
    })
}

fn engine(max_batch: usize) -> Engine<ToyPolicy> {
    Engine::from_parts(
        ToyPolicy::new(),
        vec![("c-count".into(), Arc::new(CCount) as Arc<dyn Reward>)],
        vec![("linear".into(), Arc::new(scorer()) as Arc<dyn PrefixScorer>)],
        max_batch,
    )
    .unwrap()
}

fn fixture() -> Vec<Value> {
    include_str!("fixtures/pre_engine_toy.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The strategy of a recorded case, with the sampling it ran with.
fn strategy(case: &Value) -> Strategy {
    let s = &case["strategy"];
    let sampling = if case["sampling"] == 1 {
        SamplingParams::new(0.7, Some(3), Some(0.9)).unwrap()
    } else {
        SamplingParams::default()
    };
    let n = case["n"].as_u64().unwrap_or(1) as usize;
    match s["name"].as_str().unwrap() {
        "sample" => Strategy::Sample { sampling },
        "bon" => Strategy::Bon { n, sampling },
        "won" => Strategy::Won { n, sampling },
        "soft-bon" => Strategy::SoftBon {
            n,
            lambda: s["lambda"].as_f64().unwrap(),
            sampling,
        },
        "rewind" => Strategy::Rewind {
            n,
            threshold: s["threshold"].as_f64().unwrap(),
            max_draws: s["max_draws"].as_u64().unwrap() as usize,
            sampling,
        },
        "cd-token" => Strategy::CdToken {
            lambda: s["lambda"].as_f64().unwrap(),
            top_k: s["top_k"].as_u64().unwrap() as usize,
            scorer: None,
        },
        "cd-block" => Strategy::CdBlock {
            k: s["k"].as_u64().unwrap() as usize,
            m: s["m"].as_u64().unwrap() as usize,
            scorer: None,
        },
        other => panic!("unknown strategy {other}"),
    }
}

fn same(what: &str, recorded: &Value, now: &Value) {
    assert_eq!(recorded, now, "{what}");
}

#[test]
fn every_recorded_generate_output_is_reproduced_alone_and_in_one_batch() {
    let cases: Vec<Value> = fixture()
        .into_iter()
        .filter(|c| c["kind"] == "generate" || c["kind"] == "generate_cd")
        .collect();
    assert_eq!(cases.len(), 48);
    let requests: Vec<Request> = cases
        .iter()
        .map(|c| {
            let mut params = Params::new(strategy(c));
            params.seed = c["seed"].as_u64().unwrap();
            params.max_new_tokens = 12;
            Request {
                input: Input::Prompt(c["prompt"].as_str().unwrap().into()),
                index: c["index"].as_u64().unwrap(),
                params,
            }
        })
        .collect();
    // Alone, then all 48 in one batch: the same bytes.
    let e = engine(4096);
    let alone: Vec<_> = requests.iter().map(|r| e.generate(r).unwrap()).collect();
    let mut together = vec![None; requests.len()];
    e.generate_many(requests.clone(), |i, r| {
        together[i] = Some(r.unwrap());
        true
    });
    for ((case, a), t) in cases.iter().zip(&alone).zip(&together) {
        let t = t.as_ref().unwrap();
        assert_eq!(a, t, "{case}: alone vs in a batch of 48");
        let o = &a.outputs[0];
        let rec = &case["out"];
        let what = format!("{} {} {}", case["strategy"], case["prompt"], case["seed"]);
        same(&what, &rec["text"], &Value::from(o.text.clone()));
        same(&what, &rec["reward"], &serde_json::json!(o.reward));
        same(&what, &rec["selected"], &serde_json::json!(o.selected));
        same(&what, &rec["draws"], &serde_json::json!(o.draws));
        same(&what, &rec["kl_bound"], &serde_json::json!(o.kl_bound));
        same(
            &what,
            &rec["kl_estimate"],
            &serde_json::json!(o.kl_estimate),
        );
        if let Some(acc) = rec.get("accepted") {
            same(&what, acc, &serde_json::json!(o.accepted));
        }
        let cands = serde_json::to_value(&o.candidates).unwrap();
        same(&what, &rec["candidates"], &cands);
    }
}

#[test]
fn the_recorded_evaluation_is_reproduced() {
    let case = fixture().into_iter().find(|c| c["kind"] == "eval").unwrap();
    let rec = &case["out"];
    let prompts: Vec<Input> = ["ab", "ca", "b", "cc"]
        .iter()
        .map(|s| Input::Prompt(s.to_string()))
        .collect();
    let config = EvalConfig {
        strategies: parse_strategies("sample; bon:2,4; cd-block:K=2,M=3; cd-token:lambda=2,k=3")
            .unwrap(),
        reference_samples: 8,
        samples_per_prompt: 3,
        max_new_tokens: 10,
        seed: 4,
        chat_template: true,
        reward: None,
        gold_reward: None,
    };
    for max_batch in [4096, 3] {
        let report = evaluate(&engine(max_batch), &prompts, &config, &NoProgress).unwrap();
        let now = serde_json::to_value(&report).unwrap();
        for key in ["reference_mean_reward", "exact_best_of_n"] {
            same(key, &rec[key], &now[key]);
        }
        // The tilt's KL solver changed after the fixture was recorded (Brent's method on
        // log λ, to the same 1e-12 tolerance): its curve agrees to rounding, not bit for bit.
        let (r, n) = (
            rec["exact_tilt"].as_array().unwrap(),
            now["exact_tilt"].as_array().unwrap(),
        );
        assert_eq!(r.len(), n.len());
        for (a, b) in r.iter().zip(n) {
            for k in ["kl", "win_rate", "expected_reward"] {
                let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-10 * x.abs().max(1.0),
                    "exact_tilt {k}: {x} vs {y}"
                );
            }
        }
        let strategies = rec["strategies"].as_array().unwrap();
        assert_eq!(strategies.len(), 5);
        for (r, n) in strategies.iter().zip(now["strategies"].as_array().unwrap()) {
            for key in [
                "strategy",
                "outputs",
                "mean_reward",
                "mean_reward_stderr",
                "win_rate",
                "kl",
                "kl_kind",
                "kl_stderr",
                "mean_new_tokens",
            ] {
                same(
                    &format!("{} {key} (max_batch {max_batch})", r["strategy"]),
                    &r[key],
                    &n[key],
                );
            }
        }
    }
}

#[test]
fn the_recorded_rollouts_and_fit_are_reproduced() {
    let case = fixture()
        .into_iter()
        .find(|c| c["kind"] == "train")
        .unwrap();
    let prompts: Vec<Input> = ["ab", "ca", "b", "cc"]
        .iter()
        .map(|s| Input::Prompt(s.to_string()))
        .collect();
    let config = TrainScorerConfig {
        rollouts_per_prompt: 4,
        max_new_tokens: 10,
        fit: TrainConfig {
            head: HeadKind::Linear,
            epochs: 50,
            learning_rate: 0.05,
            weight_decay: 0.01,
            heldout_fraction: 0.25,
            seed: 9,
            method: Default::default(),
        },
        reward: None,
    };
    let data = collect_rollouts(&engine(5), &prompts, &config, &NoProgress).unwrap();
    same(
        "rollout_rewards",
        &case["rollout_rewards"],
        &serde_json::json!(data.rollout_rewards),
    );
    same(
        "rollout_prefixes",
        &case["rollout_prefixes"],
        &serde_json::json!(data.rollout_prefixes),
    );
    let (head, card) = tilt_engine::cd::fit_head(&data, &config.fit).unwrap();
    same("card", &case["card"], &serde_json::to_value(&card).unwrap());
    let ScorerHead::Linear(l) = head else {
        panic!("a linear head")
    };
    same("weight", &case["weight"], &serde_json::json!(l.weight));
}
