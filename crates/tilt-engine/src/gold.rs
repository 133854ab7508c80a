//! Proxy against gold: how much of a strategy's gain on the reward it optimises (the
//! *proxy* r) is real on the reward one cares about (the *gold* r*). Mroueh,
//! *Information Theoretic Guarantees for Policy Alignment in Large Language Models*,
//! arXiv 2406.05883 (the sub-Gaussian improvement bound and the proxy-to-gold transfer).
//!
//! With the discrepancy e = r − r* (one value per reference sample, both rewards on the
//! same text), the gold improvement is the proxy improvement less what the proxy
//! over-estimates:
//!
//! ```text
//! E_π r* − E_p r* = (E_π r − E_p r) − (E_π e − E_p e)                         (identity)
//! E_π f − E_p f  ≤ √(2σ²₊(f)·KL(π‖p))   for f ∈ {r, r*, e, −e}          (2406.05883)
//! σ²₊(f) = sup_{λ>0} 2(log E_p e^{λ(f − E_p f)})/λ²      (the one-sided variance proxy)
//! ⇒  Δ_r − √(2σ²₊(e)·KL)  ≤  Δ_{r*}  ≤  Δ_r + √(2σ²₊(−e)·KL),   Δ_{r*} ≤ √(2σ²₊(r*)·KL)
//! ```
//!
//! Everything is per prompt: p is the policy given the prompt, and its law is the empirical
//! law of that prompt's M reference samples (mass 1/M each), so each σ²₊ is a plug-in
//! estimate. Reported figures are means over prompts of the per-prompt quantities (each
//! inequality holds per prompt, hence for the means).
//!
//! **The best-of-n curve** ([`best_of_n_curve`]) is exact for that empirical law: best-of-n
//! under the proxy, drawn with replacement from the M reference samples, selects sample i
//! with probability π_n(i) (tilt-core's exact best-of-n pmf, ties shared uniformly), so
//! E r* = Σ_i π_n(i)·r*_i and KL = KL(π_n‖p) exactly, and every inequality above holds to
//! rounding at every n — the picture of over-optimisation, from reference samples alone.

use crate::error::{EngineError, Result};
use crate::eval::{bootstrap_ci95, mean_se};
use serde::{Deserialize, Serialize};
use tilt_core::best_of_n::best_of_n;
use tilt_core::bounds::{optimal_sub_gaussian_proxy, sub_gaussian_improvement_bound};
use tilt_core::RewardDistribution;

/// The largest n of the best-of-n curve.
pub const CURVE_MAX_N: u64 = 64;

/// What one prompt's reference samples say about the two rewards' tails.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceTails {
    /// Mean proxy reward of the reference samples.
    pub proxy_mean: f64,
    /// Mean gold reward of the reference samples.
    pub gold_mean: f64,
    /// σ²₊ of the proxy reward (one-sided, upper tail).
    pub sigma2_proxy: f64,
    /// σ²₊ of the gold reward.
    pub sigma2_gold: f64,
    /// Mean discrepancy E_p[r − r*].
    pub discrepancy_mean: f64,
    /// σ²₊ of the discrepancy e = r − r*: how far the proxy can over-estimate.
    pub sigma2_discrepancy_upper: f64,
    /// σ²₊ of −e: how far it can under-estimate.
    pub sigma2_discrepancy_lower: f64,
}

/// The bounds of one (prompt, KL) pair, nats in, reward units out.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bounds {
    proxy: f64,
    gold: f64,
    over: f64,
    under: f64,
}

impl ReferenceTails {
    /// From one prompt's reference samples, scored by both rewards (paired by index).
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `gold_reward` when the lengths differ or a score is
    /// not finite; tilt-core's errors.
    pub fn new(proxy: &[f64], gold: &[f64]) -> Result<Self> {
        if proxy.len() != gold.len() || proxy.is_empty() {
            return Err(EngineError::invalid(
                "gold_reward",
                format!(
                    "{} proxy and {} gold scores of the reference samples (need one pair each)",
                    proxy.len(),
                    gold.len()
                ),
            ));
        }
        let upper = |xs: &[f64]| -> Result<f64> {
            Ok(optimal_sub_gaussian_proxy(&RewardDistribution::from_samples(xs)?)?.upper)
        };
        let e: Vec<f64> = proxy.iter().zip(gold).map(|(r, g)| r - g).collect();
        let minus_e: Vec<f64> = e.iter().map(|x| -x).collect();
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        Ok(Self {
            proxy_mean: mean(proxy),
            gold_mean: mean(gold),
            sigma2_proxy: upper(proxy)?,
            sigma2_gold: upper(gold)?,
            discrepancy_mean: mean(&e),
            sigma2_discrepancy_upper: upper(&e)?,
            sigma2_discrepancy_lower: upper(&minus_e)?,
        })
    }

    fn bounds(&self, kl: f64) -> Result<Bounds> {
        let b = |s2: f64| sub_gaussian_improvement_bound(s2, kl.max(0.0));
        Ok(Bounds {
            proxy: b(self.sigma2_proxy)?,
            gold: b(self.sigma2_gold)?,
            over: b(self.sigma2_discrepancy_upper)?,
            under: b(self.sigma2_discrepancy_lower)?,
        })
    }
}

/// Means over prompts of the [`ReferenceTails`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TailsSummary {
    /// Mean over prompts of σ²₊(r), the proxy's one-sided variance proxy.
    pub sigma2_proxy: f64,
    /// Mean over prompts of σ²₊(r*).
    pub sigma2_gold: f64,
    /// Mean over prompts of E_p[r − r*].
    pub discrepancy_mean: f64,
    /// Mean over prompts of σ²₊(r − r*).
    pub sigma2_discrepancy_upper: f64,
    /// Mean over prompts of σ²₊(r* − r).
    pub sigma2_discrepancy_lower: f64,
}

/// One strategy's proxy and gold improvements with their bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldStrategy {
    /// Its label.
    pub strategy: String,
    /// Mean gold reward of its outputs.
    pub gold_mean_reward: f64,
    /// Proxy improvement over the reference samples: mean over prompts of
    /// (its mean proxy reward − the reference samples' mean proxy reward).
    pub proxy_improvement: f64,
    /// Its standard error over prompts (null with one prompt).
    pub proxy_improvement_stderr: Option<f64>,
    /// 95% percentile-bootstrap interval over prompts (null with one prompt).
    pub proxy_improvement_ci95: Option<[f64; 2]>,
    /// Gold improvement, likewise.
    pub gold_improvement: f64,
    /// Its standard error over prompts.
    pub gold_improvement_stderr: Option<f64>,
    /// Its 95% bootstrap interval over prompts.
    pub gold_improvement_ci95: Option<[f64; 2]>,
    /// The KL the bounds use (the strategy's reported KL, per prompt), nats.
    pub kl: f64,
    /// Mean over prompts of √(2σ²₊(r)·KL): the most the proxy can improve.
    pub proxy_bound: f64,
    /// Mean over prompts of √(2σ²₊(r*)·KL).
    pub gold_bound: f64,
    /// The transfer interval for the gold improvement implied by the measured proxy
    /// improvement: [Δ_r − √(2σ²₊(e)·KL), Δ_r + √(2σ²₊(−e)·KL)], means over prompts. (The
    /// gold improvement is also at most `gold_bound`; the two are kept apart because a
    /// measured Δ_r carries sampling noise and may exceed its own bound.)
    pub gold_transfer_interval: [f64; 2],
}

/// One n of the exact best-of-n curve on the reference samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldCurvePoint {
    /// n.
    pub n: u64,
    /// KL(π_n‖p) for the empirical law, mean over prompts, nats.
    pub kl: f64,
    /// E_{π_n} r − E_p r, mean over prompts.
    pub proxy_improvement: f64,
    /// E_{π_n} r* − E_p r*, mean over prompts.
    pub gold_improvement: f64,
    /// Mean over prompts of √(2σ²₊(r)·KL(π_n‖p)).
    pub proxy_bound: f64,
    /// Mean over prompts of √(2σ²₊(r*)·KL(π_n‖p)).
    pub gold_bound: f64,
    /// Mean over prompts of the transfer's lower end, Δ_r − √(2σ²₊(e)·KL).
    pub gold_transfer_lower: f64,
}

/// The proxy-against-gold part of an evaluation report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldReport {
    /// The gold reward's name.
    pub reward: String,
    /// Mean gold reward of the reference samples.
    pub reference_mean_reward: f64,
    /// The tails of the two rewards and their discrepancy under p.
    pub tails: TailsSummary,
    /// Per strategy, in the order given.
    pub strategies: Vec<GoldStrategy>,
    /// Exact best-of-n under the proxy, n = 1…64, on the reference samples' empirical law.
    pub best_of_n: Vec<GoldCurvePoint>,
}

/// A strategy's outputs at one prompt: mean proxy reward, mean gold reward, KL (nats).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptOutcome {
    /// Mean proxy reward of its outputs at the prompt.
    pub proxy: f64,
    /// Mean gold reward of the same outputs.
    pub gold: f64,
    /// Its KL at the prompt (bound or estimate, as the strategy reports).
    pub kl: f64,
}

fn mean(xs: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = xs.len() as f64;
    xs.sum::<f64>() / n
}

/// Summarise the tails over prompts.
pub fn summarise_tails(tails: &[ReferenceTails]) -> TailsSummary {
    let m = |f: fn(&ReferenceTails) -> f64| mean(tails.iter().map(f));
    TailsSummary {
        sigma2_proxy: m(|t| t.sigma2_proxy),
        sigma2_gold: m(|t| t.sigma2_gold),
        discrepancy_mean: m(|t| t.discrepancy_mean),
        sigma2_discrepancy_upper: m(|t| t.sigma2_discrepancy_upper),
        sigma2_discrepancy_lower: m(|t| t.sigma2_discrepancy_lower),
    }
}

/// One strategy's [`GoldStrategy`] from its per-prompt outcomes (`outcomes[x]` beside
/// `tails[x]`); `seed` seeds the bootstrap.
///
/// # Errors
/// Mismatched lengths or no prompts (internal); a negative KL.
pub fn strategy_gold(
    label: &str,
    outcomes: &[PromptOutcome],
    tails: &[ReferenceTails],
    seed: u64,
) -> Result<GoldStrategy> {
    if outcomes.len() != tails.len() || outcomes.is_empty() {
        return Err(EngineError::Internal(format!(
            "{label}: {} prompts of outcomes against {} of reference samples",
            outcomes.len(),
            tails.len()
        )));
    }
    let dp: Vec<f64> = outcomes
        .iter()
        .zip(tails)
        .map(|(o, t)| o.proxy - t.proxy_mean)
        .collect();
    let dg: Vec<f64> = outcomes
        .iter()
        .zip(tails)
        .map(|(o, t)| o.gold - t.gold_mean)
        .collect();
    let bounds: Vec<Bounds> = outcomes
        .iter()
        .zip(tails)
        .map(|(o, t)| t.bounds(o.kl))
        .collect::<Result<_>>()?;
    let (proxy_improvement, proxy_improvement_stderr) = mean_se(&dp);
    let (gold_improvement, gold_improvement_stderr) = mean_se(&dg);
    let b = |f: fn(&Bounds) -> f64| mean(bounds.iter().map(f));
    let gold_bound = b(|x| x.gold);
    let lower = mean(dp.iter().zip(&bounds).map(|(d, x)| d - x.over));
    let upper = mean(dp.iter().zip(&bounds).map(|(d, x)| d + x.under));
    Ok(GoldStrategy {
        strategy: label.into(),
        gold_mean_reward: mean(outcomes.iter().map(|o| o.gold)),
        proxy_improvement,
        proxy_improvement_stderr,
        proxy_improvement_ci95: bootstrap_ci95(&dp, crate::eval::BOOTSTRAP_RESAMPLES, seed),
        gold_improvement,
        gold_improvement_stderr,
        gold_improvement_ci95: bootstrap_ci95(
            &dg,
            crate::eval::BOOTSTRAP_RESAMPLES,
            seed ^ 0x9E37_79B9_7F4A_7C15,
        ),
        kl: mean(outcomes.iter().map(|o| o.kl)),
        proxy_bound: b(|x| x.proxy),
        gold_bound,
        gold_transfer_interval: [lower, upper],
    })
}

/// Best-of-n under the proxy on one prompt's reference samples, exactly: (KL, E r, E r*),
/// the selected sample's law being tilt-core's best-of-n pmf over the samples (ties shared
/// uniformly).
///
/// # Errors
/// tilt-core's (non-finite scores, n = 0).
pub fn best_of_n_on_samples(proxy: &[f64], gold: &[f64], n: u64) -> Result<(f64, f64, f64)> {
    let b = best_of_n(&RewardDistribution::from_samples(proxy)?, n)?;
    let eg = b.pmf.iter().zip(gold).map(|(q, g)| q * g).sum::<f64>();
    Ok((b.kl, b.expected_reward, eg))
}

/// The exact best-of-n curve, n = 1…[`CURVE_MAX_N`], averaged over prompts (see the module
/// docs). `refs[x]` = (proxy, gold) of prompt x's reference samples.
///
/// # Errors
/// Those of [`best_of_n_on_samples`] and [`ReferenceTails`].
pub fn best_of_n_curve(
    refs: &[(Vec<f64>, Vec<f64>)],
    tails: &[ReferenceTails],
) -> Result<Vec<GoldCurvePoint>> {
    let p = refs.len() as f64;
    let mut out = Vec::with_capacity(CURVE_MAX_N as usize);
    for n in 1..=CURVE_MAX_N {
        let mut pt = GoldCurvePoint {
            n,
            kl: 0.0,
            proxy_improvement: 0.0,
            gold_improvement: 0.0,
            proxy_bound: 0.0,
            gold_bound: 0.0,
            gold_transfer_lower: 0.0,
        };
        for ((proxy, gold), t) in refs.iter().zip(tails) {
            let (kl, er, eg) = best_of_n_on_samples(proxy, gold, n)?;
            let b = t.bounds(kl)?;
            let dp = er - t.proxy_mean;
            pt.kl += kl / p;
            pt.proxy_improvement += dp / p;
            pt.gold_improvement += (eg - t.gold_mean) / p;
            pt.proxy_bound += b.proxy / p;
            pt.gold_bound += b.gold / p;
            pt.gold_transfer_lower += (dp - b.over) / p;
        }
        out.push(pt);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// E[r* of the best of n draws with replacement], ties uniform, by enumerating all
    /// M^n ordered draws: independent of tilt-core's order statistics.
    fn brute_force(proxy: &[f64], gold: &[f64], n: u32) -> (f64, f64) {
        let m = proxy.len();
        let total = m.pow(n);
        let (mut er, mut eg) = (0.0, 0.0);
        for code in 0..total {
            let draws: Vec<usize> = (0..n).map(|k| (code / m.pow(k)) % m).collect();
            let top = draws
                .iter()
                .map(|&i| proxy[i])
                .fold(f64::NEG_INFINITY, f64::max);
            let tied: Vec<usize> = draws.iter().copied().filter(|&i| proxy[i] == top).collect();
            for &i in &tied {
                er += proxy[i] / tied.len() as f64;
                eg += gold[i] / tied.len() as f64;
            }
        }
        (er / total as f64, eg / total as f64)
    }

    #[test]
    fn best_of_n_on_samples_matches_enumeration_with_ties() {
        let proxy = [0.3, 1.0, 1.0, -0.5, 0.3];
        let gold = [2.0, -1.0, 0.5, 0.0, 7.0];
        for n in 1..=4u32 {
            let (_, er, eg) = best_of_n_on_samples(&proxy, &gold, u64::from(n)).unwrap();
            let (ber, beg) = brute_force(&proxy, &gold, n);
            assert!((er - ber).abs() < 1e-12, "n={n}: E r {er} vs {ber}");
            assert!((eg - beg).abs() < 1e-12, "n={n}: E r* {eg} vs {beg}");
        }
    }

    #[test]
    fn bernoulli_tails_have_the_closed_form_proxies() {
        // 1 in 5 samples is a success: q = 0.2 < ½, so σ²₊ is Kearns–Saul's
        // (1 − 2q)/(2 log((1 − q)/q)); its negation has q = 0.8, whose upper tail is light:
        // σ²₊ = q(1 − q).
        let proxy = [0.0, 0.0, 1.0, 0.0, 0.0];
        let gold = [0.0; 5];
        let t = ReferenceTails::new(&proxy, &gold).unwrap();
        let ks = (1.0 - 0.4) / (2.0 * 4f64.ln());
        assert!((t.sigma2_proxy - ks).abs() < 1e-9, "{}", t.sigma2_proxy);
        assert_eq!(t.sigma2_gold, 0.0);
        assert!((t.sigma2_discrepancy_upper - ks).abs() < 1e-9);
        assert!((t.sigma2_discrepancy_lower - 0.16).abs() < 1e-9);
        assert!((t.discrepancy_mean - 0.2).abs() < 1e-15);
    }

    #[test]
    fn gaussian_tails_give_the_variance_and_the_tilt_meets_the_bound() {
        // A fine quantile grid of N(0, σ²): σ²₊ → σ² and the tilt e^{λr} of the grid, which
        // is Gaussian with mean λσ² and KL λ²σ²/2, meets √(2σ²·KL) = λσ².
        let sigma = 0.7f64;
        let m = 4000;
        let xs: Vec<f64> = (0..m)
            .map(|i| sigma * inverse_normal_cdf((i as f64 + 0.5) / m as f64))
            .collect();
        let t = ReferenceTails::new(&xs, &xs).unwrap();
        assert!(
            (t.sigma2_proxy / (sigma * sigma) - 1.0).abs() < 0.02,
            "{}",
            t.sigma2_proxy
        );
        let d = RewardDistribution::from_samples(&xs).unwrap();
        let tilt = tilt_core::tilt::tilt_by_lambda(&d, 2.0).unwrap();
        let bound = (2.0 * t.sigma2_proxy * tilt.kl).sqrt();
        let gain = tilt.expected_reward - t.proxy_mean;
        assert!(
            gain <= bound + 1e-12 && gain > 0.97 * bound,
            "{gain} vs {bound}"
        );
        // The same reward as gold: no discrepancy, a transfer interval of width 0.
        assert_eq!(t.sigma2_discrepancy_upper, 0.0);
    }

    /// Acklam's rational approximation (relative error < 1.2e-9), enough for a test grid.
    fn inverse_normal_cdf(p: f64) -> f64 {
        let a = [
            -3.969683028665376e1,
            2.209460984245205e2,
            -2.759285104469687e2,
            1.38357751867269e2,
            -3.066479806614716e1,
            2.506628277459239,
        ];
        let b = [
            -5.447609879822406e1,
            1.615858368580409e2,
            -1.556989798598866e2,
            6.680131188771972e1,
            -1.328068155288572e1,
        ];
        let c = [
            -7.784894002430293e-3,
            -3.223964580411365e-1,
            -2.400758277161838,
            -2.54967101022942,
            4.374664141464968,
            2.938163982698783,
        ];
        let d = [
            7.784695709041462e-3,
            3.224671290700398e-1,
            2.445134137142996,
            3.754408661907416,
        ];
        let pl = 0.02425;
        if p < pl {
            let q = (-2.0 * p.ln()).sqrt();
            (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
                / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0)
        } else if p <= 1.0 - pl {
            let q = p - 0.5;
            let r = q * q;
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
                / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0)
        } else {
            -inverse_normal_cdf(1.0 - p)
        }
    }

    #[test]
    fn a_constant_gap_transfers_the_whole_improvement() {
        // r* = r − 3: e ≡ 3 has σ²₊ = 0 both ways, so the transfer interval is the point
        // Δ_r, and every best-of-n gains the same on both rewards.
        let proxy = [0.1, 0.9, 0.4, 0.7, 0.2, 0.65];
        let gold: Vec<f64> = proxy.iter().map(|r| r - 3.0).collect();
        let t = ReferenceTails::new(&proxy, &gold).unwrap();
        assert_eq!(
            (t.sigma2_discrepancy_upper, t.sigma2_discrepancy_lower),
            (0.0, 0.0)
        );
        let curve = best_of_n_curve(&[(proxy.to_vec(), gold.clone())], &[t]).unwrap();
        for pt in &curve {
            assert!((pt.gold_improvement - pt.proxy_improvement).abs() < 1e-12);
            assert!((pt.gold_transfer_lower - pt.proxy_improvement).abs() < 1e-12);
        }
    }

    #[test]
    fn the_theorems_hold_on_the_curve_for_random_rewards() {
        // On the empirical law every inequality is a theorem: Δ_r ≤ √(2σ²₊(r)KL),
        // Δ_{r*} ≤ √(2σ²₊(r*)KL), Δ_{r*} ≥ Δ_r − √(2σ²₊(e)KL), at every n, for rewards
        // with ties, a gold reward correlated or not, and several prompts.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for case in 0..30 {
            let m = rng.random_range(2..40);
            let prompts = rng.random_range(1..4);
            let mut refs = Vec::new();
            let mut tails = Vec::new();
            for _ in 0..prompts {
                let proxy: Vec<f64> = (0..m)
                    .map(|_| (rng.random_range(0..8) as f64) * 0.25)
                    .collect();
                let w: f64 = rng.random_range(-1.0..1.0);
                let gold: Vec<f64> = proxy
                    .iter()
                    .map(|r| w * r + rng.random_range(-1.0..1.0))
                    .collect();
                tails.push(ReferenceTails::new(&proxy, &gold).unwrap());
                refs.push((proxy, gold));
            }
            let curve = best_of_n_curve(&refs, &tails).unwrap();
            assert_eq!(curve.len(), CURVE_MAX_N as usize);
            let eps = 1e-9;
            for pt in &curve {
                assert!(pt.proxy_improvement >= -eps, "case {case}: {pt:?}");
                assert!(
                    pt.proxy_improvement <= pt.proxy_bound + eps,
                    "case {case}: {pt:?}"
                );
                assert!(
                    pt.gold_improvement <= pt.gold_bound + eps,
                    "case {case}: {pt:?}"
                );
                assert!(
                    pt.gold_improvement >= pt.gold_transfer_lower - eps,
                    "case {case}: {pt:?}"
                );
                assert!(pt.kl <= tilt_core::bounds::bon_kl_bound(pt.n).unwrap() + eps);
            }
            assert!(curve[0].kl.abs() < 1e-12 && curve[0].proxy_improvement.abs() < 1e-12);
        }
    }

    #[test]
    fn strategy_figures_average_the_prompts() {
        let tails = vec![
            ReferenceTails::new(&[0.0, 1.0], &[0.0, 1.0]).unwrap(),
            ReferenceTails::new(&[0.0, 2.0], &[1.0, 1.0]).unwrap(),
        ];
        let outcomes = [
            PromptOutcome {
                proxy: 1.0,
                gold: 1.0,
                kl: 0.5,
            },
            PromptOutcome {
                proxy: 2.0,
                gold: 1.0,
                kl: 0.5,
            },
        ];
        let s = strategy_gold("bon:4", &outcomes, &tails, 3).unwrap();
        assert!((s.proxy_improvement - 0.75).abs() < 1e-15);
        assert!((s.gold_improvement - 0.25).abs() < 1e-15);
        assert!((s.gold_mean_reward - 1.0).abs() < 1e-15);
        // Prompt 1: σ²₊ of a fair coin on {0, 1} is ¼ (Kearns–Saul at q = ½): bound
        // √(2·¼·½) = ½; prompt 2's gold is constant: bound 0.
        assert!((s.gold_bound - 0.25).abs() < 1e-9, "{}", s.gold_bound);
        let [lo, hi] = s.gold_transfer_interval;
        // Prompt 1: e ≡ 0, the point ½; prompt 2: e = ±1 (σ²₊ = 1), Δ_r = 1 ± 1.
        assert!(
            (lo - 0.25).abs() < 1e-9 && (hi - 1.25).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert!(strategy_gold("x", &outcomes[..1], &tails, 0).is_err());
    }
}
