//! `tilt theory bon`: exact best-of-n (or worst-of-n) with ties (arXiv 2401.01879).

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde_json::json;

/// The library's input names that are flags of `tilt theory bon`.
const FLAGS: Flags = Flags(&[("n", "--n")]);

/// Flags of `tilt theory bon`.
#[derive(Debug, Args)]
pub struct BonArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Number of draws n ≥ 1 (up to 10^15 and beyond; `1e15` is accepted).
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    n: u64,
    /// Worst-of-n instead: keep the lowest reward.
    #[arg(long)]
    worst: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory bon`.
pub fn run(args: BonArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let b = if args.worst {
        tilt_core::best_of_n::worst_of_n(&dist, args.n)
    } else {
        tilt_core::best_of_n::best_of_n(&dist, args.n)
    }
    .map_err(flag_error(FLAGS))?;
    emit(
        &json!({
            "units": "nats",
            "selection": b.selection,
            "n": b.n,
            "kl": b.kl,
            "kl_bound": b.kl_bound,
            "kl_estimate": b.kl_estimate,
            "expected_reward": b.expected_reward,
            "reference_expected_reward": dist.mean_reward(),
            "win_rate": b.win_rate,
            "win_rate_bound": b.win_rate_bound,
            "pmf": b.pmf,
        }),
        args.format,
    )
}
