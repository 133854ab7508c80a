//! The `tilt eval` engine: several strategies on the same prompts, judged against reference
//! samples, beside the exact theory for the reference samples' reward distribution.
//!
//! For every prompt, M reference samples are drawn from p and scored; they are the
//! yardstick. Each strategy then produces S outputs per prompt, and each output's
//! **win rate** is its share of reference samples it beats, ties counting ½
//! (arXiv 2401.01879 §5; tie convention of arXiv 2412.19792):
//!
//! ```text
//! w(y) = (1/M)·Σ_j ( 1[r(y) > r(y'_j)] + ½·1[r(y) = r(y'_j)] )
//! W = (1/P)·Σ_prompts  mean_s w(y_{prompt,s})
//! 95% CI: the percentile bootstrap over prompts (2000 resamples of the P per-prompt means,
//!         seeded by the run's seed): it stays inside [0, 1], as a win rate does, where a
//!         normal interval on two prompts gave [−0.48, 1.48]; conditional on the reference
//!         samples; null with fewer than 2 prompts)
//! ```
//!
//! **KL, and which**: `sample` costs 0 exactly; `bon:n` and `won:n` report the bound
//! log n − (n−1)/n (arXiv 2401.01879 Thm 3.1), `soft-bon` the bound log n; `cd-block` the
//! mean over outputs of
//! B·(log K − (K−1)/K), an unbiased estimate of its chain-rule bound
//! E_π[B]·(log K − (K−1)/K) ≥ KL(π‖p) on the expected KL (B the number of blocks; see
//! [`crate::cd::block`]), with its standard error; `cd-token` the Monte-Carlo estimate, the
//! mean of log π(y)/p(y) over its outputs (with its standard error). All in nats.
//!
//! **Exact curves**: per prompt, the empirical distribution of the M reference rewards
//! (mass 1/M each) gives, through tilt-core, best-of-n's exact KL, win rate and expected
//! reward for each n, and the KL-optimal tilt's at each KL budget (capped per prompt at its
//! largest reachable KL, −log p(argmax set)). The curves are the averages over prompts at
//! equal n (best-of-n) and at equal KL budget (tilt). They are what an ideal best-of-n or
//! tilt would score *against these same reference samples*, so a strategy's measured point
//! can be read against them directly.
//!
//! **Sharing draws**: `sample` and every `bon:n`, `won:n` and `soft-bon` of a prompt's
//! repetition s come from the same candidates (sample = the first, bon:n = the best of the
//! first n, ties uniform with that strategy's own selection stream). Each strategy's marginal law is exact; only the
//! strategies' errors are correlated, which costs nothing in bias and makes their
//! differences sharper.
//!
//! **Seeds**: a strategy's outputs depend on the run's seed and its own label, never on what
//! else is listed or in which order. Candidate d of repetition s of the selection strategies is drawn
//! with `seed` from stream `draw_stream(prompt, s·MAX_N + d)` (a fixed stride, so it does not
//! depend on the largest n listed); `bon:n` breaks ties with stream `selection_stream(prompt,
//! 0)` of [`strategy_seed`]`(seed, "bon:n")`; a cd strategy draws its S outputs with
//! [`strategy_seed`]`(seed, label)` from streams `draw_stream(prompt, 0..S)`; the reference
//! samples use `seed ^ REFERENCE_SEED_MIX`. The report holds no timings, so the same seed
//! and configuration give the same bytes, whatever the thread count.
//!
//! **On a remote engine** ([`evaluate_remote`]): the same draws, seeds and rules, the
//! samples asked of the engine with [`crate::remote::candidate_seed`] of the same draw
//! numbers (reference draw d with `seed ^ REFERENCE_SEED_MIX`, shared candidate
//! `s·MAX_N + d` with `seed`); cd strategies run through [`RemoteEngine::generate`] (so
//! `cd-token` and prefix scorers are refused up front). Prompts are drawn concurrently and
//! judged in prompt order, and the report names the engine.
//!
//! **Batching**: every job of a prompt — the reference samples, each repetition's shared
//! candidates, each cd output — runs on one stepper ([`crate::stepper`]), their rows in one
//! batch per step (up to the engine's `max_batch`); each reward call is as it would be alone
//! (one per job, the cd outputs of a strategy together), so the numbers do not depend on
//! the batching.

use crate::cd::WeightedSum;
use crate::cost::Rule;
use crate::engine::{make_job, Engine};
use crate::error::{EngineError, Result};
use crate::gold::{
    best_of_n_curve, strategy_gold, summarise_tails, GoldReport, PromptOutcome, ReferenceTails,
};
use crate::progress::Progress;
use crate::remote::{candidate_seed, RemoteEngine};
use crate::request::Input;
use crate::select::select;
use crate::stepper::{
    draw_stream, run_jobs, score_pairs, selection_stream, Finished, Group, GroupSpec, Job,
    JobOutput, OutputSpec, Prefilled, SampleJob,
};
use crate::strategy::{ScorerSpec, Strategy, WeightedScorer, MAX_N};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tilt_core::best_of_n::best_of_n;
use tilt_core::bounds::bon_kl_bound;
use tilt_core::tilt::tilt_by_kl;
use tilt_core::RewardDistribution;
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::Policy;
use tilt_rewards::Reward;

/// XOR-ed into the seed for the reference samples, so that they are independent of every
/// strategy's draws.
pub const REFERENCE_SEED_MIX: u64 = 0xD1B5_4A32_D192_ED03;

/// Resamples of the percentile bootstrap of the win rate's interval.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// The seed of the strategy labelled `label` (see [`Strategy::label`]) in a run with seed
/// `seed`: `seed` XOR the first 8 bytes (little-endian) of sha256(`label`). A stable hash of
/// the label, so that a strategy's outputs do not depend on the other strategies listed, nor
/// on their order, nor on the platform or the Rust version.
pub fn strategy_seed(seed: u64, label: &str) -> u64 {
    let digest = Sha256::digest(label.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    seed ^ u64::from_le_bytes(first)
}

fn bad_spec(problem: impl Into<String>) -> EngineError {
    EngineError::invalid("strategies", problem)
}

fn parse_count(what: &str, v: &str) -> Result<usize> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| bad_spec(format!("{what} = {v:?} is not a whole number")))?;
    if n == 0 {
        return Err(bad_spec(format!("{what} is 0; it must be at least 1")));
    }
    Ok(n)
}

fn parse_number(what: &str, v: &str) -> Result<f64> {
    v.trim()
        .parse()
        .map_err(|_| bad_spec(format!("{what} = {v:?} is not a number")))
}

/// The most weights a frontier sweeps.
pub const MAX_FRONTIER_WEIGHTS: usize = 64;

/// The two-reward frontier of controlled decoding: every cd strategy of `strategies` that
/// names no scorer becomes one strategy per weight w of `weights`, guided by
/// (1 − w)·V_a + w·V_b (`a`, `b` scorer names in the engine, typically trained on two
/// rewards); the other strategies stay as they are. Scored by both rewards (the second as
/// `gold_reward`), the outputs trace how much of one reward each weight trades for the other
/// (arXiv 2310.17022, multi-objective CD: scorers of several rewards combine linearly;
/// docs/theory.md §8).
///
/// # Errors
/// [`EngineError::Invalid`] naming `frontier_weights`: no weight, more than
/// [`MAX_FRONTIER_WEIGHTS`], a non-finite or repeated weight, or no cd strategy to sweep;
/// naming `scorer` when `a` and `b` are the same.
pub fn frontier_strategies(
    strategies: &[Strategy],
    a: &str,
    b: &str,
    weights: &[f64],
) -> Result<Vec<Strategy>> {
    if weights.is_empty() || weights.len() > MAX_FRONTIER_WEIGHTS {
        return Err(EngineError::invalid(
            "frontier_weights",
            format!(
                "{} weights; give 1 to {MAX_FRONTIER_WEIGHTS}",
                weights.len()
            ),
        ));
    }
    for (i, w) in weights.iter().enumerate() {
        if !w.is_finite() {
            return Err(EngineError::invalid(
                "frontier_weights",
                format!("{w} is not a finite weight"),
            ));
        }
        if weights[..i].contains(w) {
            return Err(EngineError::invalid(
                "frontier_weights",
                format!("{w} is listed twice"),
            ));
        }
    }
    if a == b {
        return Err(EngineError::invalid(
            "scorer",
            format!("the frontier needs two different scorers, {a:?} is given twice"),
        ));
    }
    let spec = |w: f64| {
        Some(ScorerSpec::Weighted(vec![
            WeightedScorer {
                name: a.to_string(),
                weight: 1.0 - w,
            },
            WeightedScorer {
                name: b.to_string(),
                weight: w,
            },
        ]))
    };
    let mut out = Vec::new();
    let mut swept = false;
    for s in strategies {
        if s.scorer() == Some(None) {
            swept = true;
            out.extend(weights.iter().map(|&w| s.with_scorer(spec(w))));
        } else {
            out.push(s.clone());
        }
    }
    if !swept {
        return Err(EngineError::invalid(
            "frontier_weights",
            "no cd-block or cd-token strategy to sweep the weight of",
        ));
    }
    Ok(out)
}

/// Parse a strategies list such as
/// `sample; bon:1,2,4,8,16; cd-block:K=4,M=8; cd-token:lambda=2,k=10`.
///
/// Strategies are separated by `;`; after a strategy's name and `:` come its arguments,
/// separated by `,`: `bon:N,N,…` and `won:N,N,…` (one strategy per n),
/// `soft-bon:n=N,lambda=L`, `cd-block:K=…,M=…`, `cd-token:lambda=…[,k=…]` (k default 10).
/// (An earlier syntax separated strategies by commas too, which made `sample,bogus` read as
/// an argument of `sample`; a list in that form is refused with a hint.)
///
/// # Errors
/// [`EngineError::Invalid`] naming `strategies` and the offending item: an unknown name, a
/// missing or zero K/M/n, λ < 0, a duplicate, an empty list.
pub fn parse_strategies(spec: &str) -> Result<Vec<Strategy>> {
    let mut out = Vec::new();
    if spec.trim().is_empty() {
        return Err(bad_spec("no strategies given"));
    }
    for raw in spec.split(';') {
        let item = raw.trim();
        if item.is_empty() {
            return Err(bad_spec(format!("an empty item in {spec:?}")));
        }
        let (name, args) = match item.split_once(':') {
            Some((n, a)) => (n.trim(), Some(a)),
            None => (item, None),
        };
        if name.contains(',') {
            return Err(bad_spec(format!(
                "{name:?} is not a strategy; separate strategies with ';' (e.g. \"sample; \
                 bon:2,4\")"
            )));
        }
        let args: Vec<&str> = args
            .map(|a| a.split(',').map(str::trim).collect())
            .unwrap_or_default();
        if args.iter().any(|a| a.is_empty()) {
            return Err(bad_spec(format!("{item:?}: an empty argument")));
        }
        let keyed = |allowed: &[&str]| -> Result<Vec<(String, String)>> {
            args.iter()
                .map(|a| match a.split_once('=') {
                    Some((k, v)) if allowed.contains(&k.trim()) => {
                        Ok((k.trim().to_string(), v.trim().to_string()))
                    }
                    _ => Err(bad_spec(format!(
                        "{name} argument {a:?}: expected {}",
                        allowed
                            .iter()
                            .map(|k| format!("{k}=…"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ))),
                })
                .collect()
        };
        let sampling = SamplingParams::default();
        match name {
            "sample" => {
                if !args.is_empty() {
                    return Err(bad_spec(format!("sample takes no arguments, got {args:?}")));
                }
                out.push(Strategy::Sample { sampling });
            }
            "bon" | "won" => {
                if args.is_empty() {
                    return Err(bad_spec(format!(
                        "{name} needs at least one n ({name}:1,2,4)"
                    )));
                }
                for a in &args {
                    let n = parse_count(&format!("{name} n"), a)?;
                    out.push(if name == "bon" {
                        Strategy::Bon { n, sampling }
                    } else {
                        Strategy::Won { n, sampling }
                    });
                }
            }
            "soft-bon" => {
                let (mut n, mut lambda) = (None, None);
                for (k, v) in keyed(&["n", "lambda"])? {
                    match k.as_str() {
                        "n" => n = Some(parse_count("soft-bon n", &v)?),
                        _ => lambda = Some(parse_number("soft-bon lambda", &v)?),
                    }
                }
                let (Some(n), Some(lambda)) = (n, lambda) else {
                    return Err(bad_spec(
                        "soft-bon needs n=… and lambda=… (soft-bon:n=4,lambda=0.5)",
                    ));
                };
                out.push(Strategy::SoftBon {
                    n,
                    lambda,
                    sampling,
                });
            }
            "cd-block" => {
                let (mut k, mut m) = (None, None);
                for (key, v) in keyed(&["K", "k", "M", "m"])? {
                    if key.eq_ignore_ascii_case("k") {
                        k = Some(parse_count("cd-block K", &v)?);
                    } else {
                        m = Some(parse_count("cd-block M", &v)?);
                    }
                }
                let (Some(k), Some(m)) = (k, m) else {
                    return Err(bad_spec(
                        "cd-block needs both K=… and M=… (cd-block:K=4,M=8)",
                    ));
                };
                out.push(Strategy::CdBlock { k, m, scorer: None });
            }
            "cd-token" => {
                let (mut lambda, mut top_k) = (None, crate::strategy::DEFAULT_CD_TOP_K);
                for (key, v) in keyed(&["lambda", "λ", "k"])? {
                    if key == "k" {
                        top_k = parse_count("cd-token k", &v)?;
                    } else {
                        lambda = Some(parse_number("cd-token lambda", &v)?);
                    }
                }
                let Some(lambda) = lambda else {
                    return Err(bad_spec("cd-token needs lambda=… (cd-token:lambda=2,k=10)"));
                };
                out.push(Strategy::CdToken {
                    lambda,
                    top_k,
                    scorer: None,
                });
            }
            "rewind" => {
                return Err(bad_spec(
                    "rewind is not evaluated by tilt eval (its KL is known only from its own \
                     draws); evaluate sample, bon, won, soft-bon, cd-block or cd-token",
                ))
            }
            other => {
                return Err(bad_spec(format!(
                    "unknown strategy {other:?} (sample, bon:N, won:N, soft-bon:n=…,lambda=…, \
                     cd-block:K=…,M=…, cd-token:lambda=…,k=…)"
                )))
            }
        }
    }
    for (i, s) in out.iter().enumerate() {
        s.validate()
            .map_err(|e| bad_spec(format!("{}: {e}", s.label())))?;
        if out[..i].iter().any(|o| o.label() == s.label()) {
            return Err(bad_spec(format!("{} is listed twice", s.label())));
        }
    }
    Ok(out)
}

/// Settings of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The strategies.
    pub strategies: Vec<Strategy>,
    /// Reference samples per prompt (M ≥ 1).
    pub reference_samples: usize,
    /// Outputs per strategy and prompt (S ≥ 1).
    pub samples_per_prompt: usize,
    /// Most new tokens per output.
    pub max_new_tokens: usize,
    /// The seed.
    pub seed: u64,
    /// Wrap prompts in the model's chat template.
    pub chat_template: bool,
    /// The reward's name in the engine (None: its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    /// A second reward of the engine, the *gold* one, that every output and reference
    /// sample is also scored with: the report then says how much of each strategy's gain
    /// on the proxy (`reward`) is a gain on the gold ([`crate::gold`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_reward: Option<String>,
}

impl EvalConfig {
    /// The selection strategies that share candidates (sample, bon, won, soft-bon).
    fn is_selection(s: &Strategy) -> bool {
        matches!(
            s,
            Strategy::Sample { .. }
                | Strategy::Bon { .. }
                | Strategy::Won { .. }
                | Strategy::SoftBon { .. }
        )
    }

    /// Check everything that can be checked without the models: M, S in [1, [`MAX_N`]], at
    /// least one new token and one strategy, each strategy valid, evaluable (not rewind) and
    /// drawn from p itself (temperature 1, no truncation: the win rate is against p).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming the parameter (`reference_samples`,
    /// `samples_per_prompt`, `max_new_tokens`, `strategies` with the item).
    pub fn validate(&self) -> Result<()> {
        for (param, v) in [
            ("reference_samples", self.reference_samples),
            ("samples_per_prompt", self.samples_per_prompt),
        ] {
            if v == 0 {
                return Err(EngineError::invalid(param, "is 0; at least 1"));
            }
            if v > MAX_N {
                return Err(EngineError::invalid(
                    param,
                    format!(
                        "{v} is above the cap of {MAX_N} (they are stepped as one batch, each \
                         with its own KV cache; split the work into several runs)"
                    ),
                ));
            }
        }
        if self.max_new_tokens == 0 {
            return Err(EngineError::invalid("max_new_tokens", "is 0; at least 1"));
        }
        if self.strategies.is_empty() {
            return Err(bad_spec("no strategies given"));
        }
        for s in &self.strategies {
            s.validate()
                .map_err(|e| bad_spec(format!("{}: {e}", s.label())))?;
            if matches!(s, Strategy::Rewind { .. }) {
                return Err(bad_spec(format!("{}: rewind is not evaluated", s.label())));
            }
            if s.sampling()
                .is_some_and(|p| *p != SamplingParams::default())
            {
                return Err(bad_spec(format!(
                    "{}: tilt eval draws every strategy from p itself (temperature 1, no \
                     truncation), since win rates are against p's samples; remove its sampling \
                     parameters",
                    s.label()
                )));
            }
        }
        Ok(())
    }

    /// The largest n of the selection strategies (sample counts 1); 0 when there are none.
    fn max_n(&self) -> usize {
        self.strategies
            .iter()
            .filter(|s| Self::is_selection(s))
            .map(|s| s.rows(usize::MAX))
            .max()
            .unwrap_or(0)
    }
}

/// One strategy's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyResult {
    /// Its label (`bon:4`, …).
    pub strategy: String,
    /// Outputs scored (P·S).
    pub outputs: usize,
    /// Mean reward of its outputs.
    pub mean_reward: f64,
    /// Standard error of the mean reward over prompts (null with one prompt).
    pub mean_reward_stderr: Option<f64>,
    /// Win rate against the reference samples, ties ½.
    pub win_rate: f64,
    /// Standard error of the win rate over prompts (null with one prompt).
    pub win_rate_stderr: Option<f64>,
    /// 95% percentile-bootstrap interval over prompts, within [0, 1] (null with one prompt).
    pub win_rate_ci95: Option<[f64; 2]>,
    /// KL(π‖p) in nats: see `kl_kind`.
    pub kl: f64,
    /// `exact`, `bound` or `estimate`.
    pub kl_kind: String,
    /// Standard error of `kl` when it is a mean over outputs (cd-token's estimate, cd-block's
    /// estimated bound).
    pub kl_stderr: Option<f64>,
    /// Mean number of generated tokens.
    pub mean_new_tokens: f64,
}

/// A point of an exact curve, averaged over prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// n for best-of-n, null for the tilt.
    pub n: Option<u64>,
    /// KL(π‖p), nats.
    pub kl: f64,
    /// Win rate over the reference samples, ties ½.
    pub win_rate: f64,
    /// Expected reward.
    pub expected_reward: f64,
}

/// The evaluation report (printed as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Per strategy, in the order given.
    pub strategies: Vec<StrategyResult>,
    /// The settings.
    pub config: EvalConfig,
    /// Number of prompts.
    pub prompts: usize,
    /// The reward's name.
    pub reward: String,
    /// The policy's name.
    pub policy: String,
    /// The scorers' names, when cd strategies used them.
    pub scorers: Vec<String>,
    /// Mean reward of the reference samples.
    pub reference_mean_reward: f64,
    /// Exact best-of-n on the reference samples' empirical distributions.
    pub exact_best_of_n: Vec<CurvePoint>,
    /// Exact KL-optimal tilt on the same.
    pub exact_tilt: Vec<CurvePoint>,
    /// Proxy against gold, when the config names a gold reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<GoldReport>,
    /// The remote engine every sample was drawn from (absent for a local policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::request::RemoteNote>,
    /// What the numbers are.
    pub notes: Vec<String>,
    /// Units of every divergence: `nats`.
    pub units: String,
}

/// Win rate of reward `r` against `refs`, ties ½.
fn win_against(r: f64, refs: &[f64]) -> f64 {
    let s: f64 = refs
        .iter()
        .map(|&x| {
            if r > x {
                1.0
            } else if r == x {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    s / refs.len() as f64
}

/// Mean and standard error of per-prompt values.
pub(crate) fn mean_se(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// The 95% percentile-bootstrap interval of the mean of `xs` (resampling the values with
/// replacement `resamples` times from a ChaCha20 stream of `seed`): the 2.5% and 97.5%
/// quantiles of the resampled means (Efron & Tibshirani, *An Introduction to the
/// Bootstrap*, §13.3). Every resampled mean lies within [min xs, max xs], so the interval
/// respects the range of the values. None for fewer than 2 values.
pub fn bootstrap_ci95(xs: &[f64], resamples: usize, seed: u64) -> Option<[f64; 2]> {
    if xs.len() < 2 || resamples == 0 {
        return None;
    }
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let n = xs.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Some([q(0.025), q(0.975)])
}

#[derive(Default, Clone)]
struct Acc {
    /// Per prompt: (sum reward, sum win, sum kl, sum tokens, count, sum gold reward).
    per_prompt: Vec<[f64; 6]>,
    kl_values: Vec<f64>,
}

/// One output's figures.
struct Scored {
    reward: f64,
    gold: f64,
    kl: f64,
    tokens: usize,
}

impl Acc {
    fn add(&mut self, prompt: usize, o: Scored, refs: &[f64]) {
        if self.per_prompt.len() <= prompt {
            self.per_prompt.resize(prompt + 1, [0.0; 6]);
        }
        let e = &mut self.per_prompt[prompt];
        e[0] += o.reward;
        e[1] += win_against(o.reward, refs);
        e[2] += o.kl;
        e[3] += o.tokens as f64;
        e[4] += 1.0;
        e[5] += o.gold;
        self.kl_values.push(o.kl);
    }
}

/// The gold scores of `texts` (zeros without a gold reward).
fn gold_scores<'t>(
    gold: Option<&Arc<dyn tilt_rewards::Reward>>,
    prompt: &str,
    texts: impl ExactSizeIterator<Item = &'t str>,
) -> Result<Vec<f64>> {
    match gold {
        Some(g) => score_pairs(g.as_ref(), texts.map(|t| (prompt, t))),
        None => Ok(vec![0.0; texts.len()]),
    }
}

fn sampled(f: Finished) -> Result<Vec<crate::stepper::SampledSequence>> {
    match f.output {
        JobOutput::Sampled(s) => Ok(s),
        JobOutput::Output(_) => Err(EngineError::Internal("expected sampled sequences".into())),
    }
}

/// One drawn text with its reward and length, whichever engine drew it.
pub(crate) struct Drawn {
    pub(crate) text: String,
    pub(crate) tokens: usize,
    pub(crate) reward: f64,
}

/// What one prompt's draws gave: the M reference samples, repetition s's `max_n` shared
/// candidates of the selection strategies, and each other strategy's S outputs (by its
/// index in the config).
pub(crate) struct PromptDraws {
    pub(crate) refs: Vec<Drawn>,
    pub(crate) shared: Vec<Vec<Drawn>>,
    pub(crate) others: Vec<(usize, Vec<crate::request::Output>)>,
}

/// The gold reward `config` names, resolved by `lookup` (the proxy itself refused).
fn resolve_gold<'r>(
    config: &EvalConfig,
    reward: &Arc<dyn Reward>,
    lookup: impl Fn(&str) -> Result<&'r Arc<dyn Reward>>,
) -> Result<Option<Arc<dyn Reward>>> {
    let Some(name) = config.gold_reward.as_deref() else {
        return Ok(None);
    };
    let g = Arc::clone(
        lookup(name).map_err(|e| EngineError::invalid("gold_reward", format!("{name:?}: {e}")))?,
    );
    if Arc::ptr_eq(&g, reward) {
        return Err(EngineError::invalid(
            "gold_reward",
            format!("{name:?} is the proxy reward itself; name a different reward as gold"),
        ));
    }
    Ok(Some(g))
}

/// The engine-independent part of an evaluation: every prompt's draws judged against its
/// reference samples, in prompt order, then the report.
struct Tally<'c> {
    config: &'c EvalConfig,
    reward: Arc<dyn Reward>,
    gold: Option<Arc<dyn Reward>>,
    accs: Vec<Acc>,
    ref_rewards: Vec<Vec<f64>>,
    ref_golds: Vec<Vec<f64>>,
}

impl<'c> Tally<'c> {
    fn new(config: &'c EvalConfig, reward: Arc<dyn Reward>, gold: Option<Arc<dyn Reward>>) -> Self {
        Tally {
            config,
            reward,
            gold,
            accs: vec![Acc::default(); config.strategies.len()],
            ref_rewards: Vec::new(),
            ref_golds: Vec::new(),
        }
    }

    /// Judge prompt `pi`'s draws (`prompt` is the text the rewards see).
    fn add(&mut self, pi: usize, prompt: &str, draws: PromptDraws) -> Result<()> {
        let config = self.config;
        let gold = self.gold.as_ref();
        let index = pi as u64;
        let refs: Vec<f64> = draws.refs.iter().map(|d| d.reward).collect();
        let ref_gold = gold_scores(gold, prompt, draws.refs.iter().map(|d| d.text.as_str()))?;
        let mut selectors: Vec<SequenceSampler> = config
            .strategies
            .iter()
            .map(|st| {
                SequenceSampler::new(
                    strategy_seed(config.seed, &st.label()),
                    selection_stream(index, 0),
                )
            })
            .collect();
        for cands in &draws.shared {
            let rewards: Vec<f64> = cands.iter().map(|d| d.reward).collect();
            let golds = gold_scores(gold, prompt, cands.iter().map(|d| d.text.as_str()))?;
            for (j, st) in config.strategies.iter().enumerate() {
                let (rule, n, kl) = match *st {
                    Strategy::Sample { .. } => (Rule::Sample, 1, 0.0),
                    Strategy::Bon { n, .. } => (Rule::Best, n, bon_kl_bound(n as u64)?),
                    Strategy::Won { n, .. } => (Rule::Worst, n, bon_kl_bound(n as u64)?),
                    Strategy::SoftBon { n, lambda, .. } => {
                        (Rule::Soft { lambda }, n, (n as f64).ln())
                    }
                    _ => continue,
                };
                let chosen = select(rule, None, &rewards[..n], &mut selectors[j])?;
                let o = Scored {
                    reward: rewards[chosen],
                    gold: golds[chosen],
                    kl,
                    tokens: cands[chosen].tokens,
                };
                self.accs[j].add(pi, o, &refs);
            }
        }
        for (j, outs) in &draws.others {
            let scores = score_pairs(
                self.reward.as_ref(),
                outs.iter().map(|o| (prompt, o.text.as_str())),
            )?;
            let golds = gold_scores(gold, prompt, outs.iter().map(|o| o.text.as_str()))?;
            for ((o, r), g) in outs.iter().zip(scores).zip(golds) {
                let kl = o.kl_estimate.or(o.kl_bound).unwrap_or(0.0);
                let s = Scored {
                    reward: r,
                    gold: g,
                    kl,
                    // A remote output carries no token ids: its length is its candidate's.
                    tokens: match o.candidates.get(o.selected) {
                        Some(c) if o.tokens.is_empty() => c.new_tokens,
                        _ => o.tokens.len(),
                    },
                };
                self.accs[*j].add(pi, s, &refs);
            }
        }
        self.ref_rewards.push(refs);
        self.ref_golds.push(ref_gold);
        Ok(())
    }

    /// The report, once every prompt is in.
    fn finish(
        self,
        policy: String,
        scorers: Vec<String>,
        engine: Option<crate::request::RemoteNote>,
    ) -> Result<EvalReport> {
        let config = self.config;
        let mut results = Vec::with_capacity(config.strategies.len());
        for (strat, acc) in config.strategies.iter().zip(&self.accs) {
            let per =
                |k: usize| -> Vec<f64> { acc.per_prompt.iter().map(|e| e[k] / e[4]).collect() };
            let (mean_reward, mean_reward_stderr) = mean_se(&per(0));
            let wins = per(1);
            let (win_rate, win_rate_stderr) = mean_se(&wins);
            let (kl, kl_kind, kl_stderr) = match strat {
                Strategy::Sample { .. } => (0.0, "exact", None),
                Strategy::Bon { .. } | Strategy::Won { .. } | Strategy::SoftBon { .. } => {
                    (mean_se(&acc.kl_values).0, "bound", None)
                }
                Strategy::CdBlock { .. } => {
                    let (m, se) = mean_se(&acc.kl_values);
                    (m, "bound", se)
                }
                _ => {
                    let (m, se) = mean_se(&acc.kl_values);
                    (m, "estimate", se)
                }
            };
            results.push(StrategyResult {
                strategy: strat.label(),
                outputs: acc.kl_values.len(),
                mean_reward,
                mean_reward_stderr,
                win_rate,
                win_rate_stderr,
                win_rate_ci95: bootstrap_ci95(
                    &wins,
                    BOOTSTRAP_RESAMPLES,
                    strategy_seed(config.seed, &format!("bootstrap {}", strat.label())),
                ),
                kl,
                kl_kind: kl_kind.into(),
                kl_stderr,
                mean_new_tokens: mean_se(&per(3)).0,
            });
        }
        let p = self.ref_rewards.len();
        let max_n = config.max_n();
        let (exact_best_of_n, exact_tilt) = exact_curves(&self.ref_rewards, max_n.max(16))?;
        let reference_mean_reward =
            self.ref_rewards.iter().flatten().sum::<f64>() / (p * config.reference_samples) as f64;
        let gold = match &self.gold {
            Some(g) => Some(gold_report(
                g.name(),
                config,
                &self.accs,
                self.ref_rewards
                    .iter()
                    .cloned()
                    .zip(self.ref_golds)
                    .collect(),
            )?),
            None => None,
        };
        let mut notes = eval_notes();
        if gold.is_some() {
            notes.push(GOLD_NOTE.into());
        }
        if engine.is_some() {
            notes.push(REMOTE_NOTE.into());
        }
        Ok(EvalReport {
            strategies: results,
            config: config.clone(),
            prompts: p,
            reward: self.reward.name(),
            policy,
            scorers,
            reference_mean_reward,
            exact_best_of_n,
            exact_tilt,
            gold,
            engine,
            notes,
            units: "nats".into(),
        })
    }
}

/// What an evaluation on a remote engine rests on.
const REMOTE_NOTE: &str = "engine: every reference sample, shared candidate and cd-block block was drawn from the remote engine named in `engine` (seeds as in tilt generate --engine); the rewards, selection rules and KL numbers are tilt's own and rest on the candidates and their rewards only, as locally";

/// The prompt checks every evaluation makes before any work.
fn check_prompts(prompts: &[Input]) -> Result<()> {
    if prompts.is_empty() {
        return Err(EngineError::invalid("prompts", "no prompts given"));
    }
    if prompts.len() >= 1 << 31 {
        return Err(EngineError::invalid("prompts", "too many prompts"));
    }
    Ok(())
}

/// `input` as the config says to send it (a bare prompt raw without the chat template).
fn as_configured(input: &Input, config: &EvalConfig) -> Input {
    match (input, config.chat_template) {
        (Input::Prompt(p), false) => Input::Raw(p.clone()),
        (other, _) => other.clone(),
    }
}

/// Run an evaluation on `engine` (see the module docs); `progress` counts prompts.
///
/// # Errors
/// [`EngineError::Invalid`] for a bad config, no prompts, a cd strategy without a scorer or
/// with one of the wrong size; the policy's and reward's errors.
pub fn evaluate<P: Policy>(
    engine: &Engine<P>,
    prompts: &[Input],
    config: &EvalConfig,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    config.validate()?;
    check_prompts(prompts)?;
    let policy = engine.policy();
    let reward = Arc::clone(engine.reward(config.reward.as_deref())?);
    let gold = resolve_gold(config, &reward, |name| engine.reward(Some(name)))?;
    // Every cd strategy's scorer, resolved before any work.
    let mut scorers: Vec<Option<Arc<WeightedSum>>> = Vec::new();
    for s in &config.strategies {
        scorers.push(match s.scorer() {
            Some(spec) => Some(engine.cd_scorer(spec)?),
            None => None,
        });
    }
    let max_n = config.max_n();
    let s_count = config.samples_per_prompt;
    let vocab = policy.vocab_size();
    // Refuse, before any work, what cannot fit in memory: the jobs of a prompt run up to
    // max_batch rows at once, and a job bigger than that alone.
    let job_rows: Vec<usize> = std::iter::once(config.reference_samples)
        .chain((0..if max_n > 0 { s_count } else { 0 }).map(|_| max_n))
        .chain(
            config
                .strategies
                .iter()
                .filter(|s| !EvalConfig::is_selection(s))
                .flat_map(|s| std::iter::repeat_n(s.rows(vocab), s_count)),
        )
        .collect();
    let largest = job_rows.iter().copied().max().unwrap_or(1);
    let largest_param = if largest == config.reference_samples {
        "reference_samples"
    } else {
        "strategies"
    };
    engine.check_memory(largest_param, largest, 0, config.max_new_tokens)?;
    // Each job fits alone; the jobs of a prompt together (up to max_batch rows) are what
    // samples_per_prompt multiplies.
    let at_once = largest.max(engine.max_batch().min(job_rows.iter().sum()));
    engine.check_memory("samples_per_prompt", at_once, 0, config.max_new_tokens)?;
    let spec = |seed: u64| GroupSpec {
        seed,
        sampling: SamplingParams::default(),
        max_new_tokens: config.max_new_tokens,
        stops: Arc::from(Vec::<String>::new()),
        keep_hidden: false,
    };
    let no_stops: Arc<[String]> = Arc::from(Vec::<String>::new());
    let mut tally = Tally::new(config, Arc::clone(&reward), gold);
    progress.begin("prompts", prompts.len() as u64);
    for (pi, input) in prompts.iter().enumerate() {
        let index = pi as u64;
        let input = as_configured(input, config);
        let tokens = engine.encode(&input, config.max_new_tokens)?;
        let prefill = Arc::new(Prefilled::new(policy, tokens)?);
        let prompt: Arc<str> = Arc::from(input.reward_prompt());
        let mut jobs: Vec<(usize, Box<dyn Job<P> + '_>)> = Vec::new();
        // The reference samples, then the shared candidates of each repetition.
        let streams: Vec<u64> = (0..config.reference_samples as u64)
            .map(|d| draw_stream(index, d))
            .collect();
        let g = Group::new(
            Arc::clone(&prefill),
            spec(config.seed ^ REFERENCE_SEED_MIX),
            &streams,
            0,
        );
        jobs.push((
            streams.len(),
            Box::new(SampleJob::new(
                g,
                Some((Arc::clone(&reward), Arc::clone(&prompt))),
            )),
        ));
        let reps = if max_n > 0 { s_count } else { 0 };
        for s in 0..reps {
            let streams: Vec<u64> = (0..max_n as u64)
                .map(|d| draw_stream(index, (s * MAX_N) as u64 + d))
                .collect();
            let g = Group::new(Arc::clone(&prefill), spec(config.seed), &streams, 0);
            jobs.push((
                max_n,
                Box::new(SampleJob::new(
                    g,
                    Some((Arc::clone(&reward), Arc::clone(&prompt))),
                )),
            ));
        }
        // Each cd strategy's S outputs: output s is choice s of a request with the
        // strategy's own seed (stream draw_stream(index, s)); scored together.
        let mut others: Vec<usize> = Vec::new();
        for (j, st) in config.strategies.iter().enumerate() {
            if EvalConfig::is_selection(st) {
                continue;
            }
            others.push(j);
            let seed = strategy_seed(config.seed, &st.label());
            for s in 0..s_count {
                let out = OutputSpec {
                    choice: s,
                    seed,
                    reward: Arc::clone(&reward),
                    prompt: Arc::clone(&prompt),
                };
                let job = make_job(
                    &prefill,
                    st,
                    index,
                    seed,
                    config.max_new_tokens,
                    &no_stops,
                    out,
                    scorers[j].as_ref(),
                    false,
                )?;
                jobs.push((st.rows(vocab), job));
            }
        }
        let mut results = run_jobs(policy, jobs, engine.max_batch(), |_| {})?.into_iter();
        let mut drawn = || -> Result<Vec<Drawn>> {
            sampled(results.next().ok_or_else(lost)?)?
                .into_iter()
                .map(|s| {
                    Ok(Drawn {
                        tokens: s.tokens.len(),
                        reward: s.reward.ok_or_else(lost)?,
                        text: s.text,
                    })
                })
                .collect::<Result<_>>()
        };
        let refs = drawn()?;
        let shared = (0..reps).map(|_| drawn()).collect::<Result<_>>()?;
        let mut draws = PromptDraws {
            refs,
            shared,
            others: Vec::with_capacity(others.len()),
        };
        for j in others {
            let outs = (0..s_count)
                .map(|_| match results.next().ok_or_else(lost)?.output {
                    JobOutput::Output(o) => Ok(*o),
                    JobOutput::Sampled(_) => Err(lost()),
                })
                .collect::<Result<_>>()?;
            draws.others.push((j, outs));
        }
        tally.add(pi, &prompt, draws)?;
        progress.advance("prompts", pi as u64 + 1);
    }
    progress.end("prompts");
    let mut scorer_names: Vec<String> = Vec::new();
    for name in scorers.iter().flatten().flat_map(|s| s.names()) {
        if !scorer_names.iter().any(|n| n == name) {
            scorer_names.push(name.to_string());
        }
    }
    tally.finish(policy.name().to_string(), scorer_names, None)
}

/// Run an evaluation with every sample drawn from a remote engine (see the module docs and
/// [`crate::remote`]): the same reference samples, shared candidates, seeds, selection
/// rules and KL numbers as [`evaluate`], the candidates from the engine. Up to the engine's
/// `max-concurrency` prompts are drawn at once; they are judged in prompt order, so the
/// report does not depend on the concurrency.
///
/// # Errors
/// [`EngineError::Invalid`] for a bad config, no prompts, `cd-token` or a prefix scorer
/// (naming `strategies`), before any request; the engine's and rewards' errors. Nothing
/// partial is returned.
pub fn evaluate_remote(
    engine: &RemoteEngine,
    prompts: &[Input],
    config: &EvalConfig,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    config.validate()?;
    check_prompts(prompts)?;
    for st in &config.strategies {
        match st {
            Strategy::CdToken { .. } => {
                return Err(EngineError::invalid(
                    "strategies",
                    format!(
                        "{} cannot run on a remote engine: it needs the full next-token \
                         distribution and a scorer on the model's hidden states, which an \
                         OpenAI-style API does not expose",
                        st.label()
                    ),
                ))
            }
            Strategy::CdBlock {
                scorer: Some(_), ..
            } => {
                return Err(EngineError::invalid(
                    "strategies",
                    format!(
                        "{}: a prefix scorer reads the model's hidden states, which a remote \
                         engine does not expose; on a remote engine cd-block is guided by the \
                         reward of the partial text (give no scorer)",
                        st.label()
                    ),
                ))
            }
            _ => {}
        }
    }
    let reward = Arc::clone(engine.reward(config.reward.as_deref())?);
    let gold = resolve_gold(config, &reward, |name| engine.reward(Some(name)))?;
    let inputs: Vec<Input> = prompts.iter().map(|i| as_configured(i, config)).collect();
    // Every prompt renders (and a cd-block prompt is a text) before any request.
    for input in &inputs {
        input.validate()?;
        let p = engine.prompt_of(input)?;
        if !matches!(p, tilt_remote::Prompt::Text(_))
            && config
                .strategies
                .iter()
                .any(|s| matches!(s, Strategy::CdBlock { .. }))
        {
            return Err(crate::remote::cd_block_needs_text());
        }
    }
    let mut tally = Tally::new(config, Arc::clone(&reward), gold);
    let mut failure: Option<EngineError> = None;
    let mut note: Option<crate::request::RemoteNote> = None;
    progress.begin("prompts", inputs.len() as u64);
    crate::remote::in_order(
        &inputs,
        engine.parallel(),
        |pi, input| remote_draws(engine, pi as u64, input, config, &reward),
        |pi, got| {
            let step = got.and_then(|(draws, n)| {
                note.get_or_insert(n);
                tally.add(pi, inputs[pi].reward_prompt(), draws)
            });
            match step {
                Ok(()) => {
                    progress.advance("prompts", pi as u64 + 1);
                    true
                }
                Err(e) => {
                    failure = Some(EngineError::context(format!("prompt {}", pi + 1), e));
                    false
                }
            }
        },
    );
    progress.end("prompts");
    if let Some(e) = failure {
        return Err(e);
    }
    let note = note.ok_or_else(lost)?;
    let policy = format!("{} at {}", note.model, note.url);
    tally.finish(policy, Vec::new(), Some(note))
}

/// One prompt's draws on a remote engine, and how they were drawn.
fn remote_draws(
    engine: &RemoteEngine,
    index: u64,
    input: &Input,
    config: &EvalConfig,
    reward: &Arc<dyn Reward>,
) -> Result<(PromptDraws, crate::request::RemoteNote)> {
    let drawn = |seeds: Vec<u64>| -> Result<Vec<Drawn>> {
        Ok(engine
            .candidates(input, &seeds, config.max_new_tokens, reward)?
            .into_iter()
            .map(|c| Drawn {
                tokens: c.new_tokens,
                reward: c.reward,
                text: c.text,
            })
            .collect())
    };
    let seeds = |seed: u64, first: u64, count: usize| -> Vec<u64> {
        (0..count as u64)
            .map(|d| candidate_seed(seed, index, first + d))
            .collect()
    };
    let refs = drawn(seeds(
        config.seed ^ REFERENCE_SEED_MIX,
        0,
        config.reference_samples,
    ))?;
    let max_n = config.max_n();
    let reps = if max_n > 0 {
        config.samples_per_prompt
    } else {
        0
    };
    let shared = (0..reps)
        .map(|s| drawn(seeds(config.seed, (s * MAX_N) as u64, max_n)))
        .collect::<Result<_>>()?;
    let mut others = Vec::new();
    for (j, st) in config.strategies.iter().enumerate() {
        if EvalConfig::is_selection(st) {
            continue;
        }
        let mut params = crate::request::Params::new(st.clone());
        params.choices = config.samples_per_prompt;
        params.seed = strategy_seed(config.seed, &st.label());
        params.max_new_tokens = config.max_new_tokens;
        params.reward = config.reward.clone();
        let request = crate::request::Request {
            input: input.clone(),
            index,
            params,
        };
        others.push((j, engine.generate(&request)?.outputs));
    }
    let note = engine.note(input);
    Ok((
        PromptDraws {
            refs,
            shared,
            others,
        },
        note,
    ))
}

/// The proxy-against-gold part of the report (see [`crate::gold`]).
fn gold_report(
    name: String,
    config: &EvalConfig,
    accs: &[Acc],
    refs: Vec<(Vec<f64>, Vec<f64>)>,
) -> Result<GoldReport> {
    let tails: Vec<ReferenceTails> = refs
        .iter()
        .map(|(r, g)| ReferenceTails::new(r, g))
        .collect::<Result<_>>()?;
    let mut strategies = Vec::with_capacity(accs.len());
    for (st, acc) in config.strategies.iter().zip(accs) {
        let outcomes: Vec<PromptOutcome> = acc
            .per_prompt
            .iter()
            .map(|e| PromptOutcome {
                proxy: e[0] / e[4],
                gold: e[5] / e[4],
                kl: e[2] / e[4],
            })
            .collect();
        let label = st.label();
        strategies.push(strategy_gold(
            &label,
            &outcomes,
            &tails,
            strategy_seed(config.seed, &format!("bootstrap gold {label}")),
        )?);
    }
    let count = refs.iter().map(|(_, g)| g.len()).sum::<usize>() as f64;
    Ok(GoldReport {
        reward: name,
        reference_mean_reward: refs.iter().flat_map(|(_, g)| g).sum::<f64>() / count,
        tails: summarise_tails(&tails),
        best_of_n: best_of_n_curve(&refs, &tails)?,
        strategies,
    })
}

fn eval_notes() -> Vec<String> {
    vec![
            "win_rate: share of the prompt's reference samples beaten, ties 1/2, averaged over outputs then prompts; win_rate_stderr: its standard error over per-prompt means; win_rate_ci95: 95% percentile bootstrap over prompts (2000 resamples), within [0, 1], conditional on the reference samples".into(),
            "kl_kind: exact (sample: 0), bound (bon:n and won:n: log n - (n-1)/n, arXiv 2401.01879 Thm 3.1; soft-bon: log n; cd-block: the mean over outputs of B·(log K - (K-1)/K), B an output's number of blocks, which estimates (with kl_stderr) the chain-rule bound E[B]·(log K - (K-1)/K) on the expected KL), estimate (cd-token: mean of the exact log pi(y)/p(y) over outputs, an unbiased Monte-Carlo estimate of KL, with its standard error)".into(),
            "seeds: each strategy's outputs depend only on the run's seed and its own label (not on the other strategies listed or their order); sample, bon, won and soft-bon share candidates".into(),
            "exact_best_of_n / exact_tilt: tilt-core's exact values for the empirical distribution of each prompt's reference rewards, averaged over prompts at equal n / equal KL budget (capped per prompt at -log p(argmax set))".into(),
        ]
}

/// What the gold section's numbers are.
const GOLD_NOTE: &str = "gold: every output and reference sample is also scored by the gold reward r*; improvements are means over prompts of (strategy mean - reference-sample mean), with standard errors and 95% bootstrap intervals over prompts; bounds (arXiv 2406.05883) per prompt with the strategy's KL and one-sided sub-Gaussian proxies sigma2 = sup_{l>0} 2 log E_p e^{l(f - E_p f)}/l^2 estimated on that prompt's reference samples, then averaged: proxy_bound = sqrt(2 sigma2(r) KL), gold_bound = sqrt(2 sigma2(r*) KL), gold_transfer_interval = [D_r - sqrt(2 sigma2(e) KL), D_r + sqrt(2 sigma2(-e) KL)] with e = r - r* and D_r the measured proxy improvement (the gold improvement is also at most gold_bound); best_of_n: exact best-of-n under the proxy on each prompt's reference samples (with replacement, ties uniform), n = 1..64, where every bound holds exactly";

fn lost() -> EngineError {
    EngineError::Internal("an evaluation job's result was missing".into())
}

/// The exact best-of-n (n = 1, 2, 4, … ≤ `n_max`) and tilt (25 KL budgets) curves,
/// averaged over prompts, for the empirical distributions of `refs` (see the module docs).
///
/// # Errors
/// An empty or non-finite set of reference rewards.
pub fn exact_curves(refs: &[Vec<f64>], n_max: usize) -> Result<(Vec<CurvePoint>, Vec<CurvePoint>)> {
    let dists: Vec<RewardDistribution> = refs
        .iter()
        .map(|r| RewardDistribution::from_samples(r))
        .collect::<std::result::Result<_, _>>()?;
    let p = dists.len() as f64;
    let mut bon = Vec::new();
    let mut n = 1u64;
    while n as usize <= n_max {
        let mut pt = CurvePoint {
            n: Some(n),
            kl: 0.0,
            win_rate: 0.0,
            expected_reward: 0.0,
        };
        for d in &dists {
            let b = best_of_n(d, n)?;
            pt.kl += b.kl / p;
            pt.win_rate += b.win_rate / p;
            pt.expected_reward += b.expected_reward / p;
        }
        bon.push(pt);
        n *= 2;
    }
    // Largest reachable KL per prompt: −log p(argmax set).
    let max_kls: Vec<f64> = refs
        .iter()
        .map(|r| {
            let top = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let count = r.iter().filter(|&&x| x == top).count();
            -((count as f64) / r.len() as f64).ln()
        })
        .collect();
    let kl_top = max_kls.iter().copied().fold(0.0, f64::max);
    let mut tilt = Vec::new();
    let steps = 24;
    for i in 0..=steps {
        let budget = kl_top * i as f64 / steps as f64;
        let mut pt = CurvePoint {
            n: None,
            kl: 0.0,
            win_rate: 0.0,
            expected_reward: 0.0,
        };
        for (d, &mk) in dists.iter().zip(&max_kls) {
            // Just inside the reachable range (the endpoint itself is the λ → ∞ limit).
            let t = tilt_by_kl(d, budget.min(mk * (1.0 - 1e-9)))?;
            pt.kl += t.kl / p;
            pt.win_rate += t.win_rate / p;
            pt.expected_reward += t.expected_reward / p;
        }
        tilt.push(pt);
    }
    Ok((bon, tilt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontier_sweeps_each_cd_strategy_over_the_weights() {
        let base =
            parse_strategies("sample; bon:2; cd-block:K=2,M=3; cd-token:lambda=2,k=3").unwrap();
        let out = frontier_strategies(&base, "a", "b", &[0.0, 0.25, 1.0]).unwrap();
        let labels: Vec<String> = out.iter().map(Strategy::label).collect();
        assert_eq!(
            labels,
            [
                "sample",
                "bon:2",
                "cd-block:K=2,M=3,w=1/0",
                "cd-block:K=2,M=3,w=0.75/0.25",
                "cd-block:K=2,M=3,w=0/1",
                "cd-token:lambda=2,k=3,w=1/0",
                "cd-token:lambda=2,k=3,w=0.75/0.25",
                "cd-token:lambda=2,k=3,w=0/1",
            ]
        );
        match out[3].scorer() {
            Some(Some(ScorerSpec::Weighted(t))) => {
                assert_eq!((t[0].name.as_str(), t[0].weight), ("a", 0.75));
                assert_eq!((t[1].name.as_str(), t[1].weight), ("b", 0.25));
            }
            other => panic!("{other:?}"),
        }
        // Distinct labels: each point is seeded on its own, and the config validates.
        let config = EvalConfig {
            strategies: out,
            reference_samples: 2,
            samples_per_prompt: 1,
            max_new_tokens: 2,
            seed: 0,
            chat_template: false,
            reward: None,
            gold_reward: Some("g".into()),
        };
        config.validate().unwrap();
        for (weights, a, b, param) in [
            (vec![], "a", "b", "frontier_weights"),
            (vec![0.5, 0.5], "a", "b", "frontier_weights"),
            (vec![f64::NAN], "a", "b", "frontier_weights"),
            (vec![0.5], "a", "a", "scorer"),
        ] {
            let e = frontier_strategies(&base, a, b, &weights).unwrap_err();
            assert_eq!(e.param(), Some(param), "{e}");
        }
        let none = parse_strategies("sample; bon:2").unwrap();
        let e = frontier_strategies(&none, "a", "b", &[0.5]).unwrap_err();
        assert!(e.to_string().contains("no cd-block or cd-token"), "{e}");
    }

    #[test]
    fn parses_the_strategy_list_and_rejects_bad_specs() {
        let s = parse_strategies(
            "sample; bon:1,2,4,8,16; won:2; soft-bon:n=4,lambda=0.5; cd-block:K=4,M=8; cd-token:lambda=2.5,k=5",
        )
        .unwrap();
        let labels: Vec<String> = s.iter().map(Strategy::label).collect();
        assert_eq!(
            labels,
            [
                "sample",
                "bon:1",
                "bon:2",
                "bon:4",
                "bon:8",
                "bon:16",
                "won:2",
                "soft-bon:n=4,lambda=0.5",
                "cd-block:K=4,M=8",
                "cd-token:lambda=2.5,k=5"
            ]
        );
        for (bad, needle) in [
            ("", "no strategies"),
            ("sample;;bon:2", "empty item"),
            ("bon:0", "at least 1"),
            ("bon:x", "whole number"),
            ("cd-block:K=4", "both K"),
            ("cd-block:K=0,M=8", "at least 1"),
            ("cd-token:lambda=-1", "≥ 0"),
            ("cd-token:k=3", "needs lambda"),
            ("best:3", "unknown strategy"),
            ("foo", "unknown strategy"),
            ("bon:2;bon:2", "twice"),
            ("sample:3", "no arguments"),
            ("sample,bogus", "separate strategies with ';'"),
            ("sample,bon:2", "separate strategies with ';'"),
            ("rewind:n=2", "not evaluated"),
            ("soft-bon:n=2", "needs n=… and lambda"),
        ] {
            let e = parse_strategies(bad).unwrap_err();
            assert_eq!(e.param(), Some("strategies"), "{bad}: {e}");
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn the_bootstrap_interval_stays_in_the_range_of_the_values() {
        // Two prompts, one won everything and one nothing: a normal interval is [-0.48,
        // 1.48]; the bootstrap's is inside [0, 1].
        let ci = bootstrap_ci95(&[0.0, 1.0], 2000, 7).unwrap();
        assert!(
            ci[0] >= 0.0 && ci[1] <= 1.0 && ci[0] < 0.5 && ci[1] > 0.5,
            "{ci:?}"
        );
        assert_eq!(bootstrap_ci95(&[0.3], 2000, 7), None);
        // Seeded: the same values and seed, the same interval.
        let xs = [0.2, 0.4, 0.9, 0.5, 0.55];
        assert_eq!(bootstrap_ci95(&xs, 500, 1), bootstrap_ci95(&xs, 500, 1));
        // Its centre is near the mean for a spread sample, and it narrows with more data.
        let many: Vec<f64> = (0..200).map(|i| ((i * 37) % 100) as f64 / 100.0).collect();
        let w = bootstrap_ci95(&many, 2000, 3).unwrap();
        let m = many.iter().sum::<f64>() / 200.0;
        assert!(
            w[0] < m && m < w[1] && w[1] - w[0] < 0.1,
            "{w:?} around {m}"
        );
    }

    #[test]
    fn win_rate_counts_ties_as_half() {
        assert_eq!(win_against(1.0, &[0.0, 1.0, 2.0, 1.0]), 0.5);
        assert_eq!(win_against(3.0, &[0.0, 1.0]), 1.0);
    }

    #[test]
    fn exact_curves_start_at_the_reference_and_grow() {
        let refs = vec![vec![0.0, 1.0, 2.0, 3.0], vec![1.0, 1.0, 5.0, 2.0]];
        let (bon, tilt) = exact_curves(&refs, 4).unwrap();
        assert_eq!(bon.len(), 3);
        // n = 1 is the reference itself: KL 0, win rate 1/2, mean reward.
        assert!(bon[0].kl.abs() < 1e-12);
        assert!((bon[0].win_rate - 0.5).abs() < 1e-12);
        assert!((bon[0].expected_reward - (1.5 + 2.25) / 2.0).abs() < 1e-12);
        assert!(bon[2].win_rate > bon[1].win_rate && bon[1].win_rate > 0.5);
        assert!(tilt[0].kl.abs() < 1e-9 && (tilt[0].win_rate - 0.5).abs() < 1e-9);
        for w in tilt.windows(2) {
            assert!(
                w[1].kl >= w[0].kl - 1e-12 && w[1].expected_reward >= w[0].expected_reward - 1e-9
            );
        }
        // At equal KL the tilt has at least best-of-n's expected reward (it is KL-optimal),
        // checked per prompt where both are exact.
        for r in &refs {
            let d = RewardDistribution::from_samples(r).unwrap();
            for n in [2u64, 4] {
                let b = best_of_n(&d, n).unwrap();
                let t = tilt_by_kl(&d, b.kl).unwrap();
                assert!(t.expected_reward >= b.expected_reward - 1e-9);
            }
        }
    }
}
