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

use crate::error::{EngineError, Result};
use crate::request::KlNote;
use tilt_core::best_of_n::{best_of_n, worst_of_n};
use tilt_core::bounds::bon_kl_bound;
use tilt_core::soft_best_of_n::soft_best_of_n;
use tilt_core::RewardDistribution;

/// The KL cost of one output, in nats.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// An upper bound on KL(π‖p) for the strategy's output law π (None where there is none).
    pub kl_bound: Option<f64>,
    /// An estimate of KL(π‖p) from this output's candidates (None where it cannot be formed).
    pub kl_estimate: Option<f64>,
    /// What the two numbers are.
    pub kl_note: KlNote,
    /// Distinct texts among the candidates, where the estimate rests on them.
    pub distinct: Option<usize>,
}

/// The selection rules [`cost`] prices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// A plain draw from p.
    Sample,
    /// Best-of-n.
    Best,
    /// Worst-of-n.
    Worst,
    /// Soft best-of-n with temperature λ.
    Soft {
        /// λ > 0.
        lambda: f64,
    },
    /// Rewind-and-repeat, with its counts of draws made and accepted.
    Rewind {
        /// Draws made.
        draws: usize,
        /// Draws of the last batch in the acceptance set.
        accepted: usize,
    },
}

/// The empirical reference distribution of the candidates: one outcome per distinct text,
/// with mass (its count)/N and its reward (the first candidate's with that text).
///
/// # Errors
/// [`EngineError::Invalid`] when the lengths differ or there are no candidates.
pub fn empirical_distribution(texts: &[&str], rewards: &[f64]) -> Result<RewardDistribution> {
    if texts.len() != rewards.len() || texts.is_empty() {
        return Err(EngineError::invalid(
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

/// The KL cost of selecting with `rule` among this output's candidates (texts and rewards
/// in draw order), `n` the batch size.
///
/// ```text
/// sample    bound 0, estimate 0                      (the output is a draw from p)
/// bon, won  bound log n − (n−1)/n                    (arXiv 2401.01879 Thm 3.1)
///           estimate E_{y~π̂_n}[D̂(p̂(T(y)))]          (§4 estimator at the mass of y's reward
///                                                     level T(y); p̂ = empirical law of the
///                                                     candidates, π̂_n = best/worst-of-n of p̂)
/// soft-bon  bound log n                              (density ratio π/p ≤ n)
///           estimate KL(π̂_{n,λ}‖p̂)                  (exact soft-BoN law on p̂, when small
///                                                     enough to enumerate)
/// rewind    bound none                               (KL = log 1/p(A) for A = {r ≥ threshold},
///           estimate log(draws/accepted)              §6; see KlNote::Rewind)
/// ```
///
/// Rewind's estimate: the runner draws in batches of n until a batch holds an acceptance (or
/// the cap), so `draws` is a multiple of n (but for a capped last batch) and `accepted`
/// counts every draw of the last batch in A. log(draws/accepted) is the maximum-likelihood
/// estimate of log 1/p(A) (the likelihood p(A)^a·(1−p(A))^(D−a) does not depend on the
/// stopping rule), but it is biased and its law depends on n through that rule: with n = 1,
/// draws is geometric, accepted = 1, and E[log draws] falls short of log 1/p(A) (by Euler's
/// γ ≈ 0.577 nats as p(A) → 0); its bias vanishes as n·p(A) grows. The test
/// `rewind_kl_estimate_has_the_stated_law` in `tests/exact_distribution.rs` checks its mean
/// against the exact expectation under the stopping rule for two n (on the toy policy,
/// p(A) ≈ 0.076: −0.46 nats of bias at n = 1, +0.02 at n = 16).
///
/// # Errors
/// [`EngineError::Invalid`] on mismatched or empty inputs or a rewind with no draws;
/// tilt-core's errors on non-finite rewards.
pub fn cost(rule: Rule, texts: &[&str], rewards: &[f64], n: usize) -> Result<Cost> {
    let nu = n as u64;
    Ok(match rule {
        Rule::Sample => Cost {
            kl_bound: Some(0.0),
            kl_estimate: Some(0.0),
            kl_note: KlNote::Reference,
            distinct: None,
        },
        Rule::Best | Rule::Worst => {
            let emp = empirical_distribution(texts, rewards)?;
            let est = if rule == Rule::Best {
                best_of_n(&emp, nu)?.kl_estimate
            } else {
                worst_of_n(&emp, nu)?.kl_estimate
            };
            Cost {
                kl_bound: Some(bon_kl_bound(nu)?),
                kl_estimate: Some(est),
                kl_note: KlNote::SelectionBound,
                distinct: Some(emp.len()),
            }
        }
        Rule::Soft { lambda } => {
            let emp = empirical_distribution(texts, rewards)?;
            let bound = Some((n as f64).ln());
            match soft_best_of_n(&emp, nu, lambda) {
                Ok(s) => Cost {
                    kl_bound: bound,
                    kl_estimate: Some(s.kl),
                    kl_note: KlNote::SoftSelection,
                    distinct: Some(emp.len()),
                },
                Err(e) => {
                    tracing::debug!(error = %e, "soft best-of-n: no plug-in estimate");
                    Cost {
                        kl_bound: bound,
                        kl_estimate: None,
                        kl_note: KlNote::SoftSelectionBoundOnly,
                        distinct: Some(emp.len()),
                    }
                }
            }
        }
        Rule::Rewind { draws, accepted } => {
            if draws == 0 {
                return Err(EngineError::invalid("draws", "rewind made no draws"));
            }
            if accepted == 0 {
                Cost {
                    kl_bound: None,
                    kl_estimate: None,
                    kl_note: KlNote::RewindNotAccepted,
                    distinct: None,
                }
            } else {
                Cost {
                    kl_bound: None,
                    kl_estimate: Some((draws as f64 / accepted as f64).ln()),
                    kl_note: KlNote::Rewind,
                    distinct: None,
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
        let c = cost(Rule::Best, &texts, &[0.1, 0.2, 0.3, 0.4], 4).unwrap();
        let d = tilt_core::best_of_n::kl_estimate_per_draw(0.25, 4).unwrap();
        assert!((c.kl_estimate.unwrap() - d).abs() < 1e-12);
        assert!((c.kl_bound.unwrap() - (4f64.ln() - 0.75)).abs() < 1e-12);
        assert_eq!(c.distinct, Some(4));
    }

    #[test]
    fn repeated_candidates_lower_the_estimate() {
        // Two texts, each half the candidates: the binary uniform case. D̂(0.5) at n = 4 is
        // 0.4991239 for every output, below the bound 0.6362944.
        let texts = ["x", "y", "x", "y"];
        let c = cost(Rule::Best, &texts, &[0.0, 1.0, 0.0, 1.0], 4).unwrap();
        assert!((c.kl_estimate.unwrap() - 0.4991239).abs() < 1e-6);
        let w = cost(Rule::Worst, &texts, &[0.0, 1.0, 0.0, 1.0], 4).unwrap();
        assert!((w.kl_estimate.unwrap() - 0.4991239).abs() < 1e-6);
        assert_eq!(w.distinct, Some(2));
    }

    #[test]
    fn soft_bon_and_rewind_costs() {
        let texts = ["x", "y"];
        let s = cost(Rule::Soft { lambda: 1.0 }, &texts, &[0.0, 1.0], 2).unwrap();
        // p̂ = (½, ½), r = (0, 1), n = 2: π(1) = 1/4 + ½·σ(1).
        let q = 0.25 + 0.5 / (1.0 + (-1f64).exp());
        let kl = q * (2.0 * q).ln() + (1.0 - q) * (2.0 * (1.0 - q)).ln();
        assert!((s.kl_estimate.unwrap() - kl).abs() < 1e-12);
        assert!((s.kl_bound.unwrap() - 2f64.ln()).abs() < 1e-15);
        let r = cost(
            Rule::Rewind {
                draws: 8,
                accepted: 2,
            },
            &texts,
            &[0.0, 1.0],
            2,
        )
        .unwrap();
        assert!((r.kl_estimate.unwrap() - 4f64.ln()).abs() < 1e-15);
        let none = cost(
            Rule::Rewind {
                draws: 8,
                accepted: 0,
            },
            &texts,
            &[0.0, 1.0],
            2,
        )
        .unwrap();
        assert_eq!(
            (none.kl_estimate, none.kl_note),
            (None, KlNote::RewindNotAccepted)
        );
        assert!(cost(Rule::Best, &[], &[], 0).is_err());
    }
}
