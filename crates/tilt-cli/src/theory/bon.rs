//! `tilt theory bon`: exact best-of-n (or worst-of-n) with ties (arXiv 2401.01879).

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde::Serialize;
use tilt_core::best_of_n::BestOfN;

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
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// What `tilt theory bon` prints: the exact law and its numbers ([`BestOfN`], all finite)
/// and the reference's expected reward.
#[derive(Debug, Serialize)]
pub struct BonReport {
    /// Always `"nats"` (KL, bound, estimate).
    pub units: &'static str,
    /// Best-of-n (or worst-of-n).
    #[serde(flatten)]
    pub bon: BestOfN,
    /// E_p[r].
    pub reference_expected_reward: f64,
}

/// Run `tilt theory bon`.
pub fn run(args: BonArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let bon = if args.worst {
        tilt_core::best_of_n::worst_of_n(&dist, args.n)
    } else {
        tilt_core::best_of_n::best_of_n(&dist, args.n)
    }
    .map_err(flag_error(FLAGS))?;
    emit(
        &BonReport {
            units: "nats",
            bon,
            reference_expected_reward: dist.mean_reward(),
        },
        args.format,
    )
}
