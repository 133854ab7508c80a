//! `tilt train-scorer`: CD-FUDGE (arXiv 2310.17022 §2.2). Draw K reference rollouts per
//! prompt, score their final reward, fit a small head on the policy's hidden state at every
//! prefix, hold out a share of the prompts, and save the head (safetensors) with a JSON card
//! (data, seed, loss curve, held-out MSE against the constant predictor). The engine is
//! `tilt_decode::cd::train`; this file loads models and writes files.

use crate::output::{emit, Format};
use crate::runtime::{
    cd_to_anyhow, check_memory, check_writable, hashed, load_policy, load_reward, policy_path,
    read_prompts, resolve_threads, GIT_COMMIT, TOOL_VERSION,
};
use crate::usage;
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tilt_decode::cd::{collect_rollouts, fit_head, HeadKind, RolloutConfig, TrainConfig};
use tilt_decode::generate::MAX_N;
use tilt_models::Policy;

/// The kind of head to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadArg {
    /// V = w·u + b on standardised hidden states.
    Linear,
    /// V = w2·tanh(W1 u + b1) + b2.
    Mlp,
}

/// Flags of `tilt train-scorer`.
#[derive(Debug, Args)]
pub struct TrainScorerArgs {
    /// Prompts: a JSONL file with one `{"prompt": "..."}` per line (at least 2).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Reference rollouts per prompt (K).
    #[arg(long, default_value_t = 8)]
    pub rollouts: usize,
    /// Most new tokens per rollout.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// The scorer file to write, NAME.safetensors; its JSON card goes beside it as NAME.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Head kind.
    #[arg(long, value_enum, default_value_t = HeadArg::Linear)]
    pub head: HeadArg,
    /// Hidden units of the MLP head.
    #[arg(long, default_value_t = 32)]
    pub mlp_hidden: usize,
    /// Full-batch AdamW steps.
    #[arg(long, default_value_t = 300)]
    pub epochs: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Share of prompts held out.
    #[arg(long, default_value_t = 0.25)]
    pub heldout_fraction: f64,
    /// Seed (rollouts, split, initialisation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Policy GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Reward: minilm, minilm:target=TEXT, head:PATH, command:CMD, http:URL.
    #[arg(long, default_value = "minilm")]
    pub reward: String,
    /// Threads (0: TILT_NUM_THREADS, RAYON_NUM_THREADS or the number of cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// The card's path for a scorer file `out`: `<stem>.json` beside it.
///
/// # Errors
/// A usage error naming `--out` when it does not end in `.safetensors` (so that the card can
/// never be the scorer file itself).
pub fn card_path(out: &Path) -> anyhow::Result<PathBuf> {
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors")
        || out.file_stem().is_none_or(|s| s.is_empty())
    {
        return Err(usage(format!(
            "--out {}: the scorer file must be named NAME.safetensors (its JSON card is \
             written beside it as NAME.json)",
            out.display()
        )));
    }
    Ok(out.with_extension("json"))
}

/// `path` relative to `dir` when it lies in it (here: a file beside the card), else as is.
fn relative_to(path: &Path, dir: &Path) -> PathBuf {
    path.strip_prefix(dir)
        .map_or_else(|_| path.to_path_buf(), Path::to_path_buf)
}

/// Run `tilt train-scorer`.
///
/// Every input and both output paths are checked before the models load, so that a bad
/// flag never costs the rollouts.
pub fn run(args: TrainScorerArgs) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let card_path = card_path(&args.out)?;
    check_writable("--out", &args.out)?;
    check_writable("--out (its card)", &card_path)?;
    let prompts = read_prompts(&args.prompts)?;
    if prompts.len() < 2 {
        return Err(usage(format!(
            "--prompts {}: {} prompt; training needs at least 2 (some are held out)",
            args.prompts.display(),
            prompts.len()
        )));
    }
    if args.rollouts == 0 {
        return Err(usage("--rollouts: is 0; at least 1 rollout per prompt"));
    }
    if args.rollouts > MAX_N {
        return Err(usage(format!(
            "--rollouts: {} is above the cap of {MAX_N} (a prompt's rollouts are stepped as \
             one batch, each with its own KV cache)",
            args.rollouts
        )));
    }
    if args.max_new_tokens == 0 {
        return Err(usage("--max-new-tokens: is 0; at least 1"));
    }
    let head = match args.head {
        HeadArg::Linear => HeadKind::Linear,
        HeadArg::Mlp => HeadKind::Mlp {
            hidden: args.mlp_hidden,
        },
    };
    let train = TrainConfig {
        head,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        heldout_fraction: args.heldout_fraction,
        seed: args.seed,
    };
    train.validate().map_err(cd_to_anyhow)?;
    let threads = resolve_threads(args.threads);
    let model_path = policy_path(&args.model)?;
    let policy = load_policy(&model_path, threads)?;
    check_memory(&policy, "--rollouts", args.rollouts, args.max_new_tokens)?;
    let reward = load_reward(&args.reward)?;
    let rollouts = RolloutConfig {
        rollouts_per_prompt: args.rollouts,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
    };
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("rollouts {bar:30} {pos}/{len} prompts {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t_roll = Instant::now();
    let data = collect_rollouts(&policy, reward.as_ref(), &prompts, &rollouts, |d| {
        bar.set_position(d as u64)
    })
    .map_err(cd_to_anyhow)?;
    bar.finish_and_clear();
    let rollout_secs = t_roll.elapsed().as_secs_f64();
    let t_fit = Instant::now();
    let (scorer, card) = fit_head(&data, &train).map_err(cd_to_anyhow)?;
    let fit_secs = t_fit.elapsed().as_secs_f64();
    scorer.save(&args.out).map_err(cd_to_anyhow)?;
    let mean_reward = data.rollout_rewards.iter().flatten().sum::<f64>()
        / data
            .rollout_rewards
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            .max(1) as f64;
    // The scorer and its card are written side by side: record them relative to the card's
    // directory, so that the pair can be moved together, and as the user gave them.
    let card_dir = card_path.parent().unwrap_or(Path::new(""));
    let value = json!({
        "scorer_file": relative_to(&args.out, card_dir),
        "card_file": relative_to(&card_path, card_dir),
        "paths": "scorer_file and card_file are relative to the card's directory; written_as is the --out given",
        "written_as": { "out": args.out, "card": card_path },
        "tool_version": TOOL_VERSION,
        "git_commit": GIT_COMMIT,
        "head": scorer.kind(),
        "hidden_size": policy.hidden_size(),
        "policy": { "name": policy.name(), "file": hashed("policy", &model_path)? },
        "reward": reward.name(),
        "data": {
            "prompts_file": hashed("prompts", &args.prompts)?,
            "prompts": prompts.len(),
            "rollouts_per_prompt": args.rollouts,
            "max_new_tokens": args.max_new_tokens,
            "prefixes": data.features.len(),
            "mean_rollout_reward": mean_reward,
            "rollout_rewards": data.rollout_rewards,
            "rollout_prefixes": data.rollout_prefixes,
        },
        "seed": args.seed,
        "threads": threads,
        "training": card,
        "verdict": if card.heldout_mse_scorer < card.heldout_mse_constant {
            "the scorer beats the constant predictor on held-out prompts"
        } else {
            "the scorer does NOT beat the constant predictor on held-out prompts"
        },
        "units": "MSE in squared reward units; KL (none here) in nats",
    });
    let text = serde_json::to_string_pretty(&value)?;
    std::fs::write(&card_path, text + "\n")
        .with_context(|| format!("writing the card {}", card_path.display()))?;
    eprintln!(
        "tilt train-scorer: {} prefixes from {} prompts; rollouts {rollout_secs:.1} s, fit {fit_secs:.1} s, total {:.1} s",
        data.features.len(),
        prompts.len(),
        t_start.elapsed().as_secs_f64()
    );
    emit(&value, args.format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_can_never_overwrite_the_scorer() {
        assert_eq!(
            card_path(Path::new("out/s.safetensors")).unwrap(),
            Path::new("out/s.json")
        );
        for bad in ["x.json", "x", "x.safetensors.bak", ".safetensors", "dir/"] {
            let e = card_path(Path::new(bad)).unwrap_err();
            assert!(e.downcast_ref::<crate::UsageError>().is_some());
            assert!(
                e.to_string().starts_with("--out") && e.to_string().contains(".safetensors"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            relative_to(Path::new("/tmp/run/s.safetensors"), Path::new("/tmp/run")),
            Path::new("s.safetensors")
        );
        assert_eq!(
            relative_to(Path::new("s.safetensors"), Path::new("")),
            Path::new("s.safetensors")
        );
    }
}
