//! `tilt generate`: sample, best-of-N, worst-of-N, soft best-of-N or rewind-and-repeat on
//! one prompt or a JSONL file of prompts, one JSON line per prompt on stdout, each with
//! every candidate and the KL it cost (nats); optionally a manifest to re-run and verify.
//!
//! Robustness: every finished line is written and flushed at once, so nothing done is lost
//! if a later prompt fails. A bad prompt line (malformed JSON, empty prompt, too long for
//! the context) is reported on stderr as `FILE line K: …` and as a JSON error object on
//! stdout for that line; the other prompts still run, and the exit code is non-zero at the
//! end.

use crate::runtime::{hashed, load_policy, load_reward, policy_path};
use crate::usage;
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tilt_decode::generate::{available_memory_bytes, check_batch_memory};
use tilt_decode::manifest::{HashedFile, HostInfo, Manifest, RecordedOutput, MANIFEST_VERSION};
use tilt_decode::{generate, GenerationConfig, Strategy};
use tilt_models::llama::LlamaPolicy;
use tilt_models::sampling::SamplingParams;
use tilt_models::Policy;

/// The strategies on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// A plain draw from the model (the reference).
    Sample,
    /// Best-of-N: the highest reward of N draws.
    Bon,
    /// Worst-of-N: the lowest reward of N draws.
    Won,
    /// Soft best-of-N: draw i with probability ∝ e^{r_i/λ} (`--lambda`).
    SoftBon,
    /// Rewind-and-repeat: draw (in batches of N) until reward ≥ `--threshold`, at most
    /// `--max-draws` draws.
    Rewind,
    /// Token-level controlled decoding (arXiv 2310.17022): sample ∝ p·e^{λ·V} over the
    /// `--top-k` (default 10) most likely tokens, V from `--scorer`.
    CdToken,
    /// Blockwise controlled decoding: best-of-`--block-k` per block of `--block-m` tokens
    /// under the `--scorer`.
    CdBlock,
}

/// Flags of `tilt generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt (a user message; the model's chat template is applied).
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A JSON-lines file of prompts: each line `{"prompt": "…"}` or a JSON string.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The selection strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Bon)]
    pub strategy: StrategyArg,
    /// Number of candidates (for rewind: draws per batch).
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most new tokens per candidate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (1: the model's own distribution).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens holding this much mass.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Soft best-of-N temperature λ (reward units).
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// Rewind acceptance threshold on the reward.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
    /// Rewind cap on the number of draws.
    #[arg(long, default_value_t = 64)]
    pub max_draws: usize,
    /// Policy GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Reward: minilm, minilm:target=TEXT, head:PATH, command:CMD or http:URL.
    #[arg(long, default_value = "minilm")]
    pub reward: String,
    /// CPU threads (0: TILT_NUM_THREADS, RAYON_NUM_THREADS or the number of cores). The
    /// output does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Feed the prompt to the model as is, without its chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Write a manifest (config, seeds, file hashes, host, wall times, output hash) here.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// cd-token / cd-block: the prefix scorer file (`tilt train-scorer`).
    #[arg(long)]
    pub scorer: Option<PathBuf>,
    /// cd-block: continuations per block (K).
    #[arg(long, default_value_t = 4)]
    pub block_k: usize,
    /// cd-block: tokens per block (M).
    #[arg(long, default_value_t = 8)]
    pub block_m: usize,
}

impl GenerateArgs {
    /// The library configuration these flags describe.
    ///
    /// # Errors
    /// A usage error naming the flag.
    pub fn config(&self) -> anyhow::Result<GenerationConfig> {
        let strategy = match self.strategy {
            StrategyArg::Sample => Strategy::Sample,
            StrategyArg::Bon => Strategy::Bon,
            StrategyArg::Won => Strategy::Won,
            StrategyArg::SoftBon => Strategy::SoftBon {
                lambda: self.lambda,
            },
            StrategyArg::Rewind => Strategy::Rewind {
                threshold: self.threshold,
                max_draws: self.max_draws,
            },
            // Controlled decoding runs through `tilt_decode::cd::generate_controlled`
            // (see `cd_strategy`); the config still carries seed and lengths.
            StrategyArg::CdToken | StrategyArg::CdBlock => Strategy::Sample,
        };
        let config = GenerationConfig {
            strategy,
            n: self.n,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams::new(self.temperature, self.top_k, self.top_p)
                .map_err(usage)?,
            chat_template: !self.no_chat_template,
        };
        config.validate().map_err(usage)?;
        Ok(config)
    }

    /// The controlled-decoding strategy these flags describe, if any (`--lambda` is λ and
    /// `--top-k` the candidates per step for cd-token).
    pub fn cd_strategy(&self) -> Option<tilt_decode::cd::CdStrategy> {
        match self.strategy {
            StrategyArg::CdToken => Some(tilt_decode::cd::CdStrategy::CdToken {
                lambda: self.lambda,
                top_k: self.top_k.unwrap_or(10),
            }),
            StrategyArg::CdBlock => Some(tilt_decode::cd::CdStrategy::CdBlock {
                k: self.block_k,
                m: self.block_m,
            }),
            _ => None,
        }
    }

    /// Every flag written out (for the manifest; `--manifest` left out), starting with the
    /// subcommand's name.
    pub fn resolved_args(&self) -> Vec<String> {
        let mut a = vec!["generate".to_string()];
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        if let Some(p) = &self.prompt {
            push("--prompt", p.clone());
        }
        if let Some(p) = &self.prompts {
            push("--prompts", p.display().to_string());
        }
        let strategy = self
            .strategy
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string());
        push("--strategy", strategy);
        push("--n", self.n.to_string());
        push("--seed", self.seed.to_string());
        push("--max-new-tokens", self.max_new_tokens.to_string());
        push("--temperature", self.temperature.to_string());
        if let Some(k) = self.top_k {
            push("--top-k", k.to_string());
        }
        if let Some(p) = self.top_p {
            push("--top-p", p.to_string());
        }
        push("--lambda", self.lambda.to_string());
        push("--threshold", self.threshold.to_string());
        push("--max-draws", self.max_draws.to_string());
        if let Some(m) = &self.model {
            push("--model", m.display().to_string());
        }
        push("--reward", self.reward.clone());
        push("--threads", self.threads.to_string());
        if self.no_chat_template {
            a.push("--no-chat-template".into());
        }
        if let Some(s) = &self.scorer {
            a.extend(["--scorer".to_string(), s.display().to_string()]);
            a.extend(["--block-k".to_string(), self.block_k.to_string()]);
            a.extend(["--block-m".to_string(), self.block_m.to_string()]);
        }
        a
    }
}

/// One prompt to run, or the reason its line could not be read.
enum PromptLine {
    Ok {
        index: u64,
        text: String,
    },
    Bad {
        index: u64,
        line: usize,
        error: String,
    },
}

/// The prompts: `--prompt`, or the lines of `--prompts` (blank lines skipped; a line's
/// index is its line number − 1, which picks its random streams).
fn read_prompts(args: &GenerateArgs) -> anyhow::Result<(Vec<PromptLine>, Option<PathBuf>)> {
    if let Some(p) = &args.prompt {
        if p.trim().is_empty() {
            return Err(usage("--prompt: empty prompt"));
        }
        return Ok((
            vec![PromptLine::Ok {
                index: 0,
                text: p.clone(),
            }],
            None,
        ));
    }
    let path = args
        .prompts
        .as_ref()
        .ok_or_else(|| usage("give --prompt TEXT or --prompts FILE.jsonl"))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("--prompts {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let index = i as u64;
        let parsed = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::String(s)) => Ok(s),
            Ok(serde_json::Value::Object(m)) => match m.get("prompt") {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("\"prompt\" is {other}, not a string")),
                None => Err("no \"prompt\" field".to_string()),
            },
            Ok(other) => Err(format!(
                "expected {{\"prompt\": \"…\"}} or a string, got {other}"
            )),
            Err(e) => Err(format!("malformed JSON: {e}")),
        };
        out.push(match parsed {
            Ok(text) => PromptLine::Ok { index, text },
            Err(error) => PromptLine::Bad {
                index,
                line: i + 1,
                error,
            },
        });
    }
    if out.is_empty() {
        return Err(usage(format!("--prompts {}: no prompts", path.display())));
    }
    Ok((out, Some(path.clone())))
}

/// What a run produced besides its output lines.
pub struct RunRecord {
    /// Files that determined it, with hashes.
    pub files: Vec<HashedFile>,
    /// Threads used.
    pub threads: usize,
    /// Wall times by phase, seconds.
    pub wall_seconds: serde_json::Value,
    /// Failed prompt lines (`FILE line K: …`).
    pub failures: Vec<String>,
}

/// Run generation, writing (and flushing) each JSON line to `out` as soon as it is done.
///
/// # Errors
/// Usage errors (exit 2) for bad flags and inputs; loading or model failures (exit 1). A
/// bad prompt line is not an error here: it is written as an error object and listed in
/// [`RunRecord::failures`].
pub fn execute(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<RunRecord> {
    let t0 = Instant::now();
    let config = args.config()?;
    let (prompts, prompts_path) = read_prompts(args)?;
    let threads = if args.threads == 0 {
        tilt_models::threads::num_threads()
    } else {
        args.threads
    };
    let model_path = policy_path(&args.model)?;
    let policy: LlamaPolicy = load_policy(&model_path, threads)?;
    let reward = load_reward(&args.reward)?;
    let cd = crate::runtime::load_cd(args, &policy)?;
    let load_s = t0.elapsed().as_secs_f64();
    // Refuse a batch that cannot fit in memory before any work.
    let cfg = policy.model().config();
    let kv_bytes_per_token =
        2 * cfg.n_layers as u64 * cfg.n_kv_heads as u64 * cfg.head_dim as u64 * 4;
    if let Some(avail) = available_memory_bytes() {
        check_batch_memory(
            config.n,
            // The prompt's cache is shared by all N (one copy), small beside N suffixes.
            0,
            config.max_new_tokens,
            kv_bytes_per_token,
            policy.vocab_size(),
            avail,
        )
        .map_err(usage)?;
    }
    let mut files = vec![hashed("policy", &model_path)?];
    for a in reward.artifacts() {
        files.push(hashed("reward", &a)?);
    }
    if let Some(p) = &prompts_path {
        files.push(hashed("prompts", p)?);
    }
    if let Some(p) = &args.scorer {
        files.push(hashed("scorer", p)?);
    }
    let source = prompts_path
        .as_ref()
        .map_or_else(|| "--prompt".to_string(), |p| p.display().to_string());
    let bar = if prompts.len() > 1 {
        let b = indicatif::ProgressBar::new(prompts.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} prompts {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let t1 = Instant::now();
    let mut failures = Vec::new();
    for p in &prompts {
        let line = match p {
            PromptLine::Bad { index, line, error } => {
                let msg = format!("{source} line {line}: {error}");
                failures.push(msg.clone());
                bar.suspend(|| eprintln!("error: {msg}"));
                json!({"index": index, "line": line, "error": msg})
            }
            PromptLine::Ok { index, text } => {
                let result = match &cd {
                    Some((strategy, scorer)) => tilt_decode::cd::generate_controlled(
                        &policy,
                        reward.as_ref(),
                        scorer,
                        text,
                        *index,
                        strategy,
                        config.seed,
                        config.max_new_tokens,
                        config.chat_template,
                    ),
                    None => generate(&policy, reward.as_ref(), text, *index, &config),
                };
                match result {
                    Ok(o) => serde_json::to_value(&o)?,
                    Err(e) if e.is_input_error() => {
                        let msg = if prompts_path.is_some() {
                            format!("{source} line {}: {e}", index + 1)
                        } else {
                            return Err(usage(e));
                        };
                        failures.push(msg.clone());
                        bar.suspend(|| eprintln!("error: {msg}"));
                        json!({"index": index, "line": index + 1, "error": msg})
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e))
                            .with_context(|| format!("{source}: prompt {}", index + 1))
                    }
                }
            }
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
        out.flush()?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let generate_s = t1.elapsed().as_secs_f64();
    Ok(RunRecord {
        files,
        threads,
        wall_seconds: json!({
            "load": load_s,
            "generate": generate_s,
            "total": t0.elapsed().as_secs_f64(),
        }),
        failures,
    })
}

/// A writer that passes bytes to stdout and keeps a copy (for the manifest's output hash).
struct Tee<'a> {
    inner: &'a mut dyn Write,
    copy: Vec<u8>,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The git commit the binary was built from (build.rs), or `unknown`.
pub const GIT_COMMIT: &str = env!("TILT_GIT_COMMIT");

/// Run `tilt generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let mut tee = Tee {
        inner: &mut lock,
        copy: Vec::new(),
    };
    let record = execute(&args, &mut tee)?;
    let output = tee.copy;
    if let Some(path) = &args.manifest {
        let config = args.config()?;
        let mut config = serde_json::to_value(&config)?;
        // Controlled decoding runs outside `GenerationConfig`'s strategies: record the one
        // that actually ran.
        if let Some(cd) = args.cd_strategy() {
            config["strategy"] = serde_json::to_value(&cd)?;
        }
        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: GIT_COMMIT.to_string(),
            command: "generate".into(),
            args: args.resolved_args(),
            config,
            seed: args.seed,
            files: record.files,
            host: HostInfo::current(record.threads),
            wall_seconds: record.wall_seconds,
            output: RecordedOutput::from_bytes(&output),
        };
        manifest
            .write(path)
            .with_context(|| format!("writing the manifest {}", path.display()))?;
    }
    if !record.failures.is_empty() {
        return Err(usage(format!(
            "{} prompt line(s) failed (the others completed): {}",
            record.failures.len(),
            record.failures.join("; ")
        )));
    }
    Ok(())
}
