//! `tilt theory infalign` and `tilt theory infalign-frontier`: InfAlign's calibrated-reward
//! tilts (arXiv 2412.19792) — KL, standard and inference-time win rates by quadrature, the
//! CTRL transform's `t` optimised per N, and the frontier against identity and best-of-N.
//!
//! The computations are [`tilt_core::report`]'s; this module maps flags to them, warns on
//! stderr, and draws. Every search here is bounded: N, the KL budget and `t` are capped by
//! the library (`MAX_BON_N`/`MAX_WON_N`, `MAX_KL`, `MAX_T`) and checked before any work,
//! and each integral has a panel budget, so no input makes a run hang.

use super::input::{check_plot, flag_error, internal, parse_count, parse_list, plot_error, Flags};
use super::progress::Progress;
use crate::usage;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use tilt_core::infalign::{check_draws, check_kl_budget, check_t_max, OptimalT, Procedure};
use tilt_core::report::{
    infalign_baselines, infalign_frontier_row, infalign_point, InfalignFrontierReport,
    InfalignFrontierRow, InfalignPolicy, InfalignReport, TransformKind,
};
use tilt_core::TiltError;
use tilt_output::{emit, Format};
use tilt_plot::{write_svg, Marker, Panel, Series, SeriesStyle};

/// The inference-time procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProcedureArg {
    /// Best-of-N.
    Bon,
    /// Worst-of-N (best-of-N jailbreaking).
    Won,
}

impl From<ProcedureArg> for Procedure {
    fn from(p: ProcedureArg) -> Self {
        match p {
            ProcedureArg::Bon => Procedure::Bon,
            ProcedureArg::Won => Procedure::Won,
        }
    }
}

/// The transform Φ of the calibrated reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransformArg {
    /// Φ(c) = c: standard RLHF on the calibrated reward.
    Identity,
    /// Φ(c) = e^(tc) (CTRL for best-of-N).
    Exp,
    /// Φ(c) = −e^(−tc) (CTRL for worst-of-N).
    NegExp,
}

impl From<TransformArg> for TransformKind {
    fn from(t: TransformArg) -> Self {
        match t {
            TransformArg::Identity => TransformKind::Identity,
            TransformArg::Exp => TransformKind::Exp,
            TransformArg::NegExp => TransformKind::NegExp,
        }
    }
}

/// Warn about the values of t that the search skipped because a computation there did not
/// converge (they count as infeasible), and about an optimum at the edge of the search.
/// Plain lines on stderr: readable in a log (no ANSI codes) and shown by default.
fn warn_about(opt: &OptimalT, kl: f64) {
    for u in &opt.unconverged {
        eprintln!(
            "tilt: warning: at KL {kl} nats, t = {} was skipped in the search (treated as \
             infeasible): {}",
            u.t, u.reason
        );
    }
    if opt.at_edge {
        eprintln!(
            "tilt: warning: at KL {kl} nats the optimal t is at the edge of the search, t = {}; \
             raise --t-max (at most 1e6)",
            opt.t_max
        );
    }
}

/// Flags of `tilt theory infalign`.
#[derive(Debug, Args)]
pub struct InfalignArgs {
    /// N of the inference-time procedure (draws per query; at most 10^6 for bon, 10^15 for
    /// won).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// The inference-time procedure applied to both the policy and the reference.
    #[arg(long, value_enum, default_value_t = ProcedureArg::Bon)]
    procedure: ProcedureArg,
    /// The transform of the calibrated reward.
    #[arg(long, value_enum, default_value_t = TransformArg::Identity)]
    transform: TransformArg,
    /// The transform's rate t ∈ [0, 10^6] (exp, neg-exp).
    #[arg(long, allow_hyphen_values = true)]
    t: Option<f64>,
    /// KL coefficient β of the transform normalised to [0, 1] (g ∝ e^(Φ̃(c)/β)); its tilt's
    /// KL must be at most 20 nats.
    #[arg(long, conflicts_with = "kl", allow_hyphen_values = true)]
    beta: Option<f64>,
    /// KL budget in nats, in [1e-12, 20] (β is solved for).
    #[arg(long, allow_hyphen_values = true)]
    kl: Option<f64>,
    /// Find the t that maximises the inference-time win rate at --kl.
    #[arg(long, requires = "kl", conflicts_with = "t")]
    optimize_t: bool,
    /// Upper end of the t search, in (0.25, 10^6].
    #[arg(long, default_value_t = 200.0, allow_hyphen_values = true)]
    t_max: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory infalign`.
pub fn run(args: InfalignArgs) -> anyhow::Result<()> {
    let procedure: Procedure = args.procedure.into();
    // Only the flags the user gave are named by errors (a KL derived from --beta is not
    // --kl).
    let flags = match (args.beta, args.optimize_t) {
        (Some(_), _) => Flags(&[
            ("n", "--n"),
            ("t", "--t"),
            ("beta", "--beta"),
            ("transform", "--transform"),
        ]),
        (None, false) => Flags(&[
            ("n", "--n"),
            ("t", "--t"),
            ("kl", "--kl"),
            ("transform", "--transform"),
        ]),
        (None, true) => Flags(&[
            ("n", "--n"),
            ("kl", "--kl"),
            ("t-max", "--t-max"),
            ("transform", "--transform"),
        ]),
    };
    let err = flag_error(flags);
    check_draws(args.n, procedure).map_err(&err)?;
    if args.beta.is_none() && args.kl.is_none() {
        return Err(usage("give --beta B or --kl D (nats)"));
    }
    let policy = InfalignPolicy::from_options(
        args.transform.into(),
        args.t,
        args.beta,
        args.kl,
        args.optimize_t,
        args.t_max,
    )
    .map_err(&err)?;
    let (point, optimized) = infalign_point(policy, args.n, procedure).map_err(&err)?;
    if let (Some(opt), Some(kl)) = (&optimized, args.kl) {
        warn_about(opt, kl);
    }
    // The baselines at the same KL: identity (RLHF on c) and the best-of-m policy. Their
    // inputs are derived (the KL of the tilt above, within the library's limits), so an
    // error here is a failure while running, never blamed on a flag.
    // "The same KL" is the budget the user gave (the tilt's computed KL may round a hair
    // above it, e.g. past MAX_KL), or with --beta the tilt's KL, which CalibratedTilt::new
    // keeps within MAX_KL.
    let kl = policy.kl_budget().unwrap_or(point.kl);
    let baselines = infalign_baselines(kl, args.n, procedure).map_err(baseline_error)?;
    Ok(emit(
        &InfalignReport::new(args.n, procedure, &point, optimized.as_ref(), baselines),
        args.format,
    )?)
}

fn baseline_error(e: TiltError) -> anyhow::Error {
    internal(format!("the baseline at the tilt's KL: {e}"))
}

/// The default KL budgets of `infalign-frontier`: 24 from (0, ½] on a square-root scale
/// (the win rates grow like √KL near 0, so the curves come out evenly sampled and smooth
/// there), then 0.75, 1, 1.5, 2, 3.
const DEFAULT_KLS: &str = "0.000868,0.00347,0.00781,0.0139,0.0217,0.0313,0.0425,0.0556,0.0703,\
0.0868,0.105,0.125,0.147,0.170,0.195,0.222,0.251,0.281,0.313,0.347,0.383,0.420,0.459,0.5,\
0.75,1,1.5,2,3";

/// Flags of `tilt theory infalign-frontier`.
#[derive(Debug, Args)]
pub struct InfalignFrontierArgs {
    /// N of the inference-time procedure.
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// The inference-time procedure.
    #[arg(long, value_enum, default_value_t = ProcedureArg::Bon)]
    procedure: ProcedureArg,
    /// KL budgets in nats, comma separated, each in [1e-12, 20] (default: 24 on a
    /// square-root grid of (0, ½], then 0.75, 1, 1.5, 2, 3).
    #[arg(long, default_value = DEFAULT_KLS, hide_default_value = true, allow_hyphen_values = true)]
    kls: String,
    /// Upper end of the t search, in (0.25, 10^6].
    #[arg(long, default_value_t = 200.0, allow_hyphen_values = true)]
    t_max: f64,
    /// Draw inference-time win rate vs KL to this SVG file (checked before any work).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn plot(path: &Path, title: &str, rows: &[InfalignFrontierRow]) -> anyhow::Result<()> {
    // Every policy at KL 0 is the reference: T(p) against T(p) wins half the time.
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| a.kl.total_cmp(&b.kl));
    let pts = |f: &dyn Fn(&InfalignFrontierRow) -> f64| -> Vec<(f64, f64)> {
        std::iter::once((0.0, 0.5))
            .chain(sorted.iter().map(|r| (r.kl, f(r))))
            .collect()
    };
    let panel = Panel {
        title: "Inference-time win rate vs KL".into(),
        x_label: "KL(π‖p) (nats)".into(),
        y_label: "win rate of T(π) over T(p)".into(),
        log_x: false,
        series: vec![
            Series::new(
                "CTRL, t optimised per KL",
                pts(&|r| r.ctrl_win_rate),
                SeriesStyle::Line,
            )
            .with_marker(Marker::Circle),
            Series::new(
                "identity (RLHF on the calibrated reward)",
                pts(&|r| r.identity_win_rate),
                SeriesStyle::Line,
            )
            .with_marker(Marker::Square),
            Series::new(
                "best-of-m policy at the same KL",
                pts(&|r| r.best_of_m_win_rate),
                SeriesStyle::Dashed,
            )
            .with_marker(Marker::TriangleUp)
            .hollow(),
            Series::hline("½ (the reference against itself)", 0.5),
        ],
    };
    write_svg(path, title, &[panel]).map_err(plot_error)
}

/// Run `tilt theory infalign-frontier`.
pub fn run_frontier(args: InfalignFrontierArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        check_plot(path)?;
    }
    let procedure: Procedure = args.procedure.into();
    const FLAGS: Flags = Flags(&[("n", "--n"), ("kl", "--kls"), ("t-max", "--t-max")]);
    let err = flag_error(FLAGS);
    check_draws(args.n, procedure).map_err(&err)?;
    check_t_max(args.t_max).map_err(&err)?;
    let kls = parse_list("--kls", &args.kls)?;
    for (i, &kl) in kls.iter().enumerate() {
        check_kl_budget(kl).map_err(|e| match e {
            TiltError::InvalidInput { problem, .. } => {
                usage(format!("--kls: entry {}: {problem}", i + 1))
            }
            other => err(other),
        })?;
    }
    let mut progress = Progress::new("theory infalign-frontier", kls.len() as u64, "KL budgets");
    progress.phase("optimising t", kls.len() as u64);
    let mut rows = Vec::with_capacity(kls.len());
    for &kl in &kls {
        let row =
            infalign_frontier_row(kl, args.n, procedure, args.t_max, |opt| warn_about(opt, kl))
                .map_err(&err)?;
        rows.push(row);
        progress.inc();
    }
    progress.finish();
    let report = InfalignFrontierReport::new(
        args.n,
        procedure,
        args.t_max,
        rows,
        args.plot.as_ref().map(|p| p.display().to_string()),
    );
    emit(&report, args.format)?;
    if let Some(path) = &args.plot {
        let title = format!(
            "InfAlign: {} with N = {} (arXiv 2412.19792)",
            if procedure == Procedure::Bon {
                "best-of-N"
            } else {
                "worst-of-N"
            },
            args.n
        );
        plot(path, &title, &report.rows)?;
    }
    Ok(())
}
