//! The strategies on a remote engine, through a scripted `RemotePolicy`: each candidate's
//! text is a function of the seed tilt sends, so what the engine library does with the
//! candidates (selection, ties, KL accounting, rewind's batches, seeds, refusals) is checked
//! exactly, and best-of-n's output law against tilt-core's exact one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tilt_engine::cost::{cost, Rule};
use tilt_engine::remote::candidate_seed;
use tilt_engine::{ErrorKind, Input, Params, RemoteEngine, Request, Strategy};
use tilt_models::sampling::SamplingParams;
use tilt_remote::{
    Ask, Completion, Completions, EndpointInfo, EngineInfo, Finish, RemoteError, RemotePolicy,
    TextLogProb,
};
use tilt_rewards::{Reward, RewardError};

/// Outcome k ("y0".."y3") with probabilities 0.4, 0.3, 0.2, 0.1, chosen by the seed.
const P: [f64; 4] = [0.4, 0.3, 0.2, 0.1];

fn outcome(seed: u64) -> usize {
    // The seeds are 31-bit mixes already; a second mix spreads them over [0, 1).
    let u = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (k, p) in P.iter().enumerate() {
        acc += p;
        if u < acc {
            return k;
        }
    }
    3
}

struct Scripted {
    info: EngineInfo,
    seeds: Mutex<Vec<u64>>,
    /// Return one candidate too few.
    short: bool,
    /// How every candidate ends.
    finish: Finish,
    asks: AtomicUsize,
    /// The prompts asked, in order.
    prompts: Mutex<Vec<String>>,
}

impl Scripted {
    fn new(short: bool) -> Arc<Scripted> {
        Scripted::ending(short, Finish::Stop)
    }

    fn ending(short: bool, finish: Finish) -> Arc<Scripted> {
        let e = EndpointInfo {
            available: true,
            honours_n: false,
            log_probs: true,
        };
        Arc::new(Scripted {
            info: EngineInfo {
                url: "http://fake/v1".into(),
                model: "fake".into(),
                completions: e,
                chat: e,
                scoring: None,
            },
            seeds: Mutex::new(Vec::new()),
            short,
            finish,
            asks: AtomicUsize::new(0),
            prompts: Mutex::new(Vec::new()),
        })
    }
}

impl RemotePolicy for Scripted {
    fn info(&self) -> &EngineInfo {
        &self.info
    }
    fn complete(&self, ask: &Ask<'_>) -> Result<Completions, RemoteError> {
        self.asks.fetch_add(1, Ordering::SeqCst);
        if let tilt_remote::Prompt::Text(t) = ask.prompt {
            self.prompts.lock().unwrap().push(t.clone());
        }
        self.seeds.lock().unwrap().extend_from_slice(ask.seeds);
        let mut candidates: Vec<Completion> = ask
            .seeds
            .iter()
            .map(|&s| {
                let k = outcome(s);
                Completion {
                    text: format!("y{k}"),
                    finish: self.finish,
                    token_log_probs: vec![P[k].ln()],
                    tokens: vec![format!("y{k}")],
                }
            })
            .collect();
        if self.short {
            candidates.pop();
        }
        Ok(Completions {
            completion_tokens: candidates.len(),
            candidates,
            prompt_tokens: 3,
            requests: ask.seeds.len(),
        })
    }
    fn log_prob(&self, _: &str, _: &str) -> Result<TextLogProb, RemoteError> {
        Err(RemoteError::Invalid {
            engine: self.info.url.clone(),
            message: "cannot score".into(),
        })
    }
}

/// The reward of "yk" is k, but y2 and y3 tie (both 2): ties must be split uniformly.
struct Digit;
impl Reward for Digit {
    fn name(&self) -> String {
        "digit".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, r)| (r[1..].parse::<f32>().unwrap()).min(2.0))
            .collect())
    }
}

struct Length;
impl Reward for Length {
    fn name(&self) -> String {
        "length".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(p, r)| (p.len() + r.len()) as f32)
            .collect())
    }
}

fn engine(policy: Arc<Scripted>) -> RemoteEngine {
    RemoteEngine::from_parts(
        policy,
        vec![
            ("digit".into(), Arc::new(Digit) as Arc<dyn Reward>),
            ("length".into(), Arc::new(Length)),
        ],
        4,
    )
    .unwrap()
}

fn request(strategy: Strategy, seed: u64) -> Request {
    let mut p = Params::new(strategy);
    p.seed = seed;
    p.max_new_tokens = 4;
    Request::new(Input::Prompt("q".into()), p)
}

fn bon(n: usize) -> Strategy {
    Strategy::Bon {
        n,
        sampling: SamplingParams::default(),
    }
}

#[test]
fn bon_selects_prices_and_seeds_as_the_local_rules_do() {
    let policy = Scripted::new(false);
    let e = engine(Arc::clone(&policy));
    let mut r = request(bon(6), 42);
    r.index = 3;
    r.params.choices = 2;
    r.params.report_rewards = vec!["length".into()];
    let resp = e.generate(&r).unwrap();
    assert_eq!(resp.outputs.len(), 2);
    // The seeds: candidate d of choice j is draw j·MAX_N + d of the request.
    let sent = policy.seeds.lock().unwrap().clone();
    let expected: Vec<u64> = (0..2u64)
        .flat_map(|j| {
            (0..6u64)
                .map(move |d| candidate_seed(42, 3, j * tilt_engine::strategy::MAX_N as u64 + d))
        })
        .collect();
    assert_eq!(sent, expected);
    for o in &resp.outputs {
        let rewards: Vec<f64> = o.candidates.iter().map(|c| c.reward).collect();
        let best = rewards.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(o.reward, best);
        assert_eq!(o.candidates[o.selected].reward, best);
        let texts: Vec<&str> = o.candidates.iter().map(|c| c.text.as_str()).collect();
        let c = cost(Rule::Best, &texts, &rewards, 6).unwrap();
        assert_eq!(
            (o.kl_bound, o.kl_estimate, o.kl_note),
            (c.kl_bound, c.kl_estimate, c.kl_note)
        );
        assert_eq!(o.kl_bound, Some(6f64.ln() - 5.0 / 6.0));
        assert_eq!(o.distinct_candidates, c.distinct);
        // The engine's log-probabilities, the note of what the numbers rest on.
        for cand in &o.candidates {
            let k: usize = cand.text[1..].parse().unwrap();
            assert_eq!(cand.log_prob, P[k].ln());
        }
        let note = o.engine.as_ref().unwrap();
        assert_eq!(
            (note.url.as_str(), note.requests.as_str()),
            ("http://fake/v1", "per-candidate")
        );
        assert_eq!(o.rewards[0].name, "length");
        assert_eq!(o.rewards[0].value, (1 + o.text.len()) as f64);
    }
    // Same request, same bytes; another seed, other candidates.
    let again = engine(Scripted::new(false)).generate(&r).unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&resp).unwrap()
    );
    r.params.seed = 43;
    let other = engine(Scripted::new(false)).generate(&r).unwrap();
    assert_ne!(other.outputs[0].candidates, resp.outputs[0].candidates);
}

#[test]
fn bon_on_a_remote_engine_follows_the_exact_best_of_n_law() {
    // Outcomes y0..y3 with p = (0.4, 0.3, 0.2, 0.1) and rewards (0, 1, 2, 2): y2 and y3 tie.
    // The exact law of bon:3 (tilt-core, ties uniform in proportion to p) against 3000
    // requests of different seeds, by Pearson's chi-square (3 degrees of freedom).
    let n = 3;
    let dist = tilt_core::RewardDistribution::new_normalized(P.to_vec(), vec![0.0, 1.0, 2.0, 2.0])
        .unwrap();
    let exact = tilt_core::best_of_n::best_of_n(&dist, n as u64)
        .unwrap()
        .pmf;
    let e = engine(Scripted::new(false));
    let runs = 3000;
    let mut counts = [0u64; 4];
    for seed in 0..runs {
        let o = &e.generate(&request(bon(n), seed)).unwrap().outputs[0];
        counts[o.text[1..].parse::<usize>().unwrap()] += 1;
    }
    let chi2: f64 = (0..4)
        .map(|k| {
            let ex = exact[k] * runs as f64;
            (counts[k] as f64 - ex).powi(2) / ex
        })
        .sum();
    // 0.999 quantile of chi-square with 3 degrees of freedom: 16.27.
    assert!(
        chi2 < 16.27,
        "chi2 {chi2}, counts {counts:?}, exact {exact:?}"
    );
    // And not the law of plain sampling (the test can fail).
    let chi2_p: f64 = (0..4)
        .map(|k| {
            let ex = P[k] * runs as f64;
            (counts[k] as f64 - ex).powi(2) / ex
        })
        .sum();
    assert!(chi2_p > 100.0, "{chi2_p}");
}

#[test]
fn rewind_draws_in_batches_until_a_candidate_clears_the_threshold() {
    let policy = Scripted::new(false);
    let e = engine(Arc::clone(&policy));
    let r = request(
        Strategy::Rewind {
            n: 2,
            threshold: 2.0,
            max_draws: 40,
            sampling: SamplingParams::default(),
        },
        5,
    );
    let o = e.generate(&r).unwrap().outputs.remove(0);
    let rewards: Vec<f64> = o.candidates.iter().map(|c| c.reward).collect();
    let first = rewards
        .iter()
        .position(|&r| r >= 2.0)
        .expect("accepted within 40");
    assert_eq!(o.selected, first);
    assert_eq!(o.accepted, Some(true));
    assert_eq!(o.draws, first / 2 * 2 + 2);
    let accepted = rewards.iter().filter(|&&r| r >= 2.0).count();
    assert_eq!(o.kl_estimate, Some((o.draws as f64 / accepted as f64).ln()));
    assert_eq!(policy.asks.load(Ordering::SeqCst), o.draws / 2);
    // Rewind's draw d of choice 0 is draw_stream's d (MAX_DRAWS apart per choice).
    let sent = policy.seeds.lock().unwrap().clone();
    let expected: Vec<u64> = (0..o.draws as u64)
        .map(|d| candidate_seed(5, 0, d))
        .collect();
    assert_eq!(sent, expected);
}

#[test]
fn what_a_remote_engine_cannot_do_is_refused_clearly() {
    let e = engine(Scripted::new(false));
    let cd = request(
        Strategy::CdToken {
            lambda: 1.0,
            top_k: 8,
            scorer: None,
        },
        0,
    );
    let err = e.generate(&cd).unwrap_err();
    assert_eq!(
        (err.kind(), err.param()),
        (ErrorKind::InvalidInput, Some("strategy"))
    );
    assert!(err.to_string().contains("next-token distribution"), "{err}");
    let block = request(
        Strategy::CdBlock {
            k: 2,
            m: 4,
            scorer: None,
        },
        0,
    );
    assert_eq!(e.generate(&block).unwrap_err().param(), Some("prompt"));
    let mut bad = request(bon(2), 0);
    bad.params.reward = Some("nope".into());
    assert_eq!(e.generate(&bad).unwrap_err().param(), Some("reward"));
    bad.params.reward = None;
    bad.params.report_rewards = vec!["nope".into()];
    assert_eq!(
        e.generate(&bad).unwrap_err().param(),
        Some("report_rewards")
    );
    // An engine that returns fewer candidates than asked: a failure, nothing partial.
    let short = engine(Scripted::new(true));
    let err = short.generate(&request(bon(3), 0)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        err.to_string().contains("2 candidates for 3 asked"),
        "{err}"
    );
    // A text the engine cannot score.
    let err = e.log_prob(&Input::Raw("a".into()), "b").unwrap_err();
    assert_eq!(err.param(), Some("engine"));
}

#[test]
fn many_requests_come_back_in_order() {
    let e = engine(Scripted::new(false));
    let requests: Vec<Request> = (0..20)
        .map(|i| {
            let mut r = request(bon(2), 9);
            r.index = i;
            r
        })
        .collect();
    let lone: Vec<String> = requests
        .iter()
        .map(|r| serde_json::to_string(&e.generate(r).unwrap()).unwrap())
        .collect();
    let mut got = Vec::new();
    e.generate_many(requests, |i, r| {
        got.push((i, serde_json::to_string(&r.unwrap()).unwrap()));
        true
    });
    assert_eq!(
        got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(got.into_iter().map(|(_, s)| s).collect::<Vec<_>>(), lone);
}

/// The sum of the digits of a text, each capped at 2 (a reward of partial answers).
struct Digits;
impl Reward for Digits {
    fn name(&self) -> String {
        "digits".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, r)| {
                r.chars()
                    .filter_map(|c| c.to_digit(10))
                    .map(|d| d.min(2) as f32)
                    .sum()
            })
            .collect())
    }
}

#[test]
fn cd_block_continues_the_text_so_far_and_keeps_the_best_block() {
    let policy = Scripted::ending(false, Finish::Length);
    let e = RemoteEngine::from_parts(
        Arc::clone(&policy) as Arc<dyn RemotePolicy>,
        vec![("digits".into(), Arc::new(Digits) as Arc<dyn Reward>)],
        2,
    )
    .unwrap();
    let (k, blocks) = (3usize, 4usize);
    let mut r = request(
        Strategy::CdBlock {
            k,
            m: 1,
            scorer: None,
        },
        8,
    );
    r.input = Input::Raw("Q:".into());
    r.params.max_new_tokens = blocks;
    let o = e.generate(&r).unwrap().outputs.remove(0);
    // Each block: the candidate whose digit (capped at 2) is largest; its text appended.
    let mut text = String::new();
    let mut expected_prompts = Vec::new();
    for b in 0..blocks {
        expected_prompts.push(format!("Q:{text}"));
        let digits: Vec<usize> = (0..k as u64)
            .map(|i| outcome(candidate_seed(8, 0, (b * k) as u64 + i)))
            .collect();
        let best = digits.iter().map(|&d| d.min(2)).max().unwrap();
        // The kept digit is one of the candidates' and has the best capped value (ties, as
        // y2 and y3, split uniformly).
        let got: usize = o.text[2 * b + 1..2 * b + 2].parse().unwrap();
        assert!(
            digits.contains(&got),
            "block {b}: {got} not among {digits:?}"
        );
        assert_eq!(got.min(2), best, "block {b}: {digits:?} in {}", o.text);
        text.push_str(&o.text[2 * b..2 * b + 2]);
    }
    assert_eq!(o.text, text);
    assert_eq!(*policy.prompts.lock().unwrap(), expected_prompts);
    assert_eq!((o.blocks, o.draws), (Some(blocks), blocks * k));
    let bound = blocks as f64 * (3f64.ln() - 2.0 / 3.0);
    assert!((o.kl_bound.unwrap() - bound).abs() < 1e-12);
    assert_eq!(o.kl_note, tilt_engine::KlNote::CdBlockChainBound);
    let digits_sum: f64 = o
        .text
        .chars()
        .filter_map(|c| c.to_digit(10))
        .map(|d| d.min(2) as f64)
        .sum();
    assert_eq!(o.reward, digits_sum);
    assert_eq!(
        o.candidates[0].log_prob,
        o.candidates[0].token_log_probs.iter().sum::<f64>()
    );
    // A chat prompt, or a scorer on hidden states: refused, naming what.
    let mut chat = r.clone();
    chat.input = Input::Prompt("Q".into());
    assert_eq!(e.generate(&chat).unwrap_err().param(), Some("prompt"));
    let mut scored = r.clone();
    scored.params.strategy = Strategy::CdBlock {
        k,
        m: 1,
        scorer: Some("s".into()),
    };
    assert_eq!(e.generate(&scored).unwrap_err().param(), Some("scorer"));
}

/// The reward `Digit` gives outcome k.
fn digit(k: usize) -> f64 {
    k.min(2) as f64
}

#[test]
fn eval_on_a_remote_engine_judges_what_the_engine_drew() {
    use tilt_engine::eval::{evaluate_remote, parse_strategies, EvalConfig, REFERENCE_SEED_MIX};
    use tilt_engine::strategy::MAX_N;
    use tilt_engine::NoProgress;
    let prompts: Vec<Input> = ["a", "b", "c"].map(|p| Input::Raw(p.into())).into();
    let (m, s_count, seed) = (64usize, 8usize, 5u64);
    let config = EvalConfig {
        strategies: parse_strategies("sample; bon:4; won:2; cd-block:K=2,M=1").unwrap(),
        reference_samples: m,
        samples_per_prompt: s_count,
        max_new_tokens: 4,
        seed,
        chat_template: false,
        reward: None,
        gold_reward: None,
    };
    let policy = Scripted::new(false);
    let report =
        evaluate_remote(&engine(Arc::clone(&policy)), &prompts, &config, &NoProgress).unwrap();
    let note = report.engine.as_ref().expect("the engine is named");
    assert_eq!(
        (note.url.as_str(), note.requests.as_str()),
        ("http://fake/v1", "per-candidate")
    );
    assert!(note.prompt.starts_with("raw"), "{}", note.prompt);
    assert_eq!(report.policy, "fake at http://fake/v1");
    // Every number recomputed from the seeds alone: reference draw d of prompt i has seed
    // candidate_seed(seed ^ MIX, i, d); shared candidate d of repetition s has
    // candidate_seed(seed, i, s·MAX_N + d).
    let reward_of = |sd: u64, i: u64, d: u64| digit(outcome(candidate_seed(sd, i, d)));
    let refs: Vec<Vec<f64>> = (0..3u64)
        .map(|i| {
            (0..m as u64)
                .map(|d| reward_of(seed ^ REFERENCE_SEED_MIX, i, d))
                .collect()
        })
        .collect();
    let ref_mean = refs.iter().flatten().sum::<f64>() / (3 * m) as f64;
    assert_eq!(report.reference_mean_reward, ref_mean);
    let shared = |i: u64, s: usize, n: usize| -> Vec<f64> {
        (0..n as u64)
            .map(|d| reward_of(seed, i, (s * MAX_N) as u64 + d))
            .collect()
    };
    let win = |r: f64, refs: &[f64]| {
        refs.iter()
            .map(|&x| {
                if r > x {
                    1.0
                } else if r == x {
                    0.5
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / refs.len() as f64
    };
    // The reward a selection strategy returns does not depend on how ties are broken.
    let pick = |n: usize, f: fn(f64, f64) -> f64| -> (f64, f64) {
        let per_prompt: Vec<(f64, f64)> = (0..3u64)
            .map(|i| {
                let picked: Vec<f64> = (0..s_count)
                    .map(|s| shared(i, s, n).into_iter().reduce(f).unwrap())
                    .collect();
                let r = picked.iter().sum::<f64>() / s_count as f64;
                let w = picked
                    .iter()
                    .map(|&x| win(x, &refs[i as usize]))
                    .sum::<f64>()
                    / s_count as f64;
                (r, w)
            })
            .collect();
        (
            per_prompt.iter().map(|x| x.0).sum::<f64>() / 3.0,
            per_prompt.iter().map(|x| x.1).sum::<f64>() / 3.0,
        )
    };
    let by = |label: &str| {
        report
            .strategies
            .iter()
            .find(|s| s.strategy == label)
            .unwrap()
    };
    for (label, n, f) in [
        ("sample", 1, f64::max as fn(f64, f64) -> f64),
        ("bon:4", 4, f64::max),
        ("won:2", 2, f64::min),
    ] {
        let (r, w) = pick(n, f);
        let got = by(label);
        assert!(
            (got.mean_reward - r).abs() < 1e-12,
            "{label}: {} vs {r}",
            got.mean_reward
        );
        assert!(
            (got.win_rate - w).abs() < 1e-12,
            "{label}: {} vs {w}",
            got.win_rate
        );
        assert_eq!(got.outputs, 3 * s_count);
    }
    assert!(by("bon:4").mean_reward > by("sample").mean_reward);
    assert!(by("won:2").mean_reward < by("sample").mean_reward);
    assert!((by("bon:4").kl - (4f64.ln() - 0.75)).abs() < 1e-12);
    assert_eq!(
        (by("sample").kl, by("sample").kl_kind.as_str()),
        (0.0, "exact")
    );
    // cd-block: every candidate ends at once, so one block of best-of-2 each.
    let cd = by("cd-block:K=2,M=1");
    assert_eq!((cd.outputs, cd.kl_kind.as_str()), (3 * s_count, "bound"));
    assert!((cd.kl - (2f64.ln() - 0.5)).abs() < 1e-12);
    // The same bytes at any concurrency.
    let one = RemoteEngine::from_parts(
        Scripted::new(false),
        vec![("digit".into(), Arc::new(Digit) as Arc<dyn Reward>)],
        1,
    )
    .unwrap();
    let again = evaluate_remote(&one, &prompts, &config, &NoProgress).unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&report).unwrap()
    );
    // cd-token and a prefix scorer are refused before any request, naming `strategies`.
    let scored = parse_strategies("cd-block:K=2,M=1")
        .unwrap()
        .into_iter()
        .map(|s| s.with_scorer(Some("scorer.safetensors".into())))
        .collect::<Vec<_>>();
    for (strategies, says) in [
        (
            parse_strategies("bon:2; cd-token:lambda=1,k=4").unwrap(),
            "cd-token",
        ),
        (scored, "prefix scorer"),
    ] {
        let policy = Scripted::new(false);
        let mut c = config.clone();
        c.strategies = strategies;
        let err =
            evaluate_remote(&engine(Arc::clone(&policy)), &prompts, &c, &NoProgress).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(err.param(), Some("strategies"), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert_eq!(policy.asks.load(Ordering::SeqCst), 0);
    }
    // An engine that returns fewer candidates than asked: the evaluation fails, naming the
    // prompt; nothing is reported.
    let err =
        evaluate_remote(&engine(Scripted::new(true)), &prompts, &config, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("prompt 1"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
}
