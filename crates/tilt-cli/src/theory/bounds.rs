//! `tilt theory bounds`: the sub-Gaussian improvement bound √(2σ²·KL) of arXiv 2406.05883
//! at the KLs of the best-of-n frontier, next to the exact improvements of best-of-n and
//! the tilt, and the closed-form f-divergence bounds of best-of-n.

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use crate::output::{emit, Format};
use clap::Args;
use serde_json::json;
use tilt_core::bounds::{
    bon_chi2_bound, bon_hellinger_squared_bound, bon_renyi_bound, bon_tv_bound,
    optimal_sub_gaussian_proxy, sub_gaussian_improvement_bound,
};
use tilt_core::frontier::{frontier, frontier_ns};

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
    /// Number of log-spaced n from 1 to --n-max.
    #[arg(long, default_value_t = 11)]
    points: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// Run `tilt theory bounds`.
pub fn run(args: BoundsArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let from_samples = args.dist.samples.is_some();
    let ns = frontier_ns(args.n_max, Some(args.points)).map_err(flag_error(FLAGS))?;
    let proxy = optimal_sub_gaussian_proxy(&dist).map_err(flag_error(FLAGS))?;
    let f = frontier(&dist, &ns).map_err(flag_error(FLAGS))?;
    let mean = dist.mean_reward();
    let mut rows = Vec::with_capacity(ns.len());
    for (b, t) in f.bon.iter().zip(&f.tilt) {
        let n = b.n;
        rows.push(json!({
            "n": n,
            "kl": b.kl,
            "bound_sqrt_2_sigma2_kl": sub_gaussian_improvement_bound(proxy.optimal, b.kl).map_err(flag_error(FLAGS))?,
            "bound_hoeffding": sub_gaussian_improvement_bound(proxy.hoeffding, b.kl).map_err(flag_error(FLAGS))?,
            "bon_improvement": b.expected_reward - mean,
            "tilt_improvement": t.expected_reward - mean,
            "kl_bound": b.kl_bound,
            "bound_at_kl_bound": sub_gaussian_improvement_bound(proxy.optimal, b.kl_bound).map_err(flag_error(FLAGS))?,
            "bon_chi2_bound": bon_chi2_bound(n).map_err(flag_error(FLAGS))?,
            "bon_tv_bound": bon_tv_bound(n).map_err(flag_error(FLAGS))?,
            "bon_renyi2_bound": bon_renyi_bound(n, 2.0).map_err(flag_error(FLAGS))?,
            "bon_hellinger_squared_bound": bon_hellinger_squared_bound(n).map_err(flag_error(FLAGS))?,
        }));
    }
    let method = if from_samples {
        "optimal proxy sup_λ 2(Λ(λ) − λ·E r)/λ² of the empirical distribution of the samples \
         (a plug-in estimate), by a log-spaced λ grid plus golden-section refinement"
    } else {
        "optimal proxy sup_λ 2(Λ(λ) − λ·E r)/λ² of the given distribution, by a log-spaced λ \
         grid plus golden-section refinement"
    };
    emit(
        &json!({
            "units": "nats",
            "sigma2": proxy.optimal,
            "sigma2_method": method,
            "sigma2_lambda": proxy.optimal_lambda,
            "sigma2_hoeffding": proxy.hoeffding,
            "variance": proxy.variance,
            "reference_expected_reward": mean,
            "bound": "E_π r − E_p r ≤ √(2σ²·KL(π‖p)) (arXiv 2406.05883)",
            "rows": rows,
        }),
        args.format,
    )
}
