//! `tilt theory infalign` and `tilt theory infalign-frontier`: InfAlign's calibrated-reward
//! tilts (arXiv 2412.19792) — KL, standard and inference-time win rates by quadrature, the
//! CTRL transform's `t` optimised per N, and the frontier against identity and best-of-N.

use super::input::{check_svg_path, flag_error, json_number, parse_count, parse_list, Flags};
use crate::output::{emit, Format};
use crate::usage;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tilt_core::infalign::{
    evaluate, inference_win_rate, optimize_t, BestOfMPolicy, CalibratedTilt, OptimalT, Procedure,
    Transform,
};
use tilt_plot::{write_svg, Panel, Series, SeriesStyle};

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
    /// Φ(c) = e^{tc} (CTRL for best-of-N).
    Exp,
    /// Φ(c) = −e^{−tc} (CTRL for worst-of-N).
    NegExp,
}

fn make(kind: TransformArg, t: f64) -> Transform {
    match kind {
        TransformArg::Identity => Transform::Identity,
        TransformArg::Exp => Transform::Exp { t },
        TransformArg::NegExp => Transform::NegExp { t },
    }
}

/// The library's input names that are flags of `tilt theory infalign`.
const FLAGS: Flags = Flags(&[
    ("n", "--n"),
    ("t", "--t"),
    ("beta", "--beta"),
    ("kl", "--kl"),
    ("t-max", "--t-max"),
]);

/// The library's input names that are flags of `tilt theory infalign-frontier` (its KL
/// budgets are the entries of `--kls`).
const FRONTIER_FLAGS: Flags = Flags(&[("n", "--n"), ("kl", "--kls"), ("t-max", "--t-max")]);

/// Warn about the values of t that the search skipped because a computation there did not
/// converge (they count as infeasible).
fn warn_unconverged(opt: &OptimalT, kl: f64) {
    for u in &opt.unconverged {
        tracing::warn!(
            t = u.t,
            kl,
            reason = %u.reason,
            "t skipped in the search (treated as infeasible): the tilt did not converge"
        );
    }
}

/// Flags of `tilt theory infalign`.
#[derive(Debug, Args)]
pub struct InfalignArgs {
    /// N of the inference-time procedure (draws per query).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// The inference-time procedure applied to both the policy and the reference.
    #[arg(long, value_enum, default_value_t = ProcedureArg::Bon)]
    procedure: ProcedureArg,
    /// The transform of the calibrated reward.
    #[arg(long, value_enum, default_value_t = TransformArg::Identity)]
    transform: TransformArg,
    /// The transform's rate t ≥ 0 (exp, neg-exp).
    #[arg(long, allow_hyphen_values = true)]
    t: Option<f64>,
    /// KL coefficient β of the transform normalised to [0, 1] (g ∝ e^{Φ̃(c)/β}).
    #[arg(long, conflicts_with = "kl", allow_hyphen_values = true)]
    beta: Option<f64>,
    /// KL budget in nats (β is solved for).
    #[arg(long, allow_hyphen_values = true)]
    kl: Option<f64>,
    /// Find the t that maximises the inference-time win rate at --kl.
    #[arg(long, requires = "kl", conflicts_with = "t")]
    optimize_t: bool,
    /// Upper end of the t search.
    #[arg(long, default_value_t = 200.0, allow_hyphen_values = true)]
    t_max: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn point_json(p: &tilt_core::infalign::TiltPoint) -> Value {
    json!({
        "transform": p.transform,
        "t": p.transform.t(),
        "beta": json_number(p.beta),
        "beta_raw": p.beta_raw,
        "kl": p.kl,
        "win_rate": p.win_rate,
        "inference_win_rate": p.inference_win_rate,
    })
}

fn check_n(n: u64) -> anyhow::Result<()> {
    if n == 0 {
        return Err(usage("--n: the number of draws must be ≥ 1"));
    }
    Ok(())
}

/// Run `tilt theory infalign`.
pub fn run(args: InfalignArgs) -> anyhow::Result<()> {
    check_n(args.n)?;
    let procedure: Procedure = args.procedure.into();
    if args.beta.is_none() && args.kl.is_none() {
        return Err(usage("give --beta B or --kl D (nats)"));
    }
    let mut out = if args.optimize_t {
        if args.transform == TransformArg::Identity {
            return Err(usage(
                "--optimize-t: the identity transform has no t; use --transform exp or neg-exp",
            ));
        }
        let kl = args.kl.expect("clap requires --kl");
        let kind = args.transform;
        let opt = optimize_t(|t| make(kind, t), args.n, procedure, kl, args.t_max)
            .map_err(flag_error(FLAGS))?;
        warn_unconverged(&opt, kl);
        if opt.at_edge {
            tracing::warn!(
                t_max = opt.t_max,
                "the optimal t is at the edge of the search bracket; raise --t-max"
            );
        }
        let mut v = point_json(&opt.point);
        v["t_max"] = json!(opt.t_max);
        v["t_at_edge"] = json!(opt.at_edge);
        v["t_unconverged"] = json!(opt.unconverged.iter().map(|u| u.t).collect::<Vec<_>>());
        v
    } else {
        let t = match (args.transform, args.t) {
            (TransformArg::Identity, Some(_)) => {
                return Err(usage("--t: the identity transform takes no t"))
            }
            (TransformArg::Identity, None) => 0.0,
            (_, Some(t)) => t,
            (_, None) => {
                return Err(usage(
                    "--t: exp and neg-exp need a rate t ≥ 0 (or --optimize-t with --kl)",
                ))
            }
        };
        let transform = make(args.transform, t);
        let tilt = match (args.beta, args.kl) {
            (Some(b), None) => CalibratedTilt::new(transform, b),
            (None, Some(k)) => CalibratedTilt::with_kl(transform, k),
            _ => unreachable!("clap makes --beta and --kl exclusive"),
        }
        .map_err(flag_error(FLAGS))?;
        point_json(&evaluate(&tilt, args.n, procedure).map_err(flag_error(FLAGS))?)
    };
    // The baselines at the same KL: identity (RLHF on c) and the best-of-m policy.
    let kl = out["kl"].as_f64().unwrap_or(0.0);
    if kl >= 1e-12 {
        let id = CalibratedTilt::with_kl(Transform::Identity, kl).map_err(flag_error(FLAGS))?;
        out["identity_inference_win_rate"] =
            json!(inference_win_rate(&id, args.n, procedure).map_err(flag_error(FLAGS))?);
        let bom = BestOfMPolicy::with_kl(kl).map_err(flag_error(FLAGS))?;
        out["best_of_m_policy_m"] = json!(bom.m());
        out["best_of_m_policy_inference_win_rate"] =
            json!(inference_win_rate(&bom, args.n, procedure).map_err(flag_error(FLAGS))?);
    }
    out["n"] = json!(args.n);
    out["procedure"] = json!(format!("{:?}", procedure).to_lowercase());
    out["units"] = json!("KL in nats; win rates are probabilities (calibrated reward, ties ½)");
    emit(&out, args.format)
}

/// Flags of `tilt theory infalign-frontier`.
#[derive(Debug, Args)]
pub struct InfalignFrontierArgs {
    /// N of the inference-time procedure.
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// The inference-time procedure.
    #[arg(long, value_enum, default_value_t = ProcedureArg::Bon)]
    procedure: ProcedureArg,
    /// KL budgets in nats, comma separated.
    #[arg(
        long,
        default_value = "0.1,0.25,0.5,0.75,1,1.5,2,3",
        allow_hyphen_values = true
    )]
    kls: String,
    /// Upper end of the t search.
    #[arg(long, default_value_t = 200.0, allow_hyphen_values = true)]
    t_max: f64,
    /// Draw inference-time win rate vs KL to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn plot(path: &Path, title: &str, rows: &[Value]) -> anyhow::Result<()> {
    let pts = |key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r["kl"].as_f64()?, r[key].as_f64()?)))
            .collect()
    };
    let panel = Panel {
        title: "Inference-time win rate vs KL".into(),
        x_label: "KL(π‖p) (nats)".into(),
        y_label: "win rate of T(π) over T(p)".into(),
        log_x: false,
        series: vec![
            Series::new(
                "identity (RLHF on calibrated reward)",
                pts("identity_win_rate"),
                SeriesStyle::Line,
            ),
            Series::new("CTRL, optimised t", pts("ctrl_win_rate"), SeriesStyle::Line),
            Series::new(
                "best-of-m policy",
                pts("best_of_m_win_rate"),
                SeriesStyle::Dashed,
            ),
        ],
    };
    write_svg(path, title, &[panel])?;
    Ok(())
}

/// Run `tilt theory infalign-frontier`.
pub fn run_frontier(args: InfalignFrontierArgs) -> anyhow::Result<()> {
    check_n(args.n)?;
    let procedure: Procedure = args.procedure.into();
    let kls = parse_list("--kls", &args.kls)?;
    if let Some(path) = &args.plot {
        check_svg_path(path)?;
    }
    let kind = match procedure {
        Procedure::Bon => TransformArg::Exp,
        Procedure::Won => TransformArg::NegExp,
    };
    let bar = ProgressBar::new(kls.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} KL budgets")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("optimising t");
    let mut rows = Vec::with_capacity(kls.len());
    for &kl in &kls {
        let id =
            CalibratedTilt::with_kl(Transform::Identity, kl).map_err(flag_error(FRONTIER_FLAGS))?;
        let id_w =
            inference_win_rate(&id, args.n, procedure).map_err(flag_error(FRONTIER_FLAGS))?;
        let opt = optimize_t(|t| make(kind, t), args.n, procedure, kl, args.t_max)
            .map_err(flag_error(FRONTIER_FLAGS))?;
        warn_unconverged(&opt, kl);
        let bom = BestOfMPolicy::with_kl(kl).map_err(flag_error(FRONTIER_FLAGS))?;
        let bom_w =
            inference_win_rate(&bom, args.n, procedure).map_err(flag_error(FRONTIER_FLAGS))?;
        rows.push(json!({
            "kl": kl,
            "identity_win_rate": id_w,
            "ctrl_t": opt.t,
            "ctrl_t_at_edge": opt.at_edge,
            "ctrl_beta": json_number(opt.point.beta),
            "ctrl_win_rate": opt.point.inference_win_rate,
            "best_of_m": bom.m(),
            "best_of_m_win_rate": bom_w,
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let proc_name = format!("{:?}", procedure).to_lowercase();
    if let Some(path) = &args.plot {
        let title = format!(
            "InfAlign: {} N = {} (arXiv 2412.19792)",
            if procedure == Procedure::Bon {
                "best-of-N"
            } else {
                "worst-of-N"
            },
            args.n
        );
        plot(path, &title, &rows)?;
    }
    emit(
        &json!({
            "units": "KL in nats; win rates of T(π) over T(p) (calibrated reward, ties ½)",
            "n": args.n,
            "procedure": proc_name,
            "ctrl_transform": if kind == TransformArg::Exp { "exp" } else { "neg-exp" },
            "t_max": args.t_max,
            "rows": rows,
            "plot": args.plot.as_ref().map(|p| p.display().to_string()),
        }),
        args.format,
    )
}
