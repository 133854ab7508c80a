//! `tilt theory bon`: exact best-of-n (or worst-of-n) with ties (arXiv 2401.01879),
//! computed by [`tilt_core::report::bon_report`].

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use clap::Args;
use tilt_core::report::bon_report;
use tilt_output::{emit, Format};

/// The library's input names that are flags of `tilt theory bon`.
const FLAGS: Flags = Flags(&[("n", "--n")]);

/// Flags of `tilt theory bon`.
#[derive(Debug, Args)]
pub struct BonArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Number of draws n ≥ 1 (up to 18446744073709551615; `1e15` is accepted).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// Worst-of-n instead: keep the lowest reward.
    #[arg(long)]
    worst: bool,
    /// Summary only: leave out the per-outcome pmf (never computed), for large references
    /// where only KL, reward and win rate are wanted.
    #[arg(long)]
    no_pmf: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory bon`.
pub fn run(args: BonArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let report = bon_report(&dist, args.n, args.worst, !args.no_pmf).map_err(flag_error(FLAGS))?;
    Ok(emit(&report, args.format)?)
}
