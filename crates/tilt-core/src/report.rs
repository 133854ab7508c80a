//! The typed results of the theory computations, as every face prints or returns them
//! (the CLI's `tilt theory …` commands print them as JSON or tables; a server or a Python
//! binding can return the same values).
//!
//! Each report is a `Serialize` struct whose field order is its output order, and each
//! comes with the function that computes it from a distribution and parameters. A field
//! that is `+∞` (or does not apply) serialises as `null`, as the underlying types
//! document. Errors are the computations' own [`TiltError`](crate::TiltError)s, naming the
//! library's parameters (`n`, `kl`, `beta`, …), never a face's flags.
//!
//! Every formula is stated with its source in the repository's `docs/theory.md`.

use crate::best_of_n::{best_of_n, best_of_n_summary, worst_of_n, BestOfN, Selection};
use crate::bounds::{
    bon_chi2_bound, bon_hellinger_squared_bound, bon_renyi_bound, bon_tv_bound,
    optimal_sub_gaussian_proxy, sub_gaussian_improvement_bound, SubGaussianProxy,
};
use crate::divergence::{divergences, Divergences};
use crate::frontier::{FrontierSolver, TiltPoint};
use crate::infalign::{
    self, inference_win_rate, optimize_t, BestOfMPolicy, CalibratedTilt, OptimalT, Procedure,
    Transform,
};
use crate::lattice::ConvolutionMethod;
use crate::memoryless::{MemorylessModel, MemorylessReport, ScaledCgf};
use crate::tilt::{tilt_by_beta, tilt_by_kl, Tilt};
use crate::{Result, RewardDistribution};
use serde::Serialize;

/// How a tilt is chosen: by its regularisation strength β, or by its KL (nats).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TiltBy {
    /// β > 0: the tilt p·e^(r/β).
    Beta(f64),
    /// A KL budget in nats: the β whose tilt has exactly this KL.
    Kl(f64),
}

/// The exact KL-regularised optimum φ_β ∝ p·e^(r/β) (docs/theory.md §1, arXiv 2404.01730
/// §2): the tilt (its `beta`, `lambda` and `log_partition` are null where +∞, see
/// [`Tilt`]) and the reference's expected reward.
#[derive(Debug, Clone, Serialize)]
pub struct TiltReport {
    /// Always `"nats"` (KL and log-partition).
    pub units: &'static str,
    /// The tilt.
    #[serde(flatten)]
    pub tilt: Tilt,
    /// `E_p[r]`.
    pub reference_expected_reward: f64,
}

/// The [`TiltReport`] of `dist` tilted `by` β or KL.
///
/// # Errors
/// As [`tilt_by_beta`] (naming `beta`) or [`tilt_by_kl`] (naming `kl`).
pub fn tilt_report(dist: &RewardDistribution, by: TiltBy) -> Result<TiltReport> {
    let tilt = match by {
        TiltBy::Beta(beta) => tilt_by_beta(dist, beta)?,
        TiltBy::Kl(kl) => tilt_by_kl(dist, kl)?,
    };
    Ok(TiltReport {
        units: "nats",
        tilt,
        reference_expected_reward: dist.mean_reward(),
    })
}

/// Exact best-of-n (or worst-of-n) with ties (docs/theory.md §2–§3, arXiv 2401.01879 §2
/// for the law, §3–§4 for the KL bound and estimator): the law and its numbers
/// ([`BestOfN`], all finite) and the reference's expected reward.
#[derive(Debug, Clone, Serialize)]
pub struct BonReport {
    /// Always `"nats"` (KL, bound, estimate).
    pub units: &'static str,
    /// Best-of-n (or worst-of-n).
    #[serde(flatten)]
    pub bon: BestOfN,
    /// `E_p[r]`.
    pub reference_expected_reward: f64,
}

/// The [`BonReport`] of best-of-`n` of `dist` (worst-of-`n` when `worst`); without `pmf`,
/// a summary: the per-outcome pmf is never computed and is left out of the JSON, every
/// scalar the same bits.
///
/// # Errors
/// As [`best_of_n`] / [`worst_of_n`] (naming `n`).
pub fn bon_report(dist: &RewardDistribution, n: u64, worst: bool, pmf: bool) -> Result<BonReport> {
    let bon = match (worst, pmf) {
        (false, true) => best_of_n(dist, n)?,
        (true, true) => worst_of_n(dist, n)?,
        (false, false) => best_of_n_summary(dist, n, Selection::Best)?,
        (true, false) => best_of_n_summary(dist, n, Selection::Worst)?,
    };
    Ok(BonReport {
        units: "nats",
        bon,
        reference_expected_reward: dist.mean_reward(),
    })
}

/// KL both ways, Rényi, TV, χ², squared Hellinger between two pmfs (docs/theory.md §4;
/// [`Divergences`]: a divergence that is +∞, and `alpha` for D_∞, is null).
#[derive(Debug, Clone, Serialize)]
pub struct DivergenceReport {
    /// Always `"nats"`.
    pub units: &'static str,
    /// The divergences.
    #[serde(flatten)]
    pub divergences: Divergences,
    /// The convention of `hellinger_squared`.
    pub hellinger_convention: &'static str,
}

/// The [`DivergenceReport`] of `q` from `p` (Rényi of order `alpha`).
///
/// # Errors
/// As [`divergences`] (naming `q`, `p`, `q/p` or `alpha`).
pub fn divergence_report(q: &[f64], p: &[f64], alpha: f64) -> Result<DivergenceReport> {
    Ok(DivergenceReport {
        units: "nats",
        divergences: divergences(q, p, alpha)?,
        hellinger_convention: "H² = ½·Σ(√q − √p)² = 1 − Σ√(qp)",
    })
}

/// The scalar fields of the sub-Gaussian bounds report (then a list of [`BoundsRow`], one
/// per n): the optimal one-sided sub-Gaussian variance proxy of r − E_p r, which the
/// improvement bound uses, and the two-sided one beside it (docs/theory.md §11, arXiv
/// 2406.05883).
#[derive(Debug, Clone, Serialize)]
pub struct BoundsHead {
    /// Always `"nats"`.
    pub units: &'static str,
    /// The optimal one-sided (upper-tail) sub-Gaussian variance proxy σ² of r − E_p r:
    /// sup over λ > 0 of 2(Λ(λ) − λ·E r)/λ², the smallest σ² the bound is valid with.
    pub sigma2: f64,
    /// How σ² was computed.
    pub sigma2_method: &'static str,
    /// The λ > 0 at which σ² is attained (0: the variance limit).
    pub sigma2_lambda: f64,
    /// The optimal two-sided proxy (sup over every λ ≠ 0), ≥ σ²: what a bound on both
    /// tails would need.
    pub sigma2_two_sided: f64,
    /// Hoeffding's proxy (max r − min r)²/4.
    pub sigma2_hoeffding: f64,
    /// Var_p(r).
    pub variance: f64,
    /// `E_p[r]`.
    pub reference_expected_reward: f64,
    /// The bound, in words.
    pub bound: &'static str,
}

/// One n of the bounds report (all finite): the bound √(2σ²·KL) of arXiv 2406.05883
/// (docs/theory.md §11) at the exact KL of best-of-n, the exact improvements of best-of-n
/// and of the tilt at the same KL, and the closed-form f-divergence bounds of best-of-n
/// (docs/theory.md §3–§4, arXiv 2401.01879).
#[derive(Debug, Clone, Serialize)]
pub struct BoundsRow {
    /// Number of draws.
    pub n: u64,
    /// Exact KL(π_n‖p), nats.
    pub kl: f64,
    /// √(2σ²·KL) at the exact KL.
    pub bound_sqrt_2_sigma2_kl: f64,
    /// The same with Hoeffding's proxy.
    pub bound_hoeffding: f64,
    /// `E_{π_n}[r] − E_p[r]`.
    pub bon_improvement: f64,
    /// `E_φ[r] − E_p[r]` for the tilt at the same KL.
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

/// The bounds report of one distribution, row by row: [`Bounds::head`] once, then
/// [`Bounds::row`] for each n (rows can be streamed, memory stays a few numbers per row).
#[derive(Debug, Clone)]
pub struct Bounds {
    proxy: SubGaussianProxy,
    solver: FrontierSolver,
    mean: f64,
    from_samples: bool,
}

impl Bounds {
    /// Prepare the bounds of `dist`; `from_samples` says that `dist` is the empirical
    /// distribution of samples (so σ² is a plug-in estimate, as [`BoundsHead`] says).
    ///
    /// # Errors
    /// As [`optimal_sub_gaussian_proxy`] and [`FrontierSolver::new`].
    pub fn new(dist: &RewardDistribution, from_samples: bool) -> Result<Self> {
        let proxy = optimal_sub_gaussian_proxy(dist)?;
        let solver = FrontierSolver::new(dist)?;
        Ok(Self {
            proxy,
            solver,
            mean: dist.mean_reward(),
            from_samples,
        })
    }

    /// The scalar fields.
    pub fn head(&self) -> BoundsHead {
        let method = if self.from_samples {
            "optimal one-sided proxy, the sup over λ > 0 of 2(Λ(λ) − λ·E r)/λ², of the empirical \
             distribution of the samples (a plug-in estimate), by a log-spaced λ grid plus \
             golden-section refinement"
        } else {
            "optimal one-sided proxy, the sup over λ > 0 of 2(Λ(λ) − λ·E r)/λ², of the given \
             distribution, by a log-spaced λ grid plus golden-section refinement"
        };
        BoundsHead {
            units: "nats",
            sigma2: self.proxy.upper,
            sigma2_method: method,
            sigma2_lambda: self.proxy.upper_lambda,
            sigma2_two_sided: self.proxy.optimal,
            sigma2_hoeffding: self.proxy.hoeffding,
            variance: self.proxy.variance,
            reference_expected_reward: self.mean,
            bound: "E_π r − E_p r ≤ √(2σ²·KL(π‖p)) (arXiv 2406.05883)",
        }
    }

    /// The row of best-of-`n`.
    ///
    /// # Errors
    /// As [`FrontierSolver::bon_point`], [`FrontierSolver::tilt_at_kl`] and the bounds of
    /// [`crate::bounds`].
    pub fn row(&self, n: u64) -> Result<BoundsRow> {
        let b = self.solver.bon_point(n)?;
        let t = self.solver.tilt_at_kl(b.kl)?;
        let (sigma2, mean) = (self.proxy.upper, self.mean);
        Ok(BoundsRow {
            n,
            kl: b.kl,
            bound_sqrt_2_sigma2_kl: sub_gaussian_improvement_bound(sigma2, b.kl)?,
            bound_hoeffding: sub_gaussian_improvement_bound(self.proxy.hoeffding, b.kl)?,
            bon_improvement: b.expected_reward - mean,
            tilt_improvement: t.expected_reward - mean,
            kl_bound: b.kl_bound,
            bound_at_kl_bound: sub_gaussian_improvement_bound(sigma2, b.kl_bound)?,
            bon_chi2_bound: bon_chi2_bound(n)?,
            bon_tv_bound: bon_tv_bound(n)?,
            bon_renyi2_bound: bon_renyi_bound(n, 2.0)?,
            bon_hellinger_squared_bound: bon_hellinger_squared_bound(n)?,
        })
    }
}

/// The scalar fields of the best-of-n frontier (docs/theory.md §1–§3); then come the lists
/// `bon` ([`BonPoint`](crate::frontier::BonPoint) per n, from
/// [`FrontierSolver::bon_point`]) and `tilt` ([`TiltPoint`] at each best-of-n's KL, from
/// [`FrontierSolver::tilt_at_kl`]: `beta` is null at KL 0, `lambda` null at the largest
/// achievable KL).
#[derive(Debug, Clone, Serialize)]
pub struct FrontierHead {
    /// Always `"nats"`.
    pub units: &'static str,
    /// `E_p[r]`.
    pub reference_expected_reward: f64,
    /// The largest KL any policy reaches, `−log p(argmax set)` (nats).
    pub max_kl: f64,
    /// The SVG written, or null.
    pub plot: Option<String>,
}

/// The [`FrontierHead`] of `dist` (whose frontier `solver` computes); `plot` names a
/// drawing of it, if one is made.
pub fn frontier_head(
    dist: &RewardDistribution,
    solver: &FrontierSolver,
    plot: Option<String>,
) -> FrontierHead {
    FrontierHead {
        units: "nats",
        reference_expected_reward: dist.mean_reward(),
        max_kl: solver.max_kl(),
        plot,
    }
}

/// Points of the tilt's own curve in [`tilt_curve`] (a grid of λ).
pub const TILT_CURVE_POINTS: usize = 96;

/// The tilt's curve through the points `tilt` on a grid of λ (0, then
/// [`TILT_CURVE_POINTS`] log-spaced from a thousandth of the smallest finite positive λ of
/// the points to the largest, then ∞ when a point is saturated): one evaluation each, no
/// solve. Starting far below the first point makes the curve leave the origin as the tilt
/// does (KL ∝ λ² there, docs/theory.md §1), not along a chord.
///
/// # Errors
/// As [`FrontierSolver::tilt_at_lambda`].
pub fn tilt_curve(solver: &FrontierSolver, tilt: &[TiltPoint]) -> Result<Vec<TiltPoint>> {
    let finite: Vec<f64> = tilt
        .iter()
        .map(|t| t.lambda)
        .filter(|l| l.is_finite() && *l > 0.0)
        .collect();
    let mut lambdas = vec![0.0];
    if let (Some(lo), Some(hi)) = (
        finite.iter().copied().reduce(f64::min),
        finite.iter().copied().reduce(f64::max),
    ) {
        let start = lo * 1e-3;
        let ratio = (hi / start).max(1.0);
        for k in 0..TILT_CURVE_POINTS {
            lambdas.push(start * ratio.powf(k as f64 / (TILT_CURVE_POINTS - 1) as f64));
        }
    }
    if tilt.iter().any(|t| t.lambda == f64::INFINITY) {
        lambdas.push(f64::INFINITY);
    }
    lambdas
        .into_iter()
        .map(|l| solver.tilt_at_lambda(l))
        .collect()
}

/// One length of the memoryless model's convergence table (docs/theory.md §12, arXiv
/// 2404.01730; all finite).
#[derive(Debug, Clone, Serialize)]
pub struct MemorylessRow {
    /// Sequence length L.
    pub length: usize,
    /// log N = LΔ (nats).
    pub log_n: f64,
    /// `E_BoN[S_L]/L`.
    pub bon_reward_per_token: f64,
    /// Λ'(λ) = x*, the tilt's reward per token.
    pub tilt_reward_per_token: f64,
    /// `x* − E_BoN[S_L]/L`.
    pub x_star_minus_bon: f64,
    /// KL(best-of-N ‖ tilt)/L, nats.
    pub kl_tilt_bon_per_token: f64,
    /// KL(best-of-N ‖ q^⊗L)/L, nats.
    pub bon_kl_per_token: f64,
    /// How the law of S_L was computed.
    pub convolution: ConvolutionMethod,
}

impl From<&MemorylessReport> for MemorylessRow {
    fn from(r: &MemorylessReport) -> Self {
        MemorylessRow {
            length: r.length,
            log_n: r.log_n,
            bon_reward_per_token: r.bon_reward_per_token,
            tilt_reward_per_token: r.tilt_reward_per_token,
            x_star_minus_bon: r.x_star - r.bon_reward_per_token,
            kl_tilt_bon_per_token: r.kl_tilt_bon_per_token,
            bon_kl_per_token: r.bon_kl_per_token,
            convolution: r.convolution,
        }
    }
}

/// The memoryless model with a linear reward (docs/theory.md §12, arXiv 2404.01730): the
/// per-token quantities, the last length's numbers, and `table`, a [`MemorylessRow`] per
/// length (all finite).
#[derive(Debug, Clone, Serialize)]
pub struct MemorylessOutput {
    /// What is in which unit.
    pub units: &'static str,
    /// Per-token KL budget Δ (nats).
    pub delta: f64,
    /// x*(Δ) = Λ'(λ_Δ).
    pub x_star: f64,
    /// I(x*) by the Legendre transform (equals Δ).
    pub rate_function_at_x_star: f64,
    /// λ_Δ.
    pub lambda: f64,
    /// β = 1/λ_Δ.
    pub beta: f64,
    /// −log q(argmax r), nats per token.
    pub max_kl_per_token: f64,
    /// E_q r.
    pub reference_reward_per_token: f64,
    /// max r on the support.
    pub max_reward_per_token: f64,
    /// The reward grid step h.
    pub lattice_step: f64,
    /// Largest per-token |reward − snapped reward|.
    pub grid_snap_error_per_token: f64,
    /// The last length L.
    pub length: usize,
    /// LΔ at the last length.
    pub log_n: f64,
    /// x*.
    pub tilt_reward_per_token: f64,
    /// KL(q_λ‖q) (= Δ).
    pub tilt_kl_per_token: f64,
    /// `E_BoN[S_L]/L` at the last length.
    pub bon_reward_per_token: f64,
    /// KL(BoN‖q^⊗L)/L at the last length.
    pub bon_kl_per_token: f64,
    /// (log N − (N−1)/N)/L at the last length.
    pub bon_kl_bound_per_token: f64,
    /// KL(BoN‖tilt)/L at the last length.
    pub kl_tilt_bon_per_token: f64,
    /// The direction of the previous field.
    pub kl_direction: &'static str,
    /// The Rényi form of the scaled cumulant generating function at θ = −λ/2, λ/2, λ, 2λ.
    pub scaled_cgf_renyi: Vec<ScaledCgf>,
    /// Its formula.
    pub scaled_cgf_formula: &'static str,
    /// The SVG written, or null.
    pub plot: Option<String>,
    /// One row per length, in the order given.
    pub table: Vec<MemorylessRow>,
}

/// The memoryless model of `dist` (token law and per-token rewards, snapped to `grid` or
/// to their detected lattice) at per-token KL budget `delta`, exactly at each of `lengths`
/// (at least one): the [`MemorylessOutput`] (with `plot` as given) and the report of each
/// length, in order. `on_length` is called after each length is done (for progress).
///
/// Inputs are checked before any length is computed: the model, `delta`, then every
/// length.
///
/// # Errors
/// As [`MemorylessModel::new`] (naming `rewards` or `grid`),
/// [`MemorylessModel::lambda_for_kl`] (naming `delta`, or a KL budget beyond the largest
/// per token), [`MemorylessModel::check_length`] (naming `length`),
/// [`MemorylessModel::analyze`] and [`MemorylessModel::scaled_cgf_renyi`]; `length` when
/// `lengths` is empty.
pub fn memoryless_output(
    dist: &RewardDistribution,
    grid: Option<f64>,
    lengths: &[usize],
    delta: f64,
    plot: Option<String>,
    mut on_length: impl FnMut(),
) -> Result<(MemorylessOutput, Vec<MemorylessReport>)> {
    let model = MemorylessModel::new(dist, grid)?;
    let lambda = model.lambda_for_kl(delta)?;
    if lengths.is_empty() {
        return Err(crate::TiltError::invalid("length", "no lengths given"));
    }
    for &l in lengths {
        model.check_length(l)?;
    }
    let mut reports = Vec::with_capacity(lengths.len());
    for &l in lengths {
        reports.push(model.analyze(l, delta)?);
        on_length();
    }
    let renyi: Vec<ScaledCgf> = [-0.5, 0.5, 1.0, 2.0]
        .iter()
        .map(|ratio| model.scaled_cgf_renyi(lambda, ratio * lambda))
        .collect::<Result<_>>()?;
    let last = reports.last().expect("at least one length");
    let out = MemorylessOutput {
        units: "KL and rate function in nats (per token where named); rewards per token in \
                reward units",
        delta,
        x_star: last.x_star,
        rate_function_at_x_star: last.rate_function_at_x_star,
        lambda: last.lambda,
        beta: last.beta,
        max_kl_per_token: model.max_kl_per_token(),
        reference_reward_per_token: last.reference_reward_per_token,
        max_reward_per_token: last.max_reward_per_token,
        lattice_step: last.lattice_step,
        grid_snap_error_per_token: last.grid_snap_error_per_token,
        length: last.length,
        log_n: last.log_n,
        tilt_reward_per_token: last.tilt_reward_per_token,
        tilt_kl_per_token: last.tilt_kl_per_token,
        bon_reward_per_token: last.bon_reward_per_token,
        bon_kl_per_token: last.bon_kl_per_token,
        bon_kl_bound_per_token: last.bon_kl_bound_per_token,
        kl_tilt_bon_per_token: last.kl_tilt_bon_per_token,
        kl_direction: "KL(best-of-N ‖ tilt)",
        scaled_cgf_renyi: renyi,
        scaled_cgf_formula: "(1/L) log E_tilt[e^(θ S_L)] = Λ(λ+θ) − Λ(λ) = (θ/λ)(Λ(λ) + \
                             D_α(q_λ‖q)), α = 1 + θ/λ",
        plot,
        table: reports.iter().map(MemorylessRow::from).collect(),
    };
    Ok((out, reports))
}

/// The family of a transform Φ of the calibrated reward, its rate t left open
/// (docs/theory.md §10, arXiv 2412.19792 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformKind {
    /// Φ(c) = c: standard RLHF on the calibrated reward.
    Identity,
    /// Φ(c) = e^(tc) (CTRL for best-of-N).
    Exp,
    /// Φ(c) = −e^(−tc) (CTRL for worst-of-N).
    NegExp,
}

impl TransformKind {
    /// The transform of this family with rate `t` (ignored by the identity).
    pub fn at(self, t: f64) -> Transform {
        match self {
            TransformKind::Identity => Transform::Identity,
            TransformKind::Exp => Transform::Exp { t },
            TransformKind::NegExp => Transform::NegExp { t },
        }
    }

    /// The CTRL family for `procedure`: `exp` for best-of-N, `neg-exp` for worst-of-N
    /// (arXiv 2412.19792 §4).
    pub fn ctrl(procedure: Procedure) -> Self {
        match procedure {
            Procedure::Bon => TransformKind::Exp,
            Procedure::Won => TransformKind::NegExp,
        }
    }

    /// `identity`, `exp` or `neg-exp`.
    pub fn name(self) -> &'static str {
        match self {
            TransformKind::Identity => "identity",
            TransformKind::Exp => "exp",
            TransformKind::NegExp => "neg-exp",
        }
    }
}

/// `bon` or `won`.
pub fn procedure_name(p: Procedure) -> &'static str {
    match p {
        Procedure::Bon => "bon",
        Procedure::Won => "won",
    }
}

/// Which calibrated tilt g ∝ e^(Φ(c)/β) an InfAlign report is about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InfalignPolicy {
    /// A given transform and β (of the transform normalised to [0, 1]).
    Beta {
        /// Φ.
        transform: Transform,
        /// β.
        beta: f64,
    },
    /// A given transform at a KL budget (nats): β is solved for.
    Kl {
        /// Φ.
        transform: Transform,
        /// The budget.
        kl: f64,
    },
    /// The rate t of `kind` that maximises the inference-time win rate at a KL budget,
    /// searched in [0, t_max] ([`optimize_t`]).
    OptimizeT {
        /// The family.
        kind: TransformKind,
        /// The budget.
        kl: f64,
        /// The upper end of the search.
        t_max: f64,
    },
}

impl InfalignPolicy {
    /// The policy that loose options describe, the way faces receive them: the family
    /// `kind` with rate `t`, at `beta` or at a KL budget `kl` (exactly one of the two), or,
    /// with `optimize_t`, the best rate of `kind` at `kl` searched in [0, `t_max`].
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`](crate::TiltError::InvalidInput) naming `t` (given to the
    /// identity; missing for exp and neg-exp; given with `optimize_t`), `kl` (neither or
    /// both of `beta` and `kl`; `optimize_t` without `kl`; a budget out of range),
    /// `transform` (`optimize_t` with the identity) or `t-max`.
    pub fn from_options(
        kind: TransformKind,
        t: Option<f64>,
        beta: Option<f64>,
        kl: Option<f64>,
        optimize_t: bool,
        t_max: f64,
    ) -> Result<Self> {
        let invalid = crate::TiltError::invalid;
        if let Some(kl) = kl {
            infalign::check_kl_budget(kl)?;
        }
        if optimize_t {
            if kind == TransformKind::Identity {
                return Err(invalid(
                    "transform",
                    "the identity transform has no t to optimise; use exp or neg-exp",
                ));
            }
            if t.is_some() {
                return Err(invalid(
                    "t",
                    "a given t and optimising t exclude each other",
                ));
            }
            let Some(kl) = kl else {
                return Err(invalid("kl", "optimising t needs a KL budget"));
            };
            if beta.is_some() {
                return Err(invalid("kl", "give beta or a KL budget, not both"));
            }
            infalign::check_t_max(t_max)?;
            return Ok(InfalignPolicy::OptimizeT { kind, kl, t_max });
        }
        let t = match (kind, t) {
            (TransformKind::Identity, Some(_)) => {
                return Err(invalid("t", "the identity transform takes no t"))
            }
            (TransformKind::Identity, None) => 0.0,
            (_, Some(t)) => t,
            (_, None) => {
                return Err(invalid(
                    "t",
                    "exp and neg-exp need a rate t ≥ 0 (or optimise t at a KL budget)",
                ))
            }
        };
        let transform = kind.at(t);
        match (beta, kl) {
            (Some(beta), None) => Ok(InfalignPolicy::Beta { transform, beta }),
            (None, Some(kl)) => Ok(InfalignPolicy::Kl { transform, kl }),
            (None, None) => Err(invalid("kl", "give beta or a KL budget kl (nats)")),
            (Some(_), Some(_)) => Err(invalid("kl", "give beta or a KL budget, not both")),
        }
    }

    /// The KL budget, when the policy is given by one.
    pub fn kl_budget(&self) -> Option<f64> {
        match *self {
            InfalignPolicy::Beta { .. } => None,
            InfalignPolicy::Kl { kl, .. } | InfalignPolicy::OptimizeT { kl, .. } => Some(kl),
        }
    }
}

/// The evaluated tilt of `policy` under `procedure` with `n` draws (KL, standard and
/// inference-time win rates by quadrature, docs/theory.md §10), and the search result
/// when `policy` optimises t (whose [`OptimalT::unconverged`] a caller should warn about).
///
/// # Errors
/// As [`CalibratedTilt::new`], [`CalibratedTilt::with_kl`], [`infalign::evaluate`] and
/// [`optimize_t`] (naming `beta`, `kl`, `t`, `n` or `t-max`).
pub fn infalign_point(
    policy: InfalignPolicy,
    n: u64,
    procedure: Procedure,
) -> Result<(infalign::TiltPoint, Option<OptimalT>)> {
    match policy {
        InfalignPolicy::OptimizeT { kind, kl, t_max } => {
            let opt = optimize_t(|t| kind.at(t), n, procedure, kl, t_max)?;
            Ok((opt.point.clone(), Some(opt)))
        }
        InfalignPolicy::Beta { transform, beta } => {
            let tilt = CalibratedTilt::new(transform, beta)?;
            Ok((infalign::evaluate(&tilt, n, procedure)?, None))
        }
        InfalignPolicy::Kl { transform, kl } => {
            let tilt = CalibratedTilt::with_kl(transform, kl)?;
            Ok((infalign::evaluate(&tilt, n, procedure)?, None))
        }
    }
}

/// The baselines of an InfAlign report at one KL: the inference-time win rate of the
/// identity transform (RLHF on the calibrated reward), and the best-of-m policy with that
/// KL (its m and inference-time win rate) (docs/theory.md §10).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InfalignBaselines {
    /// The identity's inference-time win rate.
    pub identity_inference_win_rate: Option<f64>,
    /// `(m, inference-time win rate)` of the best-of-m policy.
    pub best_of_m: Option<(f64, f64)>,
}

/// The [`InfalignBaselines`] at `kl` nats (none below 1e-12, where every policy is the
/// reference).
///
/// # Errors
/// As [`CalibratedTilt::with_kl`], [`BestOfMPolicy::with_kl`] and [`inference_win_rate`].
pub fn infalign_baselines(kl: f64, n: u64, procedure: Procedure) -> Result<InfalignBaselines> {
    if kl < 1e-12 {
        return Ok(InfalignBaselines::default());
    }
    let id = CalibratedTilt::with_kl(Transform::Identity, kl)
        .and_then(|id| inference_win_rate(&id, n, procedure))?;
    let bom = BestOfMPolicy::with_kl(kl)?;
    let w = inference_win_rate(&bom, n, procedure)?;
    Ok(InfalignBaselines {
        identity_inference_win_rate: Some(id),
        best_of_m: Some((bom.m(), w)),
    })
}

/// InfAlign on the calibrated reward (docs/theory.md §10, arXiv 2412.19792): KL, standard
/// and inference-time win rates of g ∝ e^(Φ(c)/β). Fields that do not apply to a run are
/// null: the t-search fields without a search, the baselines when the KL is below 1e-12.
#[derive(Debug, Clone, Serialize)]
pub struct InfalignReport {
    /// What is in which unit.
    pub units: &'static str,
    /// N of the procedure.
    pub n: u64,
    /// `bon` or `won`.
    pub procedure: &'static str,
    /// The transform, with its t.
    pub transform: Transform,
    /// The transform's rate; null for the identity.
    pub t: Option<f64>,
    /// β of the normalised transform; null when +∞ (the reference itself, KL 0).
    pub beta: f64,
    /// β of the raw transform, β·(Φ(1) − Φ(0)); null when not a finite double (β = ∞, or
    /// e^(tc) with t > ~709 where Φ(1) − Φ(0) overflows).
    pub beta_raw: Option<f64>,
    /// KL(π‖p), nats.
    pub kl: f64,
    /// Standard win rate over p.
    pub win_rate: f64,
    /// Win rate of T(π) over T(p).
    pub inference_win_rate: f64,
    /// With a t search: its upper end.
    pub t_max: Option<f64>,
    /// With a t search: whether the optimum sits at `t_max`.
    pub t_at_edge: Option<bool>,
    /// With a t search: values of t skipped because a computation there did not converge.
    pub t_unconverged: Option<Vec<f64>>,
    /// Inference-time win rate of the identity transform at the same KL.
    pub identity_inference_win_rate: Option<f64>,
    /// The m of the best-of-m policy with the same KL.
    pub best_of_m_policy_m: Option<f64>,
    /// Its inference-time win rate.
    pub best_of_m_policy_inference_win_rate: Option<f64>,
}

impl InfalignReport {
    /// The report of `point` (from [`infalign_point`], with its search `optimized` if any)
    /// and its `baselines`.
    pub fn new(
        n: u64,
        procedure: Procedure,
        point: &infalign::TiltPoint,
        optimized: Option<&OptimalT>,
        baselines: InfalignBaselines,
    ) -> Self {
        InfalignReport {
            units: "KL in nats; win rates are probabilities (calibrated reward, ties ½)",
            n,
            procedure: procedure_name(procedure),
            transform: point.transform,
            t: point.transform.t(),
            beta: point.beta,
            beta_raw: point.beta_raw,
            kl: point.kl,
            win_rate: point.win_rate,
            inference_win_rate: point.inference_win_rate,
            t_max: optimized.map(|o| o.t_max),
            t_at_edge: optimized.map(|o| o.at_edge),
            t_unconverged: optimized.map(|o| o.unconverged.iter().map(|u| u.t).collect()),
            identity_inference_win_rate: baselines.identity_inference_win_rate,
            best_of_m_policy_m: baselines.best_of_m.map(|b| b.0),
            best_of_m_policy_inference_win_rate: baselines.best_of_m.map(|b| b.1),
        }
    }
}

/// One KL budget of the InfAlign frontier (docs/theory.md §10, arXiv 2412.19792; all
/// finite).
#[derive(Debug, Clone, Serialize)]
pub struct InfalignFrontierRow {
    /// The KL budget, nats.
    pub kl: f64,
    /// Inference-time win rate of the identity transform (RLHF on the calibrated reward).
    pub identity_win_rate: f64,
    /// The optimised t of the CTRL transform.
    pub ctrl_t: f64,
    /// Whether it sits at `t_max`.
    pub ctrl_t_at_edge: bool,
    /// β of the normalised CTRL transform.
    pub ctrl_beta: f64,
    /// Inference-time win rate of CTRL with the optimised t.
    pub ctrl_win_rate: f64,
    /// The m of the best-of-m policy with this KL.
    pub best_of_m: f64,
    /// Its inference-time win rate.
    pub best_of_m_win_rate: f64,
}

/// The frontier row at `kl` nats: identity, CTRL ([`TransformKind::ctrl`]) with t
/// optimised in [0, t_max], and the best-of-m policy. `on_search` sees the t search as
/// soon as it is done (to warn about [`OptimalT::unconverged`] and [`OptimalT::at_edge`]).
///
/// # Errors
/// As [`CalibratedTilt::with_kl`], [`inference_win_rate`], [`optimize_t`] and
/// [`BestOfMPolicy::with_kl`].
pub fn infalign_frontier_row(
    kl: f64,
    n: u64,
    procedure: Procedure,
    t_max: f64,
    on_search: impl FnOnce(&OptimalT),
) -> Result<InfalignFrontierRow> {
    let kind = TransformKind::ctrl(procedure);
    let id = CalibratedTilt::with_kl(Transform::Identity, kl)?;
    let id_w = inference_win_rate(&id, n, procedure)?;
    let opt = optimize_t(|t| kind.at(t), n, procedure, kl, t_max)?;
    on_search(&opt);
    let bom = BestOfMPolicy::with_kl(kl)?;
    let bom_w = inference_win_rate(&bom, n, procedure)?;
    Ok(InfalignFrontierRow {
        kl,
        identity_win_rate: id_w,
        ctrl_t: opt.t,
        ctrl_t_at_edge: opt.at_edge,
        ctrl_beta: opt.point.beta,
        ctrl_win_rate: opt.point.inference_win_rate,
        best_of_m: bom.m(),
        best_of_m_win_rate: bom_w,
    })
}

/// The InfAlign frontier: inference-time win rate against KL for identity, CTRL with
/// optimised t and the best-of-m policy (docs/theory.md §10, arXiv 2412.19792).
#[derive(Debug, Clone, Serialize)]
pub struct InfalignFrontierReport {
    /// What is in which unit.
    pub units: &'static str,
    /// N of the procedure.
    pub n: u64,
    /// `bon` or `won`.
    pub procedure: &'static str,
    /// `exp` (for bon) or `neg-exp` (for won).
    pub ctrl_transform: &'static str,
    /// The upper end of the t search.
    pub t_max: f64,
    /// One row per KL budget, in the order given.
    pub rows: Vec<InfalignFrontierRow>,
    /// The SVG written, or null.
    pub plot: Option<String>,
}

impl InfalignFrontierReport {
    /// The report of `rows` (from [`infalign_frontier_row`]); `plot` names a drawing.
    pub fn new(
        n: u64,
        procedure: Procedure,
        t_max: f64,
        rows: Vec<InfalignFrontierRow>,
        plot: Option<String>,
    ) -> Self {
        InfalignFrontierReport {
            units: "KL in nats; win rates of T(π) over T(p) (calibrated reward, ties ½)",
            n,
            procedure: procedure_name(procedure),
            ctrl_transform: TransformKind::ctrl(procedure).name(),
            t_max,
            rows,
            plot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * (1.0 + b.abs())
    }

    #[test]
    fn bon_report_matches_a_hand_computation() {
        // Rewards 0, 1, 2 with p = ¼, ¼, ½ and n = 2: best-of-2 keeps the larger reward,
        // so P(max = r) = F(r)² − F(r⁻)² with F = ¼, ½, 1: 1/16, 3/16, 12/16.
        let dist = RewardDistribution::new(vec![0.25, 0.25, 0.5], vec![0.0, 1.0, 2.0]).unwrap();
        let r = bon_report(&dist, 2, false, true).unwrap();
        assert_eq!(r.units, "nats");
        assert!(close(r.reference_expected_reward, 1.25));
        let pi = [1.0 / 16.0, 3.0 / 16.0, 12.0 / 16.0];
        let p = [0.25, 0.25, 0.5];
        let mean: f64 = pi.iter().zip([0.0, 1.0, 2.0]).map(|(q, r)| q * r).sum();
        assert!(close(mean, 27.0 / 16.0));
        let kl: f64 = pi.iter().zip(p).map(|(q, p)| q * (q / p).ln()).sum();
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            close(json["expected_reward"].as_f64().unwrap(), mean),
            "{json}"
        );
        assert!(close(json["kl"].as_f64().unwrap(), kl), "{json}");
        assert_eq!(json["units"], "nats");
        // Worst-of-2 keeps the smaller: P(min = r) = S(r)² − S(r⁺)², S = 1, ¾, ½.
        let w = bon_report(&dist, 2, true, true).unwrap();
        let json = serde_json::to_value(&w).unwrap();
        let worst_mean = (0.0 * 7.0 + 1.0 * 5.0 + 2.0 * 4.0) / 16.0;
        assert!(
            close(json["expected_reward"].as_f64().unwrap(), worst_mean),
            "{json}"
        );
    }

    #[test]
    fn a_bon_summary_is_the_full_report_without_its_pmf() {
        // Ties and a zero-mass outcome, both directions: every scalar the same bits.
        let dist = RewardDistribution::new(
            vec![0.1, 0.0, 0.3, 0.2, 0.4],
            vec![1.0, 3.0, 1.0, 2.0, -1.0],
        )
        .unwrap();
        for worst in [false, true] {
            let full = serde_json::to_value(bon_report(&dist, 7, worst, true).unwrap()).unwrap();
            let summary =
                serde_json::to_value(bon_report(&dist, 7, worst, false).unwrap()).unwrap();
            assert_eq!(full["pmf"].as_array().unwrap().len(), 5);
            assert!(summary.get("pmf").is_none(), "{summary}");
            let mut without = full.clone();
            without.as_object_mut().unwrap().remove("pmf");
            assert_eq!(without, summary);
        }
    }

    #[test]
    fn tilt_and_divergence_reports_match_hand_computations() {
        // Two outcomes, rewards 0 and 1, p = ½, ½, β = 1: φ = (1, e)/(1 + e).
        let dist = RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap();
        let t = tilt_report(&dist, TiltBy::Beta(1.0)).unwrap();
        let e = std::f64::consts::E;
        let phi = [1.0 / (1.0 + e), e / (1.0 + e)];
        let kl = phi[0] * (2.0 * phi[0]).ln() + phi[1] * (2.0 * phi[1]).ln();
        let json = serde_json::to_value(&t).unwrap();
        assert!(close(json["kl"].as_f64().unwrap(), kl), "{json}");
        assert!(
            close(json["expected_reward"].as_f64().unwrap(), phi[1]),
            "{json}"
        );
        assert!(close(t.reference_expected_reward, 0.5));
        // The same tilt by its KL.
        let by_kl = tilt_report(&dist, TiltBy::Kl(kl)).unwrap();
        let beta = serde_json::to_value(&by_kl).unwrap()["beta"]
            .as_f64()
            .unwrap();
        assert!((beta - 1.0).abs() < 1e-9, "{beta}");
        // KL(q‖p) and TV of q = (¾, ¼) from p = (½, ½).
        let d = divergence_report(&[0.75, 0.25], &[0.5, 0.5], 2.0).unwrap();
        let json = serde_json::to_value(&d).unwrap();
        let kl_qp = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
        assert!(close(json["kl_q_p"].as_f64().unwrap(), kl_qp), "{json}");
        assert_eq!(
            json["hellinger_convention"],
            "H² = ½·Σ(√q − √p)² = 1 − Σ√(qp)"
        );
    }

    #[test]
    fn bounds_rows_hold_the_closed_forms() {
        let dist = RewardDistribution::new(vec![0.25, 0.25, 0.5], vec![0.0, 1.0, 2.0]).unwrap();
        let b = Bounds::new(&dist, false).unwrap();
        let head = b.head();
        // Var = E r² − (E r)² = 2.25 − 1.5625; Hoeffding (2 − 0)²/4 = 1.
        assert!(close(head.variance, 2.25 - 1.5625));
        assert!(close(head.sigma2_hoeffding, 1.0));
        let row = b.row(4).unwrap();
        assert!(close(row.kl_bound, 4f64.ln() - 0.75));
        assert!(close(row.bon_chi2_bound, 9.0 / 7.0));
        assert!(close(row.bon_hellinger_squared_bound, 1.0 / 5.0));
        assert!(close(row.bound_hoeffding, (2.0 * row.kl).sqrt()));
        assert!(row.bon_improvement <= row.bound_sqrt_2_sigma2_kl + 1e-12);
        assert!(row.bon_improvement <= row.tilt_improvement + 1e-12);
    }

    #[test]
    fn ctrl_kinds_follow_the_procedure() {
        assert_eq!(TransformKind::ctrl(Procedure::Bon).name(), "exp");
        assert_eq!(TransformKind::ctrl(Procedure::Won).name(), "neg-exp");
        assert_eq!(TransformKind::NegExp.at(2.0), Transform::NegExp { t: 2.0 });
        assert_eq!(procedure_name(Procedure::Won), "won");
    }
}
