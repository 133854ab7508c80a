//! Calibrated rewards (InfAlign, arXiv 2412.19792 §4; docs/theory.md §10) and a check that
//! they are what they claim to be.
//!
//! For one prompt, draw reference responses, score them, and keep the sorted scores. The
//! calibrated reward of any response is the reference's win rate against it, with ties
//! counting half:
//!
//! ```text
//! c(r) = P_{z∼p}(r(z) < r) + ½·P_{z∼p}(r(z) = r)        (empirical: counts / M)
//! ```
//! It is invariant to every increasing transform of the reward, and for an atomless reward
//! law the *population* calibrated reward `C(Y) = F(r(Y))` is `Uniform(0, 1)` under the
//! reference. That uniformity is what lets all of InfAlign's curves be computed on
//! `[0, 1]` ([`crate::infalign`]); [`Calibrator::exactness_check`] tests whether the
//! calibrator delivers it.
//!
//! # What "exact" can mean for an empirical calibrator
//! With `M` reference samples `z_1…z_M`, the calibrated reward of a fresh reference sample
//! `Y` is `F̂_M(r(Y))`. *Given* the reference samples it is not uniform, continuous or
//! discrete: it takes the value `k/M` with probability `F(z₍ₖ₊₁₎) − F(z₍ₖ₎)` (a spacing of
//! the reference sample), which is `1/(M + 1)` only on average over reference sets. So
//! testing `n` fresh calibrated values against `U(0, 1)` — even against the discrete
//! uniform law of the rank, or after randomising within the rank gaps — rejects an exact
//! calibration once `n ≳ M`: it detects the reference sample's own deviation
//! `sup |F̂_M − F| ≈ 1/√M`, not a defect. (The discreteness of the values `k/M` alone
//! would show only later, at `n ≳ M²`.)
//!
//! The exact null for a finite `M` is the statement that the fresh samples come from the
//! law the reference samples came from. Then the `M + n` rewards are exchangeable, and the
//! test is the two-sample Kolmogorov–Smirnov test of the fresh rewards against the
//! reference ones: `D = sup_x |F̂_M(x) − Ĝ_n(x)|`, the largest gap between the calibrated
//! reward (as a function of the reward) and the fresh samples' empirical CDF, with the
//! effective size `n_e = Mn/(M + n)`. It is valid for every `n`; as `n → ∞` it becomes the
//! one-sample test of the reference sample against the true law (`n_e → M`).
//!
//! Ties (a reward model with few distinct outputs): `D` is taken between distinct values.
//! Breaking the ties at random would give a statistic with the continuous null law that is
//! at least `D` (its supremum runs over more points), so the continuous p-value is
//! conservative (too large) with ties; the report says how many distinct values and tied
//! samples there were, so that a reader does not take a discrete reward for an exact
//! uniform.

use crate::error::{Result, TiltError};
use serde::Serialize;

/// The reference's reward samples for one prompt, sorted, ready to calibrate.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibrator {
    sorted: Vec<f64>,
}

/// The result of [`Calibrator::exactness_check`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExactnessReport {
    /// Number of fresh samples tested, `n`.
    pub samples: usize,
    /// Number of reference samples of the calibrator, `M`.
    pub reference_samples: usize,
    /// The two-sample KS statistic `D = sup_x |F̂_M(x) − Ĝ_n(x)|` between the reference
    /// samples (whose empirical CDF is the calibrated reward) and the fresh samples.
    pub ks_statistic: f64,
    /// The effective sample size `Mn/(M + n)` of the two-sample test.
    pub effective_samples: f64,
    /// Asymptotic p-value of `D` under the exact null (fresh and reference samples from
    /// one law): Kolmogorov's distribution at `(√n_e + 0.12 + 0.11/√n_e)·D`; conservative
    /// with tied rewards.
    pub p_value: f64,
    /// Distinct reward values among the reference samples.
    pub distinct_reference_values: usize,
    /// Reference samples that share their value with another.
    pub tied_reference_samples: usize,
    /// Mean calibrated reward of the fresh samples (½ under exactness).
    pub mean_calibrated: f64,
}

impl Calibrator {
    /// Build from the reference's reward samples for one prompt.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `reference samples` when empty or when a sample
    /// is not finite.
    pub fn new(reference_rewards: &[f64]) -> Result<Self> {
        if reference_rewards.is_empty() {
            return Err(TiltError::invalid(
                "reference samples",
                "no reward samples given",
            ));
        }
        if let Some((i, x)) = reference_rewards
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
        {
            return Err(TiltError::invalid(
                "reference samples",
                format!("sample {} is {x}, not a finite number", i + 1),
            ));
        }
        let mut sorted = reference_rewards.to_vec();
        sorted.sort_by(f64::total_cmp);
        Ok(Self { sorted })
    }

    /// Number of reference samples `M`.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Always false (at least one sample).
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The calibrated reward `c(r) = (#{z < r} + ½·#{z = r}) / M` (arXiv 2412.19792 §4;
    /// docs/theory.md §10), by two binary searches.
    ///
    /// ```
    /// use tilt_core::calibration::Calibrator;
    /// let c = Calibrator::new(&[1.0, 2.0, 2.0, 3.0]).unwrap();
    /// assert_eq!(c.calibrated_reward(2.0), 0.5); // 1 below, 2 tied → (1 + 1)/4
    /// assert_eq!(c.calibrated_reward(10.0), 1.0);
    /// assert_eq!(c.calibrated_reward(0.0), 0.0);
    /// ```
    pub fn calibrated_reward(&self, reward: f64) -> f64 {
        let below = self.sorted.partition_point(|z| *z < reward);
        let not_above = self.sorted.partition_point(|z| *z <= reward);
        (below as f64 + 0.5 * (not_above - below) as f64) / self.sorted.len() as f64
    }

    /// Test that the calibration is exact: that fresh reference samples are calibrated as
    /// the population calibrated reward would be, i.e. that they come from the law of the
    /// reference samples (see the module doc for why this, and not uniformity of the
    /// calibrated values given the reference samples, is the exact finite-`M` null). The
    /// two-sample Kolmogorov–Smirnov statistic `D = sup_x |F̂_M(x) − Ĝ_n(x)|` and its
    /// asymptotic p-value `Q_KS((√n_e + 0.12 + 0.11/√n_e)·D)`, `n_e = Mn/(M + n)`
    /// (Stephens 1970; Press et al., Numerical Recipes §14.3, `kstwo`).
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `fresh samples` when empty or not finite.
    pub fn exactness_check(&self, fresh_reference_rewards: &[f64]) -> Result<ExactnessReport> {
        if fresh_reference_rewards.is_empty() {
            return Err(TiltError::invalid(
                "fresh samples",
                "no reward samples given",
            ));
        }
        if let Some((i, x)) = fresh_reference_rewards
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
        {
            return Err(TiltError::invalid(
                "fresh samples",
                format!("sample {} is {x}, not a finite number", i + 1),
            ));
        }
        let mut fresh = fresh_reference_rewards.to_vec();
        fresh.sort_by(f64::total_cmp);
        let (a, b) = (&self.sorted, &fresh);
        let (m, n) = (a.len() as f64, b.len() as f64);
        // Both empirical CDFs are right-continuous step functions: compare them after
        // each distinct value (all ties of it included on both sides). Once one sample is
        // used up its CDF is 1 and the gap only shrinks.
        let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
        while i < a.len() && j < b.len() {
            let x = a[i].min(b[j]);
            while i < a.len() && a[i] <= x {
                i += 1;
            }
            while j < b.len() && b[j] <= x {
                j += 1;
            }
            d = d.max((i as f64 / m - j as f64 / n).abs());
        }
        let n_e = m * n / (m + n);
        let sqrt_ne = n_e.sqrt();
        let p_value = kolmogorov_q((sqrt_ne + 0.12 + 0.11 / sqrt_ne) * d);
        let mean_calibrated = crate::numerics::neumaier_sum(
            fresh_reference_rewards
                .iter()
                .map(|r| self.calibrated_reward(*r)),
        ) / n;
        let mut distinct = 0;
        let mut tied = 0;
        let mut i = 0;
        while i < self.sorted.len() {
            let mut j = i + 1;
            while j < self.sorted.len() && self.sorted[j] == self.sorted[i] {
                j += 1;
            }
            distinct += 1;
            if j - i > 1 {
                tied += j - i;
            }
            i = j;
        }
        Ok(ExactnessReport {
            samples: fresh.len(),
            reference_samples: self.sorted.len(),
            ks_statistic: d,
            effective_samples: n_e,
            p_value,
            distinct_reference_values: distinct,
            tied_reference_samples: tied,
            mean_calibrated,
        })
    }
}

/// The Kolmogorov survival function `Q(λ) = P(K > λ) = 2 Σ_{k≥1} (−1)^{k−1} e^{−2k²λ²}`
/// (Kolmogorov 1933; the limit law of `√n·D` for the KS statistic, Press et al., Numerical
/// Recipes §14.3, `probks`), switching to the equivalent theta-function form
/// `1 − (√(2π)/λ) Σ_{k≥1} e^{−(2k−1)²π²/(8λ²)}` (Jacobi's transformation of the same
/// series; e.g. Marsaglia, Tsang & Wang 2003) for `λ < 1.18`, where the alternating series
/// converges slowly.
pub fn kolmogorov_q(lambda: f64) -> f64 {
    if lambda.is_nan() || lambda <= 0.0 {
        return 1.0;
    }
    if lambda < 1.18 {
        let y = (-std::f64::consts::PI.powi(2) / (8.0 * lambda * lambda)).exp();
        let mut sum = 0.0;
        for k in 1..=20 {
            let e = ((2 * k - 1) * (2 * k - 1)) as f64;
            sum += y.powf(e);
        }
        (1.0 - (2.0 * std::f64::consts::PI).sqrt() / lambda * sum).clamp(0.0, 1.0)
    } else {
        let mut sum = 0.0;
        for k in 1..=100 {
            let kf = k as f64;
            let term = (-2.0 * kf * kf * lambda * lambda).exp();
            sum += if k % 2 == 1 { term } else { -term };
            if term < 1e-18 {
                break;
            }
        }
        (2.0 * sum).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kolmogorov_q_branches_agree_and_match_known_points() {
        // Both forms are exact; they must agree where both converge.
        let lam: f64 = 1.18;
        let alt: f64 = 2.0
            * (1..=100)
                .map(|k| {
                    let kf = k as f64;
                    let t = (-2.0 * kf * kf * lam * lam).exp();
                    if k % 2 == 1 {
                        t
                    } else {
                        -t
                    }
                })
                .sum::<f64>();
        assert!((kolmogorov_q(lam - 1e-12) - alt).abs() < 1e-10);
        // Critical value at the 5% level: λ = 1.3581.
        assert!((kolmogorov_q(1.3581) - 0.05).abs() < 2e-4);
        assert!((kolmogorov_q(0.8276) - 0.5).abs() < 1e-3);
    }
}
