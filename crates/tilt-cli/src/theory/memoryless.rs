//! `tilt theory memoryless`: the memoryless-model asymptotics of arXiv 2404.01730 — the
//! rate function, the optimal tilt at budget L·Δ, best-of-N with N = e^(LΔ), and their KL,
//! exactly at each length, with an optional SVG of the convergence.

use super::input::{check_plot, flag_error, parse_count_list, plot_error, DistributionArgs, Flags};
use super::progress::Progress;
use crate::output::{emit, Format};
use crate::usage;
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tilt_core::lattice::ConvolutionMethod;
use tilt_core::memoryless::{MemorylessModel, MemorylessReport, ScaledCgf};
use tilt_core::TiltError;
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

/// One length of the convergence table (all finite).
#[derive(Debug, Serialize)]
pub struct MemorylessRow {
    /// Sequence length L.
    pub length: usize,
    /// log N = LΔ (nats).
    pub log_n: f64,
    /// E_BoN[S_L]/L.
    pub bon_reward_per_token: f64,
    /// Λ'(λ) = x*, the tilt's reward per token.
    pub tilt_reward_per_token: f64,
    /// x* − E_BoN[S_L]/L.
    pub x_star_minus_bon: f64,
    /// KL(best-of-N ‖ tilt)/L, nats.
    pub kl_tilt_bon_per_token: f64,
    /// KL(best-of-N ‖ q^⊗L)/L, nats.
    pub bon_kl_per_token: f64,
    /// How the law of S_L was computed.
    pub convolution: ConvolutionMethod,
}

/// What `tilt theory memoryless` prints: the per-token quantities, the last length's
/// numbers, and `table`, a [`MemorylessRow`] per length (all finite).
#[derive(Debug, Serialize)]
pub struct MemorylessOutput {
    /// What is in which unit.
    pub units: &'static str,
    /// Per-token KL budget Δ (nats).
    pub delta: f64,
    /// x*(Δ) = Λ'(λ_Δ).
    pub x_star: f64,
    /// I(x*) by the Legendre transform (equals Δ).
    pub rate_function_at_x_star: f64,
    /// λ_Δ.
    pub lambda: f64,
    /// β = 1/λ_Δ.
    pub beta: f64,
    /// −log q(argmax r), nats per token.
    pub max_kl_per_token: f64,
    /// E_q r.
    pub reference_reward_per_token: f64,
    /// max r on the support.
    pub max_reward_per_token: f64,
    /// The reward grid step h.
    pub lattice_step: f64,
    /// Largest per-token |reward − snapped reward|.
    pub grid_snap_error_per_token: f64,
    /// The last length L.
    pub length: usize,
    /// LΔ at the last length.
    pub log_n: f64,
    /// x*.
    pub tilt_reward_per_token: f64,
    /// KL(q_λ‖q) (= Δ).
    pub tilt_kl_per_token: f64,
    /// E_BoN[S_L]/L at the last length.
    pub bon_reward_per_token: f64,
    /// KL(BoN‖q^⊗L)/L at the last length.
    pub bon_kl_per_token: f64,
    /// (log N − (N−1)/N)/L at the last length.
    pub bon_kl_bound_per_token: f64,
    /// KL(BoN‖tilt)/L at the last length.
    pub kl_tilt_bon_per_token: f64,
    /// The direction of the previous field.
    pub kl_direction: &'static str,
    /// The Rényi form of the scaled cumulant generating function at θ = −λ/2, λ/2, λ, 2λ.
    pub scaled_cgf_renyi: Vec<ScaledCgf>,
    /// Its formula.
    pub scaled_cgf_formula: &'static str,
    /// The SVG written, or null.
    pub plot: Option<String>,
    /// One row per length, in the order given.
    pub table: Vec<MemorylessRow>,
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

fn row(r: &MemorylessReport) -> MemorylessRow {
    MemorylessRow {
        length: r.length,
        log_n: r.log_n,
        bon_reward_per_token: r.bon_reward_per_token,
        tilt_reward_per_token: r.tilt_reward_per_token,
        x_star_minus_bon: r.x_star - r.bon_reward_per_token,
        kl_tilt_bon_per_token: r.kl_tilt_bon_per_token,
        bon_kl_per_token: r.bon_kl_per_token,
        convolution: r.convolution,
    }
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
    let model = MemorylessModel::new(&dist, args.grid).map_err(flag)?;
    let lambda = model.lambda_for_kl(args.delta).map_err(flag)?;
    for &l in &lengths {
        model.check_length(l).map_err(flag)?;
    }
    let mut progress = Progress::new("theory memoryless", lengths.len() as u64, "lengths");
    let mut reports = Vec::with_capacity(lengths.len());
    for &l in &lengths {
        reports.push(model.analyze(l, args.delta).map_err(flag)?);
        progress.inc();
    }
    progress.finish();
    let renyi: Vec<ScaledCgf> = [-0.5, 0.5, 1.0, 2.0]
        .iter()
        .map(|ratio| model.scaled_cgf_renyi(lambda, ratio * lambda))
        .collect::<Result<_, _>>()
        .map_err(flag)?;
    let last = reports.last().expect("at least one length");
    let out = MemorylessOutput {
        units: "KL and rate function in nats (per token where named); rewards per token in \
                reward units",
        delta: args.delta,
        x_star: last.x_star,
        rate_function_at_x_star: last.rate_function_at_x_star,
        lambda: last.lambda,
        beta: last.beta,
        max_kl_per_token: model.max_kl_per_token(),
        reference_reward_per_token: last.reference_reward_per_token,
        max_reward_per_token: last.max_reward_per_token,
        lattice_step: last.lattice_step,
        grid_snap_error_per_token: last.grid_snap_error_per_token,
        length: last.length,
        log_n: last.log_n,
        tilt_reward_per_token: last.tilt_reward_per_token,
        tilt_kl_per_token: last.tilt_kl_per_token,
        bon_reward_per_token: last.bon_reward_per_token,
        bon_kl_per_token: last.bon_kl_per_token,
        bon_kl_bound_per_token: last.bon_kl_bound_per_token,
        kl_tilt_bon_per_token: last.kl_tilt_bon_per_token,
        kl_direction: "KL(best-of-N ‖ tilt)",
        scaled_cgf_renyi: renyi,
        scaled_cgf_formula: "(1/L) log E_tilt[e^(θ S_L)] = Λ(λ+θ) − Λ(λ) = (θ/λ)(Λ(λ) + \
                             D_α(q_λ‖q)), α = 1 + θ/λ",
        plot: args.plot.as_ref().map(|p| p.display().to_string()),
        table: reports.iter().map(row).collect(),
    };
    emit(&out, args.format)?;
    if let Some(path) = &args.plot {
        plot(path, &reports, args.delta)?;
    }
    Ok(())
}
