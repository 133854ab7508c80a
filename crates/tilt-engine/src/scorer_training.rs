//! Training a prefix scorer by CD-FUDGE or CD-Q on an engine (arXiv 2310.17022 §2): draw K
//! reference rollouts per prompt on the stepper, score their final reward, record the
//! hidden state at every prefix, and fit a head ([`crate::cd::train::fit_head`]).
//!
//! The rollouts of several prompts step together (up to the engine's `max_batch` rows); a
//! prompt's rollouts are one job with one reward call, so the data do not depend on the
//! batching. Rollout j of prompt i draws from stream i·K + j of the seed.

use crate::cd::train::{
    fit_head, HeadKind, PrefixDataset, TrainCard, TrainConfig, TrainMethod, MAX_Q_ROUNDS,
};
use crate::cd::{PrefixScorer, ScorerHead};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::progress::Progress;
use crate::request::Input;
use crate::stepper::{run_jobs, Group, GroupSpec, Job, JobOutput, Prefilled, SampleJob};
use crate::strategy::MAX_N;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tilt_models::sampling::SamplingParams;
use tilt_models::Policy;

/// Settings of scorer training: the rollouts and the fit (whose seed seeds both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainScorerConfig {
    /// Rollouts per prompt (K, 1 to [`MAX_N`]).
    pub rollouts_per_prompt: usize,
    /// Most tokens per rollout.
    pub max_new_tokens: usize,
    /// The head and its optimiser; `fit.seed` also seeds the rollouts.
    pub fit: TrainConfig,
    /// The reward's name in the engine (None: its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
}

impl TrainScorerConfig {
    /// Check everything that can be checked before any rollout.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `rollouts_per_prompt` (0 or above [`MAX_N`]),
    /// `max_new_tokens` (0), or the fit's parameter.
    pub fn validate(&self) -> Result<()> {
        if self.rollouts_per_prompt == 0 {
            return Err(EngineError::invalid(
                "rollouts_per_prompt",
                "is 0; at least 1 rollout per prompt",
            ));
        }
        if self.rollouts_per_prompt > MAX_N {
            return Err(EngineError::invalid(
                "rollouts_per_prompt",
                format!(
                    "{} is above the cap of {MAX_N} (a prompt's rollouts are stepped as one \
                     batch, each with its own KV cache)",
                    self.rollouts_per_prompt
                ),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(EngineError::invalid("max_new_tokens", "is 0; at least 1"));
        }
        self.fit.validate()
    }
}

/// Draw K reference rollouts per prompt, score their final reward, and record every prefix
/// (the data of both CD-FUDGE and CD-Q). Prompts are user messages (the chat template is
/// applied).
///
/// # Errors
/// No prompts; the policy or reward failing.
pub fn collect_rollouts<P: Policy>(
    engine: &Engine<P>,
    prompts: &[Input],
    config: &TrainScorerConfig,
    progress: &dyn Progress,
) -> Result<PrefixDataset> {
    config.validate()?;
    if prompts.is_empty() {
        return Err(EngineError::invalid("prompts", "no prompts given"));
    }
    let policy = engine.policy();
    let reward = Arc::clone(engine.reward(config.reward.as_deref())?);
    let k = config.rollouts_per_prompt;
    engine.check_memory(
        "rollouts_per_prompt",
        k.max(engine.max_batch().min(k * prompts.len())),
        0,
        config.max_new_tokens,
    )?;
    let spec = GroupSpec {
        seed: config.fit.seed,
        sampling: SamplingParams::default(),
        max_new_tokens: config.max_new_tokens,
        stops: Arc::from(Vec::<String>::new()),
        keep_hidden: true,
    };
    let mut jobs: Vec<(usize, Box<dyn Job<P> + '_>)> = Vec::with_capacity(prompts.len());
    for (pi, input) in prompts.iter().enumerate() {
        let tokens = engine.encode(input, config.max_new_tokens)?;
        let prefill = Arc::new(Prefilled::new(policy, tokens)?);
        let streams: Vec<u64> = (0..k).map(|j| (pi * k + j) as u64).collect();
        let g = Group::new(prefill, spec.clone(), &streams, 0);
        let prompt: Arc<str> = Arc::from(input.reward_prompt());
        jobs.push((
            k,
            Box::new(SampleJob::new(g, Some((Arc::clone(&reward), prompt)))),
        ));
    }
    progress.begin("rollouts", prompts.len() as u64);
    let results = run_jobs(policy, jobs, engine.max_batch(), |done| {
        progress.advance("rollouts", done as u64)
    })?;
    progress.end("rollouts");
    let mut data = PrefixDataset {
        hidden_size: policy.hidden_size(),
        n_prompts: prompts.len(),
        ..Default::default()
    };
    for (pi, f) in results.into_iter().enumerate() {
        let JobOutput::Sampled(rolls) = f.output else {
            return Err(EngineError::Internal(
                "rollouts returned no sequences".into(),
            ));
        };
        let mut per_prompt = Vec::with_capacity(k);
        let mut prefixes = Vec::with_capacity(k);
        for roll in rolls {
            let r = roll
                .reward
                .ok_or_else(|| EngineError::Internal("a rollout was not scored".into()))?;
            per_prompt.push(r);
            prefixes.push(roll.prefix_hidden.len());
            for h in roll.prefix_hidden {
                data.features.push(h);
                data.targets.push(r);
                data.groups.push(pi);
            }
        }
        data.rollout_rewards.push(per_prompt);
        data.rollout_prefixes.push(prefixes);
    }
    Ok(data)
}

/// A file of the training data, as the card records it: its name as given and its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardFile {
    /// The path as given.
    pub path: PathBuf,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// The policy a scorer reads: its name and the sha256 of its file (no path: a card moves
/// between machines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardPolicy {
    /// The policy's name.
    pub name: String,
    /// sha256 of its file(s), in order.
    pub sha256: Vec<String>,
}

/// The data a scorer was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardData {
    /// The prompts file.
    pub prompts_file: CardFile,
    /// Number of prompts.
    pub prompts: usize,
    /// Rollouts per prompt.
    pub rollouts_per_prompt: usize,
    /// Most tokens per rollout.
    pub max_new_tokens: usize,
    /// Prefixes (rows) in all.
    pub prefixes: usize,
    /// Mean final reward of the rollouts.
    pub mean_rollout_reward: f64,
    /// Every rollout's reward, per prompt.
    pub rollout_rewards: Vec<Vec<f64>>,
    /// Every rollout's number of prefixes (its length + 1), per prompt.
    pub rollout_prefixes: Vec<Vec<usize>>,
}

/// The JSON card written beside a scorer: what it is, what it was fitted on, how well it
/// does against the constant predictor. Deterministic by seed (no timings, no thread count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerCard {
    /// The scorer file, relative to the card's directory.
    pub scorer_file: PathBuf,
    /// The card file, relative to its directory.
    pub card_file: PathBuf,
    /// How to read the two paths above.
    pub paths: String,
    /// `linear` or `mlp`.
    pub head: String,
    /// The hidden size it reads.
    pub hidden_size: usize,
    /// The policy.
    pub policy: CardPolicy,
    /// The reward's name.
    pub reward: String,
    /// The data.
    pub data: CardData,
    /// The seed of the rollouts, the split and the initialisation.
    pub seed: u64,
    /// The fit and its figures.
    pub training: TrainCard,
    /// Whether it beats the constant predictor on held-out prompts, in words.
    pub verdict: String,
    /// Units.
    pub units: String,
}

/// Where a training run writes: the scorer (`NAME.safetensors`) and its card (`NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainOutputs {
    /// The scorer file.
    pub scorer: PathBuf,
    /// The card beside it.
    pub card: PathBuf,
}

impl TrainOutputs {
    /// The outputs of `--out NAME.safetensors`: the card is `NAME.json` beside it (so it can
    /// never overwrite the scorer).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `out` when it does not end in `.safetensors` with a
    /// name before it.
    pub fn for_scorer(out: PathBuf) -> Result<Self> {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match name.strip_suffix(".safetensors") {
            Some(stem) if !stem.is_empty() => {
                let card = out.with_file_name(format!("{stem}.json"));
                Ok(TrainOutputs { scorer: out, card })
            }
            _ => Err(EngineError::invalid(
                "out",
                "must be named NAME.safetensors (its JSON card goes beside it as NAME.json)",
            )),
        }
    }
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The head.
    pub head: ScorerHead,
    /// Its file's bytes (what is written to [`TrainOutputs::scorer`]).
    pub bytes: Vec<u8>,
    /// Its card.
    pub card: ScorerCard,
}

fn relative_to(path: &std::path::Path, dir: &std::path::Path) -> PathBuf {
    path.strip_prefix(dir)
        .map_or_else(|_| path.to_path_buf(), std::path::Path::to_path_buf)
}

/// Collect rollouts and fit a scorer (CD-FUDGE or CD-Q, as `config.fit.method` says);
/// nothing is written (the face writes
/// [`Trained::bytes`] and the card).
///
/// # Errors
/// Fewer than 2 prompts; the rollouts' and the fit's errors (a diverging fit included:
/// nothing non-finite is ever returned).
pub fn train_scorer<P: Policy>(
    engine: &Engine<P>,
    prompts: &[Input],
    prompts_file: CardFile,
    outputs: &TrainOutputs,
    config: &TrainScorerConfig,
    progress: &dyn Progress,
) -> Result<Trained> {
    config.validate()?;
    if prompts.len() < 2 {
        return Err(EngineError::invalid(
            "prompts",
            format!(
                "{} prompt(s); training needs at least 2 (some are held out)",
                prompts.len()
            ),
        ));
    }
    let data = collect_rollouts(engine, prompts, config, progress)?;
    let (head, training) = fit_head(&data, &config.fit)?;
    let bytes = head.to_bytes()?;
    let n_rollouts: usize = data.rollout_rewards.iter().map(Vec::len).sum();
    let mean_rollout_reward =
        data.rollout_rewards.iter().flatten().sum::<f64>() / n_rollouts.max(1) as f64;
    let policy = engine.policy();
    let policy_sha = engine
        .hashed_files()?
        .into_iter()
        .filter(|f| f.role == "policy")
        .map(|f| f.sha256)
        .collect();
    let card_dir = outputs.card.parent().unwrap_or(std::path::Path::new(""));
    let verdict = if training.heldout_mse_scorer < training.heldout_mse_constant {
        "the scorer beats the constant predictor on held-out prompts"
    } else {
        "the scorer does NOT beat the constant predictor on held-out prompts"
    };
    let card = ScorerCard {
        scorer_file: relative_to(&outputs.scorer, card_dir),
        card_file: relative_to(&outputs.card, card_dir),
        paths: "scorer_file and card_file are relative to the card's directory".into(),
        head: head.kind().into(),
        hidden_size: head.hidden_size(),
        policy: CardPolicy {
            name: policy.name().to_string(),
            sha256: policy_sha,
        },
        reward: engine.reward(config.reward.as_deref())?.name(),
        data: CardData {
            prompts_file,
            prompts: prompts.len(),
            rollouts_per_prompt: config.rollouts_per_prompt,
            max_new_tokens: config.max_new_tokens,
            prefixes: data.features.len(),
            mean_rollout_reward,
            rollout_rewards: data.rollout_rewards,
            rollout_prefixes: data.rollout_prefixes,
        },
        seed: config.fit.seed,
        training,
        verdict: verdict.into(),
        units: "MSE in squared reward units; KL (none here) in nats".into(),
    };
    Ok(Trained { head, bytes, card })
}

/// The head kind of a name (`linear`, `mlp`) and hidden units.
///
/// # Errors
/// [`EngineError::Invalid`] naming `head` for another name.
pub fn head_kind(name: &str, mlp_hidden: usize) -> Result<HeadKind> {
    match name {
        "linear" => Ok(HeadKind::Linear),
        "mlp" => Ok(HeadKind::Mlp { hidden: mlp_hidden }),
        other => Err(EngineError::invalid(
            "head",
            format!("{other:?} is not a head (linear or mlp)"),
        )),
    }
}

/// The training method of a name (`fudge`, `q`) and, for `q`, its number of Bellman rounds
/// (`q_rounds`; None: [`DEFAULT_Q_ROUNDS`]).
///
/// # Errors
/// [`EngineError::Invalid`] naming `method` for another name, or `q_rounds` when it is given
/// with `fudge` (which has no rounds), is 0 or is above [`MAX_Q_ROUNDS`].
pub fn train_method(name: &str, q_rounds: Option<usize>) -> Result<TrainMethod> {
    let method = match (name, q_rounds) {
        ("fudge", None) => TrainMethod::Fudge,
        ("fudge", Some(r)) => {
            return Err(EngineError::invalid(
                "q_rounds",
                format!("{r} given, but rounds apply only to method q (CD-Q), not fudge"),
            ))
        }
        ("q", r) => TrainMethod::Q {
            rounds: r.unwrap_or(DEFAULT_Q_ROUNDS),
        },
        (other, _) => {
            return Err(EngineError::invalid(
                "method",
                format!("{other:?} is not a training method (fudge or q)"),
            ))
        }
    };
    if let TrainMethod::Q { rounds } = method {
        if rounds == 0 || rounds > MAX_Q_ROUNDS {
            return Err(EngineError::invalid(
                "q_rounds",
                format!("is {rounds}; CD-Q takes 1 to {MAX_Q_ROUNDS} Bellman rounds"),
            ));
        }
    }
    Ok(method)
}

/// CD-Q's Bellman rounds when none are given. A default, not a convergence guarantee: each
/// round moves information one prefix back, so reaching the fixed point of 48-token
/// rollouts can take more; the card's `q_rounds[].max_change` says how far V still moved in
/// the last round.
pub const DEFAULT_Q_ROUNDS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_written_before_cd_q_replay_as_fudge_and_cd_q_ones_round_trip() {
        // A train-scorer manifest's run, as written before CD-Q (no `method`).
        let old = r#"{"command":"train-scorer","prompts":"p.jsonl","config":{
            "rollouts_per_prompt":8,"max_new_tokens":48,"fit":{"head":"linear","epochs":300,
            "learning_rate":0.01,"weight_decay":0.05,"heldout_fraction":0.25,"seed":0}},
            "outputs":{"scorer":"s.safetensors","card":"s.json"}}"#;
        let run: crate::run::Run = serde_json::from_str(old).unwrap();
        let crate::run::Run::TrainScorer { config, .. } = &run else {
            panic!("a train-scorer run")
        };
        assert_eq!(config.fit.method, TrainMethod::Fudge);
        let mut q = config.clone();
        q.fit.method = TrainMethod::Q { rounds: 5 };
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(serde_json::from_str::<TrainScorerConfig>(&text).unwrap(), q);
        assert!(!serde_json::to_string(config).unwrap().contains("method"));
        // An unknown method in a manifest is refused, not read as FUDGE.
        let bad = text.replace(r#"{"q":{"rounds":5}}"#, r#""sarsa""#);
        assert!(serde_json::from_str::<TrainScorerConfig>(&bad).is_err());
    }

    #[test]
    fn methods_are_named_and_bad_rounds_refused_naming_the_parameter() {
        assert_eq!(train_method("fudge", None).unwrap(), TrainMethod::Fudge);
        assert_eq!(
            train_method("q", None).unwrap(),
            TrainMethod::Q {
                rounds: DEFAULT_Q_ROUNDS
            }
        );
        assert_eq!(
            train_method("q", Some(3)).unwrap(),
            TrainMethod::Q { rounds: 3 }
        );
        for (name, rounds, param, needle) in [
            ("sarsa", None, "method", "fudge or q"),
            ("Q", Some(2), "method", "fudge or q"),
            ("fudge", Some(4), "q_rounds", "only to method q"),
            ("q", Some(0), "q_rounds", "1 to"),
            ("q", Some(MAX_Q_ROUNDS + 1), "q_rounds", "1 to"),
        ] {
            let e = train_method(name, rounds).unwrap_err();
            assert_eq!(e.param(), Some(param), "{name} {rounds:?}: {e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn the_card_can_never_overwrite_the_scorer() {
        let o = TrainOutputs::for_scorer("out/s.safetensors".into()).unwrap();
        assert_eq!(o.card, PathBuf::from("out/s.json"));
        for bad in ["x.json", "x", "x.safetensors.bak", ".safetensors", "dir/"] {
            let e = TrainOutputs::for_scorer(bad.into()).unwrap_err();
            assert_eq!(e.param(), Some("out"), "{bad}: {e}");
            assert!(e.to_string().contains(".safetensors"), "{bad}: {e}");
        }
        assert_eq!(
            relative_to(
                std::path::Path::new("/tmp/run/s.safetensors"),
                std::path::Path::new("/tmp/run")
            ),
            PathBuf::from("s.safetensors")
        );
    }
}
