//! Divergences between two pmfs on one finite support, in nats.
//!
//! Conventions (docs/theory.md §4):
//!
//! ```text
//! KL(q‖p)   = Σ q·log(q/p)                          (+∞ if q > 0 where p = 0)
//! D_α(q‖p)  = log(Σ q^α p^{1−α})/(α − 1),  α ∈ (0,1)∪(1,∞);  D_1 = KL;  D_∞ = log max q/p
//! TV(q, p)  = ½·Σ|q − p|
//! χ²(q‖p)   = Σ (q − p)²/p                          (+∞ if q > 0 where p = 0)
//! H²(q, p)  = ½·Σ(√q − √p)² = 1 − Σ√(qp)  ∈ [0, 1]
//! ```
//! The Hellinger convention is the one with the ½ (so H² ≤ 1), and it is summed as squares,
//! not as `1 − BC`, to avoid cancellation for close pmfs. Rényi divergences are computed
//! with a log-sum-exp over `α·log q + (1−α)·log p`, so large α does not overflow. The
//! supports are checked: a divergence that is infinite is returned as `f64::INFINITY`;
//! one that is finite but beyond the largest double (χ² over a subnormal p) is an error
//! that gives its logarithm. No function here returns NaN: every sum is compensated and
//! keeps infinities as such ([`NeumaierSum`](crate::numerics::NeumaierSum)).

use crate::error::{Result, TiltError};
use crate::numerics::{kl_summand, log_sum_exp, neumaier_sum, non_negative, Shown};
use serde::Serialize;

fn check(q: &[f64], p: &[f64]) -> Result<()> {
    for (name, v) in [("q", q), ("p", p)] {
        if v.is_empty() {
            return Err(TiltError::invalid(name, "empty list"));
        }
        if let Some((i, x)) = v
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite() || **x < 0.0)
        {
            return Err(TiltError::invalid(
                name,
                format!(
                    "entry {} is {x}; probabilities must be finite and ≥ 0",
                    i + 1,
                    x = Shown(*x)
                ),
            ));
        }
    }
    if q.len() != p.len() {
        return Err(TiltError::invalid(
            "p/q",
            format!("unequal lengths: q has {}, p has {}", q.len(), p.len()),
        ));
    }
    Ok(())
}

/// KL(q‖p) in nats (Kullback & Leibler 1951; docs/theory.md §4); +∞ when q puts mass
/// where p has none.
///
/// Summed as `Σ_{p>0} p·h(log(q/p)) + Σ_{p>0,q=0} p` with `h(u) = u·e^u − e^u + 1` (equal to
/// `Σ q log(q/p)` when both sum to 1), term by term non-negative.
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `q`, `p` or both when empty, of unequal length, or
/// holding a negative or non-finite entry.
///
/// ```
/// use tilt_core::divergence::kl;
/// let v = kl(&[0.25, 0.75], &[0.5, 0.5]).unwrap();
/// assert!((v - (0.25f64 * 0.5f64.ln() + 0.75 * 1.5f64.ln())).abs() < 1e-15);
/// assert_eq!(kl(&[0.5, 0.5], &[1.0, 0.0]).unwrap(), f64::INFINITY);
/// ```
pub fn kl(q: &[f64], p: &[f64]) -> Result<f64> {
    check(q, p)?;
    if q.iter().zip(p).any(|(&a, &b)| a > 0.0 && b == 0.0) {
        return Ok(f64::INFINITY);
    }
    let v = neumaier_sum(q.iter().zip(p).filter(|(_, &b)| b > 0.0).map(|(&a, &b)| {
        if a == 0.0 {
            return b;
        }
        let u = a.ln() - b.ln();
        if u.abs() < 0.5 {
            b * kl_summand(u)
        } else {
            a * (u - 1.0) + b
        }
    }));
    non_negative(v, "KL")
}

/// Rényi divergence `D_α(q‖p)` in nats for α ∈ (0, ∞]: α = 1 is KL, α = ∞ is
/// `log max_{q>0} q/p` (van Erven & Harremoës 2014, arXiv 1206.2459; docs/theory.md §4).
///
/// # Errors
/// As [`kl`], and [`TiltError::InvalidInput`] naming `alpha` when not in (0, ∞].
///
/// ```
/// use tilt_core::divergence::renyi;
/// let q = [0.25, 0.75];
/// let p = [0.5, 0.5];
/// let d2 = renyi(&q, &p, 2.0).unwrap();
/// assert!((d2 - (0.0625f64 / 0.5 + 0.5625 / 0.5).ln()).abs() < 1e-15);
/// assert!((renyi(&q, &p, f64::INFINITY).unwrap() - 1.5f64.ln()).abs() < 1e-15);
/// ```
pub fn renyi(q: &[f64], p: &[f64], alpha: f64) -> Result<f64> {
    check(q, p)?;
    if alpha.is_nan() || alpha <= 0.0 {
        return Err(TiltError::invalid(
            "alpha",
            format!("{alpha}: the Rényi order must be > 0", alpha = Shown(alpha)),
        ));
    }
    if alpha == 1.0 {
        return kl(q, p);
    }
    let unsupported = q.iter().zip(p).any(|(&a, &b)| a > 0.0 && b == 0.0);
    if alpha == f64::INFINITY {
        if unsupported {
            return Ok(f64::INFINITY);
        }
        let m = q
            .iter()
            .zip(p)
            .filter(|(&a, _)| a > 0.0)
            .map(|(&a, &b)| a.ln() - b.ln())
            .fold(f64::NEG_INFINITY, f64::max);
        return Ok(m.max(0.0));
    }
    if alpha > 1.0 && unsupported {
        return Ok(f64::INFINITY);
    }
    // Σ q^α p^{1−α} = Σ p·e^{α d} over the common support, d = log(q/p). Shifted by the
    // largest d, m: every exponent α(d − m) is ≤ 0, so nothing overflows for any α (a plain
    // α·log q + (1 − α)·log p is ∞ − ∞ for α = 1e308), and
    // D_α = (α m + L)/(α − 1) = m + (m + L)/(α − 1),  L = log Σ p·e^{α(d − m)}.
    let common = || {
        q.iter()
            .zip(p)
            .filter(|(&a, &b)| a > 0.0 && b > 0.0)
            .map(|(&a, &b)| (a.ln() - b.ln(), b.ln()))
    };
    let m = common().map(|(d, _)| d).fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        // Disjoint supports with α < 1.
        return Ok(f64::INFINITY);
    }
    let terms: Vec<f64> = common().map(|(d, lp)| lp + alpha * (d - m)).collect();
    let l = log_sum_exp(&terms);
    non_negative(m + (m + l) / (alpha - 1.0), "Rényi divergence")
}

/// Total variation `½·Σ|q − p|`, the f-divergence with `f(t) = ½|t − 1|` (Csiszár 1967;
/// docs/theory.md §4, where arXiv 2406.05883's best-of-n bound for it is worked out).
///
/// # Errors
/// As [`kl`].
pub fn total_variation(q: &[f64], p: &[f64]) -> Result<f64> {
    check(q, p)?;
    Ok(0.5 * neumaier_sum(q.iter().zip(p).map(|(a, b)| (a - b).abs())))
}

/// Pearson χ²(q‖p) = `Σ (q − p)²/p` (Pearson 1900), the f-divergence with `f(t) = (t − 1)²`
/// (docs/theory.md §4, arXiv 2406.05883); +∞ when q puts mass where p has none.
///
/// Each term is formed as `d·(d/p)`, `d = q − p`, which is exact to a few roundings; where
/// a term overflows (p subnormal, e.g. `p = 1e-310` under `q = ½`), the true χ² is a
/// finite number beyond the largest double, and that is an error giving its logarithm
/// `log χ² = LSE(2·log|d| − log p)` and `D_2(q‖p) = log(1 + χ²)`, never `∞` or NaN.
///
/// # Errors
/// As [`kl`]; [`TiltError::InvalidInput`] naming `q/p` when χ² is beyond the largest
/// double.
///
/// ```
/// use tilt_core::divergence::chi_squared;
/// assert!((chi_squared(&[0.25, 0.75], &[0.5, 0.5]).unwrap() - 0.25).abs() < 1e-16);
/// assert_eq!(chi_squared(&[0.5, 0.5], &[1.0, 0.0]).unwrap(), f64::INFINITY);
/// let e = chi_squared(&[0.5, 0.5], &[1e-310, 1.0]).unwrap_err().to_string();
/// // log χ² = log(0.25/1e-310) + log1p(…) = 712.415084 (the ½ − 1 term adds e^{−713}).
/// assert!(e.starts_with("q/p: χ²(q‖p) = e^712.415084 ") && e.contains("D_2"), "{e}");
/// ```
pub fn chi_squared(q: &[f64], p: &[f64]) -> Result<f64> {
    check(q, p)?;
    if q.iter().zip(p).any(|(&a, &b)| a > 0.0 && b == 0.0) {
        return Ok(f64::INFINITY);
    }
    let terms = || {
        q.iter()
            .zip(p)
            .filter(|(&a, &b)| b > 0.0 && a != b)
            .map(|(&a, &b)| (a - b, b))
    };
    let direct = neumaier_sum(terms().map(|(d, b)| d * (d / b)));
    if direct.is_finite() {
        return Ok(direct);
    }
    let logs: Vec<f64> = terms().map(|(d, b)| 2.0 * d.abs().ln() - b.ln()).collect();
    let log_chi2 = log_sum_exp(&logs);
    let d2 = log_chi2 + (-log_chi2).exp().ln_1p();
    Err(TiltError::invalid(
        "q/p",
        format!(
            "χ²(q‖p) = e^{log_chi2:.6} is beyond the largest double (1.8e308; p has entries \
             far smaller than q's); D_2(q‖p) = log(1 + χ²) = {d2:.6} nats"
        ),
    ))
}

/// Squared Hellinger distance with the ½ convention: `H² = ½·Σ(√q − √p)² = 1 − Σ√(qp)`,
/// in [0, 1] (Hellinger 1909; `1 − BC` with BC the Bhattacharyya coefficient, as in
/// docs/theory.md §4's best-of-n bound `BC = 2√n/(n + 1)`).
///
/// # Errors
/// As [`kl`].
///
/// ```
/// use tilt_core::divergence::hellinger_squared;
/// assert!((hellinger_squared(&[1.0, 0.0], &[0.0, 1.0]).unwrap() - 1.0).abs() < 1e-15);
/// ```
pub fn hellinger_squared(q: &[f64], p: &[f64]) -> Result<f64> {
    check(q, p)?;
    Ok(0.5
        * neumaier_sum(q.iter().zip(p).map(|(a, b)| {
            let d = a.sqrt() - b.sqrt();
            d * d
        })))
}

/// All divergences of `tilt theory divergence` at once. Serialised, a non-finite value is
/// `null`; the fields that can be `+∞` say so.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Divergences {
    /// KL(q‖p), nats; `+∞` (null) when q puts mass where p has none.
    pub kl_q_p: f64,
    /// KL(p‖q), nats; `+∞` (null) when p puts mass where q has none.
    pub kl_p_q: f64,
    /// The Rényi order used; `+∞` (null) for D_∞.
    pub alpha: f64,
    /// D_α(q‖p), nats; `+∞` (null) when the supports make it infinite.
    pub renyi_q_p: f64,
    /// Total variation, in [0, 1].
    pub total_variation: f64,
    /// χ²(q‖p); `+∞` (null) when q puts mass where p has none.
    pub chi_squared_q_p: f64,
    /// H² = ½Σ(√q − √p)², in [0, 1].
    pub hellinger_squared: f64,
}

/// Every divergence between `q` and `p` (see the module doc for conventions).
///
/// # Errors
/// As [`renyi`].
pub fn divergences(q: &[f64], p: &[f64], alpha: f64) -> Result<Divergences> {
    Ok(Divergences {
        kl_q_p: kl(q, p)?,
        kl_p_q: kl(p, q)?,
        alpha,
        renyi_q_p: renyi(q, p, alpha)?,
        total_variation: total_variation(q, p)?,
        chi_squared_q_p: chi_squared(q, p)?,
        hellinger_squared: hellinger_squared(q, p)?,
    })
}

/// Check a pmf given as `name` (e.g. `q`) for [`divergences`]: every entry finite and
/// ≥ 0, and the sum 1 within [`PROB_SUM_TOLERANCE`](crate::distribution::PROB_SUM_TOLERANCE)
/// — or, with `normalize`, rescaled to sum to 1 (the sum must be positive).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `name`: the first bad entry (1-based), or the sum.
pub fn checked_pmf(name: &str, mut v: Vec<f64>, normalize: bool) -> Result<Vec<f64>> {
    use crate::distribution::PROB_SUM_TOLERANCE;
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || **x < 0.0)
    {
        return Err(TiltError::invalid(
            name,
            format!(
                "entry {} is {x}; probabilities must be finite and ≥ 0",
                i + 1
            ),
        ));
    }
    let sum: f64 = v.iter().sum();
    if normalize {
        if sum.is_nan() || sum <= 0.0 {
            return Err(TiltError::invalid(
                name,
                format!("sum to {sum}; cannot normalise"),
            ));
        }
        v.iter_mut().for_each(|x| *x /= sum);
    } else if (sum - 1.0).abs() > PROB_SUM_TOLERANCE {
        return Err(TiltError::invalid(
            name,
            format!(
                "sum to {sum} (must be 1 within {PROB_SUM_TOLERANCE}; use normalisation to rescale)"
            ),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod pmf_tests {
    use super::checked_pmf;

    #[test]
    fn pmfs_are_checked_or_normalised_naming_the_input() {
        assert_eq!(
            checked_pmf("q", vec![0.25, 0.75], false),
            Ok(vec![0.25, 0.75])
        );
        assert_eq!(checked_pmf("q", vec![1.0, 3.0], true), Ok(vec![0.25, 0.75]));
        let e = checked_pmf("p", vec![0.5, -0.5], false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p: entry 2 is -0.5; probabilities must be finite and ≥ 0"
        );
        let e = checked_pmf("q", vec![0.5, 0.25], false).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("q: sum to 0.75 (must be 1 within"));
        let e = checked_pmf("q", vec![0.0, 0.0], true).unwrap_err();
        assert_eq!(e.to_string(), "q: sum to 0; cannot normalise");
    }
}
