//! `tilt theory divergence`: KL both ways, Rényi, TV, χ², squared Hellinger between two pmfs
//! ([`tilt_core::report::divergence_report`]).

use super::input::{flag_error, internal, parse_list, Flags};
use crate::usage;
use clap::Args;
use tilt_core::divergence::checked_pmf;
use tilt_core::report::divergence_report;
use tilt_core::TiltError;
use tilt_output::{emit, Format};

/// The library's input names that are flags of `tilt theory divergence`.
const FLAGS: Flags = Flags(&[
    ("q", "--q"),
    ("p", "--p"),
    ("alpha", "--alpha"),
    ("q/p", "--q/--p"),
    ("p/q", "--q/--p"),
]);

/// Flags of `tilt theory divergence`.
#[derive(Debug, Args)]
pub struct DivergenceArgs {
    /// The first pmf (comma separated); divergences are of q from p, e.g. KL(q‖p).
    #[arg(long, allow_hyphen_values = true)]
    q: String,
    /// The second pmf, on the same support.
    #[arg(long, allow_hyphen_values = true)]
    p: String,
    /// Order α ∈ (0, ∞] of the Rényi divergence (`inf` for D_∞).
    #[arg(long, default_value_t = 2.0, allow_hyphen_values = true)]
    alpha: f64,
    /// Rescale each pmf to sum to 1 instead of rejecting a sum ≠ 1.
    #[arg(long)]
    normalize: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Parse the pmf given to `flag` and check it ([`checked_pmf`]), naming the flag.
fn pmf(flag: &str, text: &str, normalize: bool) -> anyhow::Result<Vec<f64>> {
    let v = parse_list(flag, text)?;
    checked_pmf(flag.trim_start_matches("--"), v, normalize).map_err(|e| match e {
        TiltError::InvalidInput { problem, .. } => usage(format!(
            "{flag}: {}",
            problem.replace("use normalisation", "use --normalize")
        )),
        other => internal(other),
    })
}

/// Run `tilt theory divergence`.
pub fn run(args: DivergenceArgs) -> anyhow::Result<()> {
    let q = pmf("--q", &args.q, args.normalize)?;
    let p = pmf("--p", &args.p, args.normalize)?;
    if q.len() != p.len() {
        return Err(usage(format!(
            "--q/--p: unequal lengths: --q has {}, --p has {}",
            q.len(),
            p.len()
        )));
    }
    let report = divergence_report(&q, &p, args.alpha).map_err(flag_error(FLAGS))?;
    Ok(emit(&report, args.format)?)
}
