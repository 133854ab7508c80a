//! `tilt generate`: sample, best-of-N, worst-of-N, soft best-of-N or rewind-and-repeat on
//! one prompt or a JSONL file of prompts, one JSON line per prompt on stdout, each with
//! every candidate and the KL it cost (nats); optionally a manifest to re-run and verify.
//!
//! Robustness: every finished line is written and flushed at once, so nothing done is lost
//! if a later prompt fails. A bad prompt line (malformed JSON, empty prompt, too long for
//! the context) is reported on stderr as `FILE line K: …` and as a JSON error object on
//! stdout for that line; the other prompts still run, and the exit code is non-zero at the
//! end.

use crate::runtime::{
    check_memory, check_scorer_fits, check_writable, hashed, load_policy, load_reward, load_scorer,
    policy_path, resolve_threads, GIT_COMMIT, TOOL_VERSION,
};
use crate::usage;
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tilt_decode::cd::{CdBlockParams, CdStrategy, CdTokenParams};
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

/// Default of `--n`.
pub const DEFAULT_N: usize = 4;
/// Default of `--temperature`.
pub const DEFAULT_TEMPERATURE: f64 = 1.0;
/// Default of `--lambda`.
pub const DEFAULT_LAMBDA: f64 = 1.0;
/// Default of `--threshold`.
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// Default of `--max-draws`.
pub const DEFAULT_MAX_DRAWS: usize = 64;
/// Default of `--top-k` for cd-token (the other strategies default to no truncation).
pub const DEFAULT_CD_TOP_K: usize = 10;
/// Default of `--block-k`.
pub const DEFAULT_BLOCK_K: usize = 4;
/// Default of `--block-m`.
pub const DEFAULT_BLOCK_M: usize = 8;

/// Flags of `tilt generate`.
///
/// A flag that does not apply to the chosen strategy (e.g. `--temperature` with cd-block,
/// `--threshold` with bon) is refused when given a value other than its default, rather than
/// silently ignored.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt (a user message; the model's chat template is applied). A prompt that
    /// starts with `-` is given as `--prompt=-…`.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A JSON-lines file of prompts: each line `{"prompt": "…"}` or a JSON string.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The selection strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Bon)]
    pub strategy: StrategyArg,
    /// Number of candidates (for rewind: draws per batch) [default: 4]. Not for cd-token and
    /// cd-block, which return one output per prompt (their batches are --top-k and
    /// --block-k).
    #[arg(long)]
    pub n: Option<usize>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most new tokens per candidate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (1: the model's own distribution). Not for cd-token and cd-block,
    /// which sample from the model's own distribution p so that their KL is against p.
    #[arg(long, default_value_t = DEFAULT_TEMPERATURE)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens (cd-token: its candidates per step,
    /// default 10).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens holding this much mass (not for cd-token
    /// and cd-block).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Soft best-of-N temperature λ (reward units); cd-token's guidance strength λ.
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    pub lambda: f64,
    /// Rewind acceptance threshold on the reward.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    pub threshold: f64,
    /// Rewind cap on the number of draws.
    #[arg(long, default_value_t = DEFAULT_MAX_DRAWS)]
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
    #[arg(long, default_value_t = DEFAULT_BLOCK_K)]
    pub block_k: usize,
    /// cd-block: tokens per block (M).
    #[arg(long, default_value_t = DEFAULT_BLOCK_M)]
    pub block_m: usize,
}

/// The flags that only some strategies use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    N,
    Temperature,
    TopK,
    TopP,
    Lambda,
    Threshold,
    MaxDraws,
    Scorer,
    BlockK,
    BlockM,
}

impl Flag {
    const ALL: [Flag; 10] = [
        Flag::N,
        Flag::Temperature,
        Flag::TopK,
        Flag::TopP,
        Flag::Lambda,
        Flag::Threshold,
        Flag::MaxDraws,
        Flag::Scorer,
        Flag::BlockK,
        Flag::BlockM,
    ];

    fn name(self) -> &'static str {
        match self {
            Flag::N => "--n",
            Flag::Temperature => "--temperature",
            Flag::TopK => "--top-k",
            Flag::TopP => "--top-p",
            Flag::Lambda => "--lambda",
            Flag::Threshold => "--threshold",
            Flag::MaxDraws => "--max-draws",
            Flag::Scorer => "--scorer",
            Flag::BlockK => "--block-k",
            Flag::BlockM => "--block-m",
        }
    }
}

impl StrategyArg {
    /// The name on the command line (`cd-token`, …).
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

    fn is_cd(self) -> bool {
        matches!(self, StrategyArg::CdToken | StrategyArg::CdBlock)
    }

    /// Whether the strategy reads `flag`.
    fn uses(self, flag: Flag) -> bool {
        use Flag::*;
        let sampling = matches!(flag, N | Temperature | TopK | TopP);
        match self {
            StrategyArg::Sample | StrategyArg::Bon | StrategyArg::Won => sampling,
            StrategyArg::SoftBon => sampling || flag == Lambda,
            StrategyArg::Rewind => sampling || matches!(flag, Threshold | MaxDraws),
            StrategyArg::CdToken => matches!(flag, Lambda | TopK | Scorer),
            StrategyArg::CdBlock => matches!(flag, BlockK | BlockM | Scorer),
        }
    }
}

impl GenerateArgs {
    /// N: `--n` or its default.
    pub fn n(&self) -> usize {
        self.n.unwrap_or(DEFAULT_N)
    }

    /// Whether `flag` was given a value other than its default.
    fn is_set(&self, flag: Flag) -> bool {
        match flag {
            Flag::N => self.n.is_some(),
            Flag::Temperature => self.temperature != DEFAULT_TEMPERATURE,
            Flag::TopK => self.top_k.is_some(),
            Flag::TopP => self.top_p.is_some(),
            Flag::Lambda => self.lambda != DEFAULT_LAMBDA,
            Flag::Threshold => self.threshold != DEFAULT_THRESHOLD,
            Flag::MaxDraws => self.max_draws != DEFAULT_MAX_DRAWS,
            Flag::Scorer => self.scorer.is_some(),
            Flag::BlockK => self.block_k != DEFAULT_BLOCK_K,
            Flag::BlockM => self.block_m != DEFAULT_BLOCK_M,
        }
    }

    /// Refuse a flag set for a strategy that does not read it.
    fn check_flags_apply(&self) -> anyhow::Result<()> {
        let st = self.strategy;
        for flag in Flag::ALL {
            if st.uses(flag) || !self.is_set(flag) {
                continue;
            }
            let why = match flag {
                Flag::Temperature | Flag::TopP if st.is_cd() => format!(
                    "{} samples from the model's own distribution p (temperature 1, no top-p), \
                     so that its KL accounting is against p; remove {}",
                    st.name(),
                    flag.name()
                ),
                Flag::N if st.is_cd() => format!(
                    "{} returns one output per prompt; its batch is {} (remove --n)",
                    st.name(),
                    if st == StrategyArg::CdToken {
                        "--top-k"
                    } else {
                        "--block-k"
                    }
                ),
                _ => format!("has no effect with --strategy {}; remove it", st.name()),
            };
            return Err(usage(format!("{}: {why}", flag.name())));
        }
        Ok(())
    }

    /// The library configuration these flags describe (for cd-token and cd-block: the seed,
    /// lengths and template, with n = 1, since they run through
    /// `tilt_decode::cd::generate_controlled`; see [`GenerateArgs::cd_strategy`]).
    ///
    /// # Errors
    /// A usage error naming the flag: a bad value, or a flag the strategy does not read.
    pub fn config(&self) -> anyhow::Result<GenerationConfig> {
        self.check_flags_apply()?;
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
            StrategyArg::CdToken | StrategyArg::CdBlock => Strategy::Sample,
        };
        let config = GenerationConfig {
            strategy,
            n: if self.strategy.is_cd() { 1 } else { self.n() },
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            sampling: if self.strategy.is_cd() {
                SamplingParams::default()
            } else {
                SamplingParams::new(self.temperature, self.top_k, self.top_p).map_err(usage)?
            },
            chat_template: !self.no_chat_template,
        };
        config.validate().map_err(usage)?;
        if let Some(cd) = self.cd_strategy() {
            match cd {
                CdStrategy::CdToken { lambda, top_k } => CdTokenParams {
                    lambda,
                    top_k,
                    max_new_tokens: self.max_new_tokens,
                    seed: self.seed,
                }
                .validate(),
                CdStrategy::CdBlock { k, m } => CdBlockParams {
                    k,
                    m,
                    max_new_tokens: self.max_new_tokens,
                    seed: self.seed,
                }
                .validate(),
            }
            .map_err(usage)?;
            if self.scorer.is_none() {
                return Err(usage(format!(
                    "--scorer: --strategy {} needs a prefix scorer file (train one with `tilt \
                     train-scorer`)",
                    self.strategy.name()
                )));
            }
        }
        Ok(config)
    }

    /// The controlled-decoding strategy these flags describe, if any (`--lambda` is λ and
    /// `--top-k` the candidates per step for cd-token).
    pub fn cd_strategy(&self) -> Option<CdStrategy> {
        match self.strategy {
            StrategyArg::CdToken => Some(CdStrategy::CdToken {
                lambda: self.lambda,
                top_k: self.top_k.unwrap_or(DEFAULT_CD_TOP_K),
            }),
            StrategyArg::CdBlock => Some(CdStrategy::CdBlock {
                k: self.block_k,
                m: self.block_m,
            }),
            _ => None,
        }
    }

    /// The sequences stepped at once, and the flag that sets it: N (a rewind batch), cd-token's
    /// min(k, vocabulary) children, cd-block's K continuations.
    pub fn batch(&self, vocab: usize) -> (&'static str, usize) {
        match self.cd_strategy() {
            Some(CdStrategy::CdToken { top_k, .. }) => ("--top-k", top_k.min(vocab)),
            Some(CdStrategy::CdBlock { k, .. }) => ("--block-k", k),
            None => ("--n", self.n()),
        }
    }

    /// Every flag the strategy reads, resolved (defaults written out, the default model's
    /// path included), as `--flag=VALUE` so that a value starting with `-` parses back; for
    /// the manifest (`--manifest` left out), starting with the subcommand's name.
    /// `model_path` is the policy file the run used.
    pub fn resolved_args(&self, model_path: &Path) -> Vec<String> {
        let mut a = vec!["generate".to_string()];
        let mut push = |k: &str, v: String| a.push(format!("{k}={v}"));
        if let Some(p) = &self.prompt {
            push("--prompt", p.clone());
        }
        if let Some(p) = &self.prompts {
            push("--prompts", p.display().to_string());
        }
        let st = self.strategy;
        push("--strategy", st.name().to_string());
        push("--seed", self.seed.to_string());
        push("--max-new-tokens", self.max_new_tokens.to_string());
        if st.uses(Flag::N) {
            push("--n", self.n().to_string());
        }
        if st.uses(Flag::Temperature) {
            push("--temperature", self.temperature.to_string());
        }
        match (self.cd_strategy(), self.top_k) {
            (Some(CdStrategy::CdToken { top_k, .. }), _) => push("--top-k", top_k.to_string()),
            (_, Some(k)) if st.uses(Flag::TopK) => push("--top-k", k.to_string()),
            _ => {}
        }
        if let Some(p) = self.top_p.filter(|_| st.uses(Flag::TopP)) {
            push("--top-p", p.to_string());
        }
        if st.uses(Flag::Lambda) {
            push("--lambda", self.lambda.to_string());
        }
        if st.uses(Flag::Threshold) {
            push("--threshold", self.threshold.to_string());
        }
        if st.uses(Flag::MaxDraws) {
            push("--max-draws", self.max_draws.to_string());
        }
        if let Some(s) = self.scorer.as_ref().filter(|_| st.uses(Flag::Scorer)) {
            push("--scorer", s.display().to_string());
        }
        if st.uses(Flag::BlockK) {
            push("--block-k", self.block_k.to_string());
        }
        if st.uses(Flag::BlockM) {
            push("--block-m", self.block_m.to_string());
        }
        push("--model", model_path.display().to_string());
        push("--reward", self.reward.clone());
        push("--threads", self.threads.to_string());
        if self.no_chat_template {
            a.push("--no-chat-template".into());
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
    /// The policy file used (`--model` or the default's path).
    pub model_path: PathBuf,
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
    if let Some(path) = &args.manifest {
        check_writable("--manifest", path)?;
    }
    let (prompts, prompts_path) = read_prompts(args)?;
    // The scorer file is read before the (slower) policy, and checked against it after.
    let cd = match args.cd_strategy() {
        Some(strategy) => Some((strategy, load_scorer(args.scorer.as_deref())?)),
        None => None,
    };
    let threads = resolve_threads(args.threads);
    let model_path = policy_path(&args.model)?;
    let policy: LlamaPolicy = load_policy(&model_path, threads)?;
    if let Some((_, scorer)) = &cd {
        check_scorer_fits(scorer, &policy)?;
    }
    let reward = load_reward(&args.reward)?;
    let load_s = t0.elapsed().as_secs_f64();
    // Refuse a batch that cannot fit in memory before any work.
    let (flag, batch) = args.batch(policy.vocab_size());
    check_memory(&policy, flag, batch, config.max_new_tokens)?;
    let mut files = vec![hashed("policy", &model_path)?];
    for a in reward.artifacts() {
        files.push(hashed("reward", &a)?);
    }
    if let Some(p) = &prompts_path {
        files.push(hashed("prompts", p)?);
    }
    if let (Some(p), Some(_)) = (&args.scorer, &cd) {
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
        model_path,
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
            tool_version: TOOL_VERSION.to_string(),
            git_commit: GIT_COMMIT.to_string(),
            command: "generate".into(),
            args: args.resolved_args(&record.model_path),
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

#[cfg(test)]
mod tests {
    use crate::reproduce::parse_generate_args;

    fn config_error(args: &[&str]) -> String {
        let mut owned = vec!["generate".to_string(), "--prompt".into(), "hi".into()];
        owned.extend(args.iter().map(|s| s.to_string()));
        let a = parse_generate_args(&owned).unwrap();
        match a.config() {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn flags_a_strategy_does_not_read_are_refused_not_ignored() {
        for (args, flag, words) in [
            (
                &[
                    "--strategy",
                    "cd-block",
                    "--scorer",
                    "s",
                    "--temperature",
                    "0.7",
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
                "--top-k",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--n", "2"][..],
                "--n:",
                "--block-k",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--top-k", "5"][..],
                "--top-k:",
                "cd-block",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--lambda", "3"][..],
                "--lambda:",
                "cd-block",
            ),
            (
                &["--strategy", "cd-token", "--scorer", "s", "--block-k", "2"][..],
                "--block-k:",
                "cd-token",
            ),
            (
                &["--strategy", "bon", "--threshold", "0.9"][..],
                "--threshold:",
                "bon",
            ),
            (
                &["--strategy", "bon", "--scorer", "s"][..],
                "--scorer:",
                "bon",
            ),
            (
                &["--strategy", "cd-token"][..],
                "--scorer:",
                "needs a prefix scorer",
            ),
            (
                &["--strategy", "cd-block", "--scorer", "s", "--block-k", "0"][..],
                "--block-k",
                "K is 0",
            ),
        ] {
            let e = config_error(args);
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
            &[
                "--strategy",
                "cd-block",
                "--scorer",
                "s",
                "--block-k",
                "2",
                "--temperature",
                "1",
            ][..],
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
        ] {
            assert_eq!(config_error(ok), "", "{ok:?}");
        }
    }

    #[test]
    fn the_memory_check_uses_the_batch_that_actually_runs() {
        let parse = |args: &[&str]| {
            let mut owned = vec!["generate".to_string(), "--prompt".into(), "hi".into()];
            owned.extend(args.iter().map(|s| s.to_string()));
            parse_generate_args(&owned).unwrap()
        };
        assert_eq!(parse(&[]).batch(49152), ("--n", 4));
        assert_eq!(parse(&["--n", "16"]).batch(49152), ("--n", 16));
        assert_eq!(
            parse(&["--strategy", "cd-token", "--top-k", "50"]).batch(49152),
            ("--top-k", 50)
        );
        // k beyond the vocabulary is the whole vocabulary.
        assert_eq!(
            parse(&["--strategy", "cd-token", "--top-k", "50"]).batch(4),
            ("--top-k", 4)
        );
        assert_eq!(
            parse(&["--strategy", "cd-block", "--block-k", "6"]).batch(49152),
            ("--block-k", 6)
        );
    }
}
