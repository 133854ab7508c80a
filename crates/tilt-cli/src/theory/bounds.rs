//! `tilt theory bounds`: the sub-Gaussian improvement bound √(2σ²·KL) of arXiv 2406.05883
//! at the KLs of the best-of-n frontier, next to the exact improvements of best-of-n and
//! the tilt, and the closed-form f-divergence bounds of best-of-n. Rows are streamed.

use super::input::{flag_error, parse_count, DistributionArgs, Flags};
use super::progress::Progress;
use crate::output::{Format, Report};
use clap::Args;
use serde::Serialize;
use tilt_core::bounds::{
    bon_chi2_bound, bon_hellinger_squared_bound, bon_renyi_bound, bon_tv_bound,
    optimal_sub_gaussian_proxy, sub_gaussian_improvement_bound,
};
use tilt_core::frontier::{frontier_ns, FrontierSolver};

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

/// The scalar fields of what `tilt theory bounds` prints (then the list `rows`, a
/// [`BoundsRow`] per n).
#[derive(Debug, Serialize)]
pub struct BoundsHead {
    /// Always `"nats"`.
    pub units: &'static str,
    /// The optimal sub-Gaussian variance proxy σ² of r − E_p r.
    pub sigma2: f64,
    /// How σ² was computed.
    pub sigma2_method: &'static str,
    /// The λ at which σ² is attained (0: the variance limit).
    pub sigma2_lambda: f64,
    /// Hoeffding's proxy (max r − min r)²/4.
    pub sigma2_hoeffding: f64,
    /// Var_p(r).
    pub variance: f64,
    /// E_p[r].
    pub reference_expected_reward: f64,
    /// The bound, in words.
    pub bound: &'static str,
}

/// One n of `tilt theory bounds` (all finite).
#[derive(Debug, Serialize)]
pub struct BoundsRow {
    /// Number of draws.
    pub n: u64,
    /// Exact KL(π_n‖p), nats.
    pub kl: f64,
    /// √(2σ²·KL) at the exact KL.
    pub bound_sqrt_2_sigma2_kl: f64,
    /// The same with Hoeffding's proxy.
    pub bound_hoeffding: f64,
    /// E_{π_n}[r] − E_p[r].
    pub bon_improvement: f64,
    /// E_φ[r] − E_p[r] for the tilt at the same KL.
    pub tilt_improvement: f64,
    /// log n − (n−1)/n, nats.
    pub kl_bound: f64,
    /// √(2σ²·(log n − (n−1)/n)).
    pub bound_at_kl_bound: f64,
    /// χ²(π_n‖p) ≤ (n−1)²/(2n−1).
    pub bon_chi2_bound: f64,
    /// TV(π_n, p) ≤ n^{−1/(n−1)}·(1 − 1/n).
    pub bon_tv_bound: f64,
    /// D_2(π_n‖p) ≤ log(n²/(2n−1)).
    pub bon_renyi2_bound: f64,
    /// H²(π_n, p) ≤ (√n − 1)²/(n + 1).
    pub bon_hellinger_squared_bound: f64,
}

/// Run `tilt theory bounds`.
pub fn run(args: BoundsArgs) -> anyhow::Result<()> {
    let dist = args.dist.load()?;
    let from_samples = args.dist.samples.is_some();
    let points = args.points.min(usize::MAX as u64) as usize;
    let ns = frontier_ns(args.n_max, Some(points)).map_err(flag_error(FLAGS))?;
    let err = flag_error(FLAGS);
    let proxy = optimal_sub_gaussian_proxy(&dist).map_err(&err)?;
    let solver = FrontierSolver::new(&dist).map_err(&err)?;
    let mean = dist.mean_reward();
    let method = if from_samples {
        "optimal proxy sup_λ 2(Λ(λ) − λ·E r)/λ² of the empirical distribution of the samples \
         (a plug-in estimate), by a log-spaced λ grid plus golden-section refinement"
    } else {
        "optimal proxy sup_λ 2(Λ(λ) − λ·E r)/λ² of the given distribution, by a log-spaced λ \
         grid plus golden-section refinement"
    };
    let mut stdout = std::io::stdout().lock();
    let mut report = Report::new(&mut stdout, args.format)?;
    report.fields(&BoundsHead {
        units: "nats",
        sigma2: proxy.optimal,
        sigma2_method: method,
        sigma2_lambda: proxy.optimal_lambda,
        sigma2_hoeffding: proxy.hoeffding,
        variance: proxy.variance,
        reference_expected_reward: mean,
        bound: "E_π r − E_p r ≤ √(2σ²·KL(π‖p)) (arXiv 2406.05883)",
    })?;
    let mut progress = Progress::new("theory bounds", ns.len() as u64, "values of n");
    report.rows(
        "rows",
        ns.iter().map(|&n| {
            let b = solver.bon_point(n).map_err(&err)?;
            let t = solver.tilt_at_kl(b.kl).map_err(&err)?;
            let bound = |sigma2: f64, kl: f64| sub_gaussian_improvement_bound(sigma2, kl);
            let row = BoundsRow {
                n,
                kl: b.kl,
                bound_sqrt_2_sigma2_kl: bound(proxy.optimal, b.kl).map_err(&err)?,
                bound_hoeffding: bound(proxy.hoeffding, b.kl).map_err(&err)?,
                bon_improvement: b.expected_reward - mean,
                tilt_improvement: t.expected_reward - mean,
                kl_bound: b.kl_bound,
                bound_at_kl_bound: bound(proxy.optimal, b.kl_bound).map_err(&err)?,
                bon_chi2_bound: bon_chi2_bound(n).map_err(&err)?,
                bon_tv_bound: bon_tv_bound(n).map_err(&err)?,
                bon_renyi2_bound: bon_renyi_bound(n, 2.0).map_err(&err)?,
                bon_hellinger_squared_bound: bon_hellinger_squared_bound(n).map_err(&err)?,
            };
            progress.inc();
            Ok(row)
        }),
    )?;
    report.finish()?;
    progress.finish();
    Ok(())
}
