//! What an output cost: the KL divergence from the reference that its strategy spends, in
//! nats, as a bound and as an estimate from the candidates at hand.
//!
//! Why both: the bound `log N − (N−1)/N` (arXiv 2401.01879 Thm 3.1) is what the literature
//! quotes for best-of-N, but it is only an upper bound, loose when the reference puts heavy
//! mass on a few outputs (short answers, low temperature), where the true KL can be far
//! smaller. The candidates of one prompt are a sample of the reference, so their empirical
//! distribution shows those heavy atoms (repeated texts). [`cost`] applies the paper's §4
//! estimator (via tilt-core) to that empirical distribution and says, in `kl_note`, exactly
//! what the number estimates. With N distinct candidates the empirical distribution has no
//! atom heavier than 1/N and the estimate is `D̂(1/N)`, close to the bound; repeated
//! candidates pull it down.

use crate::{DecodeError, Strategy};
use serde::{Deserialize, Serialize};
use tilt_core::best_of_n::{best_of_n, worst_of_n};
use tilt_core::bounds::bon_kl_bound;
use tilt_core::soft_best_of_n::soft_best_of_n;
use tilt_core::RewardDistribution;

/// The KL cost of one output, in nats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// An upper bound on KL(π‖p) for the strategy's output law π (None where there is none).
    pub kl_bound: Option<f64>,
    /// An estimate of KL(π‖p) from this prompt's candidates (None where it cannot be
    /// formed; `kl_note` says why).
    pub kl_estimate: Option<f64>,
    /// What `kl_bound` and `kl_estimate` are, in words.
    pub kl_note: String,
}

/// The empirical reference distribution of the candidates: one outcome per distinct text,
/// with mass (its count)/N and its reward (the first candidate's with that text).
///
/// # Errors
/// [`DecodeError::InvalidInput`] when the lengths differ or there are no candidates.
pub fn empirical_distribution(
    texts: &[&str],
    rewards: &[f64],
) -> Result<RewardDistribution, DecodeError> {
    if texts.len() != rewards.len() || texts.is_empty() {
        return Err(DecodeError::invalid(
            "candidates",
            format!("{} texts and {} rewards", texts.len(), rewards.len()),
        ));
    }
    let mut seen: Vec<(&str, f64, f64)> = Vec::new();
    for (t, &r) in texts.iter().zip(rewards) {
        match seen.iter_mut().find(|(s, _, _)| s == t) {
            Some(e) => e.2 += 1.0,
            None => seen.push((t, r, 1.0)),
        }
    }
    let (rw, ms): (Vec<f64>, Vec<f64>) = seen.iter().map(|&(_, r, c)| (r, c)).unzip();
    Ok(RewardDistribution::new_normalized(ms, rw)?)
}

/// The KL cost of `strategy` given this prompt's candidates (texts and rewards in draw
/// order), `n` the batch size, and for rewind the number of draws made and accepted.
///
/// ```text
/// sample    bound 0, estimate 0                      (the output is a draw from p)
/// bon, won  bound log N − (N−1)/N                    (arXiv 2401.01879 Thm 3.1)
///           estimate E_{y~π̂_N}[D̂(p̂(T(y)))]          (§4 estimator at the mass of y's reward
///                                                     level T(y); p̂ = empirical law of the
///                                                     candidates, π̂_N = best/worst-of-N of p̂)
/// soft-bon  bound log N                              (density ratio π/p ≤ N, derivations §6.1)
///           estimate KL(π̂_{N,λ}‖p̂)                  (exact soft-BoN law on p̂, when small
///                                                     enough to enumerate)
/// rewind    bound none                               (KL = log 1/p(A) for A = {r ≥ threshold},
///           estimate log(draws/accepted)              §6; see below)
/// ```
///
/// Rewind's estimate: the runner draws in batches of N until a batch holds an acceptance (or
/// the cap), so `draws` is a multiple of N (but for a capped last batch) and `accepted` counts
/// every draw of the last batch in A. log(draws/accepted) is the maximum-likelihood estimate
/// of log 1/p(A) (the likelihood p(A)^a·(1−p(A))^(D−a) does not depend on the stopping
/// rule), but it is biased and its law depends on N through that rule: with N = 1, draws is
/// geometric, accepted = 1, and E[log draws] falls short of log 1/p(A) (by Euler's
/// γ ≈ 0.577 nats as p(A) → 0); its bias vanishes as N·p(A) grows. The test
/// `rewind_kl_estimate_has_the_stated_law` in `tests/exact_distribution.rs` checks its mean
/// against the exact expectation under the stopping rule for two N (on the toy policy,
/// p(A) ≈ 0.076: −0.46 nats of bias at N = 1, +0.02 at N = 16).
///
/// # Errors
/// [`DecodeError::InvalidInput`] on mismatched or empty inputs; tilt-core's errors on
/// non-finite rewards.
pub fn cost(
    strategy: &Strategy,
    texts: &[&str],
    rewards: &[f64],
    n: usize,
    draws: usize,
    accepted: usize,
) -> Result<Cost, DecodeError> {
    let nu = n as u64;
    Ok(match *strategy {
        Strategy::Sample => Cost {
            kl_bound: Some(0.0),
            kl_estimate: Some(0.0),
            kl_note: "sample returns a draw from the reference: KL 0 nats".into(),
        },
        Strategy::Bon | Strategy::Won => {
            let emp = empirical_distribution(texts, rewards)?;
            let est = if *strategy == Strategy::Bon {
                best_of_n(&emp, nu)?.kl_estimate
            } else {
                worst_of_n(&emp, nu)?.kl_estimate
            };
            Cost {
                kl_bound: Some(bon_kl_bound(nu)?),
                kl_estimate: Some(est),
                kl_note: format!(
                    "nats. kl_bound = log N - (N-1)/N, an upper bound on KL({name}_N || p) \
                     (arXiv 2401.01879 Thm 3.1). kl_estimate = E[D(eps)], the §4 estimator \
                     averaged over the {name}-of-N law of the empirical distribution of these \
                     {n} candidates ({k} distinct texts; eps = the share of the candidates \
                     whose reward ties the returned one): it estimates KL({name}_N || p) and falls below the bound \
                     when the reference repeats outputs",
                    name = strategy.name(),
                    k = emp.len()
                ),
            }
        }
        Strategy::SoftBon { lambda } => {
            let emp = empirical_distribution(texts, rewards)?;
            let bound = (n as f64).ln();
            match soft_best_of_n(&emp, nu, lambda) {
                Ok(s) => Cost {
                    kl_bound: Some(bound),
                    kl_estimate: Some(s.kl),
                    kl_note: format!(
                        "nats. kl_bound = log N (density ratio of soft best-of-N to p is at \
                         most N). kl_estimate = exact KL of soft best-of-N (lambda {lambda}) \
                         applied to the empirical distribution of these {n} candidates \
                         ({} distinct texts): a plug-in estimate of KL(soft-bon || p)",
                        emp.len()
                    ),
                },
                Err(e) => Cost {
                    kl_bound: Some(bound),
                    kl_estimate: None,
                    kl_note: format!(
                        "nats. kl_bound = log N (density ratio of soft best-of-N to p is at \
                         most N). No kl_estimate: the exact soft best-of-N law of the \
                         empirical distribution is too large to enumerate ({e})"
                    ),
                },
            }
        }
        Strategy::Rewind { .. } => {
            if draws == 0 {
                return Err(DecodeError::invalid("draws", "rewind made no draws"));
            }
            let note = "nats. Rewind-and-repeat returns p conditioned on A = {reward >= \
                        threshold} (when accepted), whose KL from p is exactly log 1/p(A) \
                        (arXiv 2401.01879 §6); no bound is known before p(A) is";
            if accepted == 0 {
                Cost {
                    kl_bound: None,
                    kl_estimate: None,
                    kl_note: format!(
                        "{note}. No draw of {draws} cleared the threshold: p(A) < ~1/{draws}, \
                         so the KL of exact rewind would be above ~log {draws} = {:.4}; the \
                         output is the best draw instead",
                        (draws as f64).ln()
                    ),
                }
            } else {
                Cost {
                    kl_bound: None,
                    kl_estimate: Some((draws as f64 / accepted as f64).ln()),
                    kl_note: format!(
                        "{note}. kl_estimate = log(draws/accepted) = log({draws}/{accepted}): \
                         the maximum-likelihood estimate of log 1/p(A) from the draws made, \
                         which stop after the first batch of {n} holding a draw in A. It is \
                         not unbiased, and its law depends on the batch size: for a batch of \
                         1 the number of draws is geometric and the estimate falls short of \
                         log 1/p(A) on average (by about 0.577 nats, Euler's gamma, when p(A) \
                         is small); its bias vanishes as {n}·p(A) grows"
                    ),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_candidates_give_d_hat_of_one_over_n() {
        let texts = ["a", "b", "c", "d"];
        let c = cost(&Strategy::Bon, &texts, &[0.1, 0.2, 0.3, 0.4], 4, 4, 0).unwrap();
        let d = tilt_core::best_of_n::kl_estimate_per_draw(0.25, 4).unwrap();
        assert!((c.kl_estimate.unwrap() - d).abs() < 1e-12);
        assert!((c.kl_bound.unwrap() - (4f64.ln() - 0.75)).abs() < 1e-12);
    }

    #[test]
    fn repeated_candidates_lower_the_estimate() {
        // Two texts, each half the candidates: the binary uniform case. D̂(0.5) at n = 4 is
        // 0.4991239 for every output, below the bound 0.6362944.
        let texts = ["x", "y", "x", "y"];
        let c = cost(&Strategy::Bon, &texts, &[0.0, 1.0, 0.0, 1.0], 4, 4, 0).unwrap();
        assert!((c.kl_estimate.unwrap() - 0.4991239).abs() < 1e-6);
        let w = cost(&Strategy::Won, &texts, &[0.0, 1.0, 0.0, 1.0], 4, 4, 0).unwrap();
        assert!((w.kl_estimate.unwrap() - 0.4991239).abs() < 1e-6);
    }

    #[test]
    fn soft_bon_and_rewind_costs() {
        let texts = ["x", "y"];
        let s = cost(
            &Strategy::SoftBon { lambda: 1.0 },
            &texts,
            &[0.0, 1.0],
            2,
            2,
            0,
        )
        .unwrap();
        // p̂ = (½, ½), r = (0, 1), n = 2: π(1) = 1/4 + ½·σ(1).
        let q = 0.25 + 0.5 / (1.0 + (-1f64).exp());
        let kl = q * (2.0 * q).ln() + (1.0 - q) * (2.0 * (1.0 - q)).ln();
        assert!((s.kl_estimate.unwrap() - kl).abs() < 1e-12);
        assert!((s.kl_bound.unwrap() - 2f64.ln()).abs() < 1e-15);
        let rw = Strategy::Rewind {
            threshold: 0.5,
            max_draws: 8,
        };
        let r = cost(&rw, &texts, &[0.0, 1.0], 2, 8, 2).unwrap();
        assert!((r.kl_estimate.unwrap() - 4f64.ln()).abs() < 1e-15);
        assert_eq!(
            cost(&rw, &texts, &[0.0, 1.0], 2, 8, 0).unwrap().kl_estimate,
            None
        );
        assert!(cost(&Strategy::Bon, &[], &[], 0, 0, 0).is_err());
    }
}
