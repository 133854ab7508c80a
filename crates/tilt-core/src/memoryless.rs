//! The memoryless model with a linear reward: exact finite-length computations and their
//! large-length limits (Yang, Salamatian, Sun, Suresh, Beirami, arXiv 2404.01730;
//! docs/theory.md §12).
//!
//! Sequences `y = (y_1, …, y_L)` are i.i.d. from a token pmf `q`; the reward is additive,
//! `r(y) = Σ r(y_i)`; the KL budget is `L·Δ`. Everything is a function of the per-token
//! cumulant generating function `Λ(λ) = log E_q[e^{λ r}]` and of the law of
//! `S_L = Σ r(y_i)`:
//!
//! - the Cramér rate function `I(x) = sup_λ (λx − Λ(λ))` and `x*(Δ) > E_q r` with
//!   `I(x*) = Δ`;
//! - the optimal KL-constrained policy at budget `LΔ`, which is memoryless with token pmf
//!   `q_λ ∝ q·e^{λr}`, `KL(q_λ‖q) = λΛ'(λ) − Λ(λ) = Δ`; its reward per token is `Λ'(λ) =
//!   x*` for every `L`;
//! - best-of-N with `N = e^{LΔ}` (a real number: the law of the maximum of N draws has CDF
//!   `F^N`, which is how the paper's scaling is read for non-integer N), computed exactly
//!   from the law of `S_L` ([`crate::lattice`]), and its KL to the tilt. Both policies are
//!   of the form `p(y)·h(S_L(y))` (best-of-N breaks ties uniformly among tied draws), so
//!   their KL equals the KL between the laws of `S_L`.
//!
//! The paper shows that as `L → ∞` best-of-N's reward per token converges to `x*` and that
//! `KL(BoN‖tilt)/L → 0` (its abstract: best-of-N and the KL-optimal policy are
//! "asymptotically equivalent"; docs/theory.md §12); the statements we follow give the limits
//! (`o(1)`), not a rate. [`MemorylessModel::analyze`] computes these quantities exactly at
//! finite `L` so the convergence can be watched.
//!
//! Conventions: multiplier `λ` inside (β = 1/λ at the edges), natural logs, nats.
//!
//! # Observed convergence
//! `tilt theory memoryless --probs 0.5,0.3,0.2 --rewards 0,1,2 --delta 0.2
//! --lengths 10,100,1000,10000,100000` (x* = 1.2113855051, λ = 0.7751746, I(x*) = 0.2):
//!
//! ```text
//!      L   log N   BoN reward/token   x* − BoN    KL(BoN‖tilt)/L   KL(BoN‖q)/L   method
//!     10       2     1.0483704317     1.630e-1      3.801e-2        0.111641     direct
//!    100      20     1.1823325663     2.905e-2      1.210e-2        0.189579     direct
//!   1000     200     1.2070546238     4.331e-3      2.309e-3        0.198952     direct
//!  10000    2000     1.2108050780     5.804e-4      3.451e-4        0.199895     fft
//! 100000   20000     1.2113126319     7.287e-5      4.600e-5        0.199990     fft
//! ```
//! Observed, not proved: the gap to x* follows `log L / (2λL)` closely (6.9/(2λ·1000) =
//! 4.46e-3 at L = 1000, 7.43e-5 at L = 100000), as a `1/√L` prefactor of the tail
//! `P(S_L ≥ Lx) ≈ e^{−L I(x)}/√L` would make it (it costs best-of-N about `log √L` nats),
//! and the KL per token falls at a similar `log L / L` pace. This is a heuristic reading of
//! the table; the paper's result, as docs/theory.md §12 states it, is only
//! that both go to 0.

use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::lattice::{self, ConvolutionMethod, LatticeRewards};
use crate::numerics::{log_sum_exp, neg_log_share, neumaier_sum, non_negative, NeumaierSum, Shown};
use crate::optimize::{bracket_up, brent_root};
use serde::Serialize;

/// A token pmf with per-token rewards on a lattice: the memoryless model of arXiv
/// 2404.01730 (memoryless reference, linear reward; docs/theory.md §12).
#[derive(Debug, Clone)]
pub struct MemorylessModel {
    /// Probabilities of the outcomes with positive probability.
    probs: Vec<f64>,
    /// Their (snapped) rewards.
    rewards: Vec<f64>,
    /// Their grid indices.
    indices: Vec<usize>,
    lattice: LatticeRewards,
    r_max: f64,
    r_min: f64,
    /// `−log q(argmax r)`, formed from the mass below the top ([`neg_log_share`]).
    max_kl: f64,
    /// `−log q(argmin r)`, formed from the mass above the bottom.
    min_rate: f64,
}

/// Values of the cumulant generating function and its first two derivatives at one `λ`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cumulants {
    /// `Λ(λ) = log E_q[e^{λ r}]`.
    pub log_mgf: f64,
    /// `Λ'(λ) = E_{q_λ}[r]`.
    pub mean: f64,
    /// `Λ''(λ) = Var_{q_λ}[r]`.
    pub variance: f64,
}

impl MemorylessModel {
    /// Build from a token distribution. Rewards must be on a grid (see
    /// [`LatticeRewards::new`]): detected when `grid` is `None`, snapped to step `grid`
    /// otherwise.
    ///
    /// # Errors
    /// As [`LatticeRewards::new`].
    pub fn new(dist: &RewardDistribution, grid: Option<f64>) -> Result<Self> {
        let support: Vec<bool> = dist.probs().iter().map(|p| *p > 0.0).collect();
        let lattice = LatticeRewards::new(dist.rewards(), &support, grid)?;
        let snapped = lattice.snapped();
        let mut probs = Vec::new();
        let mut rewards = Vec::new();
        let mut indices = Vec::new();
        for (i, &p) in dist.probs().iter().enumerate() {
            if p > 0.0 {
                probs.push(p);
                rewards.push(snapped[i]);
                indices.push(lattice.indices()[i]);
            }
        }
        let r_max = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let r_min = rewards.iter().copied().fold(f64::INFINITY, f64::min);
        let mass = |keep: &dyn Fn(f64) -> bool| {
            neumaier_sum(
                probs
                    .iter()
                    .zip(&rewards)
                    .filter(|(_, r)| keep(**r))
                    .map(|(p, _)| *p),
            )
        };
        let (p_max_set, p_below_max) = (mass(&|r| r == r_max), mass(&|r| r < r_max));
        let (p_min_set, p_above_min) = (mass(&|r| r == r_min), mass(&|r| r > r_min));
        Ok(Self {
            probs,
            rewards,
            indices,
            lattice,
            r_max,
            r_min,
            max_kl: neg_log_share(p_max_set, p_below_max),
            min_rate: neg_log_share(p_min_set, p_above_min),
        })
    }

    /// The lattice the rewards were put on.
    pub fn lattice(&self) -> &LatticeRewards {
        &self.lattice
    }

    /// `E_q[r]`, the reference reward per token.
    pub fn mean_reward(&self) -> f64 {
        self.cumulants(0.0).mean
    }

    /// Largest per-token reward with positive probability.
    pub fn max_reward(&self) -> f64 {
        self.r_max
    }

    /// The largest per-token KL of any tilt: `−log q(argmax r)` (arXiv 2404.01730; a budget
    /// at or beyond it is reached only by the degenerate policy on the argmax set).
    ///
    /// `≥ 0` exactly, and `0` exactly when every token ties for the top reward (computed
    /// from the mass below the top, [`neg_log_share`]).
    pub fn max_kl_per_token(&self) -> f64 {
        self.max_kl
    }

    /// `Λ(λ)`, `Λ'(λ)`, `Λ''(λ)` (docs/theory.md §1), by log-sum-exp shifted at the reward
    /// that dominates for this sign of `λ`, so that any `λ` is safe.
    ///
    /// ```text
    /// Λ(λ) = log Σ_y q(y) e^{λ r(y)},   Λ' = E_{q_λ}[r],   Λ'' = Var_{q_λ}[r]
    /// ```
    pub fn cumulants(&self, lambda: f64) -> Cumulants {
        let logs: Vec<f64> = self
            .probs
            .iter()
            .zip(&self.rewards)
            .map(|(p, r)| p.ln() + lambda * r)
            .collect();
        let log_mgf = log_sum_exp(&logs);
        let w: Vec<f64> = logs.iter().map(|l| (l - log_mgf).exp()).collect();
        let mean: f64 = w.iter().zip(&self.rewards).map(|(w, r)| w * r).sum();
        let variance: f64 = w
            .iter()
            .zip(&self.rewards)
            .map(|(w, r)| w * (r - mean) * (r - mean))
            .sum();
        Cumulants {
            log_mgf,
            mean,
            variance,
        }
    }

    /// `KL(q_λ‖q) = λΛ'(λ) − Λ(λ)` (docs/theory.md §1), computed as
    /// `λ(Λ' − r_max) − (Λ − λ r_max)` to avoid cancellation at large `λ`.
    pub fn tilt_kl(&self, lambda: f64) -> f64 {
        let c = self.cumulants(lambda);
        let shifted: Vec<f64> = self
            .probs
            .iter()
            .zip(&self.rewards)
            .map(|(p, r)| p.ln() + lambda * (r - self.r_max))
            .collect();
        let lse = log_sum_exp(&shifted);
        let kl = lambda * (c.mean - self.r_max) - lse;
        // Rounding below 0 becomes 0; a NaN stays NaN (the root finders reject it).
        if kl < 0.0 {
            0.0
        } else {
            kl
        }
    }

    /// The tilted token pmf `q_λ(y) = q(y) e^{λ r(y) − Λ(λ)}` over the outcomes of positive
    /// probability (input order).
    pub fn tilted_probs(&self, lambda: f64) -> Vec<f64> {
        let l = self.cumulants(lambda).log_mgf;
        self.probs
            .iter()
            .zip(&self.rewards)
            .map(|(p, r)| (p.ln() + lambda * r - l).exp())
            .collect()
    }

    /// Solve `Λ'(λ) = x` (the Legendre dual point), for `min r < x < max r`.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `x` outside the open range.
    pub fn lambda_for_mean(&self, x: f64) -> Result<f64> {
        if !(x > self.r_min && x < self.r_max) {
            return Err(TiltError::invalid(
                "x",
                format!(
                    "{x} is outside the open reward range ({}, {})",
                    self.r_min,
                    self.r_max,
                    x = Shown(x)
                ),
            ));
        }
        let g = |l: f64| self.cumulants(l).mean - x;
        let span = (self.r_max - self.r_min).max(f64::MIN_POSITIVE);
        let (lo, hi) = if g(0.0) < 0.0 {
            (0.0, bracket_up(g, 1.0 / span, 2000, "λ for Λ'(λ) = x")?)
        } else {
            let neg = bracket_up(|l: f64| -g(-l), 1.0 / span, 2000, "λ for Λ'(λ) = x")?;
            (-neg, 0.0)
        };
        brent_root(
            g,
            lo,
            hi,
            1e-15 * (1.0 + hi.abs().max(lo.abs())),
            "λ for Λ'(λ) = x",
        )
    }

    /// The Cramér rate function `I(x) = sup_λ (λx − Λ(λ))` (Legendre transform; docs/theory.md
    /// §12), accurate to ~1e-13: the error of `λ` enters only to second order.
    ///
    /// ```text
    /// I(x) = λ_x x − Λ(λ_x),  Λ'(λ_x) = x        (min r < x < max r)
    /// I(max r) = −log q(argmax r), I(min r) = −log q(argmin r), +∞ outside
    /// ```
    ///
    /// `+∞` is the true value only outside `[min r, max r]`; inside, a failure to solve
    /// `Λ'(λ) = x` is an error, never reported as `+∞`.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `x` when it is NaN; [`TiltError::NoConvergence`]
    /// if `Λ'(λ) = x` cannot be solved for an `x` inside the range.
    ///
    /// ```
    /// use tilt_core::{RewardDistribution, memoryless::MemorylessModel};
    /// let m = MemorylessModel::new(&RewardDistribution::new(vec![0.5, 0.5], vec![0.0, 1.0]).unwrap(), None).unwrap();
    /// // Bernoulli(1/2): I(x) = KL(Bern(x) ‖ Bern(1/2)).
    /// let x: f64 = 0.8;
    /// let kl = x * (2.0 * x).ln() + (1.0 - x) * (2.0 * (1.0 - x)).ln();
    /// assert!((m.rate_function(x).unwrap() - kl).abs() < 1e-13);
    /// assert_eq!(m.rate_function(1.5).unwrap(), f64::INFINITY);
    /// ```
    pub fn rate_function(&self, x: f64) -> Result<f64> {
        if x.is_nan() {
            return Err(TiltError::invalid("x", "NaN is not a reward per token"));
        }
        if x > self.r_max || x < self.r_min {
            return Ok(f64::INFINITY);
        }
        if self.r_max == self.r_min {
            return Ok(0.0);
        }
        if x == self.r_max {
            return Ok(self.max_kl_per_token());
        }
        if x == self.r_min {
            return Ok(self.min_rate);
        }
        let l = self.lambda_for_mean(x)?;
        // λx − Λ(λ); `cumulants` forms Λ by a log-sum-exp shifted at its largest term, so
        // no exponential overflows for any λ.
        non_negative(l * x - self.cumulants(l).log_mgf, "rate function")
    }

    /// The tilt multiplier `λ_Δ > 0` with `KL(q_λ‖q) = Δ` (docs/theory.md §1; arXiv
    /// 2404.01730: the optimal KL-constrained policy is this tilt).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `delta` unless `Δ > 0` and finite;
    /// [`TiltError::KlBudgetTooLarge`] when `Δ ≥ −log q(argmax r)`.
    pub fn lambda_for_kl(&self, delta: f64) -> Result<f64> {
        if !(delta.is_finite() && delta > 0.0) {
            return Err(TiltError::invalid(
                "delta",
                format!(
                    "{delta}: the per-token KL budget must be a finite number > 0 nats",
                    delta = Shown(delta)
                ),
            ));
        }
        let max = self.max_kl_per_token();
        if delta >= max {
            return Err(TiltError::KlBudgetTooLarge {
                requested: delta,
                max,
            });
        }
        let span = (self.r_max - self.r_min).max(f64::MIN_POSITIVE);
        let f = |l: f64| self.tilt_kl(l) - delta;
        let hi = bracket_up(f, 1.0 / span, 2000, "λ for KL(q_λ‖q) = Δ")?;
        brent_root(f, 0.0, hi, 1e-15 * (1.0 + hi), "λ for KL(q_λ‖q) = Δ")
    }

    /// `x*(Δ) = Λ'(λ_Δ)`, the unique `x > E_q r` with `I(x) = Δ` (docs/theory.md §12).
    ///
    /// # Errors
    /// As [`MemorylessModel::lambda_for_kl`].
    pub fn x_star(&self, delta: f64) -> Result<f64> {
        Ok(self.cumulants(self.lambda_for_kl(delta)?).mean)
    }

    /// The scaled cumulant generating function of the reward under the tilt `q_λ^{⊗L}`,
    /// with its Rényi form (docs/theory.md §12, a derivation; arXiv 2404.01730 states
    /// that "the rate of growth of the scaled cumulants is characterised by a proper Rényi
    /// cross entropy" — the exact statement in the paper was not available to us, so this
    /// implements the identity below, which is exact for every `L`):
    ///
    /// ```text
    /// (1/L) log E_{q_λ^{⊗L}}[e^{θ S_L}] = Λ(λ+θ) − Λ(λ)
    ///                                  = (θ/λ)·[Λ(λ) + D_α(q_λ‖q)],   α = 1 + θ/λ,
    /// D_α(q_λ‖q) = log(Σ_y q_λ(y)^α q(y)^{1−α}) / (α − 1)
    /// ```
    /// (`λ > 0`, `θ > −λ` so that `α > 0`, `θ ≠ 0`). `Λ(λ) + D_α(q_λ‖q)` is the order-α
    /// Rényi cross-entropy-type quantity that sets the growth rate; its `k`-th derivative
    /// in θ at 0 gives the `k`-th scaled cumulant `Λ^{(k)}(λ)`.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `theta` or `lambda` outside that range.
    pub fn scaled_cgf_renyi(&self, lambda: f64, theta: f64) -> Result<ScaledCgf> {
        if !(lambda.is_finite() && lambda > 0.0) {
            return Err(TiltError::invalid(
                "lambda",
                format!("{lambda} must be > 0", lambda = Shown(lambda)),
            ));
        }
        if !(theta.is_finite() && theta > -lambda && theta != 0.0) {
            return Err(TiltError::invalid(
                "theta",
                format!("{theta} must be finite, non-zero and > −λ = {}", -lambda),
            ));
        }
        let alpha = 1.0 + theta / lambda;
        let tilted = self.tilted_probs(lambda);
        let logs: Vec<f64> = tilted
            .iter()
            .zip(&self.probs)
            .map(|(t, p)| alpha * t.ln() + (1.0 - alpha) * p.ln())
            .collect();
        let renyi = log_sum_exp(&logs) / (alpha - 1.0);
        let lam = self.cumulants(lambda).log_mgf;
        Ok(ScaledCgf {
            theta,
            alpha,
            scaled_cgf: self.cumulants(lambda + theta).log_mgf - lam,
            renyi_divergence: renyi,
            renyi_form: (theta / lambda) * (lam + renyi),
        })
    }

    /// Per-token grid index pmf under the tilt `q_λ`, on `0..=K`.
    fn index_pmf(&self, lambda: f64) -> Vec<f64> {
        let mut out = vec![0.0; self.lattice.max_index() + 1];
        for (p, &k) in self.tilted_probs(lambda).iter().zip(&self.indices) {
            out[k] += p;
        }
        out
    }

    /// Check a sequence length before any work: at least 1 token, and the law of `S_L`
    /// (`L·K + 1` lattice points, `K` the per-token grid index range) within
    /// [`lattice::MAX_SUM_POINTS`].
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `length`.
    pub fn check_length(&self, length: usize) -> Result<()> {
        if length == 0 {
            return Err(TiltError::invalid("length", "must be at least 1 token"));
        }
        lattice::check_sum_points(self.lattice.max_index() + 1, length).map(|_| ())
    }

    /// The exact law of `S_L` under the reference `q^{⊗L}`, computed under the tilt
    /// `accuracy_tilt` (see [`crate::lattice`]) and mapped back in log space.
    ///
    /// # Errors
    /// As [`lattice::sum_pmf`].
    pub fn sum_law(
        &self,
        length: usize,
        accuracy_tilt: f64,
        method: Option<ConvolutionMethod>,
    ) -> Result<SumLaw> {
        let method =
            method.unwrap_or_else(|| lattice::choose_method(self.lattice.max_index(), length));
        let pmf = lattice::sum_pmf(&self.index_pmf(accuracy_tilt), length, method)?;
        let h = self.lattice.step();
        // log Σ_k q(k) e^{μ h k} = Λ(μ) − μ·origin.
        let shift = self.cumulants(accuracy_tilt).log_mgf - accuracy_tilt * self.lattice.origin();
        let l = length as f64;
        let log_pmf = pmf
            .iter()
            .enumerate()
            .map(|(j, &p)| p.ln() - accuracy_tilt * h * j as f64 + l * shift)
            .collect();
        Ok(SumLaw {
            length,
            origin: self.lattice.origin() * l,
            step: h,
            log_pmf,
            method,
        })
    }

    /// Everything at one length and budget: the rate function at `x*`, the optimal tilt,
    /// best-of-N with `log N = LΔ`, and their KL per token (all in nats), with the
    /// convolution method chosen by [`lattice::choose_method`].
    ///
    /// The rewards are those of the lattice ([`LatticeRewards::snapped`]): every field is
    /// computed for the snapped model, and the KL and rate-function fields are exact for
    /// it. Snapping moves the reward per token of every sequence by at most
    /// `grid_snap_error_per_token`.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `length` when 0; as
    /// [`MemorylessModel::lambda_for_kl`] for `delta`; as [`lattice::sum_pmf`];
    /// [`TiltError::NoConvergence`] if best-of-N mass is lost outside the computed range.
    pub fn analyze(&self, length: usize, delta: f64) -> Result<MemorylessReport> {
        self.analyze_with(length, delta, None)
    }

    /// [`MemorylessModel::analyze`] with the convolution method forced (`None`: chosen
    /// automatically), e.g. to cross-check the FFT against direct convolution.
    ///
    /// # Errors
    /// As [`MemorylessModel::analyze`].
    pub fn analyze_with(
        &self,
        length: usize,
        delta: f64,
        method: Option<ConvolutionMethod>,
    ) -> Result<MemorylessReport> {
        self.check_length(length)?;
        let lambda = self.lambda_for_kl(delta)?;
        let c = self.cumulants(lambda);
        let x_star = c.mean;
        let log_n = length as f64 * delta;
        let law = self.sum_law(length, lambda, method)?;
        let tilt_log = law.tilted_log_pmf(self, lambda);
        let bon = law.best_of_n(log_n)?;
        if bon.lost_mass_bound > 1e-12 {
            return Err(TiltError::NoConvergence {
                what: "best-of-N law".into(),
                detail: format!(
                    "up to {:.3e} of its mass lies below the computed range of S_L",
                    bon.lost_mass_bound
                ),
            });
        }
        let l = length as f64;
        let kl_bon_tilt = non_negative(kl_log(&bon.log_pmf, &tilt_log), "KL(best-of-N ‖ tilt)")?;
        let kl_bon_ref = non_negative(kl_log(&bon.log_pmf, &law.log_pmf), "KL(best-of-N ‖ q)")?;
        let tilt_mean_lattice = law.mean_of(&tilt_log);
        Ok(MemorylessReport {
            length,
            delta,
            log_n,
            lambda,
            beta: 1.0 / lambda,
            x_star,
            rate_function_at_x_star: self.rate_function(x_star)?,
            reference_reward_per_token: self.mean_reward(),
            max_reward_per_token: self.r_max,
            tilt_reward_per_token: x_star,
            tilt_reward_per_token_from_law: tilt_mean_lattice / l,
            tilt_kl_per_token: self.tilt_kl(lambda),
            bon_reward_per_token: bon.mean / l,
            bon_kl_per_token: kl_bon_ref / l,
            bon_kl_bound_per_token: (log_n - (1.0 - (-log_n).exp())) / l,
            kl_tilt_bon_per_token: kl_bon_tilt / l,
            convolution: law.method,
            lattice_step: self.lattice.step(),
            grid_snap_error_per_token: self.lattice.snap_error(),
            bon_mass_lost_bound: bon.lost_mass_bound,
        })
    }
}

/// One row of the Rényi characterisation of the scaled cumulants
/// ([`MemorylessModel::scaled_cgf_renyi`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScaledCgf {
    /// The argument θ.
    pub theta: f64,
    /// The Rényi order `α = 1 + θ/λ`.
    pub alpha: f64,
    /// `Λ(λ+θ) − Λ(λ)` (nats per token).
    pub scaled_cgf: f64,
    /// `D_α(q_λ‖q)` in nats.
    pub renyi_divergence: f64,
    /// `(θ/λ)(Λ(λ) + D_α(q_λ‖q))`, equal to `scaled_cgf`.
    pub renyi_form: f64,
}

/// The law of `S_L` on its lattice, as natural-log probabilities.
#[derive(Debug, Clone)]
pub struct SumLaw {
    /// The length `L`.
    pub length: usize,
    /// The smallest value of `S_L`: `L·min r`.
    pub origin: f64,
    /// The lattice step `h`: entry `j` is `S_L = origin + h·j`.
    pub step: f64,
    /// `log P_q(S_L = origin + h j)`; `−∞` where the computation lost the entry.
    pub log_pmf: Vec<f64>,
    /// How it was computed.
    pub method: ConvolutionMethod,
}

/// The law of `S_L` under best-of-N.
#[derive(Debug, Clone)]
pub struct BestOfNSum {
    /// `log P_BoN(S_L = origin + h j)`.
    pub log_pmf: Vec<f64>,
    /// `E_BoN[S_L]`.
    pub mean: f64,
    /// `F(s_0⁻)^N` at the lowest computed entry: an upper bound on the best-of-N mass
    /// outside the computed range.
    pub lost_mass_bound: f64,
}

impl SumLaw {
    /// The value of `S_L` at entry `j`.
    pub fn value(&self, j: usize) -> f64 {
        self.origin + self.step * j as f64
    }

    /// `log P_{q_λ^{⊗L}}(S_L = s) = log P_q(S_L = s) + λ s − L Λ(λ)`: the law of `S_L` under
    /// the product tilt `q_λ^{⊗L}` (an exponential family in `S_L`, since
    /// `Λ_L = L·Λ`; docs/theory.md §12, arXiv 2404.01730).
    pub fn tilted_log_pmf(&self, model: &MemorylessModel, lambda: f64) -> Vec<f64> {
        let shift = self.length as f64 * model.cumulants(lambda).log_mgf;
        self.log_pmf
            .iter()
            .enumerate()
            .map(|(j, lp)| lp + lambda * self.value(j) - shift)
            .collect()
    }

    /// `Σ_j s_j·e^{log_pmf[j]}` for a log pmf on this lattice.
    pub fn mean_of(&self, log_pmf: &[f64]) -> f64 {
        let mut s = NeumaierSum::default();
        for (j, lp) in log_pmf.iter().enumerate() {
            if *lp > f64::NEG_INFINITY {
                s.add(self.value(j) * lp.exp());
            }
        }
        s.value()
    }

    /// Best-of-N on `S_L` with `N = e^{log_n}` (real `N ≥ 1`; arXiv 2401.01879 §2 for the
    /// law, 2404.01730 for the scaling):
    ///
    /// ```text
    /// P_BoN(S = s) = F(s)^N − F(s⁻)^N,   F(s)^N = exp(N·log1p(−P(S > s)))
    /// ```
    /// with the tails `P(S > s)` summed from the top in log space (never `1 − F`), so tails
    /// of `e^{−LΔ}` keep full relative precision.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `log N` when negative or not finite.
    pub fn best_of_n(&self, log_n: f64) -> Result<BestOfNSum> {
        if !(log_n.is_finite() && log_n >= 0.0) {
            return Err(TiltError::invalid(
                "log N",
                format!("{log_n} must be finite and ≥ 0 (N ≥ 1)"),
            ));
        }
        let n = self.log_pmf.len();
        // log F(s_j)^N for j = 0..n, and for "below entry 0" at index n (stored separately).
        let mut log_fn = vec![0.0; n];
        let mut log_tail = f64::NEG_INFINITY; // log P(S > s_j)
        let mut log_fn_below = 0.0;
        for j in (0..n).rev() {
            log_fn[j] = log_pow_cdf(log_tail, log_n);
            log_tail = log_add(log_tail, self.log_pmf[j]);
            if j == 0 {
                log_fn_below = log_pow_cdf(log_tail, log_n);
            }
        }
        let mut log_pmf = vec![f64::NEG_INFINITY; n];
        let mut mean = NeumaierSum::default();
        for j in 0..n {
            let a = log_fn[j];
            let b = if j == 0 { log_fn_below } else { log_fn[j - 1] };
            if a == f64::NEG_INFINITY || self.log_pmf[j] == f64::NEG_INFINITY {
                continue;
            }
            let lp = a + (-(b - a).exp_m1()).ln();
            log_pmf[j] = lp;
            mean.add(self.value(j) * lp.exp());
        }
        Ok(BestOfNSum {
            log_pmf,
            mean: mean.value(),
            lost_mass_bound: log_fn_below.exp(),
        })
    }
}

/// `log(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log F^N = N·log1p(−t)` with `t = e^{log_tail}` and `N = e^{log_n}`, without forming N.
fn log_pow_cdf(log_tail: f64, log_n: f64) -> f64 {
    if log_tail == f64::NEG_INFINITY {
        return 0.0;
    }
    if log_tail >= 0.0 {
        return f64::NEG_INFINITY;
    }
    // log(−log1p(−t)); for tiny t this is log t + t/2 + …
    let log_neg_log1p = if log_tail < -700.0 {
        log_tail
    } else {
        (-(-log_tail.exp()).ln_1p()).ln()
    };
    -(log_n + log_neg_log1p).exp()
}

/// `KL(P‖Q) = Σ P (log P − log Q)` from log pmfs on the same support, in nats; `+∞` when P
/// puts mass where Q has none.
pub fn kl_log(log_p: &[f64], log_q: &[f64]) -> f64 {
    let mut s = NeumaierSum::default();
    for (lp, lq) in log_p.iter().zip(log_q) {
        if *lp == f64::NEG_INFINITY {
            continue;
        }
        if *lq == f64::NEG_INFINITY {
            return f64::INFINITY;
        }
        s.add(lp.exp() * (lp - lq));
    }
    // Rounding below 0 becomes 0; a NaN (a NaN input) stays NaN rather than passing for 0.
    let v = s.value();
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// The exact finite-length quantities of the memoryless model at one `(L, Δ)` (all KL in
/// nats, rewards per token in reward units).
#[derive(Debug, Clone, Serialize)]
pub struct MemorylessReport {
    /// Sequence length `L`.
    pub length: usize,
    /// Per-token KL budget `Δ` (nats).
    pub delta: f64,
    /// `log N = LΔ` (nats): best-of-N uses `N = e^{LΔ}`.
    pub log_n: f64,
    /// The tilt multiplier `λ_Δ` with `KL(q_λ‖q) = Δ`.
    pub lambda: f64,
    /// `β = 1/λ`, the same tilt as a KL-regularisation coefficient.
    pub beta: f64,
    /// `x*(Δ) = Λ'(λ_Δ)`.
    pub x_star: f64,
    /// `I(x*)` by the Legendre transform, independently of `λ_Δ` (should equal `Δ`).
    pub rate_function_at_x_star: f64,
    /// `E_q r`.
    pub reference_reward_per_token: f64,
    /// `max r` on the support.
    pub max_reward_per_token: f64,
    /// Reward per token of the optimal tilt, `Λ'(λ)` (exact for every `L`).
    pub tilt_reward_per_token: f64,
    /// The same from the computed law of `S_L` (a check of the convolution).
    pub tilt_reward_per_token_from_law: f64,
    /// `KL(q_λ‖q)`: the tilt's KL per token (= Δ).
    pub tilt_kl_per_token: f64,
    /// `E_BoN[S_L]/L`.
    pub bon_reward_per_token: f64,
    /// `KL(BoN‖q^{⊗L})/L`, exact.
    pub bon_kl_per_token: f64,
    /// `(log N − (N−1)/N)/L`, the known upper bound on the previous field.
    pub bon_kl_bound_per_token: f64,
    /// `KL(BoN ‖ tilt)/L` (direction: best-of-N first, as in arXiv 2404.01730), exact.
    pub kl_tilt_bon_per_token: f64,
    /// How the law of `S_L` was computed.
    pub convolution: ConvolutionMethod,
    /// The reward grid step `h`.
    pub lattice_step: f64,
    /// Largest per-token |reward − snapped reward| over the support: the true maximum
    /// whether the grid was detected (then at the level of the 1e-9 relative rounding the
    /// detection tolerates) or given. Every field is for the snapped model (the KL and
    /// rate-function fields exactly); snapping moves the reward per token of every
    /// sequence by at most this much.
    pub grid_snap_error_per_token: f64,
    /// Upper bound on best-of-N mass outside the computed range of `S_L`.
    pub bon_mass_lost_bound: f64,
}
