//! Controlled decoding (issue 6) on the toy policy, against exact laws computed here
//! independently: the cd-token per-step law, cd-block with M = the whole length against
//! tilt-core's best-of-K pmf, the constant-scorer control, CD-FUDGE training, and the errors.

use std::collections::HashMap;
use tilt_core::{best_of_n::best_of_n, RewardDistribution};
use tilt_decode::cd::scorer::{names, Standardizer};
use tilt_decode::cd::{
    cd_block_generate, cd_token_generate, cd_token_step_law, collect_rollouts, fit_head,
    top_k_candidates, CdBlockParams, CdError, CdTokenParams, ConstantScorer, HeadKind, LinearHead,
    PrefixScorer, RolloutConfig, ScorerHead, TrainConfig,
};
use tilt_models::toy::{ToyPolicy, TOY_EOS};
use tilt_models::{Policy, TokenId};
use tilt_rewards::{Reward, RewardError};

const HIDDEN: usize = ToyPolicy::VOCAB + 1;
const CTX: f64 = ToyPolicy::CONTEXT_LENGTH as f64;

/// A linear scorer on the toy hidden state (one-hot of the last token, position / 32).
fn toy_scorer(weights: [f32; HIDDEN], bias: f32) -> ScorerHead {
    ScorerHead::Linear(LinearHead {
        standardizer: Standardizer {
            mean: vec![0.0; HIDDEN],
            std: vec![1.0; HIDDEN],
        },
        weight: weights.to_vec(),
        bias,
    })
}

const W: [f32; HIDDEN] = [0.3, -0.5, 1.0, 0.2, 2.0];
const B: f32 = 0.1;

/// V of the prefix whose last token is `last`, at context position `pos`, computed from the
/// formula (not through the scorer code).
fn v_by_hand(last: TokenId, pos: usize) -> f64 {
    W[last as usize] as f64 + W[HIDDEN - 1] as f64 * (pos as f32 / CTX as f32) as f64 + B as f64
}

/// The toy transition probabilities in f64, from the policy's public table.
fn p_next(toy: &ToyPolicy, last: TokenId) -> [f64; 4] {
    toy.next_token_probs(last).unwrap()
}

/// The cd-token law of one step computed independently: π ∝ p e^{λV} over the top-k of p.
fn law_by_hand(
    toy: &ToyPolicy,
    last: TokenId,
    pos_child: usize,
    lambda: f64,
    k: usize,
) -> HashMap<TokenId, f64> {
    let p = p_next(toy, last);
    let mut order: Vec<usize> = (0..4).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
    let top: Vec<usize> = order.into_iter().take(k).collect();
    let w: Vec<f64> = top
        .iter()
        .map(|&z| p[z] * (lambda * v_by_hand(z as TokenId, pos_child)).exp())
        .collect();
    let z: f64 = w.iter().sum();
    top.iter()
        .zip(w)
        .map(|(&t, wi)| (t as TokenId, wi / z))
        .collect()
}

/// Exact law of whole cd-token sequences (≤ `max_new` tokens) by enumeration.
fn sequence_law_by_hand(
    toy: &ToyPolicy,
    prompt: &[TokenId],
    max_new: usize,
    lambda: f64,
    k: usize,
) -> Vec<(Vec<TokenId>, f64, f64)> {
    // (sequence, π(y), p(y))
    let mut out = Vec::new();
    let mut stack = vec![(
        Vec::<TokenId>::new(),
        *prompt.last().unwrap(),
        1.0f64,
        1.0f64,
    )];
    while let Some((seq, last, pi, p)) = stack.pop() {
        let pos_child = prompt.len() + seq.len();
        let law = law_by_hand(toy, last, pos_child, lambda, k);
        let pn = p_next(toy, last);
        for (&tok, &q) in &law {
            let mut s = seq.clone();
            s.push(tok);
            let (pi2, p2) = (pi * q, p * pn[tok as usize]);
            if tok == TOY_EOS || s.len() == max_new {
                out.push((s, pi2, p2));
            } else {
                stack.push((s, tok, pi2, p2));
            }
        }
    }
    out
}

/// Pearson chi-square statistic of observed counts against expected probabilities, merging
/// cells with expected count < 5 into one; returns (statistic, degrees of freedom). A count
/// in a cell of probability 0 makes the statistic infinite (the law is rejected).
fn chi_square(
    counts: &HashMap<Vec<TokenId>, usize>,
    law: &[(Vec<TokenId>, f64)],
    n: usize,
) -> (f64, usize) {
    let total_law: f64 = law.iter().map(|(_, q)| q).sum();
    assert!((total_law - 1.0).abs() < 1e-9, "law sums to {total_law}");
    let impossible = counts
        .keys()
        .any(|seq| !law.iter().any(|(s, q)| s == seq && *q > 0.0));
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut small_obs, mut small_exp) = (0.0, 0.0);
    for (seq, q) in law {
        let e = q * n as f64;
        let o = *counts.get(seq).unwrap_or(&0) as f64;
        if e < 5.0 {
            small_obs += o;
            small_exp += e;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    if small_exp > 0.0 {
        stat += (small_obs - small_exp).powi(2) / small_exp.max(1e-12);
        cells += 1;
    }
    if impossible {
        stat = f64::INFINITY;
    }
    (stat, cells.saturating_sub(1))
}

/// The upper quantile of chi-square(df) at the standard normal quantile `z`, by the
/// Wilson–Hilferty approximation.
fn chi_square_quantile(df: usize, z: f64) -> f64 {
    let d = df.max(1) as f64;
    d * (1.0 - 2.0 / (9.0 * d) + z * (2.0 / (9.0 * d)).sqrt()).powi(3)
}

/// The 0.999 quantile of chi-square(df).
fn chi_square_critical(df: usize) -> f64 {
    chi_square_quantile(df, 3.090_232) // standard normal 0.999 quantile
}

/// Accept `law` for `counts` at level 0.001 (the seeds are fixed: not flaky), and reject
/// `wrong` at level 1e-6, so that the test has the power to fail.
fn check_law(
    what: &str,
    counts: &HashMap<Vec<TokenId>, usize>,
    law: &[(Vec<TokenId>, f64)],
    wrong: &[(Vec<TokenId>, f64)],
    n: usize,
) {
    let (stat, df) = chi_square(counts, law, n);
    assert!(
        stat < chi_square_critical(df),
        "{what}: chi-square {stat} on {df} df against the exact law"
    );
    let (wstat, wdf) = chi_square(counts, wrong, n);
    assert!(
        wstat > chi_square_quantile(wdf, 4.753_424), // standard normal 1 − 1e-6 quantile
        "{what}: a wrong law was not rejected (chi-square {wstat} on {wdf} df)"
    );
    eprintln!("{what}: chi2 {stat:.1} on {df} df; wrong law {wstat:.1} on {wdf} df");
}

#[test]
fn cd_token_step_law_equals_the_formula_exactly() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    for prompt in ["a", "bc", "cab"] {
        let tokens = toy.encode(prompt).unwrap();
        let (cache, out) = toy.prefill(&tokens).unwrap();
        for k in 1..=4 {
            for lambda in [0.0, 0.5, 1.7, 6.0] {
                // What the decoder computes: candidates, children's hidden states, V, law.
                let cands = top_k_candidates(&out.log_probs, k);
                let mut caches = vec![cache.clone(); cands.len()];
                let outs = toy.step(&mut caches, &cands).unwrap();
                let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
                let values = scorer.score(&hidden).unwrap();
                let law = cd_token_step_law(&out.log_probs, &cands, &values, lambda).unwrap();
                let expected = law_by_hand(&toy, *tokens.last().unwrap(), tokens.len(), lambda, k);
                assert_eq!(law.candidates.len(), k);
                let p = p_next(&toy, *tokens.last().unwrap());
                for ((c, pi), lr) in law.candidates.iter().zip(&law.probs).zip(&law.log_ratios) {
                    let want = expected[c];
                    assert!(
                        (pi - want).abs() < 1e-6,
                        "{prompt} k={k} λ={lambda} token {c}: {pi} vs {want}"
                    );
                    // log π/p against the untruncated p.
                    let want_lr = (want / p[*c as usize]).ln();
                    assert!((lr - want_lr).abs() < 1e-6, "log-ratio {lr} vs {want_lr}");
                }
                let total: f64 = law.probs.iter().sum();
                assert!((total - 1.0).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn cd_token_sequences_follow_the_exact_law_and_report_log_ratios() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    let prompt = toy.encode("ab").unwrap();
    let (lambda, k, max_new) = (1.3, 3, 3);
    let params = CdTokenParams {
        lambda,
        top_k: k,
        max_new_tokens: max_new,
        seed: 7,
    };
    let n = 6000;
    let samples = cd_token_generate(&toy, &scorer, &prompt, n, &params, 0).unwrap();
    let law = sequence_law_by_hand(&toy, &prompt, max_new, lambda, k);
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    let mut kl_mean = 0.0;
    for s in &samples {
        *counts.entry(s.tokens.clone()).or_default() += 1;
        // The recorded log π(y)/p(y) equals the exact one for that sequence.
        let (_, pi, p) = law.iter().find(|(seq, _, _)| *seq == s.tokens).unwrap();
        assert!(
            (s.kl_estimate - (pi / p).ln()).abs() < 1e-5,
            "{:?}",
            s.tokens
        );
        assert_eq!(s.finished_by_eos, s.tokens.last() == Some(&TOY_EOS));
        kl_mean += s.kl_estimate / n as f64;
    }
    let law2: Vec<(Vec<TokenId>, f64)> = law.iter().map(|(s, pi, _)| (s.clone(), *pi)).collect();
    // A nearby wrong law: the same decoder at another λ.
    let wrong: Vec<(Vec<TokenId>, f64)> = sequence_law_by_hand(&toy, &prompt, max_new, 0.6, k)
        .into_iter()
        .map(|(s, pi, _)| (s, pi))
        .collect();
    check_law("cd-token λ=1.3", &counts, &law2, &wrong, n);
    // The Monte-Carlo KL estimate is near the exact KL(π‖p) of the sequence law.
    let kl_exact: f64 = law.iter().map(|(_, pi, p)| pi * (pi / p).ln()).sum();
    let var: f64 = law
        .iter()
        .map(|(_, pi, p)| pi * ((pi / p).ln() - kl_exact).powi(2))
        .sum();
    assert!(
        (kl_mean - kl_exact).abs() < 4.0 * (var / n as f64).sqrt() + 1e-9,
        "{kl_mean} vs {kl_exact}"
    );
    assert!(kl_exact > 0.01);
}

#[test]
fn constant_scorer_makes_cd_token_sample_p_with_log_ratio_exactly_zero() {
    let toy = ToyPolicy::new();
    let scorer = ConstantScorer {
        value: 3.25,
        hidden_size: HIDDEN,
    };
    let prompt = toy.encode("c").unwrap();
    let max_new = 3;
    let params = CdTokenParams {
        lambda: 2.0,
        top_k: ToyPolicy::VOCAB,
        max_new_tokens: max_new,
        seed: 11,
    };
    let n = 6000;
    let samples = cd_token_generate(&toy, &scorer, &prompt, n, &params, 0).unwrap();
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    for s in &samples {
        assert!(
            s.step_log_ratios.iter().all(|&r| r == 0.0),
            "{:?}",
            s.step_log_ratios
        );
        assert_eq!(s.kl_estimate, 0.0);
        *counts.entry(s.tokens.clone()).or_default() += 1;
    }
    let law = toy.enumerate_sequences(&prompt, max_new).unwrap();
    // Wrong: the law the same decoder has under a guiding (non-constant) scorer.
    let wrong: Vec<(Vec<TokenId>, f64)> =
        sequence_law_by_hand(&toy, &prompt, max_new, 1.0, ToyPolicy::VOCAB)
            .into_iter()
            .map(|(s, pi, _)| (s, pi))
            .collect();
    check_law("cd-token, constant scorer", &counts, &law, &wrong, n);
}

#[test]
fn constant_scorer_makes_cd_block_sample_p() {
    let toy = ToyPolicy::new();
    let scorer = ConstantScorer {
        value: -1.0,
        hidden_size: HIDDEN,
    };
    let prompt = toy.encode("b").unwrap();
    let params = CdBlockParams {
        k: 3,
        m: 2,
        max_new_tokens: 3,
        seed: 5,
    };
    let n = 5000;
    let samples = cd_block_generate(&toy, &scorer, &prompt, n, &params, 0).unwrap();
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    for s in &samples {
        *counts.entry(s.tokens.clone()).or_default() += 1;
    }
    let law = toy.enumerate_sequences(&prompt, 3).unwrap();
    // Wrong: best-of-3 of whole sequences under the toy scorer's V (what a guiding scorer
    // with M = the whole length would give).
    let rewards: Vec<f64> = law
        .iter()
        .map(|(s, _)| v_by_hand(*s.last().unwrap(), prompt.len() + s.len() - 1))
        .collect();
    let dist = RewardDistribution::new(law.iter().map(|(_, p)| *p).collect(), rewards).unwrap();
    let wrong: Vec<(Vec<TokenId>, f64)> = law
        .iter()
        .zip(best_of_n(&dist, 3).unwrap().pmf)
        .map(|((s, _), q)| (s.clone(), q))
        .collect();
    check_law("cd-block, constant scorer", &counts, &law, &wrong, n);
}

#[test]
fn cd_block_with_m_the_whole_length_is_best_of_k() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    let prompt = toy.encode("a").unwrap();
    let max_new = 3;
    let seqs = toy.enumerate_sequences(&prompt, max_new).unwrap();
    // The reward of a complete sequence: V at its last position.
    let rewards: Vec<f64> = seqs
        .iter()
        .map(|(s, _)| v_by_hand(*s.last().unwrap(), prompt.len() + s.len() - 1))
        .collect();
    let dist = RewardDistribution::new(seqs.iter().map(|(_, p)| *p).collect(), rewards).unwrap();
    for k in [1usize, 2, 4] {
        let bon = best_of_n(&dist, k as u64).unwrap();
        let law: Vec<(Vec<TokenId>, f64)> = seqs
            .iter()
            .zip(&bon.pmf)
            .map(|((s, _), q)| (s.clone(), *q))
            .collect();
        let params = CdBlockParams {
            k,
            m: max_new,
            max_new_tokens: max_new,
            seed: 100 + k as u64,
        };
        let n = 5000;
        let samples = cd_block_generate(&toy, &scorer, &prompt, n, &params, 0).unwrap();
        let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
        for s in &samples {
            assert_eq!(s.blocks, 1);
            let want = (k as f64).ln() - (k as f64 - 1.0) / k as f64;
            assert!((s.kl_bound - want).abs() < 1e-12);
            *counts.entry(s.tokens.clone()).or_default() += 1;
        }
        // Wrong: best-of-(K + 1), the nearest other best-of law.
        let wrong: Vec<(Vec<TokenId>, f64)> = seqs
            .iter()
            .zip(best_of_n(&dist, k as u64 + 1).unwrap().pmf)
            .map(|((s, _), q)| (s.clone(), q))
            .collect();
        check_law(
            &format!("cd-block K={k}, M = whole"),
            &counts,
            &law,
            &wrong,
            n,
        );
        // The exact bound holds for the exact law.
        assert!(bon.kl <= bon.kl_bound + 1e-12);
    }
}

#[test]
fn cd_block_uses_several_blocks_and_bounds_kl_per_block() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    let prompt = toy.encode("a").unwrap();
    let params = CdBlockParams {
        k: 4,
        m: 2,
        max_new_tokens: 7,
        seed: 3,
    };
    let samples = cd_block_generate(&toy, &scorer, &prompt, 200, &params, 0).unwrap();
    for s in &samples {
        assert!(s.tokens.len() <= 7);
        assert_eq!(s.blocks, s.block_values.len());
        assert!(s.blocks >= s.tokens.len().div_ceil(2));
        assert!((s.kl_bound - s.blocks as f64 * params.block_kl_bound()).abs() < 1e-12);
        if !s.finished_by_eos {
            assert_eq!(s.tokens.len(), 7);
        }
    }
    // Guidance raises the mean of V(final) over plain sampling (constant scorer).
    let constant = ConstantScorer {
        value: 0.0,
        hidden_size: HIDDEN,
    };
    let plain = cd_block_generate(&toy, &constant, &prompt, 200, &params, 0).unwrap();
    let v_final = |xs: &[tilt_decode::cd::CdBlockSample]| {
        xs.iter()
            .map(|s| v_by_hand(*s.tokens.last().unwrap(), prompt.len() + s.tokens.len() - 1))
            .sum::<f64>()
            / xs.len() as f64
    };
    assert!(v_final(&samples) > v_final(&plain) + 0.1);
}

#[test]
fn same_seed_same_sequences_whatever_the_batch() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    let prompt = toy.encode("ab").unwrap();
    let params = CdTokenParams {
        lambda: 1.0,
        top_k: 3,
        max_new_tokens: 6,
        seed: 42,
    };
    let a = cd_token_generate(&toy, &scorer, &prompt, 3, &params, 0).unwrap();
    let b = cd_token_generate(&toy, &scorer, &prompt, 8, &params, 0).unwrap();
    assert_eq!(a[..], b[..3]);
    let c = cd_token_generate(
        &toy,
        &scorer,
        &prompt,
        8,
        &CdTokenParams { seed: 43, ..params },
        0,
    )
    .unwrap();
    assert_ne!(b, c);
    let bp = CdBlockParams {
        k: 3,
        m: 2,
        max_new_tokens: 6,
        seed: 9,
    };
    let x = cd_block_generate(&toy, &scorer, &prompt, 2, &bp, 5).unwrap();
    let y = cd_block_generate(&toy, &scorer, &prompt, 4, &bp, 5).unwrap();
    assert_eq!(x[..], y[..2]);
}

/// A toy reward: the number of `c`s in the response.
struct CountC;
impl Reward for CountC {
    fn name(&self) -> String {
        "count-c".into()
    }
    fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>, RewardError> {
        Ok(pairs
            .iter()
            .map(|(_, r)| r.chars().filter(|&c| c == 'c').count() as f32)
            .collect())
    }
}

#[test]
fn cd_fudge_training_beats_the_constant_predictor_on_heldout_prompts() {
    let toy = ToyPolicy::new();
    let prompts: Vec<String> = [
        "a", "b", "c", "ab", "ba", "ca", "cb", "abc", "bca", "cab", "aa", "bb",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let data = collect_rollouts(
        &toy,
        &CountC,
        &prompts,
        &RolloutConfig {
            rollouts_per_prompt: 16,
            max_new_tokens: 8,
            seed: 1,
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(data.rollout_rewards.len(), prompts.len());
    assert!(data.features.len() > prompts.len() * 16);
    // Every row is accounted for by its rollout: (reward, prefix count) per rollout.
    assert_eq!(data.rollout_prefixes.len(), prompts.len());
    assert!(data.rollout_prefixes.iter().all(|r| r.len() == 16));
    assert_eq!(
        data.rollout_prefixes.iter().flatten().sum::<usize>(),
        data.features.len()
    );
    let mut row = 0;
    for (pi, (rs, ns)) in data
        .rollout_rewards
        .iter()
        .zip(&data.rollout_prefixes)
        .enumerate()
    {
        for (&r, &len) in rs.iter().zip(ns) {
            assert!(
                (2..=9).contains(&len),
                "a rollout of ≤ 8 tokens has 2..=9 prefixes"
            );
            assert!(data.targets[row..row + len].iter().all(|&t| t == r));
            assert!(data.groups[row..row + len].iter().all(|&g| g == pi));
            row += len;
        }
    }
    for head in [HeadKind::Linear, HeadKind::Mlp { hidden: 8 }] {
        let config = TrainConfig {
            head,
            epochs: 300,
            learning_rate: 0.05,
            weight_decay: 1e-3,
            heldout_fraction: 0.25,
            seed: 3,
        };
        let (scorer, card) = fit_head(&data, &config).unwrap();
        assert_eq!(card.heldout_prompts.len(), 3);
        assert!(card.heldout_mse_constant > 0.0);
        assert!(
            card.heldout_r2_vs_constant > 0.05,
            "{head:?}: held-out MSE {} vs constant {}",
            card.heldout_mse_scorer,
            card.heldout_mse_constant
        );
        // The loss curve's last point agrees with the saved head's own evaluation.
        let last = card.loss_curve.last().unwrap();
        assert!(
            (last.heldout_mse - card.heldout_mse_scorer).abs() < 1e-3 * (1.0 + last.heldout_mse)
        );
        assert!(card.loss_curve.first().unwrap().train_mse >= last.train_mse);
        // Round trip through the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scorer.safetensors");
        scorer.save(&path).unwrap();
        let loaded = ScorerHead::load(&path).unwrap();
        assert_eq!(loaded, scorer);
        // Same seed, same scorer.
        let (again, _) = fit_head(&data, &config).unwrap();
        assert_eq!(again, scorer);
    }
}

fn write_tensors(path: &std::path::Path, tensors: Vec<(&str, candle_core::Tensor)>) {
    let map: HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn expect_scorer_file_error(path: &std::path::Path, needle: &str) {
    match ScorerHead::load(path) {
        Err(CdError::ScorerFile { problem, path: p }) => {
            assert!(
                problem.contains(needle),
                "{problem:?} should mention {needle:?}"
            );
            assert!(p.contains("scorer"), "{p}");
        }
        other => panic!("expected a scorer-file error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_scorer_files_are_clear_errors() {
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(format!("scorer-{name}.safetensors"));
    let v = |n: usize| Tensor::ones(n, DType::F32, &dev).unwrap();

    expect_scorer_file_error(&p("absent"), "no such file");
    std::fs::write(p("garbage"), b"not a safetensors file").unwrap();
    expect_scorer_file_error(&p("garbage"), "safetensors");
    write_tensors(&p("only-mean"), vec![(names::FEATURE_MEAN, v(5))]);
    expect_scorer_file_error(&p("only-mean"), "feature_std");
    write_tensors(
        &p("no-head"),
        vec![(names::FEATURE_MEAN, v(5)), (names::FEATURE_STD, v(5))],
    );
    expect_scorer_file_error(&p("no-head"), "missing tensors");
    write_tensors(
        &p("no-bias"),
        vec![
            (names::FEATURE_MEAN, v(5)),
            (names::FEATURE_STD, v(5)),
            (names::LINEAR_WEIGHT, v(5)),
        ],
    );
    expect_scorer_file_error(&p("no-bias"), "linear.bias");
    write_tensors(
        &p("f64"),
        vec![
            (names::FEATURE_MEAN, v(5)),
            (names::FEATURE_STD, v(5)),
            (
                names::LINEAR_WEIGHT,
                Tensor::ones(5, DType::F64, &dev).unwrap(),
            ),
            (names::LINEAR_BIAS, v(1)),
        ],
    );
    expect_scorer_file_error(&p("f64"), "dtype");
    write_tensors(
        &p("shape"),
        vec![
            (names::FEATURE_MEAN, v(5)),
            (names::FEATURE_STD, v(5)),
            (names::LINEAR_WEIGHT, v(4)),
            (names::LINEAR_BIAS, v(1)),
        ],
    );
    expect_scorer_file_error(&p("shape"), "shape");
    write_tensors(
        &p("mlp"),
        vec![
            (names::FEATURE_MEAN, v(5)),
            (names::FEATURE_STD, v(5)),
            (
                names::MLP_W1,
                Tensor::ones((3, 6), DType::F32, &dev).unwrap(),
            ),
        ],
    );
    expect_scorer_file_error(&p("mlp"), "mlp.w1");
    write_tensors(
        &p("zero-std"),
        vec![
            (names::FEATURE_MEAN, v(5)),
            (
                names::FEATURE_STD,
                Tensor::zeros(5, DType::F32, &dev).unwrap(),
            ),
            (names::LINEAR_WEIGHT, v(5)),
            (names::LINEAR_BIAS, v(1)),
        ],
    );
    expect_scorer_file_error(&p("zero-std"), "> 0");

    // A valid file for another hidden size: a clear error when decoding starts.
    write_tensors(
        &p("wide"),
        vec![
            (names::FEATURE_MEAN, v(7)),
            (names::FEATURE_STD, v(7)),
            (names::LINEAR_WEIGHT, v(7)),
            (names::LINEAR_BIAS, v(1)),
        ],
    );
    let wide = tilt_decode::cd::scorer::ScorerFile::load(&p("wide")).unwrap();
    let toy = ToyPolicy::new();
    let params = CdTokenParams {
        lambda: 1.0,
        top_k: 2,
        max_new_tokens: 3,
        seed: 0,
    };
    let err = cd_token_generate(&toy, &wide, &[0], 1, &params, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scorer-wide") && err.contains('7') && err.contains('5'),
        "{err}"
    );
    let bp = CdBlockParams {
        k: 2,
        m: 2,
        max_new_tokens: 3,
        seed: 0,
    };
    let err = cd_block_generate(&toy, &wide, &[0], 1, &bp, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden size"), "{err}");
}

#[test]
fn bad_parameters_are_clear_errors() {
    let toy = ToyPolicy::new();
    let scorer = toy_scorer(W, B);
    let ok = CdTokenParams {
        lambda: 1.0,
        top_k: 2,
        max_new_tokens: 3,
        seed: 0,
    };
    let msg = |e: CdError| e.to_string();
    let e = cd_token_generate(
        &toy,
        &scorer,
        &[0],
        1,
        &CdTokenParams {
            lambda: -0.5,
            ..ok.clone()
        },
        0,
    )
    .unwrap_err();
    assert!(msg(e).contains("--lambda"));
    let e = cd_token_generate(
        &toy,
        &scorer,
        &[0],
        1,
        &CdTokenParams {
            lambda: f64::NAN,
            ..ok.clone()
        },
        0,
    )
    .unwrap_err();
    assert!(msg(e).contains("--lambda"));
    let e = cd_token_generate(
        &toy,
        &scorer,
        &[0],
        1,
        &CdTokenParams {
            top_k: 0,
            ..ok.clone()
        },
        0,
    )
    .unwrap_err();
    assert!(msg(e).contains("--top-k"));
    let e = cd_token_generate(
        &toy,
        &scorer,
        &[0],
        1,
        &CdTokenParams {
            max_new_tokens: 40,
            ..ok
        },
        0,
    )
    .unwrap_err();
    assert!(msg(e).contains("context length"));
    let okb = CdBlockParams {
        k: 2,
        m: 2,
        max_new_tokens: 3,
        seed: 0,
    };
    let e = cd_block_generate(
        &toy,
        &scorer,
        &[0],
        1,
        &CdBlockParams {
            k: 0,
            ..okb.clone()
        },
        0,
    )
    .unwrap_err();
    assert!(msg(e).contains("K is 0"));
    let e =
        cd_block_generate(&toy, &scorer, &[0], 1, &CdBlockParams { m: 0, ..okb }, 0).unwrap_err();
    assert!(msg(e).contains("M is 0"));
    assert!(cd_token_step_law(&[0.0], &[0], &[1.0], -1.0).is_err());
    assert!(cd_token_step_law(&[0.0], &[3], &[1.0], 1.0).is_err());
    assert!(cd_token_step_law(&[0.0], &[0], &[f64::INFINITY], 1.0).is_err());
    // Training: K = 0 rollouts, one prompt.
    let e = collect_rollouts(
        &toy,
        &CountC,
        &["a".to_string()],
        &RolloutConfig {
            rollouts_per_prompt: 0,
            max_new_tokens: 3,
            seed: 0,
        },
        |_| {},
    )
    .unwrap_err();
    assert!(msg(e).contains("--rollouts"));
    let data = collect_rollouts(
        &toy,
        &CountC,
        &["a".to_string()],
        &RolloutConfig {
            rollouts_per_prompt: 2,
            max_new_tokens: 3,
            seed: 0,
        },
        |_| {},
    )
    .unwrap();
    let cfg = TrainConfig {
        head: HeadKind::Linear,
        epochs: 5,
        learning_rate: 0.01,
        weight_decay: 0.0,
        heldout_fraction: 0.25,
        seed: 0,
    };
    assert!(msg(fit_head(&data, &cfg).unwrap_err()).contains("at least 2"));
    // The settings can be checked on their own, before any rollout is drawn.
    assert!(cfg.validate().is_ok());
    for (bad, flag) in [
        (
            TrainConfig {
                epochs: 0,
                ..cfg.clone()
            },
            "--epochs",
        ),
        (
            TrainConfig {
                heldout_fraction: 1.0,
                ..cfg.clone()
            },
            "--heldout-fraction",
        ),
        (
            TrainConfig {
                head: HeadKind::Mlp { hidden: 0 },
                ..cfg.clone()
            },
            "--mlp-hidden",
        ),
    ] {
        assert!(msg(bad.validate().unwrap_err()).contains(flag), "{flag}");
    }
}
