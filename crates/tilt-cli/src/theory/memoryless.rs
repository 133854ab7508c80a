//! `tilt theory memoryless`: the memoryless-model asymptotics of arXiv 2404.01730 — the
//! rate function, the optimal tilt at budget L·Δ, best-of-N with N = e^(LΔ), and their KL,
//! exactly at each length ([`tilt_core::report::memoryless_output`]), with an optional SVG
//! of the convergence.

use super::input::{check_plot, flag_error, parse_count_list, plot_error, DistributionArgs, Flags};
use super::progress::Progress;
use crate::usage;
use clap::Args;
use std::path::{Path, PathBuf};
use tilt_core::memoryless::MemorylessReport;
use tilt_core::report::memoryless_output;
use tilt_core::TiltError;
use tilt_output::{emit, Format};
use tilt_plot::{write_svg, Marker, Panel, Series, SeriesStyle};

/// Longest sequence accepted (the law of S_L is further capped by its number of lattice
/// points, `MemorylessModel::check_length`).
const MAX_LENGTH: u64 = 1_000_000_000;

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
    /// Draw reward per token and KL per token against L to this SVG file (checked before
    /// any work).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// The library's input names that are flags of `tilt theory memoryless`, when the lengths
/// were given with `length_flag`.
fn flags(length_flag: &'static str) -> Flags {
    match length_flag {
        "--lengths" => Flags(&[
            ("length", "--lengths"),
            ("delta", "--delta"),
            ("grid", "--grid"),
        ]),
        _ => Flags(&[
            ("length", "--length"),
            ("delta", "--delta"),
            ("grid", "--grid"),
        ]),
    }
}

/// Library errors with the names of this command's flags; `rewards` (the lattice of the
/// rewards) is named as the user gave them (`rewards_name`).
fn named(e: TiltError, rewards_name: &str, length_flag: &'static str) -> anyhow::Error {
    match e {
        e @ TiltError::KlBudgetTooLarge { .. } => usage(format!("--delta: {e} per token")),
        TiltError::InvalidInput { input, problem } if input == "rewards" => usage(format!(
            "{rewards_name}: {}",
            // The library names its parameter; here it is a flag.
            problem.replace("(the grid parameter)", "(--grid H)")
        )),
        other => flag_error(flags(length_flag))(other),
    }
}

fn parse_lengths(args: &MemorylessArgs) -> anyhow::Result<(&'static str, Vec<usize>)> {
    let (name, text) = match (&args.length, &args.lengths) {
        (Some(t), None) => ("--length", t.as_str()),
        (None, Some(t)) => ("--lengths", t.as_str()),
        _ => return Err(usage("give --length L or --lengths L1,L2,…")),
    };
    let lengths = parse_count_list(name, text, MAX_LENGTH, "length")?;
    if let Some(i) = lengths.iter().position(|&l| l == 0) {
        return Err(usage(format!(
            "{name}: entry {}: a sequence has at least 1 token",
            i + 1
        )));
    }
    Ok((name, lengths.into_iter().map(|l| l as usize).collect()))
}

fn plot(path: &Path, reports: &[MemorylessReport], delta: f64) -> anyhow::Result<()> {
    let mut sorted: Vec<&MemorylessReport> = reports.iter().collect();
    sorted.sort_by_key(|r| r.length);
    let pts = |f: &dyn Fn(&MemorylessReport) -> f64| -> Vec<(f64, f64)> {
        sorted.iter().map(|r| (r.length as f64, f(r))).collect()
    };
    let first = sorted[0];
    let panels = [
        Panel {
            title: "Reward per token vs length".into(),
            x_label: "sequence length L (tokens)".into(),
            y_label: "expected reward per token".into(),
            log_x: true,
            series: vec![
                Series::new(
                    "best-of-N, N = e^(LΔ)",
                    pts(&|r| r.bon_reward_per_token),
                    SeriesStyle::Line,
                )
                .with_marker(Marker::Circle),
                Series::hline(
                    format!("optimal tilt: x*(Δ) = {:.4} at every L", first.x_star),
                    first.x_star,
                ),
                Series::hline(
                    format!("reference E_q r = {:.4}", first.reference_reward_per_token),
                    first.reference_reward_per_token,
                ),
            ],
        },
        Panel {
            title: "KL per token vs length".into(),
            x_label: "sequence length L (tokens)".into(),
            y_label: "KL / L (nats per token)".into(),
            log_x: true,
            series: vec![
                Series::new(
                    "KL(best-of-N ‖ tilt)/L → 0",
                    pts(&|r| r.kl_tilt_bon_per_token),
                    SeriesStyle::Line,
                )
                .with_marker(Marker::Circle),
                Series::new(
                    "KL(best-of-N ‖ q)/L → Δ",
                    pts(&|r| r.bon_kl_per_token),
                    SeriesStyle::Line,
                )
                .with_marker(Marker::Square),
                Series::hline(format!("Δ = {delta} nats, the per-token budget"), delta),
            ],
        },
    ];
    write_svg(
        path,
        "Memoryless model: best-of-N vs the optimal tilt (arXiv 2404.01730)",
        &panels,
    )
    .map_err(plot_error)
}

/// Run `tilt theory memoryless`.
pub fn run(args: MemorylessArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        check_plot(path)?;
    }
    let dist = args.dist.load()?;
    let (length_flag, lengths) = parse_lengths(&args)?;
    let rewards_name = args.dist.rewards_name();
    let flag = |e: TiltError| named(e, &rewards_name, length_flag);
    let mut progress = Progress::new("theory memoryless", lengths.len() as u64, "lengths");
    let (out, reports) = memoryless_output(
        &dist,
        args.grid,
        &lengths,
        args.delta,
        args.plot.as_ref().map(|p| p.display().to_string()),
        || progress.inc(),
    )
    .map_err(flag)?;
    progress.finish();
    emit(&out, args.format)?;
    if let Some(path) = &args.plot {
        plot(path, &reports, args.delta)?;
    }
    Ok(())
}
