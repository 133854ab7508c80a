//! `tilt generate`: any of the seven strategies on one prompt or a JSONL file of prompts,
//! one JSON line per prompt (and choice) on stdout, each with every candidate and the KL it
//! cost (nats); optionally a manifest to re-run and verify. The flags become the engine's
//! [`Params`] (through [`Strategy::from_options`], which refuses a flag the strategy does not
//! read); the engine runs them (the prompts of a file step together as one batch) and this
//! file prints.
//!
//! Robustness: every finished line is written and flushed at once, in input order, so
//! nothing done is lost if a later prompt fails. A bad prompt line (malformed JSON, empty
//! prompt, too long for the context) is reported on stderr as `FILE line K: …` and as a
//! JSON error object on stdout for that line; the other prompts still run, and the exit
//! code is 2 at the end.

use crate::args::{check_writable, cli_error, parse_seed, scorer_spec, EngineArgs};
use crate::progress::CliProgress;
use crate::usage;
use clap::{Args, ValueEnum};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tilt_engine::manifest::Manifest;
use tilt_engine::run::{
    input_files, json_line, remote_input_files, run_generate, Generator, PromptSource, Run,
};
use tilt_engine::{Engine, Input, Params, RemoteEngine, Strategy, StrategyOptions};
use tilt_output::{emit_to, Format};

/// The strategies on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// A plain draw from the model (the reference p).
    Sample,
    /// Best-of-N: the highest reward of --n draws.
    Bon,
    /// Worst-of-N: the lowest reward of --n draws.
    Won,
    /// Soft best-of-N: draw i of --n with probability ∝ e^(r_i/λ) (--lambda).
    SoftBon,
    /// Rewind-and-repeat: draw (--n at a time) until reward ≥ --threshold, at most
    /// --max-draws draws.
    Rewind,
    /// Token-level controlled decoding (arXiv 2310.17022): sample ∝ p·e^(λ·V) over the
    /// --top-k (default 10) most likely tokens, V from --scorer.
    CdToken,
    /// Blockwise controlled decoding: best-of---block-k per block of --block-m tokens under
    /// the --scorer.
    CdBlock,
}

impl StrategyArg {
    /// The engine's name of the strategy.
    pub fn name(self) -> &'static str {
        match self {
            StrategyArg::Sample => "sample",
            StrategyArg::Bon => "bon",
            StrategyArg::Won => "won",
            StrategyArg::SoftBon => "soft-bon",
            StrategyArg::Rewind => "rewind",
            StrategyArg::CdToken => "cd-token",
            StrategyArg::CdBlock => "cd-block",
        }
    }
}

/// The strategy's flags: all optional, so that one given to a strategy that does not read
/// it is refused whatever its value (defaults: `tilt_engine::strategy`).
#[derive(Debug, Clone, Args)]
pub struct StrategyFlags {
    /// The strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Bon)]
    pub strategy: StrategyArg,
    /// Candidates of bon, won and soft-bon; rewind's draws per batch [default: 4].
    #[arg(long)]
    pub n: Option<usize>,
    /// Sampling temperature of the sampling strategies [default: 1, the model itself].
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens (sampling strategies); cd-token's candidates
    /// per step [default: 10].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens holding this much mass (sampling strategies).
    #[arg(long, allow_hyphen_values = true)]
    pub top_p: Option<f64>,
    /// Soft best-of-N's temperature λ (reward units); cd-token's guidance λ [default: 1].
    #[arg(long, allow_hyphen_values = true)]
    pub lambda: Option<f64>,
    /// Rewind's acceptance threshold on the reward [default: 0.5].
    #[arg(long, allow_hyphen_values = true)]
    pub threshold: Option<f64>,
    /// Rewind's cap on draws [default: 64].
    #[arg(long)]
    pub max_draws: Option<usize>,
    /// cd-block's continuations per block K [default: 4].
    #[arg(long)]
    pub block_k: Option<usize>,
    /// cd-block's tokens per block M [default: 8].
    #[arg(long)]
    pub block_m: Option<usize>,
    /// cd-token / cd-block: a prefix scorer file (`tilt train-scorer`), as FILE or
    /// FILE:weight=W; repeat for several: the decoder is guided by Σ W·V (weight 1 where none
    /// is given), and each output reports each scorer's value.
    #[arg(long)]
    pub scorer: Vec<String>,
}

impl StrategyFlags {
    /// The strategy these flags describe (`remote`: drawn from a remote engine, where
    /// cd-block is guided by the reward and takes no scorer file).
    ///
    /// # Errors
    /// A usage error naming the flag.
    pub fn strategy(&self, remote: bool) -> anyhow::Result<Strategy> {
        let options = StrategyOptions {
            n: self.n,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            lambda: self.lambda,
            threshold: self.threshold,
            max_draws: self.max_draws,
            block_k: self.block_k,
            block_m: self.block_m,
            scorer: scorer_spec(&self.scorer)?.spec,
        };
        let name = self.strategy.name();
        let s = Strategy::from_options(name, &options).map_err(|e| cli_error(e, &[]))?;
        if s.scorer().is_some() && self.scorer.is_empty() && !remote {
            return Err(usage(format!(
                "--scorer: --strategy {name} needs a prefix scorer file (train one with `tilt \
                 train-scorer`)"
            )));
        }
        Ok(s)
    }
}

/// Flags of `tilt generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt (a user message; the model's chat template is applied). A prompt that
    /// starts with `-` is given as `--prompt=-…`.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A JSON-lines file of prompts: each line `{"prompt": "…"}`, `{"messages": […]}` or a
    /// JSON string.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub strategy: StrategyFlags,
    /// Independent outputs per prompt, each a whole run of the strategy.
    #[arg(long, default_value_t = 1)]
    pub choices: usize,
    /// Seed of every random choice (a whole number from 0 to 2^64 − 1).
    #[arg(long, default_value_t = 0, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: u64,
    /// Most new tokens per candidate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// A text that ends a candidate (cut before it); repeat for several.
    #[arg(long)]
    pub stop: Vec<String>,
    /// A further reward (same forms as --reward) each output is scored with too, reported in
    /// its `rewards`; repeat for several.
    #[arg(long)]
    pub report_reward: Vec<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Write a manifest (engine, request, file hashes, host, wall times, output) here.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Output format (the manifest always records the JSON lines).
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

impl GenerateArgs {
    /// The prompts, the chat-template setting and the parameters these flags describe.
    ///
    /// # Errors
    /// A usage error naming the flag.
    pub fn run(&self) -> anyhow::Result<Run> {
        let prompts = match (&self.prompt, &self.prompts) {
            (Some(p), None) => PromptSource::Input(if self.engine.no_chat_template {
                Input::Raw(p.clone())
            } else {
                Input::Prompt(p.clone())
            }),
            (None, Some(f)) => PromptSource::File(f.clone()),
            _ => return Err(usage(
                "give the prompt as --prompt TEXT, or a file of prompts as --prompts FILE.jsonl",
            )),
        };
        let params = Params {
            strategy: self.strategy.strategy(self.engine.engine.is_some())?,
            choices: self.choices,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            reward: None,
            report_rewards: self.report_reward.clone(),
        };
        params.validate().map_err(|e| cli_error(e, &[]))?;
        Ok(Run::Generate {
            prompts,
            chat_template: !self.engine.no_chat_template,
            params,
        })
    }

    /// How an engine parameter is spelt here (`prompt` is `--prompt` when one was given).
    fn renames(&self) -> Vec<(&'static str, &'static str)> {
        let mut r = vec![("report_rewards", "--report-reward")];
        if self.prompt.is_some() {
            r.push(("prompt", "--prompt"));
        }
        r
    }

    /// The engine: the scorer files, and each `--report-reward` beside `--reward`.
    ///
    /// # Errors
    /// A usage error naming `--scorer`.
    pub fn engine_config(&self) -> anyhow::Result<tilt_engine::EngineConfig> {
        let files = scorer_spec(&self.strategy.scorer)?.files;
        let mut config = self.engine.config(&files);
        for spec in &self.report_reward {
            if !config.rewards.iter().any(|r| &r.name == spec) {
                config.rewards.push(tilt_engine::RewardConfig {
                    name: spec.clone(),
                    spec: spec.clone(),
                });
            }
        }
        Ok(config)
    }
}

/// Run `tilt generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let run = args.run()?;
    if let Some(path) = &args.manifest {
        check_writable("--manifest", path)?;
    }
    let renames = args.renames();
    let config = args.engine_config()?;
    let progress = CliProgress::new();
    config.validate().map_err(|e| cli_error(e, &renames))?;
    let (local, remote) = match &config.engine {
        Some(spec) => (
            None,
            Some(
                RemoteEngine::connect(spec, &config.rewards, &progress)
                    .map_err(|e| cli_error(e, &renames))?,
            ),
        ),
        None => (
            Some(Engine::load(&config, &progress).map_err(|e| cli_error(e, &renames))?),
            None,
        ),
    };
    let engine: &dyn Generator = match (&local, &remote) {
        (Some(l), _) => l,
        (None, Some(r)) => r,
        (None, None) => unreachable!("one engine is loaded"),
    };
    let load_s = t0.elapsed().as_secs_f64();
    let Run::Generate {
        prompts,
        chat_template,
        params,
    } = &run
    else {
        unreachable!("a generate run")
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut canonical = Vec::new();
    let mut printed: anyhow::Result<()> = Ok(());
    let t1 = Instant::now();
    let summary = run_generate(engine, prompts, *chat_template, params, &progress, |line| {
        let bytes = json_line(line)?;
        canonical.extend_from_slice(&bytes);
        if let tilt_engine::run::GenerateLine::Error { error, .. } = line {
            progress_note(&progress, error);
        }
        // Printing failures (a closed pipe) stop the printing, not the recording.
        if printed.is_ok() {
            printed = match args.format {
                Format::Json => out
                    .write_all(&bytes)
                    .and_then(|()| out.flush())
                    .map_err(anyhow::Error::from),
                Format::Table => emit_to(&mut out, line, args.format).map_err(anyhow::Error::from),
            };
        }
        Ok(())
    });
    let generate_s = t1.elapsed().as_secs_f64();
    // Whatever happened, a manifest of what was done is written when asked for.
    if let (Some(path), Ok(_)) = (&args.manifest, &summary) {
        let files = match &local {
            Some(l) => input_files(l, &run),
            None => remote_input_files(&run),
        }
        .map_err(|e| cli_error(e, &renames))?;
        let wall: BTreeMap<String, f64> = [
            ("load".to_string(), load_s),
            ("generate".to_string(), generate_s),
            ("total".to_string(), t0.elapsed().as_secs_f64()),
        ]
        .into();
        Manifest::new(
            config.clone(),
            run.clone(),
            files,
            Vec::new(),
            local.as_ref().map_or(1, Engine::threads),
            wall,
            &canonical,
        )
        .write(path)
        .map_err(|e| cli_error(e, &renames))?;
    }
    let summary = summary.map_err(|e| cli_error(e, &renames))?;
    printed?;
    out.flush()?;
    if !summary.failures.is_empty() {
        return Err(usage(format!(
            "{} prompt line(s) failed (the others completed): {}",
            summary.failures.len(),
            summary.failures.join("; ")
        )));
    }
    Ok(())
}

fn progress_note(progress: &CliProgress, error: &str) {
    tilt_engine::Progress::note(progress, &format!("error: {error}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        g: GenerateArgs,
    }

    fn error_of(args: &[&str]) -> String {
        let mut argv = vec!["tilt", "--prompt", "hi"];
        argv.extend_from_slice(args);
        let w = Wrap::try_parse_from(argv).unwrap();
        match w.g.run() {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn flags_a_strategy_does_not_read_are_refused_even_at_their_defaults() {
        for (args, flag, words) in [
            (
                &[
                    "--strategy",
                    "cd-block",
                    "--scorer",
                    "s",
                    "--temperature",
                    "1",
                ][..],
                "--temperature:",
                "temperature 1",
            ),
            (
                &["--strategy", "cd-token", "--scorer", "s", "--top-p", "0.9"][..],
                "--top-p:",
                "against p",
            ),
            (
                &["--strategy", "cd-token", "--scorer", "s", "--n", "4"][..],
                "--n:",
                "top_k",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--top-k", "5"][..],
                "--top-k:",
                "cd-block",
            ),
            (
                &["--strategy", "bon", "--threshold", "0.5"][..],
                "--threshold:",
                "bon",
            ),
            (
                &["--strategy", "bon", "--scorer", "s"][..],
                "--scorer:",
                "bon",
            ),
            (&["--strategy", "sample", "--n", "4"][..], "--n:", "choices"),
            (
                &["--strategy", "cd-token"][..],
                "--scorer:",
                "needs a prefix scorer",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--block-k", "0"][..],
                "--block-k:",
                "at least 1",
            ),
            (&["--choices", "0"][..], "--choices:", "1 to"),
            (
                &["--max-new-tokens", "0"][..],
                "--max-new-tokens:",
                "at least 1",
            ),
        ] {
            let e = error_of(args);
            assert!(
                e.starts_with(flag) && e.contains(words),
                "{args:?}: {e:?} should start with {flag:?} and say {words:?}"
            );
        }
        for ok in [
            &[
                "--strategy",
                "cd-token",
                "--scorer",
                "s",
                "--top-k",
                "5",
                "--lambda",
                "3",
            ][..],
            &["--strategy", "cd-block", "--scorer", "s", "--block-k", "2"][..],
            &[
                "--strategy",
                "rewind",
                "--threshold",
                "0.9",
                "--n",
                "2",
                "--top-p",
                "0.9",
            ][..],
            &[
                "--strategy",
                "bon",
                "--n",
                "8",
                "--temperature",
                "0.7",
                "--top-k",
                "5",
            ][..],
            &["--strategy", "sample", "--choices", "3", "--stop", "\n"][..],
        ] {
            assert_eq!(error_of(ok), "", "{ok:?}");
        }
    }

    #[test]
    fn a_missing_prompt_names_both_ways_to_give_one() {
        let w = Wrap::try_parse_from(["tilt"]).unwrap();
        let e = w.g.run().unwrap_err().to_string();
        assert!(
            e.contains("--prompt TEXT") && e.contains("--prompts FILE"),
            "{e}"
        );
    }
}
