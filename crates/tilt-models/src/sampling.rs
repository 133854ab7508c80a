//! Seeded next-token sampling that says what it drew from.
//!
//! Sampling policy is data ([`SamplingParams`]: temperature, top-k, top-p), validated once at
//! construction, like candle's `Sampling` enum. Unlike candle's `LogitsProcessor`, the
//! sampler returns two log-probabilities with every token: the one under the model's own
//! distribution (what the KL to the reference is made of) and the one under the distribution
//! it actually drew from (after temperature and truncation), so that every token's
//! contribution to a divergence is known.
//!
//! Determinism: each sequence owns one ChaCha20 stream ([`SequenceSampler::new`]`(seed,
//! stream)` is `ChaCha20Rng::seed_from_u64(seed)` with `set_stream(stream)`), so the draws of
//! sequence i do not depend on how many other sequences run, in which order, or on how many
//! threads. Normalisation is done in `f64` and ties (equal log-probabilities) are broken by
//! token id, so the same inputs give the same token on every machine.

use crate::{ModelError, TokenId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// How to turn the model's next-token distribution into the one that is sampled.
///
/// The sampled distribution is, in this order: the model's log-probabilities divided by
/// `temperature`; restricted to the `top_k` most likely tokens (ties broken by smaller token
/// id); restricted to the smallest set of most likely tokens whose renormalised mass reaches
/// `top_p`; renormalised. With temperature 1 and no truncation it is the model's own
/// distribution, the reference policy of every alignment method in tilt.
///
/// ```
/// use tilt_models::sampling::SamplingParams;
/// let p = SamplingParams::new(0.7, Some(40), Some(0.95)).unwrap();
/// assert_eq!(p.temperature(), 0.7);
/// assert!(SamplingParams::new(0.0, None, None).is_err());
/// assert!(SamplingParams::default().is_reference());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawSampling", into = "RawSampling")]
pub struct SamplingParams {
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
}

/// What [`SamplingParams::new`] rejects: the parameter (`temperature`, `top_k`, `top_p`)
/// and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {problem}")]
pub struct SamplingError {
    /// The parameter's name.
    pub param: &'static str,
    /// What is wrong with its value.
    pub problem: String,
}

impl From<SamplingError> for ModelError {
    fn from(e: SamplingError) -> Self {
        ModelError::InvalidInput(e.to_string())
    }
}

/// The serialised form of [`SamplingParams`]: every field optional (temperature 1, no
/// truncation), unknown fields refused, and the values validated when read.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSampling {
    #[serde(default = "one")]
    temperature: f64,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl TryFrom<RawSampling> for SamplingParams {
    type Error = SamplingError;
    fn try_from(r: RawSampling) -> Result<Self, SamplingError> {
        SamplingParams::new(r.temperature, r.top_k, r.top_p)
    }
}

impl From<SamplingParams> for RawSampling {
    fn from(p: SamplingParams) -> Self {
        RawSampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        }
    }
}

impl Default for SamplingParams {
    /// Temperature 1, no truncation: the model's own distribution.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl SamplingParams {
    /// Validate and build.
    ///
    /// # Errors
    /// [`SamplingError`] naming the parameter: `temperature` not finite or ≤ 0, `top_k` = 0,
    /// `top_p` outside (0, 1].
    pub fn new(
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
    ) -> Result<Self, SamplingError> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(SamplingError {
                param: "temperature",
                problem: format!("{temperature} is not a finite number > 0"),
            });
        }
        if top_k == Some(0) {
            return Err(SamplingError {
                param: "top_k",
                problem: "0 keeps no token; use a value >= 1 (or leave it out)".into(),
            });
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError {
                    param: "top_p",
                    problem: format!("{p} is not in (0, 1]"),
                });
            }
        }
        Ok(SamplingParams {
            temperature,
            top_k,
            top_p,
        })
    }

    /// The temperature (> 0).
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// Keep only the k most likely tokens, if set (≥ 1).
    pub fn top_k(&self) -> Option<usize> {
        self.top_k
    }

    /// Keep only the smallest most-likely set with this much mass, if set (in (0, 1]).
    pub fn top_p(&self) -> Option<f64> {
        self.top_p
    }

    /// Whether these parameters sample the model's own distribution (temperature 1, no
    /// effective truncation).
    pub fn is_reference(&self) -> bool {
        self.temperature == 1.0 && self.top_k.is_none() && self.top_p.is_none_or(|p| p >= 1.0)
    }
}

/// One sampled token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The token drawn.
    pub token: TokenId,
    /// Its log-probability under the model (the input `log_probs`, unmodified), in nats.
    pub log_prob: f64,
    /// Its log-probability under the distribution actually drawn from (temperature and
    /// truncation applied, renormalised), in nats. Equals `log_prob` (up to rounding) for
    /// reference parameters.
    pub sampling_log_prob: f64,
}

/// A seeded sampler for one sequence: one ChaCha20 stream.
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    rng: ChaCha20Rng,
}

impl SequenceSampler {
    /// The sampler of stream `stream` under `seed`: `ChaCha20Rng::seed_from_u64(seed)` with
    /// `set_stream(stream)`. Different streams are independent; the same (seed, stream) gives
    /// the same draws.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        SequenceSampler { rng }
    }

    /// A uniform draw in [0, 1) from this stream (53 random bits).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Draw an index with probability proportional to `exp(log_weights[i])` (entries may be
    /// −∞ for weight 0). Computed in `f64` by inverse CDF in index order.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when `log_weights` is empty, holds NaN or +∞, or is all
    /// −∞.
    pub fn sample_index(&mut self, log_weights: &[f64]) -> Result<usize, ModelError> {
        let (idx, _) = self.draw_from(log_weights, 0..log_weights.len())?;
        Ok(idx)
    }

    /// Draw the next token from `log_probs` (the model's normalised next-token
    /// log-probabilities) under `params`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when `log_probs` is empty, holds NaN or +∞, or gives
    /// every token probability 0.
    pub fn sample(
        &mut self,
        log_probs: &[f32],
        params: &SamplingParams,
    ) -> Result<Sampled, ModelError> {
        if log_probs.is_empty() {
            return Err(ModelError::InvalidInput(
                "sampling: empty log-probability vector".into(),
            ));
        }
        if let Some((i, v)) = log_probs
            .iter()
            .enumerate()
            .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
        {
            return Err(ModelError::InvalidInput(format!(
                "sampling: log-probability of token {i} is {v}"
            )));
        }
        let inv_t = 1.0 / params.temperature;
        let scaled: Vec<f64> = log_probs.iter().map(|&l| f64::from(l) * inv_t).collect();
        // The walk runs over the candidate tokens in token-id order: all of them, or those
        // top-k / top-p keep (ranked by descending probability, ties by token id).
        let truncates =
            params.top_k.is_some_and(|k| k < scaled.len()) || params.top_p.is_some_and(|p| p < 1.0);
        let (token, sampling_log_prob) = if truncates {
            let kept = truncated(&scaled, params);
            self.draw_from(&scaled, kept.iter().copied())?
        } else {
            // Every token in id order, without building the index list: a token of
            // probability 0 adds exactly 0 to every sum, so this is the same arithmetic as
            // the list of the others.
            self.draw_from(&scaled, 0..scaled.len())?
        };
        Ok(Sampled {
            token: token as TokenId,
            log_prob: f64::from(log_probs[token]),
            sampling_log_prob,
        })
    }

    /// Draw one of `order` with probability ∝ exp(logits[i]); return it and its normalised
    /// log-probability.
    fn draw_from(
        &mut self,
        logits: &[f64],
        order: impl Iterator<Item = usize> + Clone,
    ) -> Result<(usize, f64), ModelError> {
        if let Some(i) = order
            .clone()
            .find(|&i| logits[i].is_nan() || logits[i] == f64::INFINITY)
        {
            return Err(ModelError::InvalidInput(format!(
                "sampling: weight {i} is {}",
                logits[i]
            )));
        }
        let lse = log_sum_exp(order.clone().map(|i| logits[i]));
        if !lse.is_finite() {
            return Err(ModelError::InvalidInput(
                "sampling: every token has probability 0".into(),
            ));
        }
        let u = self.uniform();
        let mut acc = 0.0;
        let mut last = None;
        for i in order {
            if logits[i] == f64::NEG_INFINITY {
                continue;
            }
            acc += (logits[i] - lse).exp();
            last = Some(i);
            if u < acc {
                return Ok((i, logits[i] - lse));
            }
        }
        // Rounding left acc a hair below 1 and u above it: take the last possible token.
        let i = last.ok_or_else(|| {
            ModelError::InvalidInput("sampling: every token has probability 0".into())
        })?;
        Ok((i, logits[i] - lse))
    }
}

/// The tokens of nonzero probability that `params` keep (top-k, then top-p), in token-id
/// order.
fn truncated(scaled: &[f64], params: &SamplingParams) -> Vec<usize> {
    let mut kept: Vec<usize> = (0..scaled.len())
        .filter(|&i| scaled[i] > f64::NEG_INFINITY)
        .collect();
    let by_rank = |a: &usize, b: &usize| scaled[*b].total_cmp(&scaled[*a]).then(a.cmp(b));
    if let Some(k) = params.top_k {
        if k < kept.len() {
            kept.select_nth_unstable_by(k - 1, by_rank);
            kept.truncate(k);
        }
    }
    if let Some(p) = params.top_p.filter(|&p| p < 1.0) {
        kept.sort_unstable_by(by_rank);
        let lse = log_sum_exp(kept.iter().map(|&i| scaled[i]));
        let mut mass = 0.0;
        let mut cut = kept.len();
        for (j, &i) in kept.iter().enumerate() {
            mass += (scaled[i] - lse).exp();
            if mass >= p {
                cut = j + 1;
                break;
            }
        }
        kept.truncate(cut);
    }
    // A fixed order for the inverse-CDF walk, whatever the truncation did.
    kept.sort_unstable();
    kept
}

/// log Σ exp(x_i) in `f64`, stable; −∞ for an empty or all −∞ input.
pub fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY || !m.is_finite() {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(ps: &[f64]) -> Vec<f32> {
        ps.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn params_are_validated() {
        assert!(SamplingParams::new(f64::NAN, None, None).is_err());
        assert!(SamplingParams::new(-1.0, None, None).is_err());
        assert!(SamplingParams::new(f64::INFINITY, None, None).is_err());
        assert!(SamplingParams::new(1.0, Some(0), None).is_err());
        assert!(SamplingParams::new(1.0, None, Some(0.0)).is_err());
        assert!(SamplingParams::new(1.0, None, Some(1.5)).is_err());
        assert!(SamplingParams::new(1.0, Some(1), Some(1.0)).is_ok());
    }

    #[test]
    fn params_are_validated_when_read_and_name_the_parameter() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.5}"#).unwrap();
        assert_eq!(p, SamplingParams::new(0.5, None, None).unwrap());
        let d: SamplingParams = serde_json::from_str("{}").unwrap();
        assert!(d.is_reference());
        for (bad, param) in [
            (r#"{"temperature":-1}"#, "temperature"),
            (r#"{"top_k":0}"#, "top_k"),
            (r#"{"top_p":1.5}"#, "top_p"),
        ] {
            let e = serde_json::from_str::<SamplingParams>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{param}: ")), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature":1}"#).is_err());
        let back =
            serde_json::to_string(&SamplingParams::new(0.7, Some(3), None).unwrap()).unwrap();
        assert_eq!(back, r#"{"temperature":0.7,"top_k":3,"top_p":null}"#);
    }

    #[test]
    fn same_seed_and_stream_same_draws_other_stream_differs() {
        let l = lp(&[0.25, 0.25, 0.25, 0.25]);
        let p = SamplingParams::default();
        let draw = |seed, stream| {
            let mut s = SequenceSampler::new(seed, stream);
            (0..64)
                .map(|_| s.sample(&l, &p).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 3), draw(7, 3));
        assert_ne!(draw(7, 3), draw(7, 4));
        assert_ne!(draw(7, 3), draw(8, 3));
    }

    #[test]
    fn reference_params_reproduce_the_model_distribution() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let l = lp(&probs);
        let mut s = SequenceSampler::new(1, 0);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let d = s.sample(&l, &SamplingParams::default()).unwrap();
            assert!((d.log_prob - d.sampling_log_prob).abs() < 1e-6);
            counts[d.token as usize] += 1;
        }
        // Chi-square, 3 degrees of freedom: 16.27 is the 0.999 quantile.
        let chi2: f64 = counts
            .iter()
            .zip(probs)
            .map(|(&c, p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum();
        assert!(chi2 < 16.27, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn top_k_breaks_ties_by_token_id_and_reports_both_log_probs() {
        // Tokens 1 and 2 tie; top-2 keeps 0 and 1.
        let l = lp(&[0.4, 0.2, 0.2, 0.2]);
        let p = SamplingParams::new(1.0, Some(2), None).unwrap();
        let mut s = SequenceSampler::new(3, 0);
        for _ in 0..500 {
            let d = s.sample(&l, &p).unwrap();
            assert!(d.token == 0 || d.token == 1, "{d:?}");
            let expect = if d.token == 0 {
                (2.0f64 / 3.0).ln()
            } else {
                (1.0f64 / 3.0).ln()
            };
            assert!((d.sampling_log_prob - expect).abs() < 1e-6, "{d:?}");
            assert!((d.log_prob - f64::from(l[d.token as usize])).abs() < 1e-12);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        let l = lp(&[0.1, 0.6, 0.25, 0.05]);
        // 0.6 < 0.8 <= 0.85: keeps tokens 1 and 2.
        let p = SamplingParams::new(1.0, None, Some(0.8)).unwrap();
        let mut s = SequenceSampler::new(5, 9);
        let mut seen = [false; 4];
        for _ in 0..2000 {
            let d = s.sample(&l, &p).unwrap();
            seen[d.token as usize] = true;
        }
        assert_eq!(seen, [false, true, true, false]);
    }

    #[test]
    fn temperature_sharpens_and_logs_the_tempered_probability() {
        let l = lp(&[0.8, 0.2]);
        let p = SamplingParams::new(0.5, None, None).unwrap();
        let mut s = SequenceSampler::new(11, 0);
        let d = s.sample(&l, &p).unwrap();
        // Tempered: 0.64 / 0.68 and 0.04 / 0.68.
        let expect = if d.token == 0 {
            0.64f64 / 0.68
        } else {
            0.04 / 0.68
        };
        assert!((d.sampling_log_prob - expect.ln()).abs() < 1e-6);
    }

    #[test]
    fn bad_log_probs_are_errors_not_panics() {
        let mut s = SequenceSampler::new(0, 0);
        let p = SamplingParams::default();
        assert!(s.sample(&[], &p).is_err());
        assert!(s.sample(&[0.0, f32::NAN], &p).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3], &p).is_err());
        assert!(s.sample_index(&[]).is_err());
        // -inf entries are never drawn.
        for _ in 0..100 {
            assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0], &p).unwrap().token, 1);
        }
    }
}
