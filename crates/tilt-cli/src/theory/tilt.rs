//! `tilt theory tilt`: the exact KL-regularised optimum φ_β ∝ p·e^(r/β) (arXiv 2404.01730),
//! computed by [`tilt_core::report::tilt_report`].

use super::input::{flag_error, DistributionArgs, Flags};
use clap::Args;
use tilt_core::report::{tilt_report, TiltBy};
use tilt_output::{emit, Format};

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

/// Run `tilt theory tilt`.
pub fn run(args: TiltArgs) -> anyhow::Result<()> {
    // Only the flag the user gave is named by errors.
    let (by, flags) = match (args.beta, args.kl) {
        (Some(beta), _) => (TiltBy::Beta(beta), Flags(&[("beta", "--beta")])),
        (None, Some(kl)) => (TiltBy::Kl(kl), Flags(&[("kl", "--kl")])),
        (None, None) => {
            return Err(crate::usage(
                "give the regularisation as --beta B (the tilt p·e^(r/B)) or as a KL budget \
                 --kl NATS (the β whose tilt spends exactly that)",
            ))
        }
    };
    let dist = args.dist.load()?;
    Ok(emit(
        &tilt_report(&dist, by).map_err(flag_error(flags))?,
        args.format,
    )?)
}
