//! Controlled decoding on the toy policy, through the engine, against exact laws computed
//! here independently: the cd-token per-step law, cd-block with M = the whole length against
//! tilt-core's best-of-K pmf, the constant-scorer control, the random streams of the
//! choices, CD-FUDGE training, and the errors.
//!
//! Many samples of one decoder are drawn as the choices of requests (choice j of a cd
//! request draws from stream `draw_stream(index, j)`), over several prompt indices: what the
//! old `cd_token_generate(…, n, first_stream)` drew as n sequences of consecutive streams.

mod common;

use common::*;
use std::collections::HashMap;
use tilt_core::{best_of_n::best_of_n, RewardDistribution};
use tilt_engine::cd::scorer::names;
use tilt_engine::cd::{
    block_kl_bound, cd_token_step_law, fit_head, top_k_candidates, HeadKind, PrefixScorer,
    ScorerFile, ScorerHead, TrainConfig,
};
use tilt_engine::scorer_training::{collect_rollouts, TrainScorerConfig};
use tilt_engine::stepper::draw_stream;
use tilt_engine::{
    Engine, EngineError, ErrorKind, FinishReason, Input, KlNote, NoProgress, Output, ScorerSpec,
    Strategy, WeightedScorer,
};
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::toy::{ToyPolicy, TOY_EOS};
use tilt_models::{Policy, TokenId};

/// An engine with the length reward and the given scorer (named `s`).
fn cd_engine(s: std::sync::Arc<dyn PrefixScorer>) -> Engine<ToyPolicy> {
    toy_engine(vec![("length", reward(LengthReward))], vec![("s", s)], 4096)
}

/// `count` outputs of `strategy` after `prompt` with `seed`: the choices (100 a request) of
/// requests at indices 0, 1, 2, …
fn cd_outputs(
    e: &Engine<ToyPolicy>,
    strategy: &Strategy,
    prompt: &str,
    seed: u64,
    max_new: usize,
    count: usize,
) -> Vec<Output> {
    let per = 100.min(count);
    assert_eq!(count % per, 0);
    let mut out = Vec::with_capacity(count);
    for index in 0..(count / per) as u64 {
        let r = choices(at(req(prompt, strategy.clone(), seed, max_new), index), per);
        let resp = e.generate(&r).unwrap();
        assert_eq!(resp.outputs.len(), per);
        out.extend(resp.outputs);
    }
    out
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
    law_with(&v_by_hand, toy, last, pos_child, lambda, k)
}

/// The value function of a prefix (its last token, its position).
type ValueFn<'a> = &'a dyn Fn(TokenId, usize) -> f64;

/// [`law_by_hand`] under the value function `v`.
fn law_with(
    v: ValueFn<'_>,
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
        .map(|&z| p[z] * (lambda * v(z as TokenId, pos_child)).exp())
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
    sequence_law_with(&v_by_hand, toy, prompt, max_new, lambda, k)
}

/// [`sequence_law_by_hand`] under the value function `v`.
fn sequence_law_with(
    v: ValueFn<'_>,
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
        let law = law_with(v, toy, last, pos_child, lambda, k);
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
    let e = cd_engine(scorer(toy_scorer(W, B)));
    let prompt = toy.encode("ab").unwrap();
    let (lambda, k, max_new) = (1.3, 3, 3);
    let n = 6000;
    let samples = cd_outputs(&e, &cd_token(lambda, k), "ab", 7, max_new, n);
    let law = sequence_law_by_hand(&toy, &prompt, max_new, lambda, k);
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    let mut kl_mean = 0.0;
    for s in &samples {
        *counts.entry(s.tokens.clone()).or_default() += 1;
        // The recorded log π(y)/p(y) equals the exact one for that sequence.
        let (_, pi, p) = law.iter().find(|(seq, _, _)| *seq == s.tokens).unwrap();
        let kl = s.kl_estimate.unwrap();
        assert!((kl - (pi / p).ln()).abs() < 1e-5, "{:?}", s.tokens);
        // And its log p(y) is p's.
        assert!((s.candidates[0].log_prob - p.ln()).abs() < 1e-5);
        assert_eq!(
            s.finish_reason == FinishReason::Eos,
            s.tokens.last() == Some(&TOY_EOS)
        );
        assert_eq!(
            (s.kl_note, s.kl_bound, s.n, s.draws),
            (KlNote::CdTokenLogRatio, None, None, 1)
        );
        kl_mean += kl / n as f64;
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
    let e = cd_engine(scorer(constant(3.25)));
    let prompt = toy.encode("c").unwrap();
    let max_new = 3;
    let n = 6000;
    let samples = cd_outputs(&e, &cd_token(2.0, ToyPolicy::VOCAB), "c", 11, max_new, n);
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    for s in &samples {
        // The old decoder exposed each step's log-ratio (all exactly 0); an output carries
        // their sum, which must be exactly 0 too.
        assert_eq!(s.kl_estimate, Some(0.0), "{:?}", s.tokens);
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
    let e = cd_engine(scorer(constant(-1.0)));
    let prompt = toy.encode("b").unwrap();
    let n = 5000;
    let samples = cd_outputs(&e, &cd_block(3, 2), "b", 5, 3, n);
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
    let e = cd_engine(scorer(toy_scorer(W, B)));
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
        let n = 5000;
        let samples = cd_outputs(&e, &cd_block(k, max_new), "a", 100 + k as u64, max_new, n);
        let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
        for s in &samples {
            assert_eq!(s.blocks, Some(1));
            assert_eq!(s.draws, k);
            assert_eq!(
                (s.kl_note, s.kl_estimate),
                (KlNote::CdBlockChainBound, None)
            );
            let want = (k as f64).ln() - (k as f64 - 1.0) / k as f64;
            assert!((s.kl_bound.unwrap() - want).abs() < 1e-12);
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
    let e = toy_engine(
        vec![("length", reward(LengthReward))],
        vec![
            ("linear", scorer(toy_scorer(W, B))),
            ("constant", scorer(constant(0.0))),
        ],
        4096,
    );
    let prompt = toy.encode("a").unwrap();
    let samples = cd_outputs(&e, &cd_block(4, 2), "a", 3, 7, 200);
    for s in &samples {
        assert!(s.tokens.len() <= 7);
        let blocks = s.blocks.unwrap();
        assert!(blocks >= s.tokens.len().div_ceil(2));
        assert_eq!(s.draws, blocks * 4);
        assert!((s.kl_bound.unwrap() - blocks as f64 * block_kl_bound(4)).abs() < 1e-12);
        if s.finish_reason != FinishReason::Eos {
            assert_eq!(s.tokens.len(), 7);
        }
    }
    // Guidance raises the mean of V(final) over plain sampling (constant scorer).
    let plain_strategy = Strategy::CdBlock {
        k: 4,
        m: 2,
        scorer: Some("constant".into()),
    };
    let plain = cd_outputs(&e, &plain_strategy, "a", 3, 7, 200);
    let v_final = |xs: &[Output]| {
        xs.iter()
            .map(|s| v_by_hand(*s.tokens.last().unwrap(), prompt.len() + s.tokens.len() - 1))
            .sum::<f64>()
            / xs.len() as f64
    };
    assert!(v_final(&samples) > v_final(&plain) + 0.1);
}

/// cd-token after `prompt` from stream `stream` of `seed`, written out from public pieces:
/// at each step the top-k children are stepped, scored, and one is drawn from the cd law.
fn direct_cd_token(
    prompt: &str,
    scorer: &dyn PrefixScorer,
    (lambda, k): (f64, usize),
    seed: u64,
    stream: u64,
    max_new: usize,
) -> Vec<TokenId> {
    let toy = ToyPolicy::new();
    let (mut cache, mut last) = toy.prefill(&toy.encode(prompt).unwrap()).unwrap();
    let mut sampler = SequenceSampler::new(seed, stream);
    let mut tokens = Vec::new();
    loop {
        let cands = top_k_candidates(&last.log_probs, k);
        let mut caches = vec![cache.clone(); cands.len()];
        let outs = toy.step(&mut caches, &cands).unwrap();
        let hidden: Vec<&[f32]> = outs.iter().map(|o| o.hidden.as_slice()).collect();
        let values = scorer.score(&hidden).unwrap();
        let law = cd_token_step_law(&last.log_probs, &cands, &values, lambda).unwrap();
        let log_pi: Vec<f64> = law.probs.iter().map(|p| p.ln()).collect();
        let j = sampler.sample_index(&log_pi).unwrap();
        let tok = law.candidates[j];
        tokens.push(tok);
        if tok == TOY_EOS || tokens.len() == max_new {
            return tokens;
        }
        cache = caches.swap_remove(j);
        last = outs[j].clone();
    }
}

/// cd-block after `prompt` from stream `stream` of `seed`, written out from public pieces:
/// per block, K continuations of up to M tokens drawn from p (continuation by continuation,
/// in index order, at each position), the one the scorer values most (first on ties) kept.
fn direct_cd_block(
    prompt: &str,
    scorer: &dyn PrefixScorer,
    (k, m): (usize, usize),
    seed: u64,
    stream: u64,
    max_new: usize,
) -> Vec<TokenId> {
    let toy = ToyPolicy::new();
    let (mut cache, mut last) = toy.prefill(&toy.encode(prompt).unwrap()).unwrap();
    let mut sampler = SequenceSampler::new(seed, stream);
    let mut tokens: Vec<TokenId> = Vec::new();
    loop {
        let len = m.min(max_new - tokens.len());
        let mut caches = vec![cache.clone(); k];
        let mut lasts = vec![last.clone(); k];
        let mut conts: Vec<Vec<TokenId>> = vec![Vec::new(); k];
        let mut ended = vec![false; k];
        for _ in 0..len {
            for c in 0..k {
                if ended[c] {
                    continue;
                }
                let d = sampler
                    .sample(&lasts[c].log_probs, &SamplingParams::default())
                    .unwrap();
                conts[c].push(d.token);
                lasts[c] = toy
                    .step(std::slice::from_mut(&mut caches[c]), &[d.token])
                    .unwrap()
                    .remove(0);
                ended[c] = d.token == TOY_EOS;
            }
            if ended.iter().all(|&e| e) {
                break;
            }
        }
        let hidden: Vec<&[f32]> = lasts.iter().map(|o| o.hidden.as_slice()).collect();
        let values = scorer.score(&hidden).unwrap();
        let mut best = 0;
        for (c, v) in values.iter().enumerate() {
            if *v > values[best] {
                best = c;
            }
        }
        tokens.extend_from_slice(&conts[best]);
        if ended[best] || tokens.len() >= max_new {
            return tokens;
        }
        cache = caches.swap_remove(best);
        last = lasts.swap_remove(best);
    }
}

/// A second linear head on the toy's hidden states, and its value by hand.
const W2: [f32; HIDDEN] = [-0.8, 0.9, 0.1, 1.4, -1.5];
const B2: f32 = -0.3;

fn v2_by_hand(last: TokenId, pos: usize) -> f64 {
    W2[last as usize] as f64 + W2[HIDDEN - 1] as f64 * (pos as f32 / CTX as f32) as f64 + B2 as f64
}

/// `strategy` (cd-token or cd-block) guided by `w1·V1 + w2·V2`.
fn weighted(strategy: Strategy, w1: f64, w2: f64) -> Strategy {
    let spec = ScorerSpec::Weighted(vec![
        WeightedScorer {
            name: "s".into(),
            weight: w1,
        },
        WeightedScorer {
            name: "s2".into(),
            weight: w2,
        },
    ]);
    strategy.with_scorer(Some(spec))
}

fn two_scorer_engine() -> Engine<ToyPolicy> {
    toy_engine(
        vec![
            ("length", reward(LengthReward)),
            ("count-c", reward(CountC)),
        ],
        vec![
            ("s", scorer(toy_scorer(W, B))),
            ("s2", scorer(toy_scorer(W2, B2))),
        ],
        4096,
    )
}

#[test]
fn weighted_scorers_follow_the_exact_law_of_the_weighted_tilt() {
    // Multi-objective cd-token: guided by V = w1·V1 + w2·V2, its sequences follow the exact
    // law of π ∝ p·e^{λ(w1·V1 + w2·V2)} per step, and each output reports both values.
    let toy = ToyPolicy::new();
    let e = two_scorer_engine();
    let prompt = toy.encode("ab").unwrap();
    let (lambda, k, max_new) = (1.1, 3, 3);
    let (w1, w2) = (0.4, 1.7);
    let v = |t: TokenId, pos: usize| w1 * v_by_hand(t, pos) + w2 * v2_by_hand(t, pos);
    let n = 6000;
    let strategy = weighted(cd_token(lambda, k), w1, w2);
    let samples = cd_outputs(&e, &strategy, "ab", 11, max_new, n);
    let law = sequence_law_with(&v, &toy, &prompt, max_new, lambda, k);
    let mut counts: HashMap<Vec<TokenId>, usize> = HashMap::new();
    for s in &samples {
        *counts.entry(s.tokens.clone()).or_default() += 1;
        let (_, pi, p) = law.iter().find(|(seq, _, _)| *seq == s.tokens).unwrap();
        assert!((s.kl_estimate.unwrap() - (pi / p).ln()).abs() < 1e-5);
        // Each scorer's value at the last drawn token, with its name and weight.
        let last = *s.tokens.last().unwrap();
        // (the position a child is scored at: the prompt's length plus the tokens before it)
        let pos = prompt.len() + s.tokens.len() - 1;
        let sv = &s.scorer_values;
        assert_eq!(sv.len(), 2);
        assert_eq!((sv[0].name.as_str(), sv[0].weight), ("s", w1));
        assert_eq!((sv[1].name.as_str(), sv[1].weight), ("s2", w2));
        assert!((sv[0].value - v_by_hand(last, pos)).abs() < 1e-6, "{sv:?}");
        assert!((sv[1].value - v2_by_hand(last, pos)).abs() < 1e-6, "{sv:?}");
    }
    let exact: Vec<(Vec<TokenId>, f64)> = law.iter().map(|(s, pi, _)| (s.clone(), *pi)).collect();
    // Wrong laws: either scorer alone, and the unweighted sum.
    for (what, wv) in [
        (
            "V1 alone",
            &(|t: TokenId, p: usize| v_by_hand(t, p)) as ValueFn<'_>,
        ),
        (
            "V2 alone",
            &(|t: TokenId, p: usize| v2_by_hand(t, p)) as ValueFn<'_>,
        ),
        (
            "V1 + V2",
            &(|t: TokenId, p: usize| v_by_hand(t, p) + v2_by_hand(t, p)) as ValueFn<'_>,
        ),
    ] {
        let wrong: Vec<(Vec<TokenId>, f64)> =
            sequence_law_with(wv, &toy, &prompt, max_new, lambda, k)
                .into_iter()
                .map(|(s, pi, _)| (s, pi))
                .collect();
        check_law(
            &format!("weighted cd-token against {what}"),
            &counts,
            &exact,
            &wrong,
            n,
        );
    }
}

#[test]
fn one_scorer_of_weight_one_is_the_scorer_itself_bit_for_bit() {
    let e = two_scorer_engine();
    for base in [cd_token(1.3, 3), cd_block(2, 2)] {
        let named = base.with_scorer(Some("s2".into()));
        let listed = weighted(base.clone(), 0.0, 1.0);
        let only = base.with_scorer(Some(ScorerSpec::Weighted(vec![WeightedScorer {
            name: "s2".into(),
            weight: 1.0,
        }])));
        let a = cd_outputs(&e, &named, "ab", 3, 4, 200);
        let b = cd_outputs(&e, &only, "ab", 3, 4, 200);
        let c = cd_outputs(&e, &listed, "ab", 3, 4, 200);
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert_eq!(x.tokens, y.tokens);
            assert_eq!(
                x.kl_estimate.map(f64::to_bits),
                y.kl_estimate.map(f64::to_bits)
            );
            assert_eq!(x.scorer_values, y.scorer_values);
            // 0·V1 + 1·V2 guides as V2 (the same choices), and reports both terms.
            assert_eq!(x.tokens, z.tokens);
            assert_eq!(z.scorer_values.len(), 2);
            assert_eq!(z.scorer_values[1], x.scorer_values[0]);
        }
        assert!(a.iter().any(|o| o.tokens != a[0].tokens), "the draws vary");
    }
}

#[test]
fn an_output_reports_each_requested_reward() {
    let e = two_scorer_engine();
    let mut r = choices(req("ab", weighted(cd_block(2, 2), 0.5, 0.5), 1, 4), 3);
    r.params.report_rewards = vec!["count-c".into(), "length".into()];
    let resp = e.generate(&r).unwrap();
    for o in &resp.outputs {
        let names: Vec<&str> = o.rewards.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["count-c", "length"]);
        assert_eq!(o.rewards[0].value, o.text.matches('c').count() as f64);
        assert_eq!(
            o.rewards[1].value, o.reward,
            "length is also the request's reward"
        );
        assert_eq!(o.rewards[1].value, o.text.chars().count() as f64);
    }
    // Unknown or repeated names are refused before any model work.
    let prefills = e.policy().prefill_calls();
    for (bad, needle) in [
        (vec!["nope".to_string()], "nope"),
        (vec!["length".into(), "length".into()], "twice"),
        (vec![" ".into()], "empty"),
    ] {
        let mut r = req("ab", cd_block(2, 2), 1, 4);
        r.params.report_rewards = bad;
        let err = e.generate(&r).unwrap_err();
        assert_eq!(err.param(), Some("report_rewards"), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert_eq!(e.policy().prefill_calls(), prefills);
}

#[test]
fn bad_weights_and_scorer_lists_are_clear_errors() {
    let e = two_scorer_engine();
    let terms = |t: &[(&str, f64)]| Strategy::CdToken {
        lambda: 1.0,
        top_k: 2,
        scorer: Some(ScorerSpec::Weighted(
            t.iter()
                .map(|(n, w)| WeightedScorer {
                    name: n.to_string(),
                    weight: *w,
                })
                .collect(),
        )),
    };
    for (bad, needle) in [
        (terms(&[("s", f64::NAN)]), "finite"),
        (terms(&[("s", 1.0), ("s2", f64::INFINITY)]), "finite"),
        (terms(&[]), "empty list"),
        (terms(&[("s", 1.0), ("s", 2.0)]), "twice"),
        (terms(&[("s", 1.0), ("zzz", 2.0)]), "zzz"),
        (terms(&[("", 1.0)]), "empty scorer name"),
        (terms(&[("s", f64::MAX), ("s2", f64::MAX)]), "overflows"),
    ] {
        let err = e.generate(&req("ab", bad, 0, 3)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert_eq!(err.param(), Some("scorer"), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // As JSON: a name or a list of terms (weight 1 when absent); anything else is refused.
    let s: Strategy = serde_json::from_str(
        r#"{"name":"cd-block","k":2,"m":2,"scorer":[{"name":"s","weight":0.25},{"name":"s2"}]}"#,
    )
    .unwrap();
    assert_eq!(s, weighted(cd_block(2, 2), 0.25, 1.0));
    let back = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Strategy>(&back).unwrap(), s);
    let one: Strategy =
        serde_json::from_str(r#"{"name":"cd-block","k":2,"m":2,"scorer":"s"}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&one).unwrap(),
        r#"{"name":"cd-block","k":2,"m":2,"scorer":"s"}"#
    );
    for bad in [
        r#"{"name":"cd-block","k":2,"m":2,"scorer":3}"#,
        r#"{"name":"cd-block","k":2,"m":2,"scorer":[{"name":"s","weight":"x"}]}"#,
        r#"{"name":"cd-block","k":2,"m":2,"scorer":[{"name":"s","w":1}]}"#,
    ] {
        assert!(serde_json::from_str::<Strategy>(bad).is_err(), "{bad}");
    }
}

#[test]
fn same_seed_same_sequences_whatever_the_number_of_choices() {
    let e = cd_engine(scorer(toy_scorer(W, B)));
    let st = cd_token(1.0, 3);
    let a = e
        .generate(&choices(req("ab", st.clone(), 42, 6), 3))
        .unwrap();
    let b = e
        .generate(&choices(req("ab", st.clone(), 42, 6), 8))
        .unwrap();
    assert_eq!(a.outputs[..], b.outputs[..3]);
    let c = e
        .generate(&choices(req("ab", st.clone(), 43, 6), 8))
        .unwrap();
    assert_ne!(b.outputs, c.outputs);
    let bt = cd_block(3, 2);
    let x = e
        .generate(&choices(at(req("ab", bt.clone(), 9, 6), 5), 2))
        .unwrap();
    let y = e
        .generate(&choices(at(req("ab", bt.clone(), 9, 6), 5), 4))
        .unwrap();
    assert_eq!(x.outputs[..], y.outputs[..2]);
    // Choice j draws from stream draw_stream(index, j): the same sequences as decoding
    // those streams directly.
    let head = toy_scorer(W, B);
    for (j, o) in b.outputs.iter().enumerate() {
        let direct = direct_cd_token("ab", &head, (1.0, 3), 42, draw_stream(0, j as u64), 6);
        assert_eq!(o.tokens, direct, "cd-token choice {j}");
    }
    for (j, o) in y.outputs.iter().enumerate() {
        let direct = direct_cd_block("ab", &head, (3, 2), 9, draw_stream(5, j as u64), 6);
        assert_eq!(o.tokens, direct, "cd-block choice {j}");
    }
    // Not trivially: the choices differ from one another.
    assert!(b.outputs.iter().any(|o| o.tokens != b.outputs[0].tokens));
    assert!(y.outputs.iter().any(|o| o.tokens != y.outputs[0].tokens));
}

#[test]
fn cd_fudge_training_beats_the_constant_predictor_on_heldout_prompts() {
    let e = toy_engine(vec![("count-c", reward(CountC))], vec![], 4096);
    let prompts: Vec<Input> = [
        "a", "b", "c", "ab", "ba", "ca", "cb", "abc", "bca", "cab", "aa", "bb",
    ]
    .iter()
    .map(|s| Input::Prompt(s.to_string()))
    .collect();
    let fit = |head: HeadKind, seed: u64| TrainConfig {
        head,
        epochs: 300,
        learning_rate: 0.05,
        weight_decay: 1e-3,
        heldout_fraction: 0.25,
        seed,
        method: Default::default(),
    };
    // The fit's seed seeds the rollouts too now; the rollouts are drawn with seed 1 (as
    // before) and the heads fitted with seed 3 (as before) by fit_head.
    let config = TrainScorerConfig {
        rollouts_per_prompt: 16,
        max_new_tokens: 8,
        fit: fit(HeadKind::Linear, 1),
        reward: None,
    };
    let data = collect_rollouts(&e, &prompts, &config, &NoProgress).unwrap();
    assert_eq!(data.rollout_rewards.len(), prompts.len());
    assert_eq!(data.n_prompts, prompts.len());
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
        let config = fit(head, 3);
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
    // Same seed, same rollouts.
    let again = collect_rollouts(&e, &prompts, &config, &NoProgress).unwrap();
    assert_eq!(again.rollout_rewards, data.rollout_rewards);
    assert_eq!(again.features, data.features);
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
        Err(e @ EngineError::BadFile { .. }) => {
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            let EngineError::BadFile { problem, path: p } = e else {
                unreachable!()
            };
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

    // A valid file for another hidden size: a clear error naming `scorer`, the file and both
    // sizes. The old decoders found it when decoding started; the engine refuses it when it
    // is built, before any request (so for cd-token and cd-block alike).
    write_tensors(
        &p("wide"),
        vec![
            (names::FEATURE_MEAN, v(7)),
            (names::FEATURE_STD, v(7)),
            (names::LINEAR_WEIGHT, v(7)),
            (names::LINEAR_BIAS, v(1)),
        ],
    );
    let wide = ScorerFile::load(&p("wide")).unwrap();
    let err = Engine::from_parts(
        ToyPolicy::new(),
        vec![("length".into(), reward(LengthReward))],
        vec![("wide".into(), scorer(wide))],
        64,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(err.param(), Some("scorer"));
    let msg = err.to_string();
    assert!(
        msg.contains("scorer-wide") && msg.contains('7') && msg.contains('5'),
        "{msg}"
    );
    assert!(msg.contains("hidden size"), "{msg}");
}

#[test]
fn bad_parameters_are_clear_errors() {
    let e = cd_engine(scorer(toy_scorer(W, B)));
    let refused = |s: Strategy, max_new: usize, param: &str| -> String {
        let err = e.generate(&req("a", s, 0, max_new)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert_eq!(err.param(), Some(param), "{err}");
        assert!(!err.to_string().contains("--"), "no CLI flag in {err}");
        err.to_string()
    };
    refused(cd_token(-0.5, 2), 3, "lambda");
    refused(cd_token(f64::NAN, 2), 3, "lambda");
    refused(cd_token(1.0, 0), 3, "top_k");
    let msg = refused(cd_token(1.0, 2), 40, "max_new_tokens");
    assert!(msg.contains("context"), "{msg}");
    let msg = refused(cd_block(0, 2), 3, "block_k");
    assert!(msg.contains("0 continuations"), "{msg}");
    let msg = refused(cd_block(2, 0), 3, "block_m");
    assert!(msg.contains("0 tokens per block"), "{msg}");
    let msg = refused(cd_block(2, 2), 40, "max_new_tokens");
    assert!(msg.contains("context"), "{msg}");
    assert_eq!(
        e.policy().prefill_calls(),
        0,
        "refused before any model work"
    );
    assert!(cd_token_step_law(&[0.0], &[0], &[1.0], -1.0).is_err());
    assert!(cd_token_step_law(&[0.0], &[3], &[1.0], 1.0).is_err());
    assert!(cd_token_step_law(&[0.0], &[0], &[f64::INFINITY], 1.0).is_err());
    // Training: K = 0 rollouts, one prompt.
    let te = toy_engine(vec![("count-c", reward(CountC))], vec![], 4096);
    let cfg = TrainConfig {
        head: HeadKind::Linear,
        epochs: 5,
        learning_rate: 0.01,
        weight_decay: 0.0,
        heldout_fraction: 0.25,
        seed: 0,
        method: Default::default(),
    };
    let rollouts = |k: usize| TrainScorerConfig {
        rollouts_per_prompt: k,
        max_new_tokens: 3,
        fit: cfg.clone(),
        reward: None,
    };
    let one = [Input::Prompt("a".into())];
    let err = collect_rollouts(&te, &one, &rollouts(0), &NoProgress).unwrap_err();
    assert_eq!(err.param(), Some("rollouts_per_prompt"), "{err}");
    assert_eq!(te.policy().prefill_calls(), 0);
    let data = collect_rollouts(&te, &one, &rollouts(2), &NoProgress).unwrap();
    let err = fit_head(&data, &cfg).unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
    // The settings can be checked on their own, before any rollout is drawn.
    assert!(cfg.validate().is_ok());
    for (bad, param) in [
        (
            TrainConfig {
                epochs: 0,
                ..cfg.clone()
            },
            "epochs",
        ),
        (
            TrainConfig {
                heldout_fraction: 1.0,
                ..cfg.clone()
            },
            "heldout_fraction",
        ),
        (
            TrainConfig {
                head: HeadKind::Mlp { hidden: 0 },
                ..cfg.clone()
            },
            "mlp_hidden",
        ),
    ] {
        let err = bad.validate().unwrap_err();
        assert_eq!(err.param(), Some(param), "{err}");
        // And the rollouts are refused for it before any is drawn.
        let prefills = te.policy().prefill_calls();
        let config = TrainScorerConfig {
            fit: bad,
            ..rollouts(2)
        };
        let err = collect_rollouts(&te, &one, &config, &NoProgress).unwrap_err();
        assert_eq!(err.param(), Some(param), "{err}");
        assert_eq!(te.policy().prefill_calls(), prefills);
    }
    // Memory: rollouts that cannot fit are refused naming rollouts_per_prompt.
    if let Some(heavy) = heavy_engine() {
        let err = collect_rollouts(
            &heavy,
            &one,
            &TrainScorerConfig {
                max_new_tokens: 8,
                ..rollouts(4000)
            },
            &NoProgress,
        )
        .unwrap_err();
        assert_eq!(err.param(), Some("rollouts_per_prompt"), "{err}");
        assert!(err.to_string().contains("GiB"), "{err}");
        assert_eq!(heavy.policy().toy.prefill_calls(), 0);
    }
}
