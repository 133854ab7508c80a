//! `tilt eval`: several strategies on a prompts file, judged against reference samples,
//! beside the exact best-of-n and tilt curves; JSON on stdout, an optional SVG, and always a
//! manifest. The engine is `tilt_engine::eval`; this file parses flags and writes files.

use crate::args::{check_plot, check_writable, cli_error, parse_seed, scorer_spec, EngineArgs};
use crate::progress::CliProgress;
use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tilt_engine::eval::{frontier_strategies, parse_strategies, EvalConfig, EvalReport};
use tilt_engine::manifest::Manifest;
use tilt_engine::run::{input_files, json_line, remote_input_files, run_eval, Run};
use tilt_engine::{Engine, RemoteEngine, ScorerSpec, Strategy};
use tilt_output::{emit_to, Format};
use tilt_plot::{write_svg, Panel, Series, SeriesStyle};

/// Flags of `tilt eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Prompts: a JSONL file with one `{"prompt": "..."}` (or `{"messages": [...]}`) per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Strategies separated by `;`, each with its arguments after `:`, e.g.
    /// `sample; bon:1,2,4,8,16; won:4; soft-bon:n=4,lambda=0.5; cd-block:K=4,M=8;
    /// cd-token:lambda=2,k=10`.
    #[arg(long, default_value = "sample; bon:1,2,4,8,16")]
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
    /// Seed (a whole number from 0 to 2^64 − 1).
    #[arg(long, default_value_t = 0, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: u64,
    /// Prefix scorer file (`tilt train-scorer`), needed by cd-block and cd-token; as
    /// FILE:weight=W and repeated, the cd strategies are guided by the weighted sum Σ W·V;
    /// two plain files with --frontier-weights sweep the weight between them.
    #[arg(long)]
    pub scorer: Vec<String>,
    /// Sweep the two --scorer files' weight: each cd strategy runs once per w of this
    /// comma-separated list (e.g. 0,0.25,0.5,0.75,1), guided by (1 − w)·V₁ + w·V₂, and the
    /// plot draws the two-reward frontier (--reward against --second-reward).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub frontier_weights: Vec<f64>,
    /// A second reward (any `--reward` kind), the gold one: every output and reference
    /// sample is scored by it too, and the report adds each strategy's proxy and gold
    /// improvement with their bounds and the proxy-to-gold transfer interval (arXiv
    /// 2406.05883), and the exact best-of-n curve n = 1…64 on the reference samples. Also
    /// spelt --second-reward (the frontier's second objective: the report's `gold` section
    /// then holds its numbers).
    #[arg(long, value_name = "SPEC", visible_alias = "second-reward")]
    pub gold_reward: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Write win rate vs KL and reward vs KL to this SVG file (checked before any work).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Where to write the run manifest.
    #[arg(long, default_value = "tilt-eval.manifest.json")]
    pub manifest: PathBuf,
    /// Output format (the manifest always records the JSON).
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
        check_plot(p)?;
    }
    let strategies = parse_strategies(&args.strategies).map_err(|e| cli_error(e, &[]))?;
    let scorers = scorer_spec(&args.scorer)?;
    let strategies = if args.frontier_weights.is_empty() {
        match &scorers.spec {
            // A weighted sum guides every cd strategy; one file is the engine's default.
            Some(spec @ ScorerSpec::Weighted(_)) => strategies
                .iter()
                .map(|s| s.with_scorer(Some(spec.clone())))
                .collect(),
            _ => strategies,
        }
    } else {
        let [a, b] = &scorers.files[..] else {
            return Err(crate::usage(format!(
                "--frontier-weights: sweeps the weight between two --scorer files; {} given",
                scorers.files.len()
            )));
        };
        if scorers.weighted {
            return Err(crate::usage(
                "--frontier-weights: give the two --scorer files without weights (the sweep \
                 sets them)",
            ));
        }
        if args.gold_reward.is_none() {
            return Err(crate::usage(
                "--frontier-weights: the frontier is drawn between two rewards; give the \
                 second as --second-reward SPEC",
            ));
        }
        let name = |f: &PathBuf| f.display().to_string();
        frontier_strategies(&strategies, &name(a), &name(b), &args.frontier_weights)
            .map_err(|e| cli_error(e, &[]))?
    };
    let config = EvalConfig {
        strategies,
        reference_samples: args.reference_samples,
        samples_per_prompt: args.samples_per_prompt,
        max_new_tokens: args.max_new_tokens,
        seed: args.seed,
        chat_template: !args.engine.no_chat_template,
        reward: None,
        gold_reward: args.gold_reward.clone(),
    };
    config.validate().map_err(|e| cli_error(e, &[]))?;
    let needs_scorer = config.strategies.iter().any(|s| s.scorer().is_some());
    // On a remote engine cd-block is guided by the reward of the partial text (no scorer),
    // and cd-token is refused by the engine library, naming it.
    let remote = args.engine.engine.is_some();
    match (args.scorer.first(), needs_scorer) {
        (None, true) if !remote => {
            return Err(crate::usage(
                "--scorer: cd-block and cd-token need a prefix scorer file (train one with \
                 `tilt train-scorer`)",
            ))
        }
        (Some(_), false) => {
            return Err(crate::usage(
                "--scorer: has no effect, no cd-block or cd-token in --strategies; remove it",
            ))
        }
        _ => {}
    }
    // The prompts file is read before the models load, so that a bad line costs nothing.
    tilt_engine::prompts::read_prompts(&args.prompts).map_err(|e| cli_error(e, &[]))?;
    let mut engine_config = args.engine.config(&scorers.files);
    if let Some(gold) = &args.gold_reward {
        if *gold == args.engine.reward {
            return Err(crate::usage(format!(
                "--gold-reward: {gold:?} is also the --reward; the gold reward must be a \
                 different one"
            )));
        }
        tilt_rewards::RewardSpec::parse(gold)
            .map_err(|e| crate::usage(format!("--gold-reward: {e}")))?;
        engine_config.rewards.push(tilt_engine::RewardConfig {
            name: gold.clone(),
            spec: gold.clone(),
        });
    }
    let progress = CliProgress::new();
    let run = Run::Eval {
        prompts: args.prompts.clone(),
        config: config.clone(),
    };
    let (report, files, threads, t_load, eval_secs) = match &engine_config.engine {
        Some(spec) => {
            let engine = RemoteEngine::connect(spec, &engine_config.rewards, &progress)
                .map_err(|e| cli_error(e, &[]))?;
            let t_load = t_start.elapsed().as_secs_f64();
            let t_eval = Instant::now();
            let report = run_eval(&engine, &args.prompts, &config, &progress)
                .map_err(|e| cli_error(e, &[]))?;
            let files = remote_input_files(&run).map_err(|e| cli_error(e, &[]))?;
            (report, files, 1, t_load, t_eval.elapsed().as_secs_f64())
        }
        None => {
            let engine = Engine::load(&engine_config, &progress).map_err(|e| cli_error(e, &[]))?;
            let t_load = t_start.elapsed().as_secs_f64();
            let t_eval = Instant::now();
            let report = run_eval(&engine, &args.prompts, &config, &progress)
                .map_err(|e| cli_error(e, &[]))?;
            let files = input_files(&engine, &run).map_err(|e| cli_error(e, &[]))?;
            let threads = engine.threads();
            (
                report,
                files,
                threads,
                t_load,
                t_eval.elapsed().as_secs_f64(),
            )
        }
    };
    let bytes = json_line(&report).map_err(|e| cli_error(e, &[]))?;
    let wall: BTreeMap<String, f64> = [
        ("load".to_string(), t_load),
        ("eval".to_string(), eval_secs),
        ("total".to_string(), t_start.elapsed().as_secs_f64()),
    ]
    .into();
    let manifest = Manifest::new(engine_config, run, files, Vec::new(), threads, wall, &bytes);
    let plot = args.plot.as_deref().map(|path| {
        (path, |p: &Path| {
            write_plot(p, &report).map_err(|e| e.to_string())
        })
    });
    let mut stdout = std::io::stdout().lock();
    finish(
        &report,
        &bytes,
        args.format,
        &mut stdout,
        plot,
        &manifest,
        &args.manifest,
    )?;
    tilt_engine::Progress::note(
        &progress,
        &format!(
            "eval: {} prompts in {eval_secs:.1} s; manifest {}",
            report.prompts,
            args.manifest.display()
        ),
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
    report: &impl serde::Serialize,
    canonical: &[u8],
    format: Format,
    out: &mut dyn Write,
    plot: Option<(&Path, F)>,
    manifest: &Manifest,
    manifest_path: &Path,
) -> anyhow::Result<()>
where
    F: FnOnce(&Path) -> Result<(), String>,
{
    // JSON is the canonical bytes the manifest records; a table is made from the report.
    let printed = match format {
        Format::Json => out
            .write_all(canonical)
            .and_then(|()| out.flush())
            .map_err(anyhow::Error::from),
        Format::Table => emit_to(out, report, format).map_err(anyhow::Error::from),
    };
    if let Some((path, write)) = plot {
        if let Err(e) = write(path) {
            eprintln!(
                "tilt: warning: --plot {}: not written ({e}); the report and the manifest do \
                 not depend on it",
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

/// Win rate vs KL and reward vs KL: measured strategies as hollow points, each its own
/// marker and colour, dodged sideways where they share a KL, with error bars (the win
/// rate's bootstrap interval, the reward's ±1.96 standard errors); exact best-of-n (line)
/// and tilt (dashed) for the reference samples' empirical distributions.
fn write_plot(path: &Path, report: &EvalReport) -> Result<(), tilt_plot::PlotError> {
    let curve = |f: &dyn Fn(&tilt_engine::eval::CurvePoint) -> f64,
                 c: &[tilt_engine::eval::CurvePoint]| {
        c.iter().map(|p| (p.kl, f(p))).collect::<Vec<_>>()
    };
    let mut win = vec![
        Series::new(
            "best-of-n, exact (reference samples)",
            curve(&|p| p.win_rate, &report.exact_best_of_n),
            SeriesStyle::Line,
        ),
        Series::new(
            "tilt, exact (reference samples)",
            curve(&|p| p.win_rate, &report.exact_tilt),
            SeriesStyle::Dashed,
        ),
    ];
    let mut rew = vec![
        Series::new(
            "best-of-n, exact (reference samples)",
            curve(&|p| p.expected_reward, &report.exact_best_of_n),
            SeriesStyle::Line,
        ),
        Series::new(
            "tilt, exact (reference samples)",
            curve(&|p| p.expected_reward, &report.exact_tilt),
            SeriesStyle::Dashed,
        ),
    ];
    for (i, s) in report.strategies.iter().enumerate() {
        let name = format!("{} (KL {})", s.strategy, s.kl_kind);
        let marker = tilt_plot::Marker::for_index(i);
        let mut w = Series::new(name.clone(), vec![(s.kl, s.win_rate)], SeriesStyle::Points)
            .with_marker(marker)
            .with_color(i + 2)
            .hollow();
        if let Some([lo, hi]) = s.win_rate_ci95 {
            w = w.with_error_bars(vec![(lo, hi)]);
        }
        win.push(w);
        let mut r = Series::new(name, vec![(s.kl, s.mean_reward)], SeriesStyle::Points)
            .with_marker(marker)
            .with_color(i + 2)
            .hollow();
        if let Some(se) = s.mean_reward_stderr {
            r = r.with_error_bars(vec![(s.mean_reward - 1.96 * se, s.mean_reward + 1.96 * se)]);
        }
        rew.push(r);
    }
    // Strategies at the same KL (sample and bon:1 at 0) stay side by side, not on top.
    tilt_plot::dodge(&mut win, 8);
    tilt_plot::dodge(&mut rew, 8);
    let mut panels = vec![
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
    if let Some(g) = &report.gold {
        panels.push(gold_panel(report, g));
        if let Some(f) = frontier_panel(report, g) {
            panels.push(f);
        }
    }
    write_svg(
        path,
        &format!("tilt eval: {} prompts", report.prompts),
        &panels,
    )
}

/// The weight of the second scorer of a two-term weighted sum, and the label of the strategy
/// without it: a point of a frontier sweep.
fn frontier_point(s: &Strategy) -> Option<(String, f64)> {
    match s.scorer() {
        Some(Some(ScorerSpec::Weighted(terms))) if terms.len() == 2 => {
            Some((s.with_scorer(None).label(), terms[1].weight))
        }
        _ => None,
    }
}

/// The two-reward frontier (`--frontier-weights`): each strategy's improvement over the
/// reference samples in the first reward (x) and the second (y, with its 95% bootstrap
/// interval); the cd strategies of one sweep joined in weight order and labelled by w, the
/// others (and the reference itself, at the origin) as points. None without a sweep.
fn frontier_panel(report: &EvalReport, g: &tilt_engine::gold::GoldReport) -> Option<Panel> {
    let by_label: BTreeMap<String, &Strategy> = report
        .config
        .strategies
        .iter()
        .map(|s| (s.label(), s))
        .collect();
    let mut sweeps: Vec<(String, Vec<(f64, &tilt_engine::gold::GoldStrategy)>)> = Vec::new();
    let mut others = Vec::new();
    for gs in &g.strategies {
        match by_label.get(&gs.strategy).and_then(|s| frontier_point(s)) {
            Some((base, w)) => match sweeps.iter_mut().find(|(b, _)| *b == base) {
                Some((_, v)) => v.push((w, gs)),
                None => sweeps.push((base, vec![(w, gs)])),
            },
            None => others.push(gs),
        }
    }
    if sweeps.is_empty() {
        return None;
    }
    let mut series = vec![Series::new(
        "reference p (the origin)",
        vec![(0.0, 0.0)],
        SeriesStyle::Points,
    )
    .with_marker(tilt_plot::Marker::for_index(0))
    .with_color(0)];
    for (i, (base, mut pts)) in sweeps.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bars = pts
            .iter()
            .map(|(_, s)| {
                s.gold_improvement_ci95
                    .map_or((s.gold_improvement, s.gold_improvement), |[lo, hi]| {
                        (lo, hi)
                    })
            })
            .collect();
        series.push(
            Series::new(
                format!("{base}: (1 − w)·V₁ + w·V₂"),
                pts.iter()
                    .map(|(_, s)| (s.proxy_improvement, s.gold_improvement))
                    .collect(),
                SeriesStyle::Line,
            )
            .with_marker(tilt_plot::Marker::for_index(i + 1))
            .with_labels(pts.iter().map(|(w, _)| format!("w = {w}")).collect())
            .with_error_bars(bars)
            .with_color(i + 1),
        );
    }
    let first = series.len();
    for (i, s) in others.iter().enumerate() {
        let mut pt = Series::new(
            s.strategy.clone(),
            vec![(s.proxy_improvement, s.gold_improvement)],
            SeriesStyle::Points,
        )
        .with_marker(tilt_plot::Marker::for_index(first + i))
        .with_color(first + i)
        .hollow();
        if let Some([lo, hi]) = s.gold_improvement_ci95 {
            pt = pt.with_error_bars(vec![(lo, hi)]);
        }
        series.push(pt);
    }
    Some(Panel {
        title: "Two-reward frontier".into(),
        x_label: format!("improvement in {} over reference samples", report.reward),
        y_label: format!("improvement in {}", g.reward),
        log_x: false,
        series,
    })
}

/// Proxy and gold improvement against KL (arXiv 2406.05883's over-optimisation picture):
/// exact best-of-n on the reference samples, n = 1…64 (lines), the two sub-Gaussian bounds
/// (dashed), the transfer's lower end, and each measured strategy's gold improvement with
/// its bootstrap interval.
fn gold_panel(report: &EvalReport, g: &tilt_engine::gold::GoldReport) -> Panel {
    let curve = |f: &dyn Fn(&tilt_engine::gold::GoldCurvePoint) -> f64| {
        g.best_of_n.iter().map(|p| (p.kl, f(p))).collect::<Vec<_>>()
    };
    let mut series = vec![
        Series::new(
            format!("proxy {}: best-of-n, n = 1…64 (exact)", report.reward),
            curve(&|p| p.proxy_improvement),
            SeriesStyle::Line,
        ),
        Series::new(
            format!("gold {}: same best-of-n (exact)", g.reward),
            curve(&|p| p.gold_improvement),
            SeriesStyle::Line,
        ),
        Series::new(
            "proxy bound √(2σ²₊(r)·KL)",
            curve(&|p| p.proxy_bound),
            SeriesStyle::Dashed,
        ),
        Series::new(
            "gold bound √(2σ²₊(r*)·KL)",
            curve(&|p| p.gold_bound),
            SeriesStyle::Dashed,
        ),
        Series::new(
            "transfer lower end Δr − √(2σ²₊(r−r*)·KL)",
            curve(&|p| p.gold_transfer_lower),
            SeriesStyle::Dashed,
        ),
    ];
    for (i, s) in g.strategies.iter().enumerate() {
        let mut pt = Series::new(
            format!("{}: gold, measured", s.strategy),
            vec![(s.kl, s.gold_improvement)],
            SeriesStyle::Points,
        )
        .with_marker(tilt_plot::Marker::for_index(i))
        .with_color(i + 5)
        .hollow();
        if let Some([lo, hi]) = s.gold_improvement_ci95 {
            pt = pt.with_error_bars(vec![(lo, hi)]);
        }
        series.push(pt);
    }
    tilt_plot::dodge(&mut series[5..], 8);
    Panel {
        title: "Proxy vs gold improvement".into(),
        x_label: "KL(π‖p) (nats)".into(),
        y_label: "improvement over reference samples".into(),
        log_x: false,
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tilt_engine::run::PromptSource;
    use tilt_engine::{EngineConfig, Input, Params, Strategy};

    fn manifest() -> Manifest {
        Manifest::new(
            EngineConfig::default(),
            Run::Generate {
                prompts: PromptSource::Input(Input::Prompt("x".into())),
                chat_template: true,
                params: Params::new(Strategy::Sample {
                    sampling: Default::default(),
                }),
            },
            vec![],
            vec![],
            1,
            BTreeMap::new(),
            b"{\"a\":1}\n",
        )
    }

    #[test]
    fn a_late_plot_failure_keeps_the_report_and_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = dir.path().join("m.json");
        let plot = dir.path().join("p.svg");
        let mut out = Vec::new();
        let called = std::cell::Cell::new(false);
        finish(
            &serde_json::json!({"a": 1}),
            b"{\"a\":1}\n",
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
            &serde_json::json!({"a": 1}),
            b"{\"a\":1}\n",
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
