//! `tilt theory frontier`: best-of-n for n = 1…N next to the tilt at the same KL, and an
//! optional SVG of reward and win rate against KL (nats).

use super::input::{check_svg_path, flag_error, json_number, parse_count, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use tilt_core::frontier::{frontier, frontier_ns, Frontier};
use tilt_plot::{write_svg, Panel, Series, SeriesStyle};

/// The library's input names that are flags of `tilt theory frontier`.
const FLAGS: Flags = Flags(&[("n-max", "--n-max"), ("points", "--points")]);

/// Flags of `tilt theory frontier`.
#[derive(Debug, Args)]
pub struct FrontierArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Largest n (every n from 1, or --points log-spaced ones).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n_max: u64,
    /// Number of log-spaced n from 1 to --n-max (default: every n).
    #[arg(long)]
    points: Option<usize>,
    /// Also draw reward vs KL and win rate vs KL to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

fn plot(path: &std::path::Path, f: &Frontier) -> anyhow::Result<()> {
    let bon_r: Vec<(f64, f64)> = f.bon.iter().map(|b| (b.kl, b.expected_reward)).collect();
    let tilt_r: Vec<(f64, f64)> = f.tilt.iter().map(|t| (t.kl, t.expected_reward)).collect();
    let bound_r: Vec<(f64, f64)> = f
        .bon
        .iter()
        .map(|b| (b.kl_bound, b.expected_reward))
        .collect();
    let bon_w: Vec<(f64, f64)> = f.bon.iter().map(|b| (b.kl, b.win_rate)).collect();
    let tilt_w: Vec<(f64, f64)> = f.tilt.iter().map(|t| (t.kl, t.win_rate)).collect();
    let bound_w: Vec<(f64, f64)> = f.bon.iter().map(|b| (b.kl_bound, b.win_rate)).collect();
    let label = "best-of-n placed at KL = log n − (n−1)/n (the bound)";
    let panels = [
        Panel {
            title: "Expected reward vs KL".into(),
            x_label: "KL(π‖p) (nats)".into(),
            y_label: "expected reward E_π[r]".into(),
            log_x: false,
            series: vec![
                Series::new("best-of-n (exact KL)", bon_r, SeriesStyle::Line),
                Series::new("tilt p·e^{r/β} at the same KL", tilt_r, SeriesStyle::Line),
                Series::new(label, bound_r, SeriesStyle::Dashed),
            ],
        },
        Panel {
            title: "Win rate vs KL".into(),
            x_label: "KL(π‖p) (nats)".into(),
            y_label: "win rate over p (ties ½)".into(),
            log_x: false,
            series: vec![
                Series::new("best-of-n (exact KL)", bon_w, SeriesStyle::Line),
                Series::new("tilt p·e^{r/β} at the same KL", tilt_w, SeriesStyle::Line),
                Series::new(label, bound_w, SeriesStyle::Dashed),
            ],
        },
    ];
    write_svg(path, "Best-of-n vs the KL-optimal tilt", &panels)?;
    Ok(())
}

/// Run `tilt theory frontier`.
pub fn run(args: FrontierArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let ns = frontier_ns(args.n_max, args.points).map_err(flag_error(FLAGS))?;
    if let Some(path) = &args.plot {
        check_svg_path(path)?;
    }
    let f = frontier(&dist, &ns).map_err(flag_error(FLAGS))?;
    if let Some(path) = &args.plot {
        plot(path, &f)?;
    }
    let bon: Vec<_> = f
        .bon
        .iter()
        .map(|b| {
            json!({"n": b.n, "kl": b.kl, "kl_bound": b.kl_bound,
                   "expected_reward": b.expected_reward, "win_rate": b.win_rate})
        })
        .collect();
    let tilt: Vec<_> = f
        .tilt
        .iter()
        .map(|t| {
            json!({"beta": json_number(t.beta), "kl": t.kl,
                   "expected_reward": t.expected_reward, "win_rate": t.win_rate})
        })
        .collect();
    emit(
        &json!({
            "units": "nats",
            "reference_expected_reward": dist.mean_reward(),
            "bon": bon,
            "tilt": tilt,
            "plot": args.plot.as_ref().map(|p| p.display().to_string()),
        }),
        args.format,
    )
}
