//! One-dimensional root finding and maximisation.
//!
//! The asymptotic and InfAlign analyses solve a handful of monotone scalar equations
//! (`K(λ) = Δ`, `Λ'(λ) = x`, `KL(β) = D`) and one unimodal-ish maximisation (the
//! inference-time win rate over the transform parameter `t`). Each equation is monotone
//! on a bracket we can find by doubling, so Brent's method (bisection safeguarding inverse
//! quadratic interpolation; Brent 1973, ch. 4) is both robust and fast. The maximiser
//! scans a grid first (the win-rate curve in `t` is flat for large N, see
//! docs/theory.md §10) and then refines with golden-section search around the best grid
//! point, reporting when the optimum sits at the edge of the bracket.

use crate::error::{Result, TiltError};

/// Solve `f(x) = 0` on `[lo, hi]` where `f(lo)` and `f(hi)` have opposite signs (or one is
/// zero), by Brent's method, to an absolute tolerance `x_tol` on `x` (or an exact zero).
///
/// # Errors
/// [`TiltError::NoConvergence`] naming `what` when the bracket does not change sign, `f`
/// is not finite at a probe, or 200 iterations do not suffice.
///
/// ```
/// use tilt_core::optimize::brent_root;
/// let x = brent_root(|x| x * x - 2.0, 0.0, 2.0, 1e-15, "sqrt(2)").unwrap();
/// assert!((x - 2f64.sqrt()).abs() < 1e-15);
/// ```
pub fn brent_root(
    mut f: impl FnMut(f64) -> f64,
    lo: f64,
    hi: f64,
    x_tol: f64,
    what: &str,
) -> Result<f64> {
    let fail = |detail: String| TiltError::NoConvergence {
        what: what.to_string(),
        detail,
    };
    let (mut a, mut b) = (lo, hi);
    let (mut fa, mut fb) = (f(a), f(b));
    if !fa.is_finite() || !fb.is_finite() {
        return Err(fail(format!(
            "function not finite at the bracket [{a}, {b}]: {fa}, {fb}"
        )));
    }
    if fa == 0.0 {
        return Ok(a);
    }
    if fb == 0.0 {
        return Ok(b);
    }
    if fa.signum() == fb.signum() {
        return Err(fail(format!(
            "no sign change on [{a}, {b}] (values {fa}, {fb})"
        )));
    }
    let (mut c, mut fc) = (a, fa);
    let mut d = b - a;
    let mut e = d;
    for _ in 0..200 {
        if fb.signum() == fc.signum() {
            c = a;
            fc = fa;
            d = b - a;
            e = d;
        }
        if fc.abs() < fb.abs() {
            a = b;
            b = c;
            c = a;
            fa = fb;
            fb = fc;
            fc = fa;
        }
        let tol = 2.0 * f64::EPSILON * b.abs() + 0.5 * x_tol;
        let m = 0.5 * (c - b);
        if m.abs() <= tol || fb == 0.0 {
            return Ok(b);
        }
        if e.abs() >= tol && fa.abs() > fb.abs() {
            let s = fb / fa;
            let (mut p, mut q);
            if a == c {
                p = 2.0 * m * s;
                q = 1.0 - s;
            } else {
                let qq = fa / fc;
                let r = fb / fc;
                p = s * (2.0 * m * qq * (qq - r) - (b - a) * (r - 1.0));
                q = (qq - 1.0) * (r - 1.0) * (s - 1.0);
            }
            if p > 0.0 {
                q = -q;
            } else {
                p = -p;
            }
            if 2.0 * p < (3.0 * m * q - (tol * q).abs()).min((e * q).abs()) {
                e = d;
                d = p / q;
            } else {
                d = m;
                e = d;
            }
        } else {
            d = m;
            e = d;
        }
        a = b;
        fa = fb;
        b += if d.abs() > tol { d } else { tol.copysign(m) };
        fb = f(b);
        if !fb.is_finite() {
            return Err(fail(format!("function not finite at {b}")));
        }
    }
    Err(fail("200 iterations of Brent's method".into()))
}

/// Find `hi ≥ start > 0` with `f(hi) ≥ 0` for an increasing `f` with `f(0) < 0`, by
/// doubling (at most `max_doublings` times).
///
/// # Errors
/// [`TiltError::NoConvergence`] naming `what` when no such point is found.
pub fn bracket_up(
    mut f: impl FnMut(f64) -> f64,
    start: f64,
    max_doublings: u32,
    what: &str,
) -> Result<f64> {
    let mut hi = start;
    for _ in 0..max_doublings {
        let v = f(hi);
        if v >= 0.0 {
            return Ok(hi);
        }
        if !v.is_finite() {
            break;
        }
        hi *= 2.0;
    }
    Err(TiltError::NoConvergence {
        what: what.to_string(),
        detail: format!("no upper bracket found up to {hi}"),
    })
}

/// A maximum found by [`maximize_scalar`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Maximum {
    /// The argmax.
    pub x: f64,
    /// The maximal value.
    pub value: f64,
    /// True when the argmax is at (within one grid step of) an end of the search bracket:
    /// the true optimum may lie beyond it.
    pub at_edge: bool,
    /// Number of function evaluations.
    pub evaluations: usize,
}

/// Maximise `f` over the grid `grid` (sorted increasingly) and then by golden-section
/// search between the neighbours of the best grid point, to tolerance `x_tol`.
///
/// Golden-section search (Kiefer 1953) assumes unimodality inside the final bracket; the
/// grid scan makes that likely for curves with one broad hump. Evaluations that fail are
/// propagated as errors.
///
/// # Errors
/// [`TiltError::InvalidInput`] for a grid of fewer than 3 points or unsorted; any error of
/// `f`.
///
/// ```
/// use tilt_core::optimize::maximize_scalar;
/// let grid: Vec<f64> = (0..=10).map(|i| i as f64).collect();
/// let m = maximize_scalar(|x| Ok(-(x - 3.3) * (x - 3.3)), &grid, 1e-9).unwrap();
/// assert!((m.x - 3.3).abs() < 1e-7 && !m.at_edge);
/// ```
pub fn maximize_scalar(
    mut f: impl FnMut(f64) -> Result<f64>,
    grid: &[f64],
    x_tol: f64,
) -> Result<Maximum> {
    if grid.len() < 3
        || grid
            .windows(2)
            .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
    {
        return Err(TiltError::invalid(
            "optimisation grid",
            "needs at least 3 strictly increasing points",
        ));
    }
    let mut evaluations = 0;
    let mut values = Vec::with_capacity(grid.len());
    for &x in grid {
        values.push(f(x)?);
        evaluations += 1;
    }
    let (best, _) =
        values
            .iter()
            .enumerate()
            .fold((0usize, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            });
    let at_edge = best == grid.len() - 1;
    let lo_i = best.saturating_sub(1);
    let hi_i = (best + 1).min(grid.len() - 1);
    let (mut a, mut b) = (grid[lo_i], grid[hi_i]);
    let mut best_x = grid[best];
    let mut best_v = values[best];
    let inv_phi = (5f64.sqrt() - 1.0) / 2.0;
    let mut x1 = b - inv_phi * (b - a);
    let mut x2 = a + inv_phi * (b - a);
    let mut f1 = f(x1)?;
    let mut f2 = f(x2)?;
    evaluations += 2;
    while (b - a) > x_tol * (1.0 + best_x.abs()) && evaluations < 400 {
        if f1 >= f2 {
            b = x2;
            x2 = x1;
            f2 = f1;
            x1 = b - inv_phi * (b - a);
            f1 = f(x1)?;
        } else {
            a = x1;
            x1 = x2;
            f1 = f2;
            x2 = a + inv_phi * (b - a);
            f2 = f(x2)?;
        }
        evaluations += 1;
    }
    for (x, v) in [(x1, f1), (x2, f2)] {
        if v > best_v {
            best_v = v;
            best_x = x;
        }
    }
    Ok(Maximum {
        x: best_x,
        value: best_v,
        at_edge,
        evaluations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brent_solves_monotone_equations_and_rejects_bad_brackets() {
        let x = brent_root(|x: f64| x.exp() - 5.0, -10.0, 10.0, 1e-14, "log 5").unwrap();
        assert!((x - 5f64.ln()).abs() < 1e-13);
        assert!(brent_root(|x| x * x + 1.0, -1.0, 1.0, 1e-9, "none").is_err());
    }

    #[test]
    fn maximiser_reports_edge() {
        let grid = [0.0, 1.0, 2.0, 3.0];
        let m = maximize_scalar(Ok, &grid, 1e-9).unwrap();
        assert!(m.at_edge);
        assert!((m.x - 3.0).abs() < 1e-6);
    }
}
