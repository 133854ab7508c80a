//! Lattice rewards and the exact law of a sum of `L` i.i.d. lattice variables, accurate in
//! relative terms far out in the upper tail.
//!
//! # Why a tilted convolution
//! Best-of-N over sequences of length `L` with `N = e^{LΔ}` (arXiv 2404.01730, §3 of
//! docs/theory.md §12) lives where the reference law of `S_L = Σ r(y_i)` has tail probability
//! about `e^{−LΔ}`: for `L = 1000`, `Δ = 0.5` that is `e^{−500}`, far below what a plain
//! convolution resolves (an FFT's absolute error is ~1e-16 of the peak; even a direct
//! convolution underflows past 1e-308). So the law is computed under the exponentially
//! tilted token law `q_μ(k) ∝ q(k)·e^{μ h k}` whose mean sits near the region of interest,
//! where every probability of interest is within a few orders of magnitude of the peak,
//! and mapped back exactly (Esscher transform):
//!
//! ```text
//! log P_q(S = j) = log P_{q_μ}(S = j) − μ h j + L·log Σ_k q(k) e^{μ h k}
//! ```
//!
//! # Methods and their error
//! - [`ConvolutionMethod::Direct`]: binary powering with direct convolutions of
//!   non-negative numbers. Every entry keeps a relative error of about `(log₂ L)·(K+1)·L·ε`
//!   (no cancellation) until it underflows (entries below 1e-290 of the total are dropped).
//!   Cost `O((LK)²)`.
//! - [`ConvolutionMethod::Fft`]: one FFT of the tilted token pmf, pointwise `L`-th power
//!   in polar form, one inverse FFT. The absolute error is about `L·ε` times the peak of
//!   the tilted law; entries below `100·L·ε·peak` are set to zero (treated as lost). Cost
//!   `O(LK log(LK))`. Chosen automatically when the direct cost would exceed
//!   [`DIRECT_COST_LIMIT`].
//!
//! In both cases the lost entries are in the far tails of the tilted law, where best-of-N
//! puts (provably, and checked at run time: see `crate::memoryless`) negligible mass.
//!
//! # Non-grid rewards
//! Rewards must lie on a grid `a + h·k` with integer `k`. [`LatticeRewards::new`] detects
//! the grid when none is given (exact grids such as integers or multiples of 0.1, up to
//! 1e-9 relative rounding), and rejects rewards that are not on any grid of at most
//! [`MAX_GRID_INDEX`] steps, or that differ only within that rounding, with an error
//! asking for an explicit step `h`; with a step, each reward is snapped to the nearest
//! grid point, which moves every per-token reward by at most `h/2`. Either way the exact
//! maximum movement is reported as [`LatticeRewards::snap_error`]; it bounds how much
//! every `S_L / L` moves. Everything downstream is computed for the snapped rewards
//! (exactly, for the KL and rate-function quantities of the snapped model).

use crate::error::{Result, TiltError};
use crate::numerics::Shown;
use rustfft::{num_complex::Complex, FftPlanner};

/// Largest grid index `K = (max r − min r)/h` accepted per token.
pub const MAX_GRID_INDEX: usize = 100_000;
/// Largest support `L·K + 1` of the sum that will be computed.
pub const MAX_SUM_POINTS: usize = 1 << 23;
/// Above this estimated number of multiply-adds the FFT is used instead of direct
/// convolution.
pub const DIRECT_COST_LIMIT: f64 = 6e7;

/// Per-token rewards on a lattice `origin + step·k`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatticeRewards {
    origin: f64,
    step: f64,
    indices: Vec<usize>,
    snap_error: f64,
}

impl LatticeRewards {
    /// Put `rewards` on a lattice. `origin` is their minimum over `support` (the outcomes
    /// with positive probability); `step` is `grid` when given (rewards are snapped to the
    /// nearest grid point), else the detected common step of all differences.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `grid` when it is not finite and positive, or
    /// naming `rewards` when no grid is given and none with at most [`MAX_GRID_INDEX`]
    /// steps fits them, or when the grid needs more than [`MAX_GRID_INDEX`] steps.
    pub fn new(rewards: &[f64], support: &[bool], grid: Option<f64>) -> Result<Self> {
        if rewards.is_empty() || rewards.len() != support.len() || !support.iter().any(|s| *s) {
            return Err(TiltError::invalid(
                "rewards",
                "need at least one outcome with positive probability",
            ));
        }
        let origin = rewards
            .iter()
            .zip(support)
            .filter(|(_, s)| **s)
            .map(|(r, _)| *r)
            .fold(f64::INFINITY, f64::min);
        let top = rewards
            .iter()
            .zip(support)
            .filter(|(_, s)| **s)
            .map(|(r, _)| *r)
            .fold(f64::NEG_INFINITY, f64::max);
        let range = top - origin;
        if !range.is_finite() {
            return Err(TiltError::invalid(
                "rewards",
                format!(
                    "range from {origin:e} to {top:e} overflows (max − min is not a finite number); \
                     rescale the rewards"
                ),
            ));
        }
        let step = match grid {
            Some(h) => {
                if !(h.is_finite() && h > 0.0) {
                    return Err(TiltError::invalid(
                        "grid",
                        format!("step {h} must be a finite positive number", h = Shown(h)),
                    ));
                }
                h
            }
            None if range == 0.0 => 1.0,
            None => detect_step(rewards, support, origin, range)?,
        };
        if range / step > MAX_GRID_INDEX as f64 {
            return Err(TiltError::invalid(
                "grid",
                format!(
                    "step {step} gives {:.0} grid points per token (at most {MAX_GRID_INDEX}); use a coarser step",
                    range / step
                ),
            ));
        }
        let mut snap_error: f64 = 0.0;
        let indices = rewards
            .iter()
            .zip(support)
            .map(|(r, s)| {
                if !*s {
                    return 0;
                }
                let k = ((r - origin) / step).round();
                snap_error = snap_error.max((origin + k * step - r).abs());
                k as usize
            })
            .collect();
        Ok(Self {
            origin,
            step,
            indices,
            snap_error,
        })
    }

    /// The grid origin (the smallest reward with positive probability).
    pub fn origin(&self) -> f64 {
        self.origin
    }

    /// The grid step `h`.
    pub fn step(&self) -> f64 {
        self.step
    }

    /// Grid index of each outcome (0 for outcomes of zero probability).
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// Largest index `K`.
    pub fn max_index(&self) -> usize {
        self.indices.iter().copied().max().unwrap_or(0)
    }

    /// The snapped reward of each outcome, `origin + step·index`.
    pub fn snapped(&self) -> Vec<f64> {
        self.indices
            .iter()
            .map(|&k| self.origin + self.step * k as f64)
            .collect()
    }

    /// Largest |reward − snapped reward| over outcomes with positive probability, always
    /// the true maximum: for a detected grid it is at the level of the 1e-9 relative
    /// rounding that detection tolerates (the least-squares step moves snapped rewards
    /// slightly), and at most `step/2` when a step was given.
    pub fn snap_error(&self) -> f64 {
        self.snap_error
    }
}

/// The common step of `r_i − origin` by a tolerant Euclidean algorithm, refined by least
/// squares and verified on every reward. The tolerance is 1e-9 relative to the magnitude of
/// the rewards (the rounding of decimal grids such as multiples of 0.1 is relative to it).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `rewards` when they are not on a grid of at most
/// [`MAX_GRID_INDEX`] steps, or when they differ (`range > 0`) but by no more than the
/// tolerance, so that no step can be told from rounding.
fn detect_step(rewards: &[f64], support: &[bool], origin: f64, range: f64) -> Result<f64> {
    let top = origin + range;
    let tol = 1e-9 * range.max(origin.abs()).max(top.abs());
    let diffs: Vec<f64> = rewards
        .iter()
        .zip(support)
        .filter(|(_, s)| **s)
        .map(|(r, _)| r - origin)
        .filter(|d| *d > tol)
        .collect();
    if diffs.is_empty() {
        return Err(TiltError::invalid(
            "rewards",
            format!(
                "differ by at most {range:e}, within the grid-detection tolerance {tol:e} (1e-9 \
                 of their magnitude), so no grid step can be told from rounding; pass a grid \
                 step h (the grid parameter) to snap them (per-token reward error ≤ h/2)"
            ),
        ));
    }
    let fail = || {
        TiltError::invalid(
            "rewards",
            format!(
                "are not on a grid a + h·k with at most {MAX_GRID_INDEX} steps; pass a grid step h \
                 (the grid parameter) to snap them (per-token reward error ≤ h/2)"
            ),
        )
    };
    let mut g = diffs[0];
    for &d in diffs.iter().skip(1) {
        let (mut x, mut y) = (g.max(d), g.min(d));
        while y > tol {
            let r = x % y;
            x = y;
            y = if r > y - tol { 0.0 } else { r };
        }
        g = x;
        if range / g > MAX_GRID_INDEX as f64 {
            return Err(fail());
        }
    }
    // Least-squares refinement of h with the integer indices fixed.
    let ks: Vec<f64> = diffs.iter().map(|d| (d / g).round()).collect();
    let num: f64 = ks.iter().zip(&diffs).map(|(k, d)| k * d).sum();
    let den: f64 = ks.iter().map(|k| k * k).sum();
    let h = num / den;
    for (k, d) in ks.iter().zip(&diffs) {
        if (k * h - d).abs() > 10.0 * tol {
            return Err(fail());
        }
    }
    Ok(h)
}

/// How the `L`-fold convolution was (or should be) computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvolutionMethod {
    /// Binary powering with direct convolutions (relative accuracy everywhere).
    Direct,
    /// FFT with a pointwise power (absolute accuracy ~ L·ε of the peak).
    Fft,
}

/// Pick [`ConvolutionMethod::Direct`] unless its cost estimate exceeds
/// [`DIRECT_COST_LIMIT`].
pub fn choose_method(max_index: usize, length: usize) -> ConvolutionMethod {
    let n = (max_index * length + 1) as f64;
    if n * n * 0.7 > DIRECT_COST_LIMIT {
        ConvolutionMethod::Fft
    } else {
        ConvolutionMethod::Direct
    }
}

fn convolve_direct(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        if x == 0.0 {
            continue;
        }
        for (o, &y) in out[i..].iter_mut().zip(b) {
            *o += x * y;
        }
    }
    out
}

/// Drop entries below 1e-290 of the total (relative accuracy is lost in subnormals) and
/// renormalise to total 1 (the pmf's sum is 1 up to rounding).
fn clean(mut v: Vec<f64>) -> Vec<f64> {
    let total: f64 = v.iter().sum();
    for x in &mut v {
        if *x < 1e-290 * total {
            *x = 0.0;
        } else {
            *x /= total;
        }
    }
    v
}

/// The number of points `L·K + 1` of the law of a sum of `length` variables on
/// `0..grid_points` (`K = grid_points − 1`), if within [`MAX_SUM_POINTS`].
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `length` beyond it.
pub fn check_sum_points(grid_points: usize, length: usize) -> Result<usize> {
    let k = grid_points.saturating_sub(1);
    k.checked_mul(length)
        .and_then(|x| x.checked_add(1))
        .filter(|&n| n <= MAX_SUM_POINTS)
        .ok_or_else(|| {
            TiltError::invalid(
                "length",
                format!(
                    "sequences of length {length} with {grid_points} reward grid points per \
                     token need more than {MAX_SUM_POINTS} points for the law of the sum; use \
                     a shorter length or a coarser grid"
                ),
            )
        })
}

/// The pmf of `Σ_{i=1}^{L} k_i` for i.i.d. `k_i` with pmf `token_pmf` on `0..=K`, on
/// `0..=L·K` (linear scale, total 1).
///
/// # Errors
/// [`TiltError::InvalidInput`] naming `length` when it is 0 or the support `L·K + 1`
/// exceeds [`MAX_SUM_POINTS`]; naming `token pmf` when it is empty, has a negative or
/// non-finite entry, or sums to 0.
pub fn sum_pmf(token_pmf: &[f64], length: usize, method: ConvolutionMethod) -> Result<Vec<f64>> {
    if length == 0 {
        return Err(TiltError::invalid("length", "must be at least 1"));
    }
    if token_pmf.is_empty() || token_pmf.iter().any(|p| !p.is_finite() || *p < 0.0) {
        return Err(TiltError::invalid(
            "token pmf",
            "must be non-empty, finite and non-negative",
        ));
    }
    let total: f64 = token_pmf.iter().sum();
    if total <= 0.0 {
        return Err(TiltError::invalid("token pmf", "sums to 0"));
    }
    let points = check_sum_points(token_pmf.len(), length)?;
    let unit: Vec<f64> = token_pmf.iter().map(|p| p / total).collect();
    let out = match method {
        ConvolutionMethod::Direct => {
            let mut result: Vec<f64> = vec![1.0];
            let mut power = unit;
            let mut e = length;
            loop {
                if e & 1 == 1 {
                    result = clean(convolve_direct(&result, &power));
                }
                e >>= 1;
                if e == 0 {
                    break;
                }
                power = clean(convolve_direct(&power, &power));
            }
            result
        }
        ConvolutionMethod::Fft => {
            let size = points.next_power_of_two();
            let mut planner = FftPlanner::<f64>::new();
            let forward = planner.plan_fft_forward(size);
            let inverse = planner.plan_fft_inverse(size);
            let mut buf: Vec<Complex<f64>> = vec![Complex::new(0.0, 0.0); size];
            for (b, p) in buf.iter_mut().zip(&unit) {
                *b = Complex::new(*p, 0.0);
            }
            forward.process(&mut buf);
            let l = length as f64;
            for z in &mut buf {
                let (r, theta) = z.to_polar();
                *z = Complex::from_polar(r.powf(l), theta * l);
            }
            inverse.process(&mut buf);
            let scale = 1.0 / size as f64;
            let mut v: Vec<f64> = buf[..points].iter().map(|z| z.re * scale).collect();
            let peak = v.iter().copied().fold(0.0, f64::max);
            let floor = 100.0 * l * f64::EPSILON * peak;
            for x in &mut v {
                if *x < floor {
                    *x = 0.0;
                }
            }
            clean(v)
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_decimal_grid_and_snaps_given_grid() {
        let r = [0.0, 0.3, 0.7, 1.2];
        let s = [true; 4];
        let lat = LatticeRewards::new(&r, &s, None).unwrap();
        assert!((lat.step() - 0.1).abs() < 1e-12);
        assert_eq!(lat.indices(), &[0, 3, 7, 12]);
        let lat = LatticeRewards::new(&[0.0, 0.26, 1.0], &[true; 3], Some(0.25)).unwrap();
        assert_eq!(lat.indices(), &[0, 1, 4]);
        assert!((lat.snap_error() - 0.01).abs() < 1e-12);
        assert!(LatticeRewards::new(&[0.0, 1.0, std::f64::consts::PI], &[true; 3], None).is_err());
    }

    #[test]
    fn near_equal_or_overflowing_rewards_are_clear_errors_not_panics() {
        let named = |r: Result<LatticeRewards>, needle: &str| match r {
            Err(TiltError::InvalidInput { input, problem }) => {
                assert_eq!(input, "rewards");
                assert!(problem.contains(needle), "{problem}");
            }
            other => panic!("{other:?}"),
        };
        // Gaps within the 1e-9 relative tolerance: no step can be told from rounding.
        named(
            LatticeRewards::new(&[1e20, 1.00000000000001e20], &[true; 2], None),
            "grid parameter",
        );
        named(
            LatticeRewards::new(&[1.0, 1.0 + 1e-12, 1.0], &[true; 3], None),
            "grid parameter",
        );
        named(
            LatticeRewards::new(&[-1e308, 1e308], &[true; 2], None),
            "overflows",
        );
        // The tolerance is relative to the rewards' magnitude: tiny rewards on a grid are
        // detected, and truly equal ones are a constant.
        let tiny = LatticeRewards::new(&[0.0, 1e-10, 3e-10], &[true; 3], None).unwrap();
        assert_eq!(tiny.indices(), &[0, 1, 3]);
        assert!((tiny.step() / 1e-10 - 1.0).abs() < 1e-9);
        let constant = LatticeRewards::new(&[2.5, 2.5], &[true; 2], None).unwrap();
        assert_eq!(constant.max_index(), 0);
        // With an explicit step the near-equal rewards are snapped, and the error reported.
        let snapped =
            LatticeRewards::new(&[1e20, 1.00000000000001e20], &[true; 2], Some(1e6)).unwrap();
        assert_eq!(snapped.max_index(), 1);
        // Exact up to the spacing of doubles near 1e20 (16384) in forming origin + step.
        let exact: f64 = (1.00000000000001e20 - 1e20) - 1e6;
        assert!((snapped.snap_error() - exact.abs()).abs() <= 16384.0);
    }

    #[test]
    fn snap_error_of_a_detected_grid_is_the_true_maximum() {
        // A decimal grid whose entries carry rounding: the least-squares step moves the
        // snapped rewards slightly, and that movement is what is reported.
        let r = [0.0, 0.1, 0.7, 1.2000000001, 2.3];
        let lat = LatticeRewards::new(&r, &[true; 5], None).unwrap();
        let truth = lat
            .snapped()
            .iter()
            .zip(&r)
            .map(|(s, r)| (s - r).abs())
            .fold(0.0, f64::max);
        assert!(truth > 0.0, "the case must move a reward");
        assert_eq!(lat.snap_error(), truth);
        assert!(lat.snap_error() < 1e-9 * 2.3 * 10.0);
    }

    #[test]
    fn direct_and_fft_agree_on_binomial() {
        let q = [0.3, 0.7];
        let d = sum_pmf(&q, 50, ConvolutionMethod::Direct).unwrap();
        let f = sum_pmf(&q, 50, ConvolutionMethod::Fft).unwrap();
        let lnf = crate::numerics::ln_factorials(50);
        for j in 0..=50 {
            let exact = (lnf[50] - lnf[j] - lnf[50 - j]
                + j as f64 * 0.7f64.ln()
                + (50 - j) as f64 * 0.3f64.ln())
            .exp();
            assert!((d[j] - exact).abs() <= 1e-13 * exact, "direct {j}");
            assert!((f[j] - exact).abs() <= 1e-13, "fft {j}");
        }
    }
}
