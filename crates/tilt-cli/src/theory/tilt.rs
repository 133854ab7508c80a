//! `tilt theory tilt`: the exact KL-regularised optimum φ_β ∝ p·e^(r/β) (arXiv 2404.01730).

use super::input::{flag_error, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde::Serialize;
use tilt_core::tilt::Tilt;

/// Flags of `tilt theory tilt`.
#[derive(Debug, Args)]
pub struct TiltArgs {
    #[command(flatten)]
    dist: DistributionArgs,
    /// Regularisation strength β > 0 (the tilt is p·e^(r/β)); or give --kl.
    #[arg(long, conflicts_with = "kl", allow_hyphen_values = true)]
    beta: Option<f64>,
    /// KL budget in nats: solve for the β whose tilt has exactly this KL (1e-12 relative).
    #[arg(long, allow_hyphen_values = true)]
    kl: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// What `tilt theory tilt` prints: the tilt (its `beta`, `lambda` and `log_partition` are
/// null where +∞, see [`Tilt`]) and the reference's expected reward.
#[derive(Debug, Serialize)]
pub struct TiltReport {
    /// Always `"nats"` (KL and log-partition).
    pub units: &'static str,
    /// The tilt.
    #[serde(flatten)]
    pub tilt: Tilt,
    /// E_p[r].
    pub reference_expected_reward: f64,
}

/// Run `tilt theory tilt`.
pub fn run(args: TiltArgs) -> anyhow::Result<()> {
    if args.beta.is_none() && args.kl.is_none() {
        return Err(crate::usage(
            "give the regularisation as --beta B (the tilt p·e^(r/B)) or as a KL budget \
             --kl NATS (the β whose tilt spends exactly that)",
        ));
    }
    let dist = args.dist.load()?;
    // Only the flag the user gave is named by errors.
    let tilt = match (args.beta, args.kl) {
        (Some(beta), _) => tilt_core::tilt::tilt_by_beta(&dist, beta)
            .map_err(flag_error(Flags(&[("beta", "--beta")])))?,
        (None, kl) => tilt_core::tilt::tilt_by_kl(&dist, kl.unwrap_or_default())
            .map_err(flag_error(Flags(&[("kl", "--kl")])))?,
    };
    emit(
        &TiltReport {
            units: "nats",
            tilt,
            reference_expected_reward: dist.mean_reward(),
        },
        args.format,
    )
}
