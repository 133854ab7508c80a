//! Inference-aware alignment on the calibrated reward (InfAlign: Balashankar, Sun, …,
//! Suresh, Beirami, arXiv 2412.19792 §3–§4; docs/theory.md §10).
//!
//! # The reduction to [0, 1]
//! With the calibrated reward `c(y) = P_{z∼p}(r(z) < r(y)) + ½P(r(z) = r(y))`, which is
//! Uniform(0, 1) under the reference for atomless rewards, any policy that depends on `y`
//! only through `c` is a density `g` on `[0, 1]`, with `KL(π‖p) = ∫ g log g`. Aligning by
//! KL-regularised RL on a transformed calibrated reward `Φ(c)` gives
//! `g(u) ∝ e^{Φ(u)/β}` (arXiv 2412.19792 §3). Every curve of the paper is then a 1-D integral:
//!
//! ```text
//! standard win rate      W   = ∫₀¹ u g(u) du = 1 − ∫₀¹ G(u) du
//! best-of-N  (BoN_N)     W_N = 1 − ∫₀¹ N u^{N−1} G(u)^N du
//! worst-of-N (WoN_N)     W_N = 1 − ∫₀¹ N (1−u)^{N−1} [1 − (1 − G(u))^N] du
//! ```
//! (`G` the CDF of `g`; docs/theory.md §10, derived here: for BoN, `P(Y > Z) = ∫ (1 −
//! G(z)^N) dz^N` with `Y` the max of N draws from `g` and `Z` the max of N uniforms; for
//! WoN, `P(Y > Z) = ∫ (1 − G(z))^N d(1 − (1−z)^N)` with minima. The tests check both
//! against Monte Carlo and against the alternative form `∫ f_Y F_Z`.)
//!
//! # Transforms and the normalisation of Φ
//! Identity `Φ(u) = u` (standard RLHF on the calibrated reward), the exponential
//! `Φ_t(u) = e^{tu}` proposed for best-of-N, and `Φ_t(u) = −e^{−tu}` for worst-of-N
//! (arXiv 2412.19792 §4). An affine change of `Φ` only reparametrises `β`, so every `Φ` is
//! first normalised to `Φ̃ ∈ [0, 1]`, `Φ̃(0) = 0`, `Φ̃(1) = 1`, and `β` refers to `Φ̃`
//! (the `β` of the raw transform is `β·(Φ(1) − Φ(0))`, reported beside it). This keeps
//! `e^{Φ̃/β}` in range for any `t`, and `t → 0` recovers the identity continuously.
//!
//! # Numerics
//! Adaptive Gauss–Kronrod ([`crate::quadrature`]) to ~1e-12. The densities are smooth but
//! can be sharply peaked at `u = 1` (large `t`, small `β`) or have a narrow dip at `u = 0`
//! (neg-exp), and the outer integrands concentrate within `1/N` of an end, so the initial
//! partition has geometric breakpoints `2^{−k}` and `1 − 2^{−k}` down to those scales;
//! without them a narrow peak could fall between the first 15 nodes and be missed. `G`
//! is the cumulative integral on the converged partition.

use crate::error::{Result, TiltError};
use crate::numerics::{non_negative, Shown};
use crate::optimize::{brent_root, maximize_scalar};
use crate::quadrature::{integrate, CumulativeIntegral};
use serde::Serialize;

/// Absolute tolerance of every integral here.
pub const QUAD_TOL: f64 = 1e-12;
/// Largest KL (nats) of a calibrated tilt: the budget of [`CalibratedTilt::with_kl`] and the
/// KL that a β given to [`CalibratedTilt::new`] may reach. A tilt of KL `D` puts most of its
/// mass within about `e^{−(D+1)}` of `c = 1` (identity transform); at 20 nats that is 8e-10,
/// and every transform's tilt integrates to the 1e-12 tolerance (measured for identity,
/// `e^{tc}` and `−e^{−tc}` with t up to [`MAX_T`]). At 22 nats the quadrature runs out of
/// panels for every transform, so budgets up to 20 are accepted and none beyond.
pub const MAX_KL: f64 = 20.0;
/// Narrowest peak at `c = 1` that [`CalibratedTilt::new`] integrates: the density
/// `∝ e^{−λ(1 − Φ̃(c))}` falls off over `1/(λ·Φ̃'(1))` there, and doubles near 1 are
/// 1.1e-16 apart. A narrower peak means a KL of about `log(1/width) − 1 > 28` nats, far
/// beyond [`MAX_KL`] anyway.
pub const MIN_PEAK_WIDTH: f64 = 1e-13;
/// Largest rate `t` of the exponential transforms `e^{tc}`, `−e^{−tc}` (and largest upper
/// end of the search of [`optimize_t`]). The transform changes over `1/t` near an end of
/// `[0, 1]`; at 10⁶ that scale is 10¹⁰ doubles wide, resolved by the quadrature; far beyond
/// it (10¹², 10³⁰⁰) the transform is a step that no double-precision integral resolves,
/// and every evaluation there would only fail after its full panel budget.
pub const MAX_T: f64 = 1e6;
/// Largest `log(1/β)` searched when solving for a KL budget.
pub const MAX_LOG_LAMBDA: f64 = 700.0;
/// Largest N of best-of-N for which [`inference_win_rate`] is accurate (measured: within
/// 5e-12 of the closed form `m/(m+1)` for the best-of-m policies at N ≤ 10^6). Its
/// integrand `N·u^{N−1}·G(u)^N` lives within ~1/N of u = 1, where a double carries u
/// only to ε absolute and `G(u)` near 1 only to ε: `G^N` then has a relative error of
/// about `N·ε`, and beyond ~10^7 the quadrature loses 1e-10 or fails to converge.
pub const MAX_BON_N: u64 = 1_000_000;
/// Largest N of worst-of-N for which [`inference_win_rate`] is accurate. Its integrand
/// lives within ~1/N of u = 0, where doubles are dense, so precision is no limit; the
/// initial partition is: its geometric breakpoints stop at 1e-15, the integrand's scale
/// at N = 10^15. (Measured: within 3e-16 of the closed form `1/(m+1)` for worst-of-m
/// policies at N = 10^3 … 10^18, so the cap leaves a margin.)
pub const MAX_WON_N: u64 = 1_000_000_000_000_000;

/// The inference-time procedure applied to both the aligned and the reference policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Procedure {
    /// Best-of-N: keep the highest-reward of N draws.
    Bon,
    /// Worst-of-N ("best-of-N jailbreaking"): the lowest-reward of N draws.
    Won,
}

/// A transform `Φ` of the calibrated reward, before normalisation to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Transform {
    /// `Φ(u) = u`.
    Identity,
    /// `Φ(u) = e^{tu}`, `t ≥ 0` (`t = 0` is the identity limit).
    Exp {
        /// The rate `t`.
        t: f64,
    },
    /// `Φ(u) = −e^{−tu}`, `t ≥ 0` (`t = 0` is the identity limit).
    NegExp {
        /// The rate `t`.
        t: f64,
    },
}

impl Transform {
    /// Validate `t` for the exponential transforms.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `t` when negative, not finite, or above [`MAX_T`]
    /// (a negative `t` flips the transform's direction, which is meaningless for the
    /// procedure it serves).
    pub fn validated(self) -> Result<Self> {
        match self {
            Transform::Identity => Ok(self),
            Transform::Exp { t } | Transform::NegExp { t } => {
                if t.is_finite() && (0.0..=MAX_T).contains(&t) {
                    Ok(self)
                } else {
                    Err(TiltError::invalid(
                        "t",
                        format!(
                            "{t}: the transform rate must be between 0 and {MAX_T:e} (beyond, \
                             the transform is a step that double precision cannot resolve)",
                            t = Shown(t)
                        ),
                    ))
                }
            }
        }
    }

    /// The rate `t` (None for the identity).
    pub fn t(&self) -> Option<f64> {
        match self {
            Transform::Identity => None,
            Transform::Exp { t } | Transform::NegExp { t } => Some(*t),
        }
    }

    /// `Φ̃(u) = (Φ(u) − Φ(0)) / (Φ(1) − Φ(0))`, computed without overflow for any `t`: the
    /// CTRL transforms of arXiv 2412.19792 (`e^{tu}` for best-of-N, `−e^{−tu}` for
    /// worst-of-N; arXiv 2412.19792 §4) normalised to `[0, 1]` as docs/theory.md §10
    /// advises (an affine change of Φ only reparametrises β).
    ///
    /// ```text
    /// exp:     Φ̃(u) = expm1(tu)/expm1(t)  =  e^{t(u−1)}·(1 − e^{−tu})/(1 − e^{−t})
    /// neg-exp: Φ̃(u) = (1 − e^{−tu})/(1 − e^{−t})
    /// ```
    pub fn normalized(&self, u: f64) -> f64 {
        match *self {
            Transform::Identity => u,
            Transform::Exp { t } | Transform::NegExp { t } if t == 0.0 => u,
            Transform::Exp { t } => {
                if t < 1.0 {
                    (t * u).exp_m1() / t.exp_m1()
                } else {
                    (t * (u - 1.0)).exp() * (-(-t * u).exp_m1()) / (-(-t).exp_m1())
                }
            }
            Transform::NegExp { t } => (-t * u).exp_m1() / (-t).exp_m1(),
        }
    }

    /// `1 − Φ̃(u)` for the normalised transform of [`Transform::normalized`] (arXiv
    /// 2412.19792 §4; docs/theory.md §10), computed directly so that it keeps its relative
    /// precision where `Φ̃(u)` is close to 1 (the density is `∝ e^{−(1 − Φ̃)/β}`, and for
    /// neg-exp with large `t`, `1 − Φ̃ ≈ e^{−tu}` is far below ε over most of `[0, 1]`).
    ///
    /// ```text
    /// exp:     1 − Φ̃(u) = (1 − e^{−t(1−u)}) / (1 − e^{−t})
    /// neg-exp: 1 − Φ̃(u) = e^{−tu}·(1 − e^{−t(1−u)}) / (1 − e^{−t})
    /// ```
    pub fn complement(&self, u: f64) -> f64 {
        match *self {
            Transform::Identity => 1.0 - u,
            Transform::Exp { t } | Transform::NegExp { t } if t == 0.0 => 1.0 - u,
            Transform::Exp { t } => (-t * (1.0 - u)).exp_m1() / (-t).exp_m1(),
            Transform::NegExp { t } => (-t * u).exp() * (-t * (1.0 - u)).exp_m1() / (-t).exp_m1(),
        }
    }

    /// `dΦ̃/du` at `u` (sets the scale of the density's variation).
    fn slope(&self, u: f64) -> f64 {
        match *self {
            Transform::Identity => 1.0,
            Transform::Exp { t } | Transform::NegExp { t } if t == 0.0 => 1.0,
            Transform::Exp { t } => t * (t * (u - 1.0)).exp() / (-(-t).exp_m1()),
            Transform::NegExp { t } => t * (-t * u).exp() / (-(-t).exp_m1()),
        }
    }

    /// `Φ(1) − Φ(0)`, the factor from the normalised `β` to the raw transform's `β`
    /// (may be `+∞` for `e^{tu}` with `t > 709`).
    pub fn raw_range(&self) -> f64 {
        match *self {
            Transform::Identity => 1.0,
            Transform::Exp { t } => t.exp_m1(),
            Transform::NegExp { t } => -(-t).exp_m1(),
        }
    }
}

/// Breakpoints `2^{−k}` and `1 − 2^{−k}` down to `scale0` near 0 and `scale1` near 1.
fn geometric_breaks(scale0: f64, scale1: f64) -> Vec<f64> {
    let mut v = vec![0.5];
    let depth = |s: f64| ((1.0 / s.clamp(1e-15, 0.5)).log2().ceil() as i32 + 1).clamp(1, 50);
    for k in 2..=depth(scale0) {
        v.push(0.5f64.powi(k));
    }
    for k in 2..=depth(scale1) {
        v.push(1.0 - 0.5f64.powi(k));
    }
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// A policy on the calibrated scale: a CDF on `[0, 1]` and where it changes fast.
pub trait CalibratedPolicy {
    /// `G(u)`, the CDF of the calibrated reward under the policy.
    fn cdf(&self, u: f64) -> f64;
    /// Breakpoints that resolve the policy's density (inside (0, 1)).
    fn breakpoints(&self) -> Vec<f64>;
}

/// The tilt `g(u) = e^{Φ̃(u)/β} / Z` of the uniform reference (docs/theory.md §10).
#[derive(Debug, Clone)]
pub struct CalibratedTilt {
    transform: Transform,
    /// `λ = 1/β` for the normalised transform.
    lambda: f64,
    /// `log ∫ e^{λ(Φ̃ − 1)}`.
    log_z_shifted: f64,
    cumulative: CumulativeIntegral,
    breaks: Vec<f64>,
    /// `KL(g‖Uniform)`, nats.
    kl: f64,
}

impl CalibratedTilt {
    /// The tilt with coefficient `beta` on the normalised transform (`β = ∞` is the
    /// reference itself).
    ///
    /// The KL of the result is at most [`MAX_KL`]: a smaller β (a sharper tilt) is refused
    /// before any integral when its peak is too narrow to resolve ([`MIN_PEAK_WIDTH`]), and
    /// after the integral when its KL comes out above [`MAX_KL`], so that what is returned
    /// is always a tilt the quadrature resolved.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `beta` unless `β > 0` (may be `+∞`) and its tilt
    /// within those limits, or `t` (see [`Transform::validated`]);
    /// [`TiltError::NoConvergence`] if quadrature fails.
    pub fn new(transform: Transform, beta: f64) -> Result<Self> {
        let transform = transform.validated()?;
        if beta.is_nan() || beta <= 0.0 {
            return Err(TiltError::invalid(
                "beta",
                format!("{beta}: the KL coefficient must be > 0", beta = Shown(beta)),
            ));
        }
        let lambda = if beta.is_infinite() { 0.0 } else { 1.0 / beta };
        let width = 1.0 / (lambda * transform.slope(1.0));
        if width.is_nan() || width < MIN_PEAK_WIDTH {
            return Err(TiltError::invalid(
                "beta",
                format!(
                    "{beta}: the tilt would put its mass within {width:.1e} of c = 1 (a KL of \
                     about {:.0} nats), beyond the {MAX_KL} nats the quadrature resolves; \
                     use a larger β",
                    (1.0 / width).ln() - 1.0,
                    beta = Shown(beta)
                ),
            ));
        }
        let tilt = Self::with_lambda(transform, lambda)?;
        if tilt.kl > MAX_KL {
            return Err(TiltError::invalid(
                "beta",
                format!(
                    "{beta}: the tilt's KL is {:.3} nats, beyond the {MAX_KL} nats the \
                     quadrature resolves; use a larger β",
                    tilt.kl,
                    beta = Shown(beta)
                ),
            ));
        }
        Ok(tilt)
    }

    fn with_lambda(transform: Transform, lambda: f64) -> Result<Self> {
        let scale0 = 1.0 / (1.0 + lambda * transform.slope(0.0));
        let scale1 = 1.0 / (1.0 + lambda * transform.slope(1.0));
        let breaks = geometric_breaks(0.05 * scale0, 0.05 * scale1);
        let h = |u: f64| (-lambda * transform.complement(u)).exp();
        let cumulative = CumulativeIntegral::new(h, 0.0, 1.0, &breaks, 0.0, 1e-12)?;
        let total = cumulative.total();
        if !(total > 0.0 && total.is_finite()) {
            return Err(TiltError::NoConvergence {
                what: "calibrated tilt".into(),
                detail: format!(
                    "its normaliser came out {total:e} at 1/β = {lambda:e} (the density is \
                     narrower than the quadrature's nodes)"
                ),
            });
        }
        let log_z_shifted = total.ln();
        let kl = if lambda == 0.0 {
            0.0
        } else {
            // KL = λ·E_g[Φ̃ − 1] − log Z' (nats).
            let m = integrate(
                |u| -transform.complement(u) * h(u),
                0.0,
                1.0,
                &breaks,
                0.0,
                1e-12,
            )?;
            non_negative(
                lambda * (m.value / total) - log_z_shifted,
                "KL of the calibrated tilt",
            )?
        };
        Ok(Self {
            transform,
            lambda,
            log_z_shifted,
            cumulative,
            breaks,
            kl,
        })
    }

    /// The tilt whose KL to the reference is `kl` nats (β found by Brent's method on
    /// `log(1/β)`; `KL` is increasing in `1/β`, from 0 to ∞).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `kl` unless `1e-12 ≤ kl ≤ MAX_KL`; as
    /// [`CalibratedTilt::new`].
    pub fn with_kl(transform: Transform, kl: f64) -> Result<Self> {
        let transform = transform.validated()?;
        check_kl_budget(kl)?;
        let kl_at = |s: f64| -> Result<f64> { Self::with_lambda(transform, s.exp())?.kl() };
        let mut lo = -12.0f64;
        while kl_at(lo)? >= kl {
            lo -= 6.0;
            if lo < -40.0 {
                return Err(TiltError::NoConvergence {
                    what: "β for the KL budget".into(),
                    detail: "no lower bracket".into(),
                });
            }
        }
        // Upper bracket on log(1/β), up to 700 (1/β still finite): neg-exp with a large t
        // needs 1/β ≈ e^{t(1−e^{−KL})}. Growth by 1.5× overshoots; when the overshoot makes
        // the density too concentrated for double precision (its mass within ~1e-11 of
        // u = 1, where u itself has no digits left), the quadrature fails and we bisect back
        // between the last point below the budget and the failed one.
        let mut hi = 1.0f64.max(lo + 1.0);
        let mut failed: Option<f64> = None;
        loop {
            match kl_at(hi) {
                Ok(reached) if reached >= kl => break,
                Ok(reached) => {
                    lo = hi;
                    hi = match failed {
                        Some(f) => 0.5 * (hi + f),
                        None if hi >= MAX_LOG_LAMBDA => {
                            return Err(TiltError::invalid(
                                "kl",
                                format!(
                                    "{kl} nats is beyond what this transform reaches \
                                     ({reached:.6} nats at 1/β = e^{MAX_LOG_LAMBDA}); lower t \
                                     or the KL budget",
                                    kl = Shown(kl)
                                ),
                            ))
                        }
                        None => (1.5 * hi + 1.0).min(MAX_LOG_LAMBDA),
                    };
                }
                Err(TiltError::NoConvergence { detail, .. }) => {
                    if hi - lo < 1e-9 {
                        return Err(TiltError::NoConvergence {
                            what: "β for the KL budget".into(),
                            detail: format!(
                                "the tilt reaching {kl} nats is too concentrated to integrate: {detail}", kl = Shown(kl)),
                        });
                    }
                    failed = Some(hi);
                    hi = 0.5 * (lo + hi);
                }
                Err(e) => return Err(e),
            }
        }
        let mut failure = None;
        let s = brent_root(
            |s| match kl_at(s) {
                Ok(v) => v - kl,
                Err(e) => {
                    failure = Some(e);
                    f64::NAN
                }
            },
            lo,
            hi,
            1e-13,
            "β for the KL budget",
        );
        if let Some(e) = failure {
            return Err(e);
        }
        Self::with_lambda(transform, s?.exp())
    }

    /// The transform.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// `β` of the normalised transform (`∞` for the reference).
    pub fn beta(&self) -> f64 {
        1.0 / self.lambda
    }

    /// `β` of the raw transform `Φ`: `β·(Φ(1) − Φ(0))`.
    pub fn beta_raw(&self) -> f64 {
        self.beta() * self.transform.raw_range()
    }

    fn unnormalized(&self, u: f64) -> f64 {
        (-self.lambda * self.transform.complement(u)).exp()
    }

    /// The density `g(u)`.
    pub fn density(&self, u: f64) -> f64 {
        if !(0.0..=1.0).contains(&u) {
            return 0.0;
        }
        (-self.lambda * self.transform.complement(u) - self.log_z_shifted).exp()
    }

    /// `KL(g‖Uniform) = ∫ g log g = λ·E_g[Φ̃ − 1] − log Z'` (nats), integrated when the tilt
    /// was built.
    ///
    /// # Errors
    /// None: the `Result` stays for callers written against the lazy version.
    pub fn kl(&self) -> Result<f64> {
        Ok(self.kl)
    }

    /// The standard win rate over the reference, `E_g[u] = 1 − ∫ G`.
    ///
    /// # Errors
    /// As [`inference_win_rate`].
    pub fn win_rate(&self) -> Result<f64> {
        inference_win_rate(self, 1, Procedure::Bon)
    }
}

impl CalibratedPolicy for CalibratedTilt {
    fn cdf(&self, u: f64) -> f64 {
        (self.cumulative.at(u, |v| self.unnormalized(v)) / self.cumulative.total()).clamp(0.0, 1.0)
    }
    fn breakpoints(&self) -> Vec<f64> {
        self.breaks.clone()
    }
}

/// The best-of-m policy itself as a calibrated density `m u^{m−1}` (BoN is the RLHF tilt
/// with `Φ = log u`, `β = 1/(m−1)`; docs/theory.md §10). Real `m ≥ 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestOfMPolicy {
    m: f64,
}

impl BestOfMPolicy {
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `m` unless `m ≥ 1` and finite.
    pub fn new(m: f64) -> Result<Self> {
        if !(m.is_finite() && m >= 1.0) {
            return Err(TiltError::invalid(
                "m",
                format!("{m} must be ≥ 1", m = Shown(m)),
            ));
        }
        Ok(Self { m })
    }

    /// The `m ≥ 1` with `KL = log m − (m−1)/m` equal to `kl` (the KL is increasing in m).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `kl` unless `0 ≤ kl ≤ MAX_KL`.
    pub fn with_kl(kl: f64) -> Result<Self> {
        if !(kl.is_finite() && (0.0..=MAX_KL).contains(&kl)) {
            return Err(TiltError::invalid(
                "kl",
                format!("{kl}: must be between 0 and {MAX_KL} nats", kl = Shown(kl)),
            ));
        }
        if kl == 0.0 {
            return Ok(Self { m: 1.0 });
        }
        let f = |s: f64| {
            let m = s.exp();
            m.ln() - (m - 1.0) / m - kl
        };
        let s = brent_root(f, 0.0, kl + 2.0, 1e-15, "m for the KL budget")?;
        Ok(Self { m: s.exp() })
    }

    /// `m`.
    pub fn m(&self) -> f64 {
        self.m
    }

    /// `KL = log m − (m−1)/m` (arXiv 2401.01879, exact for continuous rewards).
    pub fn kl(&self) -> f64 {
        self.m.ln() - (self.m - 1.0) / self.m
    }
}

impl CalibratedPolicy for BestOfMPolicy {
    fn cdf(&self, u: f64) -> f64 {
        u.clamp(0.0, 1.0).powf(self.m)
    }
    fn breakpoints(&self) -> Vec<f64> {
        geometric_breaks(0.5, 0.05 / self.m)
    }
}

/// The inference-time win rate `W(T(π) > T(p))` on the calibrated scale (arXiv
/// 2412.19792; formulas in the module doc, docs/theory.md §10), for `T = BoN_N` or `WoN_N`.
/// `N = 1` gives the standard win rate. Ties have probability 0 on the calibrated scale.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` when 0 or above the accurate range of the
/// quadrature ([`MAX_BON_N`], [`MAX_WON_N`]); [`TiltError::NoConvergence`] if quadrature
/// fails.
///
/// ```
/// use tilt_core::infalign::{inference_win_rate, BestOfMPolicy, Procedure};
/// // Best-of-4 drawn against best-of-N of the reference wins with probability 4/5.
/// let w = inference_win_rate(&BestOfMPolicy::new(4.0).unwrap(), 8, Procedure::Bon).unwrap();
/// assert!((w - 0.8).abs() < 1e-12);
/// ```
pub fn inference_win_rate(
    policy: &impl CalibratedPolicy,
    n: u64,
    procedure: Procedure,
) -> Result<f64> {
    check_draws(n, procedure)?;
    let nf = n as f64;
    let mut breaks = policy.breakpoints();
    breaks.extend(geometric_breaks(0.05 / nf, 0.05 / nf));
    let integral = match procedure {
        Procedure::Bon => integrate(
            |u| {
                let g = policy.cdf(u);
                if g <= 0.0 || u <= 0.0 {
                    return 0.0;
                }
                nf * ((nf - 1.0) * u.ln() + nf * g.ln()).exp()
            },
            0.0,
            1.0,
            &breaks,
            QUAD_TOL,
            0.0,
        )?,
        Procedure::Won => integrate(
            |u| {
                let g = policy.cdf(u);
                let min_cdf = -(nf * (-g).ln_1p()).exp_m1();
                nf * ((nf - 1.0) * (-u).ln_1p()).exp() * min_cdf
            },
            0.0,
            1.0,
            &breaks,
            QUAD_TOL,
            0.0,
        )?,
    };
    Ok((1.0 - integral.value).clamp(0.0, 1.0))
}

/// Check a KL budget for [`CalibratedTilt::with_kl`]: finite, in `[1e-12, MAX_KL]` nats.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `kl` otherwise.
pub fn check_kl_budget(kl: f64) -> Result<()> {
    if kl.is_finite() && (1e-12..=MAX_KL).contains(&kl) {
        return Ok(());
    }
    Err(TiltError::invalid(
        "kl",
        format!(
            "{kl}: the KL budget must be between 1e-12 and {MAX_KL} nats",
            kl = Shown(kl)
        ),
    ))
}

/// Check the N of an inference-time procedure for [`inference_win_rate`]: at least 1 and
/// within the accurate range of its quadrature ([`MAX_BON_N`], [`MAX_WON_N`]).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `n` otherwise.
pub fn check_draws(n: u64, procedure: Procedure) -> Result<()> {
    if n == 0 {
        return Err(TiltError::invalid("n", "the number of draws must be ≥ 1"));
    }
    let (cap, name) = match procedure {
        Procedure::Bon => (MAX_BON_N, "best-of-N"),
        Procedure::Won => (MAX_WON_N, "worst-of-N"),
    };
    if n > cap {
        return Err(TiltError::invalid(
            "n",
            format!(
                "{n} draws: the quadrature of the {name} win rate is accurate (1e-10) only up to \
                 N = {cap:e}"
            ),
        ));
    }
    Ok(())
}

/// Check the upper end of the t search of [`optimize_t`]: `0.25 < t_max ≤ MAX_T`.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `t-max` otherwise.
pub fn check_t_max(t_max: f64) -> Result<()> {
    if t_max.is_finite() && t_max > 0.25 && t_max <= MAX_T {
        return Ok(());
    }
    Err(TiltError::invalid(
        "t-max",
        format!(
            "{t_max}: the upper end of the t search must be > 0.25 and at most {MAX_T:e} \
             (beyond, the transform is a step that double precision cannot resolve)",
            t_max = Shown(t_max)
        ),
    ))
}

/// One evaluated point of a CTRL tilt: transform, β, KL, win rates.
#[derive(Debug, Clone, Serialize)]
pub struct TiltPoint {
    /// The transform (with its t).
    pub transform: Transform,
    /// β of the normalised transform.
    pub beta: f64,
    /// β of the raw transform (`null` in JSON when it overflows).
    pub beta_raw: Option<f64>,
    /// KL(π‖p) in nats.
    pub kl: f64,
    /// Standard win rate over p.
    pub win_rate: f64,
    /// Win rate of `T(π)` over `T(p)`.
    pub inference_win_rate: f64,
}

/// Evaluate a tilt at a given procedure.
///
/// # Errors
/// As [`inference_win_rate`] and [`CalibratedTilt::kl`].
pub fn evaluate(tilt: &CalibratedTilt, n: u64, procedure: Procedure) -> Result<TiltPoint> {
    let raw = tilt.beta_raw();
    Ok(TiltPoint {
        transform: tilt.transform(),
        beta: tilt.beta(),
        beta_raw: raw.is_finite().then_some(raw),
        kl: tilt.kl()?,
        win_rate: tilt.win_rate()?,
        inference_win_rate: inference_win_rate(tilt, n, procedure)?,
    })
}

/// The `t` maximising the inference-time win rate at a fixed KL.
#[derive(Debug, Clone, Serialize)]
pub struct OptimalT {
    /// The best point found.
    pub point: TiltPoint,
    /// The t found.
    pub t: f64,
    /// Upper end of the search bracket.
    pub t_max: f64,
    /// True when the optimum sits at `t_max`: the true argmax may be larger (for large N
    /// it runs to hundreds; docs/theory.md §10).
    pub at_edge: bool,
    /// The values of t at which the tilt or its win rate could not be computed (a
    /// [`TiltError::NoConvergence`]), each with the reason; they were treated as
    /// infeasible and the search went on. Callers should warn about them.
    pub unconverged: Vec<UnconvergedT>,
}

/// A value of t that [`optimize_t`] skipped because a computation did not converge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnconvergedT {
    /// The transform rate.
    pub t: f64,
    /// The error, as text.
    pub reason: String,
}

/// Maximise the inference-time win rate over `t ∈ [0, t_max]` for the exponential family
/// `make(t)` at KL `kl`: a scan of `t = 0` and 24 log-spaced points in `[0.25, t_max]`,
/// then golden-section search around the best (docs/theory.md §10: t is chosen this way,
/// on a grid). A `t` at which the transform cannot reach the KL budget (neg-exp with a
/// large `t` needs `1/β ≈ e^{t(1−e^{−KL})}`, beyond [`MAX_LOG_LAMBDA`]) counts as
/// infeasible, and so does one at which the tilt is too concentrated to integrate
/// ([`TiltError::NoConvergence`]); those are listed in [`OptimalT::unconverged`].
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `t-max` unless `0.25 < t_max ≤ MAX_T`; as
/// [`CalibratedTilt::with_kl`] and [`inference_win_rate`] for the identity (`t = 0`), which
/// reaches every KL, so that bad input (a KL budget, N) is reported as such.
pub fn optimize_t(
    make: impl Fn(f64) -> Transform,
    n: u64,
    procedure: Procedure,
    kl: f64,
    t_max: f64,
) -> Result<OptimalT> {
    check_t_max(t_max)?;
    let mut grid = vec![0.0];
    let steps = 24;
    for i in 0..steps {
        let frac = i as f64 / (steps - 1) as f64;
        grid.push(0.25 * (t_max / 0.25).powf(frac));
    }
    // User errors (a bad KL, N) surface here, with t = 0 (the identity, which reaches
    // every KL) …
    let identity = CalibratedTilt::with_kl(make(0.0), kl)?;
    inference_win_rate(&identity, n, procedure)?;
    // … so that below, a KL the transform cannot reach at this t, or a tilt too
    // concentrated to integrate, only marks t infeasible.
    let mut unconverged: Vec<UnconvergedT> = Vec::new();
    let value = |t: f64| -> Result<f64> {
        let w = CalibratedTilt::with_kl(make(t), kl)
            .and_then(|tilt| inference_win_rate(&tilt, n, procedure));
        match w {
            Ok(w) => Ok(w),
            Err(TiltError::InvalidInput { input, .. }) if input == "kl" => Ok(f64::NEG_INFINITY),
            Err(e @ TiltError::NoConvergence { .. }) => {
                unconverged.push(UnconvergedT {
                    t,
                    reason: e.to_string(),
                });
                Ok(f64::NEG_INFINITY)
            }
            Err(e) => Err(e),
        }
    };
    let best = maximize_scalar(value, &grid, 1e-6)?;
    let tilt = CalibratedTilt::with_kl(make(best.x), kl)?;
    Ok(OptimalT {
        point: evaluate(&tilt, n, procedure)?,
        t: best.x,
        t_max,
        at_edge: best.at_edge,
        unconverged,
    })
}
