//! `tilt theory tilt`: the exact KL-regularised optimum φ_β ∝ p·e^{r/β} (arXiv 2404.01730).

use super::input::{flag_error, json_number, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde_json::json;

/// The library's input names that are flags of `tilt theory tilt`.
const FLAGS: Flags = Flags(&[("beta", "--beta"), ("kl", "--kl")]);

/// Flags of `tilt theory tilt`.
#[derive(Debug, Args)]
pub struct TiltArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Regularisation strength β > 0 (the tilt is p·e^{r/β}).
    #[arg(
        long,
        conflicts_with = "kl",
        required_unless_present = "kl",
        allow_hyphen_values = true
    )]
    beta: Option<f64>,
    /// KL budget in nats: solve for the β whose tilt has exactly this KL (1e-12 relative).
    #[arg(long, allow_hyphen_values = true)]
    kl: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory tilt`.
pub fn run(args: TiltArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let t = match (args.beta, args.kl) {
        (Some(beta), _) => tilt_core::tilt::tilt_by_beta(&dist, beta),
        (None, Some(kl)) => tilt_core::tilt::tilt_by_kl(&dist, kl),
        (None, None) => unreachable!("clap requires --beta or --kl"),
    }
    .map_err(flag_error(FLAGS))?;
    emit(
        &json!({
            "units": "nats",
            "beta": json_number(t.beta),
            "lambda": json_number(t.lambda),
            "kl": t.kl,
            "expected_reward": t.expected_reward,
            "reference_expected_reward": dist.mean_reward(),
            "win_rate": t.win_rate,
            "log_partition": json_number(t.log_partition),
            "pmf": t.pmf,
        }),
        args.format,
    )
}
