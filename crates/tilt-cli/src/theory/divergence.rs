//! `tilt theory divergence`: KL both ways, Rényi, TV, χ², squared Hellinger between two pmfs
//! ([`tilt_core::report::divergence_report`]).

use super::input::{flag_error, parse_list, Flags};
use crate::output::{emit, Format};
use crate::usage;
use clap::Args;
use tilt_core::distribution::PROB_SUM_TOLERANCE;
use tilt_core::report::divergence_report;

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

fn pmf(flag: &str, text: &str, normalize: bool) -> anyhow::Result<Vec<f64>> {
    let mut v = parse_list(flag, text)?;
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || **x < 0.0)
    {
        return Err(usage(format!(
            "{flag}: entry {} is {x}; probabilities must be finite and ≥ 0",
            i + 1
        )));
    }
    let sum: f64 = v.iter().sum();
    if normalize {
        if sum.is_nan() || sum <= 0.0 {
            return Err(usage(format!("{flag}: sum to {sum}; cannot normalise")));
        }
        v.iter_mut().for_each(|x| *x /= sum);
    } else if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
        return Err(usage(format!(
            "{flag}: sum to {sum} (must be 1 within {PROB_SUM_TOLERANCE}; use --normalize to rescale)"
        )));
    }
    Ok(v)
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
    emit(&report, args.format)
}
