//! `tilt train-scorer`: CD-FUDGE or CD-Q (arXiv 2310.17022 §2). Draw K reference rollouts
//! per prompt, score their final reward, fit a small head on the policy's hidden state at
//! every prefix (to the final reward, or for CD-Q to the previous round's value of the next
//! prefix), hold out a share of the prompts, and save the head (safetensors) with a JSON
//! card (data, seed, loss curve, held-out MSE against the constant predictor). The engine is
//! `tilt_engine::scorer_training`; this file parses flags and writes the files.

use crate::args::{check_writable, cli_error, parse_seed, EngineArgs};
use crate::progress::CliProgress;
use clap::{Args, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tilt_engine::cd::TrainConfig;
use tilt_engine::manifest::{Manifest, GIT_COMMIT, TOOL_VERSION};
use tilt_engine::run::{execute, input_files, output_files, Run};
use tilt_engine::scorer_training::{head_kind, train_method, TrainOutputs, TrainScorerConfig};
use tilt_engine::Engine;
use tilt_output::{emit, Format};

/// The kind of head to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadArg {
    /// V = w·u + b on standardised hidden states.
    Linear,
    /// V = w2·tanh(W1 u + b1) + b2.
    Mlp,
}

/// How the scorer's regression targets are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// CD-FUDGE: every prefix regressed on its rollout's final reward.
    Fudge,
    /// CD-Q: after the FUDGE fit, --q-rounds refits on the previous fit's value of the next
    /// prefix (the final reward at a rollout's last prefix).
    Q,
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
    #[arg(long, default_value_t = 0.01, allow_hyphen_values = true)]
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.05, allow_hyphen_values = true)]
    pub weight_decay: f64,
    /// Share of prompts held out.
    #[arg(long, default_value_t = 0.25, allow_hyphen_values = true)]
    pub heldout_fraction: f64,
    /// Training method: fudge (regress on the final reward) or q (CD-Q's Bellman rounds).
    #[arg(long, value_enum, default_value_t = MethodArg::Fudge)]
    pub method: MethodArg,
    /// CD-Q's Bellman rounds after the FUDGE fit, each of --epochs steps (default 8; only
    /// with --method q).
    #[arg(long)]
    pub q_rounds: Option<usize>,
    /// Seed (rollouts, split, initialisation).
    #[arg(long, default_value_t = 0, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Also write a manifest of the run here (to re-run and verify with `tilt reproduce`).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// How this command spells the engine's parameters.
const RENAMES: &[(&str, &str)] = &[
    ("rollouts_per_prompt", "--rollouts"),
    ("prompts", "--prompts"),
];

/// Run `tilt train-scorer`.
///
/// Every input and both output paths are checked before the models load, so that a bad
/// flag never costs the rollouts; a fit that diverges writes nothing.
pub fn run(args: TrainScorerArgs) -> anyhow::Result<()> {
    let t_start = Instant::now();
    let outputs = TrainOutputs::for_scorer(args.out.clone())
        .map_err(|e| crate::usage(format!("--out {}: {}", args.out.display(), e.problem())))?;
    check_writable("--out", &outputs.scorer)?;
    check_writable("--out (its card)", &outputs.card)?;
    if let Some(m) = &args.manifest {
        check_writable("--manifest", m)?;
    }
    let head = match args.head {
        HeadArg::Linear => head_kind("linear", args.mlp_hidden),
        HeadArg::Mlp => head_kind("mlp", args.mlp_hidden),
    }
    .map_err(|e| cli_error(e, RENAMES))?;
    let method = match args.method {
        MethodArg::Fudge => train_method("fudge", args.q_rounds),
        MethodArg::Q => train_method("q", args.q_rounds),
    }
    .map_err(|e| cli_error(e, RENAMES))?;
    let config = TrainScorerConfig {
        rollouts_per_prompt: args.rollouts,
        max_new_tokens: args.max_new_tokens,
        fit: TrainConfig {
            head,
            epochs: args.epochs,
            learning_rate: args.learning_rate,
            weight_decay: args.weight_decay,
            heldout_fraction: args.heldout_fraction,
            seed: args.seed,
            method,
        },
        reward: None,
    };
    config.validate().map_err(|e| cli_error(e, RENAMES))?;
    let prompts =
        tilt_engine::prompts::read_prompts(&args.prompts).map_err(|e| cli_error(e, RENAMES))?;
    if prompts.len() < 2 {
        return Err(crate::usage(format!(
            "--prompts {}: {} prompt; training needs at least 2 (some are held out)",
            args.prompts.display(),
            prompts.len()
        )));
    }
    let engine_config = args.engine.config(&[]);
    let progress = CliProgress::new();
    let engine = Engine::load(&engine_config, &progress).map_err(|e| cli_error(e, RENAMES))?;
    let t_load = t_start.elapsed().as_secs_f64();
    let run = Run::TrainScorer {
        prompts: args.prompts.clone(),
        config,
        outputs: outputs.clone(),
    };
    let t_run = Instant::now();
    let out = execute(&engine, &run, &progress).map_err(|e| cli_error(e, RENAMES))?;
    let run_secs = t_run.elapsed().as_secs_f64();
    for (_, path, bytes) in &out.files {
        std::fs::write(path, bytes)
            .map_err(|e| crate::failure(format!("--out {}: cannot write: {e}", path.display())))?;
    }
    // The card: the canonical output, with where and by what it was made.
    let mut card: serde_json::Value = serde_json::from_slice(&out.bytes)?;
    card["provenance"] = serde_json::json!({
        "tool_version": TOOL_VERSION,
        "git_commit": GIT_COMMIT,
        "written_as": { "scorer": outputs.scorer, "card": outputs.card },
    });
    let text = serde_json::to_string_pretty(&card)? + "\n";
    std::fs::write(&outputs.card, text).map_err(|e| {
        crate::failure(format!(
            "--out {}: cannot write the card: {e}",
            outputs.card.display()
        ))
    })?;
    if let Some(path) = &args.manifest {
        let files = input_files(&engine, &run).map_err(|e| cli_error(e, RENAMES))?;
        let wall: BTreeMap<String, f64> = [
            ("load".to_string(), t_load),
            ("train".to_string(), run_secs),
            ("total".to_string(), t_start.elapsed().as_secs_f64()),
        ]
        .into();
        Manifest::new(
            engine_config,
            run,
            files,
            output_files(&out),
            engine.threads(),
            wall,
            &out.bytes,
        )
        .write(path)
        .map_err(|e| cli_error(e, RENAMES))?;
    }
    tilt_engine::Progress::note(
        &progress,
        &format!(
            "train-scorer: {} prompts; {run_secs:.1} s after {t_load:.1} s of loading; wrote {} and {}",
            prompts.len(),
            outputs.scorer.display(),
            outputs.card.display()
        ),
    );
    Ok(emit(&card, args.format)?)
}
