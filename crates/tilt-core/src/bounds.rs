//! Bounds on what an aligned policy can gain: sub-Gaussian improvement bounds
//! (arXiv 2406.05883) and the closed-form f-divergence bounds of best-of-n
//! (arXiv 2401.01879 Thm 3.1; 2406.05883 via exponential order statistics).
//!
//! The improvement bound `E_π r − E_p r ≤ √(2σ²·KL(π‖p))` holds for every π once the
//! centred reward is σ²-sub-Gaussian under p. On a finite distribution every reward is
//! bounded, so a proxy always exists; the question is which. Hoeffding's `(b − a)²/4` is the
//! textbook one and is often far from tight. The smallest valid proxy is
//!
//! ```text
//! σ²_opt = sup_{λ ≠ 0} 2·(Λ(λ) − λ·E_p r)/λ²,   Λ(λ) = log E_p e^{λ r}
//! ```
//! (its limit at λ → 0 is the variance, so σ²_opt ≥ Var_p r). [`optimal_sub_gaussian_proxy`]
//! computes it numerically: a log-spaced grid of λ on both sides of 0, scaled by the reward
//! range, then golden-section refinement around the best grid point. The centred CGF is
//! evaluated as `log1p(Σ p·(e^{λx} − 1 − λx) + λ·Σ p·x)` where `|λx| ≤ 1`, so that small λ
//! keeps its digits, and as a log-sum-exp beyond, so that no grid point overflows (a tiny
//! top mass q puts the supremum at `λ·range ≈ 2·log(1/q)`, e.g. 921 for q = 1e-200).
//! For samples, this is the plug-in value of their empirical distribution (an estimate, not
//! a guarantee for the population).

use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::levels::Levels;
use crate::numerics::{exp_m1_minus_x, log_sum_exp, neumaier_sum, NeumaierSum, Shown};
use serde::Serialize;

/// Check that a best-of-n sample count is at least 1.
pub(crate) fn check_n(n: u64) -> Result<f64> {
    if n == 0 {
        return Err(TiltError::invalid("n", "must be at least 1 (got 0)"));
    }
    Ok(n as f64)
}

/// The "analytical formula" for the KL of best-of-n, an upper bound on its exact KL for
/// every reference and reward (arXiv 2401.01879 Thm 3.1), with equality for continuous
/// rewards. Nats.
///
/// ```text
/// KL(π_n‖p) ≤ log n − (n − 1)/n
/// ```
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0`.
///
/// ```
/// use tilt_core::bounds::bon_kl_bound;
/// assert!((bon_kl_bound(4).unwrap() - 0.6362943611198906).abs() < 1e-15);
/// ```
pub fn bon_kl_bound(n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    Ok(nf.ln() - (nf - 1.0) / nf)
}

/// Upper bound on the win rate of best-of-n over the reference, ties counting ½
/// (arXiv 2401.01879 Thm 5.3); equality for continuous rewards.
///
/// ```text
/// W(π_n ≻ p) ≤ n/(n + 1)
/// ```
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0`.
pub fn bon_win_rate_bound(n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    Ok(nf / (nf + 1.0))
}

/// χ²(π_n‖p) ≤ (n − 1)²/(2n − 1): the f-divergence bound `∫₀¹ f(n·v^{n−1}) dv` with
/// `f(t) = (t − 1)²` (arXiv 2406.05883; derivation in docs/theory.md §4).
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0`.
pub fn bon_chi2_bound(n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    Ok((nf - 1.0) * (nf - 1.0) / (2.0 * nf - 1.0))
}

/// TV(π_n, p) ≤ n^{−1/(n−1)}·(1 − 1/n) (0 for n = 1): `∫₀¹ ½|n·v^{n−1} − 1| dv`
/// (arXiv 2406.05883; docs/theory.md §4).
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0`.
pub fn bon_tv_bound(n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    if n == 1 {
        return Ok(0.0);
    }
    Ok((-nf.ln() / (nf - 1.0)).exp() * (1.0 - 1.0 / nf))
}

/// Rényi divergence bound of order α for best-of-n (arXiv 2406.05883; docs/theory.md §4):
///
/// ```text
/// D_α(π_n‖p) ≤ log(n^α / (α(n − 1) + 1)) / (α − 1),   D_1 = log n − (n−1)/n,   D_∞ = log n
/// ```
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0` or α is not in (0, ∞].
pub fn bon_renyi_bound(n: u64, alpha: f64) -> Result<f64> {
    let nf = check_n(n)?;
    if alpha.is_nan() || alpha <= 0.0 {
        return Err(TiltError::invalid(
            "alpha",
            format!("{alpha}: the Rényi order must be > 0", alpha = Shown(alpha)),
        ));
    }
    if alpha == f64::INFINITY {
        return Ok(nf.ln());
    }
    if alpha == 1.0 {
        return bon_kl_bound(n);
    }
    Ok((alpha * nf.ln() - (alpha * (nf - 1.0)).ln_1p()) / (alpha - 1.0))
}

/// Squared Hellinger bound for best-of-n, with the convention `H² = ½Σ(√q − √p)² = 1 − Σ√(qp)`
/// (see [`crate::divergence::hellinger_squared`]): `1 − 2√n/(n + 1)`, from the
/// Bhattacharyya coefficient `∫₀¹ √(n·v^{n−1}) dv = 2√n/(n+1)` (docs/theory.md §4).
///
/// # Errors
/// [`TiltError::InvalidInput`] when `n = 0`.
pub fn bon_hellinger_squared_bound(n: u64) -> Result<f64> {
    let nf = check_n(n)?;
    // 1 − 2√n/(n+1) = (√n − 1)²/(n + 1), free of cancellation.
    let s = nf.sqrt() - 1.0;
    Ok(s * s / (nf + 1.0))
}

/// The sub-Gaussian improvement bound of arXiv 2406.05883 (§ "sub-Gaussian tails"):
///
/// ```text
/// E_π r − E_p r ≤ √(2σ²·KL(π‖p))
/// ```
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `sigma2` or `kl` if negative or not finite.
pub fn sub_gaussian_improvement_bound(sigma2: f64, kl: f64) -> Result<f64> {
    if !sigma2.is_finite() || sigma2 < 0.0 {
        return Err(TiltError::invalid(
            "sigma2",
            format!("{sigma2}: must be finite and ≥ 0", sigma2 = Shown(sigma2)),
        ));
    }
    if kl.is_nan() || kl < 0.0 {
        return Err(TiltError::invalid(
            "kl",
            format!("{kl}: must be ≥ 0", kl = Shown(kl)),
        ));
    }
    Ok((2.0 * sigma2 * kl).sqrt())
}

/// Sub-Gaussian variance proxies of the reward under a finite reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SubGaussianProxy {
    /// The one-sided (upper-tail) proxy `sup_{λ>0} 2(Λ(λ) − λE r)/λ²`: the smallest σ²
    /// with `Λ(λ) − λE r ≤ λ²σ²/2` for every λ > 0, which is all the improvement bound
    /// `E_π r − E_p r ≤ √(2σ²·KL)` needs (its Donsker–Varadhan proof takes λ > 0 only;
    /// arXiv 2406.05883). At most [`optimal`](Self::optimal), and smaller for a reward
    /// whose upper tail is lighter than its lower one.
    pub upper: f64,
    /// The λ > 0 at which `upper` is reached (0 when it is the variance limit).
    pub upper_lambda: f64,
    /// The optimal (smallest valid) two-sided proxy `sup_{λ≠0} 2(Λ(λ) − λE r)/λ²`.
    pub optimal: f64,
    /// The λ at which the supremum is reached (0 when it is the variance limit).
    pub optimal_lambda: f64,
    /// Hoeffding's proxy `(max r − min r)²/4` over the support.
    pub hoeffding: f64,
    /// `Var_p(r)`, the λ → 0 limit and a lower bound of every valid proxy.
    pub variance: f64,
}

/// The optimal sub-Gaussian variance proxies of `r − E_p r` under p, one-sided (the one the
/// bound of arXiv 2406.05883 needs) and two-sided, with Hoeffding's proxy and the variance
/// for comparison.
///
/// ```text
/// σ²₊   = sup_{λ>0} 2·(Λ(λ) − λ·E_p r)/λ²,  Λ(λ) = log E_p e^{λ r}
/// σ²_opt = sup_{λ≠0} 2·(Λ(λ) − λ·E_p r)/λ²  ≥ σ²₊ ≥ Var_p(r)
/// ```
/// For a Bernoulli(q) reward σ²_opt is `(1 − 2q)/(2·log((1 − q)/q))` (Kearns–Saul), ¼ at
/// q = ½, reached at λ > 0 when q < ½ (so σ²₊ = σ²_opt there); for q > ½ the upper tail is
/// the light one and σ²₊ is the variance q(1 − q).
///
/// # Errors
/// [`TiltError::NoConvergence`] never in practice; the search is a fixed grid plus a
/// bounded refinement.
///
/// ```
/// use tilt_core::{bounds::optimal_sub_gaussian_proxy, RewardDistribution};
/// let d = RewardDistribution::new(vec![0.9, 0.1], vec![0.0, 1.0]).unwrap();
/// let s = optimal_sub_gaussian_proxy(&d).unwrap();
/// let kearns_saul = (1.0 - 0.2) / (2.0 * 9f64.ln());
/// assert!((s.optimal - kearns_saul).abs() < 1e-9);
/// assert!(s.variance <= s.optimal && s.optimal <= s.hoeffding);
/// ```
pub fn optimal_sub_gaussian_proxy(dist: &RewardDistribution) -> Result<SubGaussianProxy> {
    let levels = Levels::new(dist)?;
    let (rw, ms) = (levels.rewards(), levels.masses());
    let support: Vec<(f64, f64)> = rw
        .iter()
        .zip(ms)
        .filter(|(_, &m)| m > 0.0)
        .map(|(&r, &m)| (r, m))
        .collect();
    let lo = support.first().map_or(0.0, |s| s.0);
    let hi = support.last().map_or(0.0, |s| s.0);
    let range = hi - lo;
    let hoeffding = range * range / 4.0;
    if support.len() < 2 || range == 0.0 {
        return Ok(SubGaussianProxy {
            upper: 0.0,
            upper_lambda: 0.0,
            optimal: 0.0,
            optimal_lambda: 0.0,
            hoeffding,
            variance: 0.0,
        });
    }
    // Centre and scale the rewards to [−1, 1]-ish: x = (r − μ)/range.
    let mu = neumaier_sum(support.iter().map(|(r, m)| r * m));
    let xs: Vec<(f64, f64)> = support
        .iter()
        .map(|&(r, m)| ((r - mu) / range, m))
        .collect();
    let mean_x = neumaier_sum(xs.iter().map(|(x, m)| x * m));
    let variance_x = neumaier_sum(xs.iter().map(|(x, m)| m * (x - mean_x) * (x - mean_x)));
    // g(t) = 2·Λ_c(t)/t² in scaled units (σ² = range²·g), with the centred CGF
    // Λ_c(t) = log Σ m·e^{tx} − t·mean_x. For |t|·max|x| ≤ 1 as log1p of the cancellation-free
    // Σ m·(e^{tx} − 1 − tx) + t·mean_x (small t keeps its digits); beyond, as a
    // log-sum-exp, which cannot overflow: e^{tx} alone overflows for tx > 709, and a top
    // mass q far in the tail puts the supremum near t = 2·log((1 − q)/q) (921 at q = 1e-200).
    let max_abs_x = xs.iter().map(|(x, _)| x.abs()).fold(0.0, f64::max);
    let log_masses: Vec<f64> = xs.iter().map(|(_, m)| m.ln()).collect();
    let g = |t: f64| -> f64 {
        let centred_cgf = if (t * max_abs_x).abs() <= 1.0 {
            let mut s = NeumaierSum::default();
            for &(x, m) in &xs {
                s.add(m * exp_m1_minus_x(t * x));
            }
            s.add(t * mean_x);
            s.value().ln_1p()
        } else {
            let terms: Vec<f64> = xs
                .iter()
                .zip(&log_masses)
                .map(|(&(x, _), lm)| lm + t * x)
                .collect();
            log_sum_exp(&terms) - t * mean_x
        };
        2.0 * centred_cgf / (t * t)
    };
    // The supremum over t of sign `sign` (the t → 0 limit is the variance): a log-spaced
    // grid, then a golden-section refinement around its best point.
    let steps = 400;
    let sup = |sign: f64| -> (f64, f64) {
        let mut best = (variance_x, 0.0);
        for i in 0..=steps {
            let t = sign * 10f64.powf(-3.0 + 7.0 * i as f64 / steps as f64);
            let v = g(t);
            if v.is_finite() && v > best.0 {
                best = (v, t);
            }
        }
        refine(&g, best, steps)
    };
    let (upper, below) = (sup(1.0), sup(-1.0));
    let best = if below.0 > upper.0 { below } else { upper };
    Ok(SubGaussianProxy {
        upper: upper.0 * range * range,
        upper_lambda: upper.1 / range,
        optimal: best.0 * range * range,
        optimal_lambda: best.1 / range,
        hoeffding,
        variance: variance_x * range * range,
    })
}

/// Golden-section search of `g` on log|t| within one grid step either side of the grid's
/// best point `best = (g(t), t)`; the better of the two.
fn refine(g: &dyn Fn(f64) -> f64, mut best: (f64, f64), steps: usize) -> (f64, f64) {
    if best.1 != 0.0 {
        // Golden-section search on log|t| within one grid step either side.
        let sign = best.1.signum();
        let step = 7.0 / steps as f64 * std::f64::consts::LN_10;
        let (mut a, mut b) = (best.1.abs().ln() - step, best.1.abs().ln() + step);
        let phi = 0.5 * (5f64.sqrt() - 1.0);
        let h = |s: f64| g(sign * s.exp());
        let (mut c, mut d) = (b - phi * (b - a), a + phi * (b - a));
        let (mut hc, mut hd) = (h(c), h(d));
        for _ in 0..200 {
            if (b - a).abs() < 1e-12 {
                break;
            }
            if hc > hd {
                b = d;
                d = c;
                hd = hc;
                c = b - phi * (b - a);
                hc = h(c);
            } else {
                a = c;
                c = d;
                hc = hd;
                d = a + phi * (b - a);
                hd = h(d);
            }
        }
        let t = sign * (0.5 * (a + b)).exp();
        let v = g(t);
        if v.is_finite() && v > best.0 {
            best = (v, t);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::approx_constant)] // the table's values, as printed in docs/theory.md §4
    fn the_table_of_theory_section_4() {
        // docs/theory.md §4, the table of best-of-n bounds (closed forms, 7 digits).
        let rows = [
            (2, 0.1931472, 0.3333333, 0.2500000, 0.2876821, 0.6931472),
            (4, 0.6362944, 1.2857143, 0.4724704, 0.8266786, 1.3862944),
            (8, 1.2044415, 3.2666667, 0.6501225, 1.4508329, 2.0794415),
            (32, 2.4969859, 15.2539683, 0.8662804, 2.7883371, 3.4657359),
        ];
        for (n, kl, chi2, tv, d2, dinf) in rows {
            assert!((bon_kl_bound(n).unwrap() - kl).abs() < 5e-8);
            assert!((bon_chi2_bound(n).unwrap() - chi2).abs() < 5e-8);
            assert!((bon_tv_bound(n).unwrap() - tv).abs() < 5e-8);
            assert!((bon_renyi_bound(n, 2.0).unwrap() - d2).abs() < 5e-8);
            assert!((bon_renyi_bound(n, f64::INFINITY).unwrap() - dinf).abs() < 5e-8);
        }
        assert!(bon_kl_bound(0).is_err());
    }
}
