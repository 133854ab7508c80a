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
//! 95% CI: W ± 1.96·sd(per-prompt means)/√P   (normal interval over prompts, conditional on
//!         the reference samples; null with fewer than 2 prompts)
//! ```
//!
//! **KL, and which**: `sample` costs 0 exactly; `bon:n` reports the bound
//! log n − (n−1)/n (arXiv 2401.01879 Thm 3.1); `cd-block` the mean over outputs of
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
//! **Sharing draws**: `sample` and every `bon:n` of a prompt's repetition s come from the
//! same candidates (sample = the first, bon:n = the best of the first n, ties uniform with
//! that strategy's own selection stream). Each strategy's marginal law is exact; only the
//! strategies' errors are correlated, which costs nothing in bias and makes their
//! differences sharper.
//!
//! **Seeds**: a strategy's outputs depend on the run's seed and its own label, never on what
//! else is listed or in which order. Candidate d of repetition s of `sample`/`bon` is drawn
//! with `seed` from stream `draw_stream(prompt, s·MAX_N + d)` (a fixed stride, so it does not
//! depend on the largest n listed); `bon:n` breaks ties with stream `selection_stream(prompt)`
//! of [`strategy_seed`]`(seed, "bon:n")`; a cd strategy draws its S outputs with
//! [`strategy_seed`]`(seed, label)` from streams `draw_stream(prompt, 0..S)`; the reference
//! samples use `seed ^ REFERENCE_SEED_MIX`. The report holds no timings, so the same seed
//! and configuration give the same bytes, whatever the thread count.

use crate::cd::{cd_block_generate, cd_token_generate, CdBlockParams, CdTokenParams, PrefixScorer};
use crate::generate::{
    draw_stream, encode_prompt, prefill_prompt, sample_continuations, score_sequences,
    selection_stream, MAX_N,
};
use crate::select::select_best;
use crate::DecodeError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tilt_core::best_of_n::best_of_n;
use tilt_core::bounds::bon_kl_bound;
use tilt_core::tilt::tilt_by_kl;
use tilt_core::RewardDistribution;
use tilt_models::sampling::{SamplingParams, SequenceSampler};
use tilt_models::{Policy, TokenId};
use tilt_rewards::Reward;

/// XOR-ed into the seed for the reference samples, so that they are independent of every
/// strategy's draws.
pub const REFERENCE_SEED_MIX: u64 = 0xD1B5_4A32_D192_ED03;

/// The seed of the strategy labelled `label` (see [`EvalStrategy::label`]) in a run with
/// seed `seed`: `seed` XOR the first 8 bytes (little-endian) of sha256(`label`). A stable
/// hash of the label, so that a strategy's outputs do not depend on the other strategies
/// listed, nor on their order, nor on the platform or the Rust version.
pub fn strategy_seed(seed: u64, label: &str) -> u64 {
    let digest = Sha256::digest(label.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    seed ^ u64::from_le_bytes(first)
}

/// One strategy of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum EvalStrategy {
    /// A plain draw from p.
    Sample,
    /// Best-of-n under the reward.
    Bon {
        /// n ≥ 1.
        n: usize,
    },
    /// Blockwise controlled decoding (best-of-K per block of M tokens under V).
    CdBlock {
        /// K ≥ 1.
        k: usize,
        /// M ≥ 1.
        m: usize,
    },
    /// Token-level controlled decoding.
    CdToken {
        /// λ ≥ 0.
        lambda: f64,
        /// Candidates per step.
        top_k: usize,
    },
}

impl EvalStrategy {
    /// The label used in outputs: `sample`, `bon:4`, `cd-block:K=4,M=8`,
    /// `cd-token:lambda=2,k=10`.
    pub fn label(&self) -> String {
        match self {
            EvalStrategy::Sample => "sample".into(),
            EvalStrategy::Bon { n } => format!("bon:{n}"),
            EvalStrategy::CdBlock { k, m } => format!("cd-block:K={k},M={m}"),
            EvalStrategy::CdToken { lambda, top_k } => {
                format!("cd-token:lambda={lambda},k={top_k}")
            }
        }
    }

    /// Whether it needs a prefix scorer.
    pub fn needs_scorer(&self) -> bool {
        matches!(
            self,
            EvalStrategy::CdBlock { .. } | EvalStrategy::CdToken { .. }
        )
    }
}

fn bad_spec(problem: impl Into<String>) -> DecodeError {
    DecodeError::invalid("--strategies", problem)
}

fn parse_usize(what: &str, v: &str) -> Result<usize, DecodeError> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| bad_spec(format!("{what} = {v:?} is not a whole number")))?;
    if n == 0 {
        return Err(bad_spec(format!("{what} is 0; it must be at least 1")));
    }
    Ok(n)
}

/// Parse a strategies list such as `sample,bon:1,2,4,8,16,cd-block:K=4,M=8,cd-token:lambda=2,k=10`.
///
/// Items are separated by commas; an item `name:first` starts a strategy and the items after
/// it without a `:` continue its arguments (`bon:1,2,4` is three best-of-n's;
/// `cd-block:K=4,M=8` one cd-block). `cd-token` takes `lambda=` (≥ 0) and `k=` (default 10).
///
/// # Errors
/// [`DecodeError::InvalidInput`] naming `--strategies` and the offending item: an unknown
/// name, a missing or zero K/M/n, λ < 0, a duplicate, an empty list.
pub fn parse_strategies(spec: &str) -> Result<Vec<EvalStrategy>, DecodeError> {
    // Group items into (name, args).
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for raw in spec.split(',') {
        let item = raw.trim();
        if item.is_empty() {
            return Err(bad_spec(format!("empty item in {spec:?}")));
        }
        let is_name = |s: &str| matches!(s, "sample" | "bon" | "cd-block" | "cd-token");
        if let Some((name, first)) = item.split_once(':') {
            groups.push((name.trim().to_string(), vec![first.trim().to_string()]));
        } else if is_name(item) {
            groups.push((item.to_string(), Vec::new()));
        } else if let Some((_, args)) = groups.last_mut() {
            args.push(item.to_string());
        } else {
            return Err(bad_spec(format!(
                "{item:?} is not a strategy (sample, bon:N, cd-block:K=…,M=…, cd-token:lambda=…,k=…)"
            )));
        }
    }
    let mut out = Vec::new();
    for (name, args) in groups {
        match name.as_str() {
            "sample" => {
                if !args.is_empty() {
                    return Err(bad_spec(format!("sample takes no arguments, got {args:?}")));
                }
                out.push(EvalStrategy::Sample);
            }
            "bon" => {
                if args.is_empty() {
                    return Err(bad_spec("bon needs at least one n (bon:1,2,4)"));
                }
                for a in &args {
                    out.push(EvalStrategy::Bon {
                        n: parse_usize("bon n", a)?,
                    });
                }
            }
            "cd-block" => {
                let (mut k, mut m) = (None, None);
                for a in &args {
                    match a.split_once('=') {
                        Some(("K" | "k", v)) => k = Some(parse_usize("cd-block K", v)?),
                        Some(("M" | "m", v)) => m = Some(parse_usize("cd-block M", v)?),
                        _ => {
                            return Err(bad_spec(format!(
                                "cd-block argument {a:?}: expected K=… or M=…"
                            )))
                        }
                    }
                }
                let (Some(k), Some(m)) = (k, m) else {
                    return Err(bad_spec(
                        "cd-block needs both K=… and M=… (cd-block:K=4,M=8)",
                    ));
                };
                out.push(EvalStrategy::CdBlock { k, m });
            }
            "cd-token" => {
                let (mut lambda, mut top_k) = (None, 10usize);
                for a in &args {
                    match a.split_once('=') {
                        Some(("lambda" | "λ", v)) => {
                            let l: f64 = v.trim().parse().map_err(|_| {
                                bad_spec(format!("cd-token lambda = {v:?} is not a number"))
                            })?;
                            if !(l.is_finite() && l >= 0.0) {
                                return Err(bad_spec(format!(
                                    "cd-token lambda = {l}; λ must be a finite number ≥ 0"
                                )));
                            }
                            lambda = Some(l);
                        }
                        Some(("k", v)) => top_k = parse_usize("cd-token k", v)?,
                        _ => {
                            return Err(bad_spec(format!(
                                "cd-token argument {a:?}: expected lambda=… or k=…"
                            )))
                        }
                    }
                }
                let Some(lambda) = lambda else {
                    return Err(bad_spec("cd-token needs lambda=… (cd-token:lambda=2,k=10)"));
                };
                out.push(EvalStrategy::CdToken { lambda, top_k });
            }
            other => {
                return Err(bad_spec(format!(
                    "unknown strategy {other:?} (sample, bon, cd-block, cd-token)"
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(bad_spec("no strategies given"));
    }
    for (i, s) in out.iter().enumerate() {
        if out[..i].contains(s) {
            return Err(bad_spec(format!("{} is listed twice", s.label())));
        }
    }
    Ok(out)
}

/// Settings of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// The strategies.
    pub strategies: Vec<EvalStrategy>,
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
}

/// A batch of sequences that an evaluation steps at once, and the input that sets its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The flag (and item) to lower: `--reference-samples`, `--strategies bon:16`, …
    pub input: String,
    /// Sequences stepped together.
    pub sequences: usize,
}

impl EvalConfig {
    /// Check everything that can be checked without the models: M, S ≥ 1 and at most
    /// [`MAX_N`], at least one new token, at least one strategy, n ≤ [`MAX_N`] for every
    /// `bon:n`, and the cd parameters (K ≤ [`MAX_N`]).
    ///
    /// # Errors
    /// [`DecodeError::InvalidInput`] naming the flag (`--reference-samples`,
    /// `--samples-per-prompt`, `--max-new-tokens`, `--strategies` with the item).
    pub fn validate(&self) -> Result<(), DecodeError> {
        for (flag, v) in [
            ("--reference-samples", self.reference_samples),
            ("--samples-per-prompt", self.samples_per_prompt),
        ] {
            if v == 0 {
                return Err(DecodeError::invalid(flag, "is 0; at least 1"));
            }
            if v > MAX_N {
                return Err(DecodeError::invalid(
                    flag,
                    format!(
                        "{v} is above the cap of {MAX_N} (they are stepped as one batch, each \
                         with its own KV cache; split the work into several runs)"
                    ),
                ));
            }
        }
        if self.max_new_tokens == 0 {
            return Err(DecodeError::invalid("--max-new-tokens", "is 0; at least 1"));
        }
        if self.strategies.is_empty() {
            return Err(bad_spec("no strategies given"));
        }
        for s in &self.strategies {
            match *s {
                EvalStrategy::Bon { n } if n > MAX_N => {
                    return Err(bad_spec(format!(
                        "{}: n = {n} is above the cap of {MAX_N} candidates (each needs its \
                         own KV cache)",
                        s.label()
                    )))
                }
                EvalStrategy::CdBlock { k, m } => CdBlockParams {
                    k,
                    m,
                    max_new_tokens: self.max_new_tokens,
                    seed: 0,
                }
                .validate()
                .map_err(|e| bad_spec(format!("{}: {e}", s.label())))?,
                EvalStrategy::CdToken { lambda, top_k } => CdTokenParams {
                    lambda,
                    top_k,
                    max_new_tokens: self.max_new_tokens,
                    seed: 0,
                }
                .validate()
                .map_err(|e| bad_spec(format!("{}: {e}", s.label())))?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The largest n of `sample` (1) and the `bon:n` listed; 0 when there are none.
    fn max_n(&self) -> usize {
        self.strategies
            .iter()
            .map(|s| match s {
                EvalStrategy::Bon { n } => *n,
                EvalStrategy::Sample => 1,
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// Every batch the evaluation steps at once, for a policy with `vocab` tokens: the M
    /// reference samples, the max-n candidates of sample/bon, the K continuations of each
    /// cd-block, and the S·min(k, vocab) children of each cd-token step. Batches run one
    /// after another, so memory must hold the largest (check each with
    /// [`crate::generate::check_batch_memory`]).
    pub fn batches(&self, vocab: usize) -> Vec<Batch> {
        let mut out = vec![Batch {
            input: "--reference-samples".into(),
            sequences: self.reference_samples,
        }];
        let max_n = self.max_n();
        if max_n > 0 {
            out.push(Batch {
                input: if max_n == 1 {
                    "--strategies sample".into()
                } else {
                    format!("--strategies bon:{max_n}")
                },
                sequences: max_n,
            });
        }
        for s in &self.strategies {
            match *s {
                EvalStrategy::CdBlock { k, .. } => out.push(Batch {
                    input: format!("--strategies {}", s.label()),
                    sequences: k,
                }),
                EvalStrategy::CdToken { top_k, .. } => out.push(Batch {
                    input: format!("--strategies {} (with --samples-per-prompt)", s.label()),
                    sequences: self.samples_per_prompt.saturating_mul(top_k.min(vocab)),
                }),
                _ => {}
            }
        }
        out
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
    /// 95% normal interval over prompts (null with one prompt).
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
    /// The settings.
    pub config: EvalConfig,
    /// Number of prompts.
    pub prompts: usize,
    /// The reward's name.
    pub reward: String,
    /// The policy's name.
    pub policy: String,
    /// The scorer's name, when one was used.
    pub scorer: Option<String>,
    /// Mean reward of the reference samples.
    pub reference_mean_reward: f64,
    /// Per strategy, in the order given.
    pub strategies: Vec<StrategyResult>,
    /// Exact best-of-n on the reference samples' empirical distributions.
    pub exact_best_of_n: Vec<CurvePoint>,
    /// Exact KL-optimal tilt on the same.
    pub exact_tilt: Vec<CurvePoint>,
    /// What the numbers are.
    pub notes: Vec<String>,
    /// Units of every divergence: `nats`.
    pub units: String,
}

use crate::cd::run::to_decode_error as cd_err;

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
fn mean_se(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

#[derive(Default, Clone)]
struct Acc {
    /// Per prompt: (sum reward, sum win, sum kl, sum tokens, count).
    per_prompt: Vec<[f64; 5]>,
    kl_values: Vec<f64>,
}

impl Acc {
    fn add(&mut self, prompt: usize, reward: f64, refs: &[f64], kl: f64, tokens: usize) {
        if self.per_prompt.len() <= prompt {
            self.per_prompt.resize(prompt + 1, [0.0; 5]);
        }
        let e = &mut self.per_prompt[prompt];
        e[0] += reward;
        e[1] += win_against(reward, refs);
        e[2] += kl;
        e[3] += tokens as f64;
        e[4] += 1.0;
        self.kl_values.push(kl);
    }
}

/// Run an evaluation (see the module docs). `scorer` is needed by cd strategies.
/// `progress(prompt_done)` is called after each prompt; `timing(label, seconds)` after each
/// strategy of each prompt (timings are not part of the report).
///
/// # Errors
/// [`DecodeError::InvalidInput`] for M = 0, S = 0, no prompts, a cd strategy without a
/// scorer, bad cd parameters, a scorer of the wrong hidden size; the policy's and reward's
/// errors.
pub fn evaluate<P>(
    policy: &P,
    reward: &dyn Reward,
    scorer: Option<&dyn PrefixScorer>,
    prompts: &[String],
    config: &EvalConfig,
    mut progress: impl FnMut(usize),
    mut timing: impl FnMut(&str, f64),
) -> Result<EvalReport, DecodeError>
where
    P: Policy,
{
    config.validate()?;
    if prompts.is_empty() {
        return Err(DecodeError::invalid("--prompts", "no prompts given"));
    }
    if prompts.len() >= 1 << 31 {
        return Err(DecodeError::invalid("--prompts", "too many prompts"));
    }
    if config.strategies.iter().any(EvalStrategy::needs_scorer) && scorer.is_none() {
        return Err(DecodeError::invalid(
            "--scorer",
            "cd-block and cd-token need a prefix scorer file (train one with `tilt train-scorer`)",
        ));
    }
    let reference = SamplingParams::default();
    let max_n = config.max_n();
    let s_count = config.samples_per_prompt;
    let mut accs: Vec<Acc> = vec![Acc::default(); config.strategies.len()];
    let mut ref_rewards_all: Vec<Vec<f64>> = Vec::with_capacity(prompts.len());
    for (pi, prompt) in prompts.iter().enumerate() {
        let index = pi as u64;
        let tokens: Vec<TokenId> =
            encode_prompt(policy, prompt, config.chat_template, config.max_new_tokens)?;
        let prefilled = prefill_prompt(policy, tokens.clone())?;
        // Reference samples.
        let t0 = std::time::Instant::now();
        let streams: Vec<u64> = (0..config.reference_samples as u64)
            .map(|d| draw_stream(index, d))
            .collect();
        let refs = sample_continuations(
            policy,
            &prefilled,
            config.seed ^ REFERENCE_SEED_MIX,
            &streams,
            config.max_new_tokens,
            &reference,
        )?;
        let refs: Vec<f64> = score_sequences(policy, reward, prompt, refs)?
            .iter()
            .map(|c| c.reward)
            .collect();
        timing("reference", t0.elapsed().as_secs_f64());
        // sample / bon: shared candidates, max_n per repetition (stride MAX_N, so that a
        // candidate's stream does not depend on max_n); each bon:n its own selector.
        if max_n > 0 {
            let t0 = std::time::Instant::now();
            let mut selectors: Vec<SequenceSampler> = config
                .strategies
                .iter()
                .map(|st| {
                    SequenceSampler::new(
                        strategy_seed(config.seed, &st.label()),
                        selection_stream(index),
                    )
                })
                .collect();
            for s in 0..s_count {
                let streams: Vec<u64> = (0..max_n as u64)
                    .map(|d| draw_stream(index, (s * MAX_N) as u64 + d))
                    .collect();
                let seqs = sample_continuations(
                    policy,
                    &prefilled,
                    config.seed,
                    &streams,
                    config.max_new_tokens,
                    &reference,
                )?;
                let cands = score_sequences(policy, reward, prompt, seqs)?;
                let rewards: Vec<f64> = cands.iter().map(|c| c.reward).collect();
                for (j, strat) in config.strategies.iter().enumerate() {
                    let (chosen, kl) = match *strat {
                        EvalStrategy::Sample => (0, 0.0),
                        EvalStrategy::Bon { n } => (
                            select_best(&rewards[..n], &mut selectors[j])?,
                            bon_kl_bound(n as u64)?,
                        ),
                        _ => continue,
                    };
                    accs[j].add(pi, rewards[chosen], &refs, kl, cands[chosen].new_tokens);
                }
            }
            timing("sample/bon", t0.elapsed().as_secs_f64());
        }
        // Controlled decoding.
        for (j, strat) in config.strategies.iter().enumerate() {
            let Some(scorer) = scorer else { continue };
            let cd_seed = strategy_seed(config.seed, &strat.label());
            let t0 = std::time::Instant::now();
            let outs: Vec<(Vec<TokenId>, f64)> = match *strat {
                EvalStrategy::CdBlock { k, m } => {
                    let params = CdBlockParams {
                        k,
                        m,
                        max_new_tokens: config.max_new_tokens,
                        seed: cd_seed,
                    };
                    cd_block_generate(
                        policy,
                        scorer,
                        &tokens,
                        s_count,
                        &params,
                        draw_stream(index, 0),
                    )
                    .map_err(cd_err)?
                    .into_iter()
                    .map(|o| (o.tokens, o.kl_bound))
                    .collect()
                }
                EvalStrategy::CdToken { lambda, top_k } => {
                    let params = CdTokenParams {
                        lambda,
                        top_k,
                        max_new_tokens: config.max_new_tokens,
                        seed: cd_seed,
                    };
                    cd_token_generate(
                        policy,
                        scorer,
                        &tokens,
                        s_count,
                        &params,
                        draw_stream(index, 0),
                    )
                    .map_err(cd_err)?
                    .into_iter()
                    .map(|o| (o.tokens, o.kl_estimate))
                    .collect()
                }
                _ => continue,
            };
            let texts = outs
                .iter()
                .map(|(t, _)| policy.decode(t))
                .collect::<Result<Vec<_>, _>>()?;
            let pairs: Vec<(&str, &str)> = texts
                .iter()
                .map(|t| (prompt.as_str(), t.as_str()))
                .collect();
            let scores =
                tilt_rewards::check_scores(&reward.name(), pairs.len(), reward.score(&pairs)?)?;
            for ((toks, kl), r) in outs.iter().zip(scores) {
                accs[j].add(pi, f64::from(r), &refs, *kl, toks.len());
            }
            timing(&strat.label(), t0.elapsed().as_secs_f64());
        }
        ref_rewards_all.push(refs);
        progress(pi + 1);
    }
    let p = prompts.len();
    let mut results = Vec::with_capacity(config.strategies.len());
    for (strat, acc) in config.strategies.iter().zip(&accs) {
        let per = |k: usize| -> Vec<f64> { acc.per_prompt.iter().map(|e| e[k] / e[4]).collect() };
        let (mean_reward, mean_reward_stderr) = mean_se(&per(0));
        let (win_rate, win_se) = mean_se(&per(1));
        let (kl, kl_kind, kl_stderr) = match strat {
            EvalStrategy::Sample => (0.0, "exact", None),
            EvalStrategy::Bon { .. } => (mean_se(&acc.kl_values).0, "bound", None),
            EvalStrategy::CdBlock { .. } => {
                let (m, se) = mean_se(&acc.kl_values);
                (m, "bound", se)
            }
            EvalStrategy::CdToken { .. } => {
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
            win_rate_ci95: win_se.map(|se| [win_rate - 1.96 * se, win_rate + 1.96 * se]),
            kl,
            kl_kind: kl_kind.into(),
            kl_stderr,
            mean_new_tokens: mean_se(&per(3)).0,
        });
    }
    let (exact_best_of_n, exact_tilt) = exact_curves(&ref_rewards_all, max_n.max(16))?;
    let reference_mean_reward =
        ref_rewards_all.iter().flatten().sum::<f64>() / (p * config.reference_samples) as f64;
    Ok(EvalReport {
        config: config.clone(),
        prompts: p,
        reward: reward.name(),
        policy: policy.name().to_string(),
        scorer: scorer.map(|s| s.name()),
        reference_mean_reward,
        strategies: results,
        exact_best_of_n,
        exact_tilt,
        notes: vec![
            "win_rate: share of the prompt's reference samples beaten, ties 1/2, averaged over outputs then prompts; win_rate_ci95: normal interval (±1.96 standard errors) over per-prompt means, conditional on the reference samples".into(),
            "kl_kind: exact (sample: 0), bound (bon:n: log n - (n-1)/n, arXiv 2401.01879 Thm 3.1; cd-block: the mean over outputs of B·(log K - (K-1)/K), B an output's number of blocks, which estimates (with kl_stderr) the chain-rule bound E[B]·(log K - (K-1)/K) on the expected KL), estimate (cd-token: mean of the exact log pi(y)/p(y) over outputs, an unbiased Monte-Carlo estimate of KL, with its standard error)".into(),
            "seeds: each strategy's outputs depend only on the run's seed and its own label (not on the other strategies listed or their order); sample and bon:n share candidates".into(),
            "exact_best_of_n / exact_tilt: tilt-core's exact values for the empirical distribution of each prompt's reference rewards, averaged over prompts at equal n / equal KL budget (capped per prompt at -log p(argmax set))".into(),
        ],
        units: "nats".into(),
    })
}

/// The exact best-of-n (n = 1, 2, 4, … ≤ `n_max`) and tilt (25 KL budgets) curves,
/// averaged over prompts, for the empirical distributions of `refs` (see the module docs).
///
/// # Errors
/// An empty or non-finite set of reference rewards.
pub fn exact_curves(
    refs: &[Vec<f64>],
    n_max: usize,
) -> Result<(Vec<CurvePoint>, Vec<CurvePoint>), DecodeError> {
    let dists: Vec<RewardDistribution> = refs
        .iter()
        .map(|r| RewardDistribution::from_samples(r))
        .collect::<Result<_, _>>()?;
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
    fn parses_the_issue_example_and_rejects_bad_specs() {
        let s = parse_strategies("sample,bon:1,2,4,8,16,cd-block:K=4,M=8,cd-token:lambda=2.5,k=5")
            .unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s[0], EvalStrategy::Sample);
        assert_eq!(s[5], EvalStrategy::Bon { n: 16 });
        assert_eq!(s[6], EvalStrategy::CdBlock { k: 4, m: 8 });
        assert_eq!(
            s[7],
            EvalStrategy::CdToken {
                lambda: 2.5,
                top_k: 5
            }
        );
        assert_eq!(s[6].label(), "cd-block:K=4,M=8");
        for (bad, needle) in [
            ("", "empty item"),
            ("bon:0", "at least 1"),
            ("bon:x", "whole number"),
            ("cd-block:K=4", "both K"),
            ("cd-block:K=0,M=8", "K is 0"),
            ("cd-block:K=4,M=0", "M is 0"),
            ("cd-token:lambda=-1", "≥ 0"),
            ("cd-token:k=3", "needs lambda"),
            ("best:3", "unknown strategy"),
            ("foo", "not a strategy"),
            ("bon:2,2", "twice"),
            ("sample:3", "no arguments"),
        ] {
            let e = parse_strategies(bad).unwrap_err().to_string();
            assert!(
                e.contains("--strategies") && e.contains(needle),
                "{bad}: {e}"
            );
        }
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
