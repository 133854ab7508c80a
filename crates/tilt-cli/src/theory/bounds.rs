//! `tilt theory bounds`: the sub-Gaussian improvement bound √(2σ²·KL) of arXiv 2406.05883
//! at the KLs of the best-of-n frontier, next to the exact improvements of best-of-n and
//! the tilt, and the closed-form f-divergence bounds of best-of-n
//! ([`tilt_core::report::Bounds`]). Rows are streamed.

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use super::progress::Progress;
use clap::Args;
use tilt_core::frontier::frontier_ns;
use tilt_core::report::Bounds;
use tilt_output::{Format, Report};

/// The library's input names that are flags of `tilt theory bounds`.
const FLAGS: Flags = Flags(&[("n-max", "--n-max"), ("points", "--points")]);

/// Flags of `tilt theory bounds`.
#[derive(Debug, Args)]
pub struct BoundsArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Largest n of the best-of-n frontier whose KLs are used.
    #[arg(long, value_parser = parse_count, default_value = "1024", allow_hyphen_values = true)]
    n_max: u64,
    /// Number of log-spaced n from 1 to --n-max (at most 10^6).
    #[arg(long, value_parser = parse_count, default_value = "11", allow_hyphen_values = true)]
    points: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory bounds`.
pub fn run(args: BoundsArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let points = args.points.min(usize::MAX as u64) as usize;
    let err = flag_error(FLAGS);
    let ns = frontier_ns(args.n_max, Some(points)).map_err(&err)?;
    let bounds = Bounds::new(&dist, args.dist.samples.is_some()).map_err(&err)?;
    let mut stdout = std::io::stdout().lock();
    let mut report = Report::new(&mut stdout, args.format)?;
    report.fields(&bounds.head())?;
    let mut progress = Progress::new("theory bounds", ns.len() as u64, "values of n");
    report.rows(
        "rows",
        ns.iter().map(|&n| {
            let row = bounds.row(n).map_err(&err)?;
            progress.inc();
            anyhow::Ok(row)
        }),
    )?;
    report.finish()?;
    progress.finish();
    Ok(())
}
