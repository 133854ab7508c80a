//! `tilt theory frontier`: best-of-n for n = 1…N next to the tilt at the same KL, and an
//! optional SVG of reward and win rate against KL (nats). The head and the tilt's drawn
//! curve come from [`tilt_core::report`]; the points from [`FrontierSolver`].
//!
//! The rows are streamed (one `bon` row per n as it is computed, then one `tilt` row per
//! n), so memory stays at a few numbers per point whatever `--points` is; progress goes to
//! stderr.

use super::input::{check_plot, flag_error, parse_count, plot_error, DistributionArgs, Flags};
use super::progress::Progress;
use clap::Args;
use std::path::{Path, PathBuf};
use tilt_core::frontier::{frontier_ns, BonPoint, FrontierSolver, TiltPoint};
use tilt_core::report::{frontier_head, tilt_curve};
use tilt_output::{Format, Report};
use tilt_plot::{write_svg, Marker, Panel, Series, SeriesStyle};

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
    /// Number of log-spaced n from 1 to --n-max (default: every n; at most 10^6).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    points: Option<u64>,
    /// Also draw reward vs KL and win rate vs KL to this SVG file (checked before any work).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Most best-of-n points drawn (log-spaced among all): more only adds ink.
const PLOT_POINTS: usize = 400;
/// About how many points carry an `n = …` label.
const N_LABELS: usize = 9;

/// Indices of at most [`PLOT_POINTS`] of `len` points, log-spaced (all when fewer).
fn plot_subset(len: usize) -> Vec<usize> {
    if len <= PLOT_POINTS {
        return (0..len).collect();
    }
    let mut v: Vec<usize> = (0..PLOT_POINTS)
        .map(|k| {
            let f = k as f64 / (PLOT_POINTS - 1) as f64;
            ((len as f64).powf(f).round() as usize).clamp(1, len) - 1
        })
        .collect();
    v.dedup();
    v
}

/// `n = …` labels on about [`N_LABELS`] log-spaced points (and the last).
fn n_labels(bon: &[BonPoint]) -> Vec<String> {
    let Some(last) = bon.last() else {
        return Vec::new();
    };
    let top = (last.n as f64).ln().max(1e-9);
    let mut next = 0usize;
    bon.iter()
        .enumerate()
        .map(|(i, b)| {
            let level = ((b.n as f64).ln() / top * (N_LABELS - 1) as f64).floor() as usize;
            if level >= next || i + 1 == bon.len() {
                next = level + 1;
                format!("n = {}", b.n)
            } else {
                String::new()
            }
        })
        .collect()
}

fn plot(
    path: &Path,
    solver: &FrontierSolver,
    bon: &[BonPoint],
    tilt: &[TiltPoint],
) -> anyhow::Result<()> {
    let curve = tilt_curve(solver, tilt).map_err(flag_error(FLAGS))?;
    let labels = n_labels(bon);
    let panel = |title: &str, y_label: &str, y: &dyn Fn(f64, f64) -> f64| {
        let bon_y: Vec<(f64, f64)> = bon
            .iter()
            .map(|b| (b.kl, y(b.expected_reward, b.win_rate)))
            .collect();
        let at_bound: Vec<(f64, f64)> = bon
            .iter()
            .map(|b| (b.kl_bound, y(b.expected_reward, b.win_rate)))
            .collect();
        Panel {
            title: title.into(),
            x_label: "KL(π‖p) (nats)".into(),
            y_label: y_label.into(),
            log_x: false,
            // Beneath first: the bound's hollow squares, then the tilt's curve, then the
            // exact best-of-n points on top (for continuous rewards the first and the last
            // coincide, and both stay visible).
            series: vec![
                Series::new(
                    "best-of-n placed at KL = log n − (n−1)/n (cut at the frame)",
                    at_bound,
                    SeriesStyle::Dashed,
                )
                .with_marker(Marker::Square)
                .hollow()
                .clipped()
                .with_color(2),
                Series::new(
                    "tilt p·e^(r/β), the KL-optimal policy",
                    curve
                        .iter()
                        .map(|t| (t.kl, y(t.expected_reward, t.win_rate)))
                        .collect(),
                    SeriesStyle::Line,
                )
                .with_color(0),
                Series::new("best-of-n at its exact KL", bon_y, SeriesStyle::Line)
                    .with_marker(Marker::Circle)
                    .with_labels(labels.clone())
                    .with_color(1),
            ],
        }
    };
    let panels = [
        panel("Expected reward vs KL", "expected reward E_π[r]", &|r, _| r),
        panel(
            "Win rate vs KL",
            "win rate over p (ties count ½)",
            &|_, w| w,
        ),
    ];
    write_svg(path, "Best-of-n vs the KL-optimal tilt", &panels).map_err(plot_error)
}

/// Run `tilt theory frontier`.
pub fn run(args: FrontierArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        check_plot(path)?;
    }
    let dist = args.dist.load()?;
    let points = args.points.map(|p| p.min(usize::MAX as u64) as usize);
    let ns = frontier_ns(args.n_max, points).map_err(flag_error(FLAGS))?;
    let solver = FrontierSolver::new(&dist).map_err(flag_error(FLAGS))?;
    let keep = args.plot.as_ref().map(|_| plot_subset(ns.len()));
    let kept = |i: usize| keep.as_ref().is_some_and(|k| k.binary_search(&i).is_ok());
    let mut progress = Progress::new("theory frontier", ns.len() as u64, "points");
    let mut stdout = std::io::stdout().lock();
    let mut report = Report::new(&mut stdout, args.format)?;
    let plot_name = args.plot.as_ref().map(|p| p.display().to_string());
    report.fields(&frontier_head(&dist, &solver, plot_name))?;
    // Between the two lists only each point's KL is kept (and the points to draw).
    let mut kls = Vec::with_capacity(ns.len());
    let (mut plot_bon, mut plot_tilt) = (Vec::new(), Vec::new());
    progress.phase("best-of-n", ns.len() as u64);
    report.rows(
        "bon",
        ns.iter().enumerate().map(|(i, &n)| {
            let b = solver.bon_point(n).map_err(flag_error(FLAGS))?;
            kls.push(b.kl);
            if kept(i) {
                plot_bon.push(b);
            }
            progress.inc();
            anyhow::Ok(b)
        }),
    )?;
    progress.phase("tilt at each KL", ns.len() as u64);
    report.rows(
        "tilt",
        kls.iter().enumerate().map(|(i, &kl)| {
            let t = solver.tilt_at_kl(kl).map_err(flag_error(FLAGS))?;
            if kept(i) {
                plot_tilt.push(t);
            }
            progress.inc();
            anyhow::Ok(t)
        }),
    )?;
    report.finish()?;
    progress.finish();
    if let Some(path) = &args.plot {
        plot(path, &solver, &plot_bon, &plot_tilt)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_subset_is_log_spaced_and_keeps_the_ends() {
        assert_eq!(plot_subset(5), vec![0, 1, 2, 3, 4]);
        let s = plot_subset(1_000_000);
        assert!(s.len() <= PLOT_POINTS && s.len() > 300, "{}", s.len());
        assert_eq!((s[0], *s.last().unwrap()), (0, 999_999));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn about_nine_labels_including_the_last() {
        let bon: Vec<BonPoint> = (1..=1000u64)
            .map(|n| BonPoint {
                n,
                kl: 0.0,
                kl_bound: 0.0,
                expected_reward: 0.0,
                win_rate: 0.0,
            })
            .collect();
        let l = n_labels(&bon);
        let shown: Vec<&String> = l.iter().filter(|s| !s.is_empty()).collect();
        assert!((8..=11).contains(&shown.len()), "{shown:?}");
        assert_eq!(shown[0], "n = 1");
        assert_eq!(l.last().unwrap(), "n = 1000");
    }
}
