//! The element-wise functions of the forward — `exp`, log-softmax, SiLU — in a form the
//! compiler turns into 8-lane AVX2 code.
//!
//! libm's `expf` is a call per element, which no compiler vectorises; at 16 sequences a
//! step spends ≈2M of them (the 49152-way log-softmax, SiLU over the MLP, attention
//! weights), 3–4% of the step. [`exp_f32`] is the classic Cody–Waite reduction with
//! Cephes' degree-6 polynomial, written with `mul_add` and branch-free selects, so the
//! same operations give the same bits whether compiled for AVX2 or not. Its error is
//! below 2 ulp over the whole range (tested against f64 `exp`).

/// e^x in f32: `x = n·ln 2 + r` (|r| ≤ ½ ln 2, ln 2 split in two for an exact `n·ln2_hi`),
/// e^r by Cephes' `expf` polynomial, times 2^n built in the exponent bits (in two factors,
/// so that n = 128 and n = −126 need no special case). 0 below −87.34 (where e^x is
/// subnormal), +∞ above 88.72, NaN for NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_84;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 5e-1);
    let er = (p * r).mul_add(r, r) + 1.0;
    let n = n as i32;
    let half = n >> 1;
    let two_to = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = er * two_to(half) * two_to(n - half);
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// e^x of every element, in place ([`exp_f32`] each, 8 at a time with AVX2: the same bits).
pub(crate) fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::simd_available() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        unsafe { avx2::exp_in_place(v) };
        return;
    }
    for x in v {
        *x = exp_f32(*x);
    }
}

/// Normalised natural-log probabilities `x − log Σ eˣ`: terms e^(x − max) ≤ 1 by
/// [`exp_f32`], summed in f64 into 4 lanes (element i into lane i mod 4, in order), the
/// lanes added as (0 + 1) + (2 + 3), the log in f64.
pub(crate) fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lanes = exp_sum(logits, max);
    let lse = max as f64 + ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])).ln();
    let mut out = vec![0f32; logits.len()];
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::simd_available() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        unsafe { avx2::minus_f64(logits, lse, &mut out) };
        return out;
    }
    for (o, &x) in out.iter_mut().zip(logits) {
        *o = (x as f64 - lse) as f32;
    }
    out
}

/// [`exp_sum_lanes`], 8 at a time with AVX2 (the same bits).
fn exp_sum(logits: &[f32], max: f32) -> [f64; 4] {
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::simd_available() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { avx2::exp_sum_lanes(logits, max) };
    }
    exp_sum_lanes(logits, max)
}

/// Σ e^(x_i − max) into 4 f64 lanes, element i into lane i mod 4 in order.
fn exp_sum_lanes(logits: &[f32], max: f32) -> [f64; 4] {
    let mut lanes = [0f64; 4];
    for (i, &x) in logits.iter().enumerate() {
        lanes[i % 4] += exp_f32(x - max) as f64;
    }
    lanes
}

/// SwiGLU's gate (arXiv:2002.05202): `out = silu(g) ⊙ u = g / (1 + e^−g) · u`, with
/// [`exp_f32`].
pub(crate) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::matmul::simd_available() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        unsafe { avx2::silu_mul(g, u, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = silu_mul_one(g, u);
    }
}

#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_f32(-g)) * u
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! [`super::exp_f32`] 8 lanes at a time, operation for operation.
    use std::arch::x86_64::*;

    /// `super::exp_f32` of each lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.336_55);
        let hi = _mm256_set1_ps(88.722_84);
        // max/min return their second operand when one is NaN: NaN stays NaN, as clamp.
        let xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), xc);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let er = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let n = _mm256_cvttps_epi32(n);
        let half = _mm256_srai_epi32::<1>(n);
        let bias = _mm256_set1_epi32(127);
        let two_to =
            |k: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, bias)));
        let y = _mm256_mul_ps(
            _mm256_mul_ps(er, two_to(half)),
            two_to(_mm256_sub_epi32(n, half)),
        );
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        _mm256_blendv_ps(
            y,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(v: &mut [f32]) {
        let mut chunks = v.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
        }
        for x in chunks.into_remainder() {
            *x = super::exp_f32(*x);
        }
    }

    /// As `super::exp_sum_lanes`: 8 elements are lanes 0–3 twice, low half first.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum_lanes(logits: &[f32], max: f32) -> [f64; 4] {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_pd();
        let chunks = logits.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        }
        let mut lanes = [0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), acc);
        for (i, &x) in rest.iter().enumerate() {
            lanes[i % 4] += super::exp_f32(x - max) as f64;
        }
        lanes
    }

    /// `out[i] = (x[i] as f64 − c) as f32`, 4 at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn minus_f64(x: &[f32], c: f64, out: &mut [f32]) {
        let n = x.len().min(out.len());
        let cv = _mm256_set1_pd(c);
        let mut i = 0;
        while i + 4 <= n {
            let v = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(i)));
            _mm_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_cvtpd_ps(_mm256_sub_pd(v, cv)),
            );
            i += 4;
        }
        for j in i..n {
            out[j] = (x[j] as f64 - c) as f32;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = g.len().min(u.len()).min(out.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
            );
            i += 8;
        }
        for j in i..n {
            out[j] = super::silu_mul_one(g[j], u[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, exact: f64) -> f64 {
        let e = exact as f32;
        if e == 0.0 || !e.is_finite() {
            return if a == e { 0.0 } else { f64::INFINITY };
        }
        let ulp = (f32::from_bits(e.to_bits() + 1) - e) as f64;
        (a as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst < 2.0, "max error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.72).is_finite() && exp_f32(88.72) > 3.3e38);
        assert!((exp_f32(-87.3) as f64 / (-87.3f32 as f64).exp() - 1.0).abs() < 1e-6);
    }

    /// The vector paths give the scalar definition's bits (−0.0 ≠ 0.0 and NaN payloads
    /// aside, compared by value there).
    #[test]
    fn vector_paths_equal_the_scalar_definitions() {
        let xs: Vec<f32> = (0..4003)
            .map(|i| (i as f32 - 2001.0) * 0.0517)
            .chain([
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -87.34,
                88.72,
                88.73,
                0.0,
                -0.0,
            ])
            .collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &e) in xs.iter().zip(&v) {
            let want = exp_f32(x);
            assert!(
                e.to_bits() == want.to_bits() || (e.is_nan() && want.is_nan()),
                "exp({x}): {e} vs {want}"
            );
        }
        let finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        for len in [0usize, 1, 3, 4, 7, 8, 9, 1001] {
            let l = &finite[..len.min(finite.len())];
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(
                exp_sum(l, max).map(f64::to_bits),
                exp_sum_lanes(l, max).map(f64::to_bits),
                "length {len}"
            );
        }
        let lp = log_softmax(&finite);
        let max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let l = exp_sum_lanes(&finite, max);
        let lse = max as f64 + ((l[0] + l[1]) + (l[2] + l[3])).ln();
        for (&a, &x) in lp.iter().zip(&finite) {
            assert_eq!(a.to_bits(), ((x as f64 - lse) as f32).to_bits());
        }
        let u: Vec<f32> = finite.iter().map(|x| 0.5 - x * 0.01).collect();
        let mut out = vec![0f32; finite.len()];
        silu_mul(&finite, &u, &mut out);
        for ((&g, &u), &o) in finite.iter().zip(&u).zip(&out) {
            assert_eq!(o.to_bits(), silu_mul_one(g, u).to_bits(), "silu({g})·{u}");
        }
    }

    #[test]
    fn log_softmax_normalises_and_matches_f64() {
        let logits: Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32) * 0.37 - 9.0)
            .collect();
        let lp = log_softmax(&logits);
        let max = logits
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for (a, &x) in lp.iter().zip(&logits) {
            assert!((*a as f64 - (x as f64 - lse)).abs() < 2e-6, "{a}");
        }
        let total: f64 = lp.iter().map(|&a| (a as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }

    #[test]
    fn silu_matches_its_definition() {
        let g: Vec<f32> = (-50..50).map(|i| i as f32 * 0.7).collect();
        let u: Vec<f32> = g.iter().map(|x| 1.0 - x * 0.1).collect();
        let mut out = vec![0f32; g.len()];
        silu_mul(&g, &u, &mut out);
        for ((o, &g), &u) in out.iter().zip(&g).zip(&u) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (*o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{o} vs {want}"
            );
        }
    }
}
