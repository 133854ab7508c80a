//! Calibrated rewards (InfAlign, arXiv 2412.19792 §4; derivations §2.1) and a check that
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
//! law `c(Y) ∼ Uniform(0, 1)` under the reference. That uniformity is what lets all of
//! InfAlign's curves be computed on `[0, 1]` ([`crate::infalign`]), so
//! [`Calibrator::exactness_check`] tests it: the calibrated rewards of *fresh* reference
//! samples against Uniform(0, 1) by a Kolmogorov–Smirnov statistic.
//!
//! Ties are reported, not hidden: with `M` reference samples `c` takes at most `2M + 1`
//! values, and with tied rewards (a reward model with few distinct outputs) `c` is a
//! discrete variable; the KS p-value is then conservative (too large), and the report
//! says how many distinct values and tied samples there were so that a reader does not
//! take a discrete reward for an exact uniform.

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
    /// Number of fresh samples tested.
    pub samples: usize,
    /// The KS statistic `D = sup_u |F̂(u) − u|` of their calibrated rewards.
    pub ks_statistic: f64,
    /// Asymptotic p-value of `D` under exact uniformity (Kolmogorov's distribution with
    /// Stephens' small-sample correction; conservative for discrete `c`).
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
    /// derivations §2.1), by two binary searches.
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

    /// Test that calibrated rewards of fresh reference samples are Uniform(0, 1), with a
    /// one-sample Kolmogorov–Smirnov statistic
    /// `D = max_i max(i/n − c₍ᵢ₎, c₍ᵢ₎ − (i−1)/n)` and its asymptotic p-value
    /// `Q_KS((√n + 0.12 + 0.11/√n)·D)` (Stephens 1970; Press et al., Numerical Recipes
    /// §14.3).
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
        if fresh_reference_rewards.iter().any(|x| !x.is_finite()) {
            return Err(TiltError::invalid(
                "fresh samples",
                "every sample must be a finite number",
            ));
        }
        let mut c: Vec<f64> = fresh_reference_rewards
            .iter()
            .map(|r| self.calibrated_reward(*r))
            .collect();
        c.sort_by(f64::total_cmp);
        let n = c.len() as f64;
        let mut d: f64 = 0.0;
        for (i, ci) in c.iter().enumerate() {
            d = d.max((i as f64 + 1.0) / n - ci).max(ci - i as f64 / n);
        }
        let sqrt_n = n.sqrt();
        let p_value = kolmogorov_q((sqrt_n + 0.12 + 0.11 / sqrt_n) * d);
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
            samples: c.len(),
            ks_statistic: d,
            p_value,
            distinct_reference_values: distinct,
            tied_reference_samples: tied,
            mean_calibrated: c.iter().sum::<f64>() / n,
        })
    }
}

/// The Kolmogorov survival function `Q(λ) = P(K > λ) = 2 Σ_{k≥1} (−1)^{k−1} e^{−2k²λ²}`,
/// switching to the theta-function form `1 − (√(2π)/λ) Σ_{k≥1} e^{−(2k−1)²π²/(8λ²)}` for
/// `λ < 1.18` where the alternating series converges slowly.
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
