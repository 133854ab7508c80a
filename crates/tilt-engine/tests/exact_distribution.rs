//! The engine's outputs follow the exact laws of tilt-core.
//!
//! On the toy policy (three letters and an end token, a Markov chain: see
//! `tilt_models::toy`) every response to a prompt can be enumerated with its exact
//! probability. With a deterministic reward on the text, tilt-core gives the exact law of
//! best-of-n, worst-of-n and soft best-of-n over those responses; rewind-and-repeat's law is
//! p conditioned on the acceptance set. Each test runs the real engine
//! ([`tilt_engine::Engine::generate`]) many times and compares the counts of the returned
//! texts with the exact law by Pearson's chi-square (bins with expected count < 5 pooled).
//! The draws are 200 seeds × 100 choices: each choice of a request is a whole independent run
//! of the strategy from its own random streams, so the 20 000 outputs are iid draws of the
//! strategy's law (were the choices of a request correlated, the statistic would explode).
//! The seeds are fixed, so the tests are not flaky; each also checks that a wrong law (the
//! reference p, or best-of-(n−1)) is rejected by the same statistic, so the test has the
//! power to fail.

mod common;

use common::*;
use std::collections::BTreeMap;
use tilt_core::best_of_n::{best_of_n, worst_of_n};
use tilt_core::soft_best_of_n::soft_best_of_n;
use tilt_core::RewardDistribution;
use tilt_engine::{Engine, KlNote, Strategy};
use tilt_models::toy::ToyPolicy;
use tilt_models::Policy;

const PROMPT: &str = "a";
const MAX_NEW: usize = 3;

fn letters_engine() -> Engine<ToyPolicy> {
    toy_engine(vec![("letters", reward(LetterReward))], vec![], 4096)
}

/// The enumerated responses (as texts: text determines the response here) and the
/// reference distribution with the letter reward.
fn reference() -> (Vec<String>, RewardDistribution) {
    let toy = ToyPolicy::new();
    let prompt = toy.encode(PROMPT).unwrap();
    let seqs = toy.enumerate_sequences(&prompt, MAX_NEW).unwrap();
    let texts: Vec<String> = seqs.iter().map(|(s, _)| toy.decode(s).unwrap()).collect();
    let mut uniq = texts.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), texts.len(), "texts must identify responses");
    let probs = seqs.iter().map(|(_, p)| *p).collect();
    let rewards = texts.iter().map(|t| letter_reward(t)).collect();
    (texts, RewardDistribution::new(probs, rewards).unwrap())
}

/// Choices per request.
const CHOICES: usize = 100;

/// Counts of the returned texts over `runs` outputs (`runs / CHOICES` seeds of `CHOICES`
/// choices each).
fn run_counts(strategy: &Strategy, runs: u64) -> BTreeMap<String, u64> {
    assert_eq!(runs % CHOICES as u64, 0);
    let e = letters_engine();
    let mut counts = BTreeMap::new();
    for seed in 0..runs / CHOICES as u64 {
        let r = choices(
            req(PROMPT, strategy.clone(), 1_000_003 * seed + 17, MAX_NEW),
            CHOICES,
        );
        let out = e.generate(&r).unwrap();
        assert_eq!(out.outputs.len(), CHOICES);
        for o in out.outputs {
            *counts.entry(o.text).or_insert(0) += 1;
        }
    }
    counts
}

/// Pearson's chi-square of `counts` against `pmf` (over `texts`), pooling bins with
/// expected count < 5; returns (statistic, degrees of freedom, p-value).
fn chi_square(
    texts: &[String],
    pmf: &[f64],
    counts: &BTreeMap<String, u64>,
    runs: u64,
) -> (f64, usize, f64) {
    let total: u64 = counts.values().sum();
    assert_eq!(total, runs);
    for t in counts.keys() {
        let i = texts
            .iter()
            .position(|x| x == t)
            .expect("an enumerated text");
        assert!(
            pmf[i] > 0.0,
            "returned {t:?}, which has probability 0 under the law"
        );
    }
    let m = runs as f64;
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pooled_e, mut pooled_o) = (0.0, 0.0);
    for (t, &p) in texts.iter().zip(pmf) {
        let e = m * p;
        let o = *counts.get(t).unwrap_or(&0) as f64;
        if e < 5.0 {
            pooled_e += e;
            pooled_o += o;
        } else {
            stat += (o - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e;
        bins += 1;
    }
    let df = bins - 1;
    (stat, df, chi_square_sf(stat, df as f64))
}

/// Upper tail of the chi-square distribution: Q(df/2, x/2), the regularised upper
/// incomplete gamma function (series for x < a + 1, Lentz continued fraction otherwise;
/// Numerical Recipes §6.2).
fn chi_square_sf(x: f64, df: f64) -> f64 {
    let (a, x) = (df / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let ln_pre = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        1.0 - sum * ln_pre.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-16 {
                break;
            }
        }
        ln_pre.exp() * h
    }
}

/// log Γ(x) for x > 0 (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        std::f64::consts::PI.ln() - (std::f64::consts::PI * x).sin().ln() - ln_gamma(1.0 - x)
    } else {
        let x = x - 1.0;
        let mut a = G[0];
        let t = x + 7.5;
        for (i, g) in G.iter().enumerate().skip(1) {
            a += g / (x + i as f64);
        }
        0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
    }
}

#[test]
fn chi_square_tail_matches_known_values() {
    // Independent values: chi2 with 1 df at 3.841459 has tail 0.05; 10 df at 18.307038, 0.05;
    // 2 df: tail = e^{-x/2} exactly.
    assert!((chi_square_sf(3.841_458_820_694_124, 1.0) - 0.05).abs() < 1e-9);
    assert!((chi_square_sf(18.307_038_053_275_146, 10.0) - 0.05).abs() < 1e-9);
    assert!((chi_square_sf(7.0, 2.0) - (-3.5f64).exp()).abs() < 1e-12);
}

const RUNS: u64 = 20_000;
/// A fixed seed set: accept the law unless p < 1e-3 (it is not re-drawn, so not flaky).
const ALPHA: f64 = 1e-3;

fn check(strategy: Strategy, exact: &[f64], wrong: &[f64]) {
    let (texts, _) = reference();
    let counts = run_counts(&strategy, RUNS);
    let label = strategy.label();
    let (stat, df, p) = chi_square(&texts, exact, &counts, RUNS);
    eprintln!("{label}: chi2 = {stat:.2}, df = {df}, p = {p:.4}");
    assert!(
        p > ALPHA,
        "{label}: chi2 = {stat:.2} on {df} df, p = {p:.3e} < {ALPHA}: the engine's outputs do \
         not follow the exact law"
    );
    let (wstat, wdf, wp) = chi_square(&texts, wrong, &counts, RUNS);
    assert!(
        wp < 1e-9,
        "{label}: a wrong law was not rejected (chi2 = {wstat:.2} on {wdf} df, p = {wp:.3e})"
    );
}

#[test]
fn best_of_n_follows_the_exact_law_with_ties() {
    let (_, dist) = reference();
    let exact = best_of_n(&dist, 4).unwrap().pmf;
    let wrong = best_of_n(&dist, 3).unwrap().pmf;
    check(bon(4), &exact, &wrong);
}

#[test]
fn worst_of_n_follows_the_exact_law_with_ties() {
    let (_, dist) = reference();
    let exact = worst_of_n(&dist, 4).unwrap().pmf;
    check(won(4), &exact, dist.probs());
}

#[test]
fn soft_best_of_n_follows_the_exact_law() {
    let (_, dist) = reference();
    let lambda = 0.7;
    let exact = soft_best_of_n(&dist, 4, lambda).unwrap().pmf;
    // Hard best-of-4 is a nearby but wrong law.
    let wrong = best_of_n(&dist, 4).unwrap().pmf;
    check(soft_bon(4, lambda), &exact, &wrong);
}

#[test]
fn sample_follows_the_reference() {
    // `sample` has no n (it draws exactly one candidate); the old runner's `n = 4` with
    // Strategy::Sample drew four and returned the first, which has the same law.
    let (_, dist) = reference();
    let wrong = best_of_n(&dist, 2).unwrap().pmf;
    check(sample(), dist.probs(), &wrong);
}

/// p(A) for A = {reward ≥ threshold}.
fn acceptance_mass(dist: &RewardDistribution, threshold: f64) -> f64 {
    dist.probs()
        .iter()
        .zip(dist.rewards())
        .filter(|(_, &r)| r >= threshold)
        .map(|(p, _)| p)
        .sum()
}

#[test]
fn rewind_follows_the_reference_conditioned_on_acceptance() {
    let (_, dist) = reference();
    let threshold = 1.0;
    let p_accept = acceptance_mass(&dist, threshold);
    // With a cap of 200 draws, P(no acceptance) = (1 − p(A))^200 is negligible.
    assert!((1.0 - p_accept).powi(200) < 1e-12, "p(A) = {p_accept}");
    let exact: Vec<f64> = dist
        .probs()
        .iter()
        .zip(dist.rewards())
        .map(|(p, &r)| if r >= threshold { p / p_accept } else { 0.0 })
        .collect();
    let wrong = best_of_n(&dist, 4).unwrap().pmf;
    check(rewind(3, threshold, 200), &exact, &wrong);
}

/// E[log(draws/accepted)] under the engine's stopping rule, exactly: batches of `n` draws,
/// each in A with probability `q`, until a batch holds one (at most `cap` draws, a multiple of
/// `n`); conditional on acceptance. The batch holding the first acceptance is the b-th with
/// probability (1−q)^{n(b−1)}·(1−(1−q)^n), and its count a of draws in A is
/// Binomial(n, q) conditioned on a ≥ 1.
fn rewind_estimate_mean(q: f64, n: usize, cap: usize) -> f64 {
    assert_eq!(cap % n, 0);
    let mut binom = vec![0.0; n + 1];
    for (a, b) in binom.iter_mut().enumerate() {
        let ln_choose =
            ln_gamma(n as f64 + 1.0) - ln_gamma(a as f64 + 1.0) - ln_gamma((n - a) as f64 + 1.0);
        *b = (ln_choose + a as f64 * q.ln() + (n - a) as f64 * (1.0 - q).ln()).exp();
    }
    let mut e = 0.0;
    for b in 1..=cap / n {
        let reach = (1.0 - q).powi((n * (b - 1)) as i32);
        for (a, pa) in binom.iter().enumerate().skip(1) {
            e += reach * pa * ((n * b) as f64 / a as f64).ln();
        }
    }
    e / (1.0 - (1.0 - q).powi(cap as i32))
}

#[test]
fn rewind_kl_estimate_has_the_stated_law() {
    // What the kl_note says of log(draws/accepted): the maximum-likelihood estimate of
    // log 1/p(A), biased downwards for a batch of 1 (geometric draws) and with a law that
    // depends on the batch size N. Checked on the engine's own outputs: their mean matches
    // the exact expectation under the stopping rule, for N = 1 and N = 16.
    let note = KlNote::Rewind.explain();
    // kl_note is now a code; what the old free-text note said is in its explanation.
    assert!(
        note.contains("biased") && note.contains("depends on n"),
        "{note}"
    );
    let (_, dist) = reference();
    let threshold = 2.0;
    let q = acceptance_mass(&dist, threshold);
    assert!(q > 0.02 && q < 0.3, "p(A) = {q}");
    let cap = 1024;
    let e = letters_engine();
    let runs = 3000u64;
    let mut means = Vec::new();
    for n in [1usize, 16] {
        let (mut sum, mut sum2, mut count) = (0.0, 0.0, 0.0);
        for seed in 0..runs / CHOICES as u64 {
            let r = choices(
                req(
                    PROMPT,
                    rewind(n, threshold, cap),
                    7_000_003 * seed + 1,
                    MAX_NEW,
                ),
                CHOICES,
            );
            for out in e.generate(&r).unwrap().outputs {
                let est = out.kl_estimate.expect("accepted within the cap");
                assert_eq!(out.kl_note, KlNote::Rewind);
                assert_eq!(out.n, Some(n));
                sum += est;
                sum2 += est * est;
                count += 1.0;
            }
        }
        assert_eq!(count, runs as f64);
        let mean = sum / count;
        let se = ((sum2 / count - mean * mean) / count).sqrt();
        let exact = rewind_estimate_mean(q, n, cap);
        eprintln!(
            "rewind N={n}: mean estimate {mean:.4} ± {se:.4}, exact {exact:.4}, log 1/p(A) = {:.4}",
            (1.0 / q).ln()
        );
        assert!(
            (mean - exact).abs() < 4.0 * se,
            "N={n}: mean {mean} vs exact expectation {exact} (se {se})"
        );
        means.push((exact, se));
    }
    let target = (1.0 / q).ln();
    // N = 1: biased downwards, by more than the noise; N = 16 (N·p(A) > 1): much closer.
    assert!(means[0].0 < target - 0.2, "{} vs {target}", means[0].0);
    assert!((means[1].0 - target).abs() < (means[0].0 - target).abs() / 2.0);
    assert!((means[0].0 - means[1].0).abs() > 4.0 * (means[0].1 + means[1].1));
}
