//! `tilt theory memoryless`: the memoryless-model asymptotics of arXiv 2404.01730 — the
//! rate function, the optimal tilt at budget L·Δ, best-of-N with N = e^{LΔ}, and their KL,
//! exactly at each length, with an optional SVG of the convergence.

use super::input::{check_svg_path, flag_error, json_number, parse_list, DistributionArgs, Flags};
use crate::output::{emit, Format};
use crate::usage;
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tilt_core::memoryless::{MemorylessModel, MemorylessReport};
use tilt_core::TiltError;
use tilt_plot::{write_svg, Panel, Series, SeriesStyle};

/// Flags of `tilt theory memoryless`.
#[derive(Debug, Args)]
pub struct MemorylessArgs {
    /// The token distribution q and per-token rewards r (rewards on a grid, or give --grid).
    #[command(flatten)]
    dist: DistributionArgs,
    /// Sequence length L (number of tokens).
    #[arg(long, conflicts_with = "lengths", allow_hyphen_values = true)]
    length: Option<String>,
    /// Several lengths, comma separated (e.g. 10,100,1000): prints the convergence table.
    #[arg(long, allow_hyphen_values = true)]
    lengths: Option<String>,
    /// Per-token KL budget Δ in nats (the sequence budget is L·Δ, and log N = L·Δ).
    #[arg(long, allow_hyphen_values = true)]
    delta: f64,
    /// Snap rewards to this grid step h (per-token reward error ≤ h/2); default: detect
    /// the exact grid of the rewards.
    #[arg(long, allow_hyphen_values = true)]
    grid: Option<f64>,
    /// Draw reward per token and KL per token against L to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// The library's input names that are flags of `tilt theory memoryless`.
const FLAGS: Flags = Flags(&[
    ("length", "--length"),
    ("delta", "--delta"),
    ("grid", "--grid"),
]);

/// Library errors with the names of this command's flags; `rewards` (the lattice of the
/// rewards) is named as the user gave them (`rewards_name`).
fn named(e: TiltError, rewards_name: &str) -> anyhow::Error {
    match e {
        e @ TiltError::KlBudgetTooLarge { .. } => usage(format!("--delta: {e} per token")),
        TiltError::InvalidInput { input, problem } if input == "rewards" => {
            usage(format!("{rewards_name}: {problem}"))
        }
        other => flag_error(FLAGS)(other),
    }
}

fn parse_lengths(args: &MemorylessArgs) -> anyhow::Result<Vec<usize>> {
    let (name, text) = match (&args.length, &args.lengths) {
        (Some(t), None) => ("--length", t.as_str()),
        (None, Some(t)) => ("--lengths", t.as_str()),
        _ => return Err(usage("give --length L or --lengths L1,L2,…")),
    };
    parse_list(name, text)?
        .into_iter()
        .map(|x| {
            if x.is_finite() && x >= 1.0 && x.fract() == 0.0 && x <= 1e9 {
                Ok(x as usize)
            } else {
                Err(usage(format!(
                    "{name}: {x} is not a whole number of tokens ≥ 1"
                )))
            }
        })
        .collect()
}

fn row(r: &MemorylessReport) -> Value {
    json!({
        "length": r.length,
        "log_n": r.log_n,
        "bon_reward_per_token": r.bon_reward_per_token,
        "tilt_reward_per_token": r.tilt_reward_per_token,
        "x_star_minus_bon": r.x_star - r.bon_reward_per_token,
        "kl_tilt_bon_per_token": r.kl_tilt_bon_per_token,
        "bon_kl_per_token": r.bon_kl_per_token,
        "convolution": r.convolution,
    })
}

fn plot(path: &Path, reports: &[MemorylessReport]) -> anyhow::Result<()> {
    let pts = |f: &dyn Fn(&MemorylessReport) -> f64| -> Vec<(f64, f64)> {
        reports.iter().map(|r| (r.length as f64, f(r))).collect()
    };
    let panels = [
        Panel {
            title: "Reward per token vs length".into(),
            x_label: "sequence length L (tokens)".into(),
            y_label: "expected reward per token".into(),
            log_x: true,
            series: vec![
                Series::new(
                    "best-of-N, N = e^{LΔ}",
                    pts(&|r| r.bon_reward_per_token),
                    SeriesStyle::Line,
                ),
                Series::new(
                    "optimal tilt (= x*)",
                    pts(&|r| r.tilt_reward_per_token),
                    SeriesStyle::Dashed,
                ),
                Series::new(
                    "reference E_q r",
                    pts(&|r| r.reference_reward_per_token),
                    SeriesStyle::Dashed,
                ),
            ],
        },
        Panel {
            title: "KL(best-of-N ‖ tilt) / L".into(),
            x_label: "sequence length L (tokens)".into(),
            y_label: "nats per token".into(),
            log_x: true,
            series: vec![
                Series::new(
                    "KL(BoN‖tilt)/L",
                    pts(&|r| r.kl_tilt_bon_per_token),
                    SeriesStyle::Line,
                ),
                Series::new(
                    "KL(BoN‖q)/L",
                    pts(&|r| r.bon_kl_per_token),
                    SeriesStyle::Line,
                ),
            ],
        },
    ];
    write_svg(
        path,
        "Memoryless model: best-of-N vs the optimal tilt (arXiv 2404.01730)",
        &panels,
    )?;
    Ok(())
}

/// Run `tilt theory memoryless`.
pub fn run(args: MemorylessArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let lengths = parse_lengths(&args)?;
    if let Some(path) = &args.plot {
        check_svg_path(path)?;
    }
    let rewards_name = args.dist.rewards_name();
    let flag = |e: TiltError| named(e, &rewards_name);
    let model = MemorylessModel::new(&dist, args.grid).map_err(flag)?;
    let lambda = model.lambda_for_kl(args.delta).map_err(flag)?;
    let mut reports = Vec::with_capacity(lengths.len());
    for &l in &lengths {
        tracing::info!(length = l, "memoryless: exact law of S_L and best-of-N");
        reports.push(model.analyze(l, args.delta).map_err(flag)?);
    }
    if let Some(path) = &args.plot {
        plot(path, &reports)?;
    }
    let renyi: Vec<Value> = [-0.5, 0.5, 1.0, 2.0]
        .iter()
        .filter_map(|ratio| model.scaled_cgf_renyi(lambda, ratio * lambda).ok())
        .map(|c| json!(c))
        .collect();
    let last = reports.last().expect("at least one length");
    let mut out = json!({
        "units": "KL and rate function in nats (per token where named); rewards per token in reward units",
        "delta": args.delta,
        "x_star": last.x_star,
        "rate_function_at_x_star": last.rate_function_at_x_star,
        "lambda": last.lambda,
        "beta": last.beta,
        "max_kl_per_token": model.max_kl_per_token(),
        "reference_reward_per_token": last.reference_reward_per_token,
        "max_reward_per_token": last.max_reward_per_token,
        "lattice_step": last.lattice_step,
        "grid_snap_error_per_token": last.grid_snap_error_per_token,
        "length": last.length,
        "log_n": last.log_n,
        "tilt_reward_per_token": last.tilt_reward_per_token,
        "tilt_kl_per_token": last.tilt_kl_per_token,
        "bon_reward_per_token": last.bon_reward_per_token,
        "bon_kl_per_token": last.bon_kl_per_token,
        "bon_kl_bound_per_token": last.bon_kl_bound_per_token,
        "kl_tilt_bon_per_token": last.kl_tilt_bon_per_token,
        "kl_direction": "KL(best-of-N ‖ tilt)",
        "scaled_cgf_renyi": renyi,
        "scaled_cgf_formula": "(1/L) log E_tilt[e^{θ S_L}] = Λ(λ+θ) − Λ(λ) = (θ/λ)(Λ(λ) + D_α(q_λ‖q)), α = 1 + θ/λ",
        "plot": args.plot.as_ref().map(|p| p.display().to_string()),
    });
    if lengths.len() > 1 {
        out["table"] = Value::Array(reports.iter().map(row).collect());
    }
    out["beta"] = json_number(last.beta);
    emit(&out, args.format)
}
