//! `tilt eval`: several strategies on a prompts file, judged against reference samples,
//! beside the exact best-of-n and tilt curves; JSON on stdout, an optional SVG, and always a
//! manifest. The engine is `tilt_decode::eval`; this file loads models and writes files.

use crate::output::{emit_to, Format};
use crate::runtime::{
    check_memory, check_scorer_fits, check_writable, hashed, load_policy, load_reward, load_scorer,
    policy_path, read_prompts, resolve_threads, GIT_COMMIT, TOOL_VERSION,
};
use crate::usage;
use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tilt_decode::cd::PrefixScorer;
use tilt_decode::eval::{evaluate, parse_strategies, EvalConfig, EvalReport, EvalStrategy};
use tilt_decode::manifest::{HostInfo, Manifest, RecordedOutput, MANIFEST_VERSION};
use tilt_models::Policy;
use tilt_plot::{write_svg, Panel, Series, SeriesStyle};

/// Flags of `tilt eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Prompts: a JSONL file with one `{"prompt": "..."}` per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Strategies, e.g. `sample,bon:1,2,4,8,16,cd-block:K=4,M=8,cd-token:lambda=2,k=10`.
    #[arg(long, default_value = "sample,bon:1,2,4,8,16")]
    pub strategies: String,
    /// Reference samples from p per prompt (the yardstick of win rates).
    #[arg(long, default_value_t = 16)]
    pub reference_samples: usize,
    /// Outputs per strategy and prompt.
    #[arg(long, default_value_t = 1)]
    pub samples_per_prompt: usize,
    /// Most new tokens per output.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prefix scorer file (`tilt train-scorer`), needed by cd-block and cd-token.
    #[arg(long)]
    pub scorer: Option<PathBuf>,
    /// Policy GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Reward: minilm, minilm:target=TEXT, head:PATH, command:CMD, http:URL.
    #[arg(long, default_value = "minilm")]
    pub reward: String,
    /// Threads (0: TILT_NUM_THREADS, RAYON_NUM_THREADS or the number of cores). The output
    /// does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Do not wrap prompts in the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Write win rate vs KL and reward vs KL to this SVG file (its directory must exist; it
    /// is checked before any work).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Where to write the run manifest.
    #[arg(long, default_value = "tilt-eval.manifest.json")]
    pub manifest: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// Run `tilt eval`.
///
/// Order, so that nothing is lost: every input and both output paths are checked before the
/// models load; after the (long) evaluation the report is printed first, then the plot is
/// written (a failure there is a warning on stderr), then the manifest.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let t_start = Instant::now();
    check_writable("--manifest", &args.manifest)?;
    if let Some(p) = &args.plot {
        check_writable("--plot", p)?;
    }
    let prompts = read_prompts(&args.prompts)?;
    let strategies = parse_strategies(&args.strategies).map_err(usage)?;
    let config = EvalConfig {
        strategies,
        reference_samples: args.reference_samples,
        samples_per_prompt: args.samples_per_prompt,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        chat_template: !args.no_chat_template,
    };
    config.validate().map_err(usage)?;
    let needs_scorer = config.strategies.iter().any(EvalStrategy::needs_scorer);
    let scorer = match (&args.scorer, needs_scorer) {
        (Some(p), true) => Some(load_scorer(Some(p))?),
        (None, false) => None,
        (None, true) => {
            return Err(usage(
                "--scorer: cd-block and cd-token need a prefix scorer file (train one with \
                 `tilt train-scorer`)",
            ))
        }
        (Some(_), false) => {
            return Err(usage(
                "--scorer: has no effect, no cd-block or cd-token in --strategies; remove it",
            ))
        }
    };
    let threads = resolve_threads(args.threads);
    let model_path = policy_path(&args.model)?;
    let policy = load_policy(&model_path, threads)?;
    if let Some(s) = &scorer {
        check_scorer_fits(s, &policy)?;
    }
    // Refuse, before any work, a batch that cannot fit in memory.
    for b in config.batches(policy.vocab_size()) {
        check_memory(&policy, &b.input, b.sequences, config.max_new_tokens)?;
    }
    let reward = load_reward(&args.reward)?;
    let t_load = t_start.elapsed().as_secs_f64();
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} prompts {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut timings: std::collections::BTreeMap<String, f64> = Default::default();
    let t_eval = Instant::now();
    let report: EvalReport = evaluate(
        &policy,
        reward.as_ref(),
        scorer.as_ref().map(|s| s as &dyn PrefixScorer),
        &prompts,
        &config,
        |done| bar.set_position(done as u64),
        |label, secs| *timings.entry(label.to_string()).or_default() += secs,
    )
    .map_err(|e| {
        if e.is_input_error() {
            usage(e)
        } else {
            anyhow::Error::new(e)
        }
    })?;
    bar.finish_and_clear();
    let eval_secs = t_eval.elapsed().as_secs_f64();
    tracing::info!(eval_secs, "tilt eval done");
    let value = serde_json::to_value(&report)?;
    let bytes = format!("{}\n", serde_json::to_string(&value)?).into_bytes();
    // The manifest.
    let mut files = vec![
        hashed("policy", &model_path)?,
        hashed("prompts", &args.prompts)?,
    ];
    if let Some(p) = &args.scorer {
        files.push(hashed("scorer", p)?);
    }
    for a in reward.artifacts() {
        files.push(hashed("reward", &a)?);
    }
    let mut resolved = vec!["eval".to_string()];
    let mut push = |k: &str, v: String| resolved.push(format!("{k}={v}"));
    push("--prompts", args.prompts.display().to_string());
    push("--strategies", args.strategies.clone());
    push("--reference-samples", args.reference_samples.to_string());
    push("--samples-per-prompt", args.samples_per_prompt.to_string());
    push("--max-new-tokens", args.max_new_tokens.to_string());
    push("--seed", args.seed.to_string());
    push("--model", model_path.display().to_string());
    push("--reward", args.reward.clone());
    push("--threads", args.threads.to_string());
    if let Some(p) = &args.scorer {
        push("--scorer", p.display().to_string());
    }
    if let Some(p) = &args.plot {
        push("--plot", p.display().to_string());
    }
    if args.no_chat_template {
        resolved.push("--no-chat-template".into());
    }
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        tool_version: TOOL_VERSION.into(),
        git_commit: GIT_COMMIT.into(),
        command: "eval".into(),
        args: resolved,
        config: serde_json::to_value(&config)?,
        seed: args.seed,
        files,
        host: HostInfo::current(threads),
        wall_seconds: json!({
            "load": t_load,
            "eval": eval_secs,
            "by_strategy": timings,
            "total": t_start.elapsed().as_secs_f64(),
        }),
        output: RecordedOutput::from_bytes(&bytes),
    };
    let plot = args.plot.as_deref().map(|path| {
        (path, move |p: &Path| {
            write_plot(p, &report).map_err(|e| e.to_string())
        })
    });
    let mut stdout = std::io::stdout().lock();
    finish(
        &value,
        args.format,
        &mut stdout,
        plot,
        &manifest,
        &args.manifest,
    )?;
    eprintln!(
        "tilt eval: {} prompts in {eval_secs:.1} s; manifest {}",
        prompts.len(),
        args.manifest.display()
    );
    Ok(())
}

/// Write what an evaluation produced, losing as little as possible: print the report to
/// `out` first, then write the plot (a failure is a warning on stderr: the report and
/// manifest do not depend on it), then the manifest, and only then return a failure to
/// print (so that a closed pipe cannot lose the manifest).
///
/// # Errors
/// The manifest cannot be written (the report is printed already); printing failed (the
/// manifest is written already).
fn finish<F>(
    value: &serde_json::Value,
    format: Format,
    out: &mut dyn Write,
    plot: Option<(&Path, F)>,
    manifest: &Manifest,
    manifest_path: &Path,
) -> anyhow::Result<()>
where
    F: FnOnce(&Path) -> Result<(), String>,
{
    let printed = emit_to(out, value, format);
    if let Some((path, write)) = plot {
        if let Err(e) = write(path) {
            eprintln!(
                "warning: --plot {}: not written ({e}); the report and the manifest do not \
                 depend on it",
                path.display()
            );
        }
    }
    manifest.write(manifest_path).with_context(|| {
        format!(
            "--manifest {}: writing the manifest",
            manifest_path.display()
        )
    })?;
    printed
}

/// Win rate vs KL and reward vs KL: measured strategies as points, exact best-of-n (line)
/// and tilt (dashed) for the reference samples' empirical distributions.
fn write_plot(path: &Path, report: &EvalReport) -> Result<(), tilt_plot::PlotError> {
    let mut win = Vec::new();
    let mut rew = Vec::new();
    let bon_w: Vec<(f64, f64)> = report
        .exact_best_of_n
        .iter()
        .map(|c| (c.kl, c.win_rate))
        .collect();
    let bon_r: Vec<(f64, f64)> = report
        .exact_best_of_n
        .iter()
        .map(|c| (c.kl, c.expected_reward))
        .collect();
    let tilt_w: Vec<(f64, f64)> = report
        .exact_tilt
        .iter()
        .map(|c| (c.kl, c.win_rate))
        .collect();
    let tilt_r: Vec<(f64, f64)> = report
        .exact_tilt
        .iter()
        .map(|c| (c.kl, c.expected_reward))
        .collect();
    win.push(Series::new(
        "best-of-n, exact (reference samples)",
        bon_w,
        SeriesStyle::Line,
    ));
    win.push(Series::new(
        "tilt, exact (reference samples)",
        tilt_w,
        SeriesStyle::Dashed,
    ));
    rew.push(Series::new(
        "best-of-n, exact (reference samples)",
        bon_r,
        SeriesStyle::Line,
    ));
    rew.push(Series::new(
        "tilt, exact (reference samples)",
        tilt_r,
        SeriesStyle::Dashed,
    ));
    for s in &report.strategies {
        let name = format!("{} (KL {})", s.strategy, s.kl_kind);
        let mut w = Series::new(name.clone(), vec![(s.kl, s.win_rate)], SeriesStyle::Points);
        if let Some([lo, hi]) = s.win_rate_ci95 {
            w.error_bars = Some(vec![(lo, hi)]);
        }
        win.push(w);
        rew.push(Series::new(
            name,
            vec![(s.kl, s.mean_reward)],
            SeriesStyle::Points,
        ));
    }
    let panels = [
        Panel {
            title: "Win rate vs KL".into(),
            x_label: "KL(π‖p) (nats)".into(),
            y_label: "win rate over reference samples".into(),
            log_x: false,
            series: win,
        },
        Panel {
            title: "Reward vs KL".into(),
            x_label: "KL(π‖p) (nats)".into(),
            y_label: format!("mean reward ({})", report.reward),
            log_x: false,
            series: rew,
        },
    ];
    write_svg(
        path,
        &format!("tilt eval: {} prompts", report.prompts),
        &panels,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            tool_version: TOOL_VERSION.into(),
            git_commit: GIT_COMMIT.into(),
            command: "eval".into(),
            args: vec!["eval".into()],
            config: json!({}),
            seed: 0,
            files: vec![],
            host: HostInfo::current(1),
            wall_seconds: json!({}),
            output: RecordedOutput::from_bytes(b"{\"a\":1}\n"),
        }
    }

    #[test]
    fn a_late_plot_failure_keeps_the_report_and_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = dir.path().join("m.json");
        let plot = dir.path().join("p.svg");
        let mut out = Vec::new();
        let called = std::cell::Cell::new(false);
        finish(
            &json!({"a": 1}),
            Format::Json,
            &mut out,
            Some((plot.as_path(), |_: &Path| {
                called.set(true);
                Err("disk full".to_string())
            })),
            &manifest(),
            &manifest_path,
        )
        .unwrap();
        assert!(called.get());
        assert_eq!(out, b"{\"a\":1}\n");
        assert_eq!(Manifest::read(&manifest_path).unwrap(), manifest());
    }

    #[test]
    fn the_report_is_printed_before_the_manifest_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("gone").join("m.json");
        let mut out = Vec::new();
        let e = finish(
            &json!({"a": 1}),
            Format::Json,
            &mut out,
            None::<(&Path, fn(&Path) -> Result<(), String>)>,
            &manifest(),
            &bad,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--manifest"), "{e}");
        assert_eq!(out, b"{\"a\":1}\n", "the report is out before the failure");
    }
}
