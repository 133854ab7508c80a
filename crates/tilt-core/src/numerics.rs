//! Small numerical building blocks shared by the finite-support theory.
//!
//! Best-of-n raises cumulative probabilities to powers as large as n = 10^15, and tilts
//! exponentiate rewards divided by tiny temperatures. Both go wrong in the obvious
//! formulas: `F.powf(n)` with `F = 1 − tail` loses every digit of a tail below 1e-16, and
//! `log Σ e^x` overflows. The helpers here are the few careful versions the rest of the
//! crate calls, so that each trick lives in exactly one place:
//! compensated sums (Neumaier), log-sum-exp, `(1 − t)^n` through `log1p`, and the
//! cancellation-free pieces of `e^u − 1 − u` and `u·e^u − e^u + 1` used by KL computations.

use crate::error::{Result, TiltError};

/// A running Neumaier (improved Kahan–Babuška) compensated sum.
///
/// The error of the total is about one rounding of the result, independent of the number
/// of terms, which matters when 10^7 level masses are accumulated into tails.
///
/// ```
/// use tilt_core::numerics::NeumaierSum;
/// let mut s = NeumaierSum::default();
/// for x in [1.0, 1e100, 1.0, -1e100] {
///     s.add(x);
/// }
/// assert_eq!(s.value(), 2.0);
/// ```
///
/// Infinite terms and overflow give the total plain summation would give (`+∞`, `−∞`, or
/// NaN for `∞ − ∞`), never a NaN made by the compensation (`(s − ∞) + ∞`):
///
/// ```
/// use tilt_core::numerics::NeumaierSum;
/// let mut s = NeumaierSum::default();
/// for x in [0.25, f64::INFINITY, 1.0] {
///     s.add(x);
/// }
/// assert_eq!(s.value(), f64::INFINITY);
/// let mut big = NeumaierSum::default();
/// big.add(f64::MAX);
/// big.add(f64::MAX);
/// assert_eq!(big.value(), f64::INFINITY);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NeumaierSum {
    sum: f64,
    compensation: f64,
    /// The sum of the non-finite terms and of overflowed partial sums (0 when there are
    /// none): once non-zero (or NaN) it is the total.
    special: f64,
}

impl NeumaierSum {
    /// Add one term.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if !t.is_finite() {
            // x is ±∞ or NaN, or the running sum overflowed: the total is that, and the
            // compensation (which would form ∞ − ∞) has no meaning any more.
            self.special += if x.is_finite() { t } else { x };
            return;
        }
        if self.sum.abs() >= x.abs() {
            self.compensation += (self.sum - t) + x;
        } else {
            self.compensation += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// Merge another partial sum into this one (used to combine fixed chunks in a fixed
    /// order, so that parallel reductions do not depend on the thread count).
    #[inline]
    pub fn merge(&mut self, other: NeumaierSum) {
        self.add(other.sum);
        self.compensation += other.compensation;
        self.special += other.special;
    }

    /// The compensated total.
    #[inline]
    pub fn value(&self) -> f64 {
        if self.special != 0.0 || self.special.is_nan() {
            return self.special;
        }
        self.sum + self.compensation
    }
}

/// Compensated sum of an iterator (see [`NeumaierSum`]).
pub fn neumaier_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut s = NeumaierSum::default();
    for x in xs {
        s.add(x);
    }
    s.value()
}

/// `log Σ_i e^{x_i}`, shifted by the maximum so that nothing overflows.
///
/// Terms equal to `−∞` contribute nothing; an empty or all-`−∞` input gives `−∞`.
///
/// ```text
/// LSE(x) = m + log Σ_i e^{x_i − m},  m = max_i x_i
/// ```
///
/// ```
/// use tilt_core::numerics::log_sum_exp;
/// assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-12);
/// assert_eq!(log_sum_exp(&[f64::NEG_INFINITY]), f64::NEG_INFINITY);
/// ```
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY || m.is_nan() {
        return m;
    }
    if m == f64::INFINITY {
        return m;
    }
    m + neumaier_sum(xs.iter().map(|x| (x - m).exp())).ln()
}

/// `n · log(1 − t)` for a tail probability `t ∈ [0, 1]`, i.e. the logarithm of `(1 − t)^n`,
/// computed with `log1p` so that tails far below machine epsilon keep all their digits.
///
/// ```text
/// log (1 − t)^n = n · log1p(−t)
/// ```
///
/// ```
/// use tilt_core::numerics::ln_pow_one_minus;
/// // (1 − 1e-20)^(1e15) = e^{−1e-5}: invisible to (1.0 - 1e-20).powf(1e15) == 1.
/// let v = ln_pow_one_minus(1e-20, 1e15);
/// assert!((v + 1e-5).abs() < 1e-20);
/// ```
#[inline]
pub fn ln_pow_one_minus(t: f64, n: f64) -> f64 {
    if t >= 1.0 {
        return if n == 0.0 { 0.0 } else { f64::NEG_INFINITY };
    }
    n * (-t).ln_1p()
}

/// `e^u − 1 − u` without cancellation near `u = 0` (a power series for `|u| < 0.5`).
///
/// ```
/// use tilt_core::numerics::exp_m1_minus_x;
/// // u²/2 + u³/6, where e^u − 1 − u in plain arithmetic would give 0 or noise.
/// let u = 1e-8;
/// assert!((exp_m1_minus_x(u) - (u * u / 2.0 + u * u * u / 6.0)).abs() < 1e-16 * 5e-17);
/// ```
#[inline]
pub fn exp_m1_minus_x(u: f64) -> f64 {
    if u.abs() < 0.5 {
        // Σ_{k≥2} u^k / k!
        let mut term = u * u / 2.0;
        let mut sum = term;
        let mut k = 2.0;
        while term.abs() > 1e-18 * sum.abs() && k < 40.0 {
            k += 1.0;
            term *= u / k;
            sum += term;
        }
        sum
    } else {
        u.exp_m1() - u
    }
}

/// `h(u) = u·e^u − e^u + 1 ≥ 0`, the per-outcome summand of a KL divergence written as
/// `KL(q‖p) = Σ_y p(y)·h(log(q(y)/p(y)))` (valid because `Σ q = Σ p = 1`). Every term is
/// non-negative, so the sum has no cancellation even when KL is of order 1e-20.
///
/// ```text
/// h(u) = Σ_{k≥2} (k − 1)·u^k / k!   (|u| < 0.5),   e^u·(u − 1) + 1 otherwise
/// ```
/// (`h(−∞) = 1`; `+∞` where `e^u` overflows.)
///
/// ```
/// use tilt_core::numerics::kl_summand;
/// let u = 1e-6;
/// assert!((kl_summand(u) - (u * u / 2.0 + u * u * u / 3.0)).abs() < 1e-12 * 5e-13);
/// assert_eq!(kl_summand(0.0), 0.0);
/// ```
#[inline]
pub fn kl_summand(u: f64) -> f64 {
    if u == f64::NEG_INFINITY {
        return 1.0;
    }
    if u.abs() < 0.5 {
        let mut pow_over_fact = u; // u^k / k!, k = 1
        let mut sum = 0.0;
        let mut k = 1.0;
        loop {
            k += 1.0;
            pow_over_fact *= u / k;
            let term = (k - 1.0) * pow_over_fact;
            sum += term;
            if term.abs() <= 1e-18 * sum.abs() || k > 40.0 {
                break;
            }
        }
        sum
    } else {
        // e^u·(u − 1) + 1: finite or +∞ (u > ~709), never ∞ − ∞.
        u.exp() * (u - 1.0) + 1.0
    }
}

/// A quantity that is non-negative in exact arithmetic (a KL divergence, a rate function),
/// computed as a sum that may round a hair below 0: negative values become 0, a NaN is an
/// error naming `what` (clamping it would turn a failed computation into a plausible 0), and
/// `+∞` is kept.
///
/// # Errors
/// [`TiltError::NumericalFailure`] naming `what` when `x` is NaN.
///
/// ```
/// use tilt_core::numerics::non_negative;
/// assert_eq!(non_negative(-1e-18, "KL").unwrap(), 0.0);
/// assert_eq!(non_negative(0.25, "KL").unwrap(), 0.25);
/// assert!(non_negative(f64::NAN, "KL").is_err());
/// ```
pub fn non_negative(x: f64, what: &str) -> Result<f64> {
    if x.is_nan() {
        return Err(TiltError::NumericalFailure {
            what: what.to_string(),
            detail: "the computation gave NaN".into(),
        });
    }
    Ok(if x < 0.0 { 0.0 } else { x })
}

/// `−log(a/(a + b))` for masses `a > 0`, `b ≥ 0`: the information of an event of mass `a`
/// whose complement has mass `b`, e.g. the largest KL of a tilt, `−log p(argmax set)`
/// (docs/theory.md §1), with `b` the mass below the argmax set.
///
/// ```text
/// −log(a/(a + b)) = log1p(b/a)
/// ```
/// Formed from the complement, it is `≥ 0` exactly and `0` exactly when `b = 0`, however
/// many terms `a` was summed from: `−log Σ_i p_i` over 10⁶ equal masses of 10⁻⁶ rounds a
/// hair below 0 (the sum rounds above 1), and that is not a KL. Both masses are normalised
/// by `a + b`, so a pmf that sums to 1 only within tolerance gives the same answer as the
/// normalised one. `a = 0` gives `+∞`.
///
/// ```
/// use tilt_core::numerics::neg_log_share;
/// assert_eq!(neg_log_share(1.0000000000079, 0.0), 0.0);
/// assert!((neg_log_share(0.25, 0.75) - 4f64.ln()).abs() < 1e-15);
/// assert_eq!(neg_log_share(0.0, 1.0), f64::INFINITY);
/// ```
pub fn neg_log_share(a: f64, b: f64) -> f64 {
    if a <= 0.0 {
        return f64::INFINITY;
    }
    (b / a).ln_1p()
}

/// A number as an error message shows it: as Rust prints it for moderate magnitudes
/// (`0.25`, `200`), in scientific notation otherwise (`1e-12`, `1e300`, never 301 digits).
///
/// ```
/// use tilt_core::numerics::Shown;
/// assert_eq!(Shown(0.25).to_string(), "0.25");
/// assert_eq!(Shown(1e300).to_string(), "1e300");
/// assert_eq!(Shown(1e-12).to_string(), "1e-12");
/// assert_eq!(Shown(f64::INFINITY).to_string(), "inf");
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shown(pub f64);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.0;
        if !x.is_finite() || x == 0.0 || (1e-5..1e16).contains(&x.abs()) {
            write!(f, "{x}")
        } else {
            write!(f, "{x:e}")
        }
    }
}

/// `ln k!` for `k = 0..=n`, by cumulative sums of logarithms (exact enough for the small
/// `n` of exhaustive enumerations).
pub fn ln_factorials(n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = NeumaierSum::default();
    out.push(0.0);
    for k in 1..=n {
        acc.add((k as f64).ln());
        out.push(acc.value());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_direct_formulas_away_from_zero() {
        for u in [-0.49f64, -0.3, -0.01, 0.01, 0.3, 0.49] {
            let direct = u.exp_m1() - u;
            assert!((exp_m1_minus_x(u) - direct).abs() < 1e-15 * direct.abs().max(1e-3));
            let direct_h = u * u.exp() - u.exp_m1();
            assert!((kl_summand(u) - direct_h).abs() < 1e-14 * direct_h.abs().max(1e-3));
        }
    }

    #[test]
    fn ln_factorials_small() {
        let f = ln_factorials(5);
        assert!((f[5] - 120f64.ln()).abs() < 1e-14);
        assert_eq!(f[0], 0.0);
    }
}
