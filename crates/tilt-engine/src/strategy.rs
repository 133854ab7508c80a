//! The seven strategies as one value: [`Strategy`].
//!
//! Each variant holds exactly the parameters it reads, so a request can neither carry a
//! parameter that would be ignored nor miss one that is needed: the type says it. What
//! reaches the engine as loose options (flags of the CLI, fields of an HTTP request,
//! keyword arguments in Python) goes through one constructor, [`Strategy::from_options`],
//! which refuses an option the strategy does not read *whether or not its value equals the
//! default*, and through one [`Strategy::validate`] for the values.
//!
//! ```text
//! sample     draw one candidate from p (the model with its sampling parameters)
//! bon        best of n iid candidates under the reward           arXiv 2401.01879 §2
//! won        worst of n                                          arXiv 2412.19792
//! soft-bon   candidate i with probability ∝ e^{r_i/λ}           arXiv 2505.03156
//! rewind     draw (n at a time) until r ≥ threshold, ≤ max_draws arXiv 2401.01879 §6
//! cd-token   token-level controlled decoding over the top-k     arXiv 2310.17022 §3
//! cd-block   best-of-K per block of M tokens under the scorer    arXiv 2310.17022 §3
//! ```

use crate::error::{check_names, EngineError, Result};
use serde::{Deserialize, Serialize};
use tilt_models::sampling::SamplingParams;

/// The largest number of candidates a strategy draws at once (n, rewind's batch, cd-block's
/// K): each needs its own KV cache, and a draw's number must fit its random stream.
pub const MAX_N: usize = 4096;

/// The largest rewind `max_draws` accepted.
pub const MAX_DRAWS: usize = 1 << 20;

/// The default n of bon, won, soft-bon and rewind's batch.
pub const DEFAULT_N: usize = 4;
/// The default λ of soft-bon (reward units).
pub const DEFAULT_SOFT_LAMBDA: f64 = 1.0;
/// The default acceptance threshold of rewind.
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// The default `max_draws` of rewind.
pub const DEFAULT_MAX_DRAWS: usize = 64;
/// The default λ of cd-token.
pub const DEFAULT_CD_LAMBDA: f64 = 1.0;
/// The default candidates per step of cd-token.
pub const DEFAULT_CD_TOP_K: usize = 10;
/// The default K of cd-block.
pub const DEFAULT_BLOCK_K: usize = 4;
/// The default M of cd-block.
pub const DEFAULT_BLOCK_M: usize = 8;
/// The most prefix scorers one cd strategy sums.
pub const MAX_SCORERS: usize = 16;

/// One term of a weighted sum of prefix scorers: a scorer's name in the engine and its
/// weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedScorer {
    /// The scorer's name in the engine.
    pub name: String,
    /// Its weight w (finite; negative steers away from the scorer's reward).
    #[serde(default = "unit_weight")]
    pub weight: f64,
}

fn unit_weight() -> f64 {
    1.0
}

/// The prefix scorer of cd-token and cd-block: one scorer by name, or a weighted sum
/// V = Σᵢ wᵢ·Vᵢ of several. Controlled decoding for several rewards at once needs nothing
/// more: the value of the weighted reward Σᵢ wᵢ·rᵢ is Σᵢ wᵢ·Vᵢ by linearity of expectation,
/// so guiding by the sum targets the tilt of p by the weighted reward (arXiv 2310.17022,
/// multi-objective CD: the scorers of the rewards combine linearly; docs/theory.md §8).
///
/// As JSON, a name (`"scorer": "helpful"`) or a list of terms
/// (`"scorer": [{"name": "helpful", "weight": 0.7}, {"name": "short", "weight": 0.3}]`; a term
/// without a weight has weight 1).
#[derive(Debug, Clone, PartialEq)]
pub enum ScorerSpec {
    /// One scorer, weight 1.
    One(String),
    /// A weighted sum, summed in the listed order.
    Weighted(Vec<WeightedScorer>),
}

impl From<&str> for ScorerSpec {
    fn from(name: &str) -> Self {
        ScorerSpec::One(name.to_string())
    }
}

impl From<String> for ScorerSpec {
    fn from(name: String) -> Self {
        ScorerSpec::One(name)
    }
}

impl Serialize for ScorerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ScorerSpec::One(name) => s.serialize_str(name),
            ScorerSpec::Weighted(terms) => terms.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ScorerSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ScorerSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a scorer name or a list of {\"name\", \"weight\"} terms")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<ScorerSpec, E> {
                Ok(ScorerSpec::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<ScorerSpec, A::Error> {
                let mut terms = Vec::new();
                while let Some(t) = seq.next_element::<WeightedScorer>()? {
                    terms.push(t);
                }
                Ok(ScorerSpec::Weighted(terms))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl ScorerSpec {
    /// The terms (name, weight) in order; [`ScorerSpec::One`] is one term of weight 1.
    pub fn terms(&self) -> Vec<(&str, f64)> {
        match self {
            ScorerSpec::One(name) => vec![(name.as_str(), 1.0)],
            ScorerSpec::Weighted(terms) => {
                terms.iter().map(|t| (t.name.as_str(), t.weight)).collect()
            }
        }
    }

    /// Check the names and weights.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `scorer`: an empty name, an empty list, more than
    /// [`MAX_SCORERS`] terms, a name listed twice, a non-finite weight.
    pub fn validate(&self) -> Result<()> {
        let terms = self.terms();
        if terms.is_empty() {
            return Err(EngineError::invalid(
                "scorer",
                "an empty list of scorers; give at least one",
            ));
        }
        if terms.len() > MAX_SCORERS {
            return Err(EngineError::invalid(
                "scorer",
                format!(
                    "{} scorers; at most {MAX_SCORERS} can be summed",
                    terms.len()
                ),
            ));
        }
        check_names(terms.iter().map(|(name, _)| *name), "scorer")?;
        match terms.iter().find(|(_, w)| !w.is_finite()) {
            Some((name, w)) => Err(EngineError::invalid(
                "scorer",
                format!("scorer {name:?} has weight {w}; a weight must be a finite number"),
            )),
            None => Ok(()),
        }
    }

    /// What [`Strategy::label`] appends for a weighted sum: the weights in order,
    /// `,w=0.7/0.3` (nothing for one scorer, so that labels of single-scorer runs are
    /// unchanged).
    fn label_suffix(&self) -> String {
        match self {
            ScorerSpec::One(_) => String::new(),
            ScorerSpec::Weighted(terms) => {
                let parts: Vec<String> = terms.iter().map(|t| t.weight.to_string()).collect();
                format!(",w={}", parts.join("/"))
            }
        }
    }
}

/// An inference-time alignment strategy with its parameters (see the module docs).
///
/// As JSON, internally tagged by `name`; unknown fields are refused:
/// ```
/// use tilt_engine::Strategy;
/// let s: Strategy = serde_json::from_str(r#"{"name": "bon", "n": 8}"#).unwrap();
/// assert_eq!(s.name(), "bon");
/// assert!(serde_json::from_str::<Strategy>(r#"{"name": "bon", "n": 8, "lambda": 1}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    /// The reference: one draw from p.
    Sample {
        /// How p samples (temperature 1 and no truncation: the model itself).
        #[serde(default)]
        sampling: SamplingParams,
    },
    /// Best-of-n: the highest reward of n draws, ties broken uniformly with the seeded
    /// selection stream (arXiv 2401.01879 §2).
    Bon {
        /// n ≥ 1.
        n: usize,
        /// How the candidates are sampled.
        #[serde(default)]
        sampling: SamplingParams,
    },
    /// Worst-of-n: the lowest reward, ties uniform (arXiv 2412.19792).
    Won {
        /// n ≥ 1.
        n: usize,
        /// How the candidates are sampled.
        #[serde(default)]
        sampling: SamplingParams,
    },
    /// Soft best-of-n: candidate i with probability ∝ e^{r_i/λ} (arXiv 2505.03156); λ → 0 is
    /// best-of-n, λ → ∞ is `sample`.
    SoftBon {
        /// n ≥ 1.
        n: usize,
        /// The temperature λ > 0, in reward units.
        lambda: f64,
        /// How the candidates are sampled.
        #[serde(default)]
        sampling: SamplingParams,
    },
    /// Rewind-and-repeat: draw until a candidate's reward is at least `threshold`, at most
    /// `max_draws` draws, `n` at a time from one shared prefill; the first accepted draw in
    /// draw order is returned (so the output does not depend on n), or the best draw when
    /// none is accepted (arXiv 2401.01879 §6).
    Rewind {
        /// Draws per batch, ≥ 1.
        n: usize,
        /// The acceptance threshold on the reward (finite).
        threshold: f64,
        /// The cap on draws, in [1, [`MAX_DRAWS`]].
        max_draws: usize,
        /// How the candidates are sampled.
        #[serde(default)]
        sampling: SamplingParams,
    },
    /// Token-level controlled decoding: each token z is drawn with probability
    /// ∝ p(z)·e^{λ·V(prefix + z)} over the `top_k` most likely tokens of p, V a prefix scorer
    /// (arXiv 2310.17022 §3). Samples from p itself (temperature 1): its KL is against p.
    CdToken {
        /// λ ≥ 0 (finite).
        lambda: f64,
        /// Candidates per step, ≥ 1 (at least the vocabulary: no truncation).
        top_k: usize,
        /// The prefix scorer: a name in the engine or a weighted sum of several (None: the
        /// engine's only or first scorer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scorer: Option<ScorerSpec>,
    },
    /// Blockwise controlled decoding: draw K continuations of M tokens from p, keep the one
    /// the prefix scorer values most, repeat (arXiv 2310.17022 §3).
    CdBlock {
        /// K ≥ 1 continuations per block.
        k: usize,
        /// M ≥ 1 tokens per block.
        m: usize,
        /// The prefix scorer: a name in the engine or a weighted sum of several (None: the
        /// engine's only or first scorer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scorer: Option<ScorerSpec>,
    },
}

/// The names of the strategies, as written everywhere (`sample`, `bon`, …).
pub const STRATEGY_NAMES: [&str; 7] = [
    "sample", "bon", "won", "soft-bon", "rewind", "cd-token", "cd-block",
];

/// Strategy parameters as loose, optional options, the way faces receive them (CLI flags,
/// request fields, keyword arguments). [`Strategy::from_options`] turns them into a
/// [`Strategy`]; each field is named as the parameter it sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyOptions {
    /// Candidates (bon, won, soft-bon) or draws per batch (rewind).
    pub n: Option<usize>,
    /// Sampling temperature (the sampling strategies).
    pub temperature: Option<f64>,
    /// Sampling top-k (the sampling strategies); candidates per step (cd-token).
    pub top_k: Option<usize>,
    /// Sampling top-p (the sampling strategies).
    pub top_p: Option<f64>,
    /// soft-bon's temperature; cd-token's guidance strength.
    pub lambda: Option<f64>,
    /// rewind's acceptance threshold.
    pub threshold: Option<f64>,
    /// rewind's cap on draws.
    pub max_draws: Option<usize>,
    /// cd-block's K.
    pub block_k: Option<usize>,
    /// cd-block's M.
    pub block_m: Option<usize>,
    /// The prefix scorer of cd-token and cd-block (a name in the engine, or a weighted sum).
    pub scorer: Option<ScorerSpec>,
}

impl StrategyOptions {
    /// The options that are set, by parameter name.
    fn set(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut note = |on: bool, name: &'static str| {
            if on {
                v.push(name)
            }
        };
        note(self.n.is_some(), "n");
        note(self.temperature.is_some(), "temperature");
        note(self.top_k.is_some(), "top_k");
        note(self.top_p.is_some(), "top_p");
        note(self.lambda.is_some(), "lambda");
        note(self.threshold.is_some(), "threshold");
        note(self.max_draws.is_some(), "max_draws");
        note(self.block_k.is_some(), "block_k");
        note(self.block_m.is_some(), "block_m");
        note(self.scorer.is_some(), "scorer");
        v
    }

    fn sampling(&self) -> Result<SamplingParams> {
        Ok(SamplingParams::new(
            self.temperature.unwrap_or(1.0),
            self.top_k,
            self.top_p,
        )?)
    }
}

/// The parameters each strategy reads, by name (what [`Strategy::from_options`] accepts).
pub fn parameters_read(name: &str) -> &'static [&'static str] {
    const SAMPLING: [&str; 3] = ["temperature", "top_k", "top_p"];
    match name {
        "sample" => &SAMPLING,
        "bon" | "won" => &["n", "temperature", "top_k", "top_p"],
        "soft-bon" => &["n", "lambda", "temperature", "top_k", "top_p"],
        "rewind" => &[
            "n",
            "threshold",
            "max_draws",
            "temperature",
            "top_k",
            "top_p",
        ],
        "cd-token" => &["lambda", "top_k", "scorer"],
        "cd-block" => &["block_k", "block_m", "scorer"],
        _ => &[],
    }
}

impl Strategy {
    /// The strategy's name: `sample`, `bon`, `won`, `soft-bon`, `rewind`, `cd-token`,
    /// `cd-block`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Sample { .. } => "sample",
            Strategy::Bon { .. } => "bon",
            Strategy::Won { .. } => "won",
            Strategy::SoftBon { .. } => "soft-bon",
            Strategy::Rewind { .. } => "rewind",
            Strategy::CdToken { .. } => "cd-token",
            Strategy::CdBlock { .. } => "cd-block",
        }
    }

    /// Build the strategy `name` from loose options, with the documented defaults for the
    /// options not given (n = 4, soft-bon λ = 1, threshold 0.5, max_draws 64, cd-token λ = 1
    /// and top_k = 10, K = 4, M = 8), then [`Strategy::validate`] it.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming `strategy` (an unknown name), an option the strategy
    /// does not read (even when its value is the default), or a bad value.
    pub fn from_options(name: &str, o: &StrategyOptions) -> Result<Strategy> {
        let reads = parameters_read(name);
        if reads.is_empty() {
            return Err(EngineError::invalid(
                "strategy",
                format!(
                    "unknown strategy {name:?}; the strategies are {}",
                    STRATEGY_NAMES.join(", ")
                ),
            ));
        }
        if let Some(extra) = o.set().into_iter().find(|p| !reads.contains(p)) {
            return Err(EngineError::invalid(extra, not_read_reason(name, extra)));
        }
        let n = o.n.unwrap_or(DEFAULT_N);
        let s = match name {
            "sample" => Strategy::Sample {
                sampling: o.sampling()?,
            },
            "bon" => Strategy::Bon {
                n,
                sampling: o.sampling()?,
            },
            "won" => Strategy::Won {
                n,
                sampling: o.sampling()?,
            },
            "soft-bon" => Strategy::SoftBon {
                n,
                lambda: o.lambda.unwrap_or(DEFAULT_SOFT_LAMBDA),
                sampling: o.sampling()?,
            },
            "rewind" => Strategy::Rewind {
                n,
                threshold: o.threshold.unwrap_or(DEFAULT_THRESHOLD),
                max_draws: o.max_draws.unwrap_or(DEFAULT_MAX_DRAWS),
                sampling: o.sampling()?,
            },
            "cd-token" => Strategy::CdToken {
                lambda: o.lambda.unwrap_or(DEFAULT_CD_LAMBDA),
                top_k: o.top_k.unwrap_or(DEFAULT_CD_TOP_K),
                scorer: o.scorer.clone(),
            },
            _ => Strategy::CdBlock {
                k: o.block_k.unwrap_or(DEFAULT_BLOCK_K),
                m: o.block_m.unwrap_or(DEFAULT_BLOCK_M),
                scorer: o.scorer.clone(),
            },
        };
        s.validate()?;
        Ok(s)
    }

    /// Check every parameter's value.
    ///
    /// # Errors
    /// [`EngineError::Invalid`] naming the parameter: n = 0 or above [`MAX_N`]; λ not finite
    /// (or ≤ 0 for soft-bon, < 0 for cd-token); a non-finite threshold; max_draws = 0 or above
    /// [`MAX_DRAWS`]; top_k = 0; K = 0 or above [`MAX_N`]; M = 0; a bad scorer (see
    /// [`ScorerSpec::validate`]).
    pub fn validate(&self) -> Result<()> {
        let count = |param: &str, v: usize, what: &str| -> Result<()> {
            if v == 0 {
                return Err(EngineError::invalid(
                    param,
                    format!("0 {what}; use at least 1"),
                ));
            }
            if v > MAX_N {
                return Err(EngineError::invalid(
                    param,
                    format!(
                        "{v} {what} is above the cap of {MAX_N} (each needs its own KV cache; \
                         split the work into several runs)"
                    ),
                ));
            }
            Ok(())
        };
        let scorer_name = |s: &Option<ScorerSpec>| -> Result<()> {
            s.as_ref().map_or(Ok(()), ScorerSpec::validate)
        };
        match self {
            Strategy::Sample { .. } => Ok(()),
            Strategy::Bon { n, .. } | Strategy::Won { n, .. } => count("n", *n, "candidates"),
            Strategy::SoftBon { n, lambda, .. } => {
                count("n", *n, "candidates")?;
                if !(lambda.is_finite() && *lambda > 0.0) {
                    return Err(EngineError::invalid(
                        "lambda",
                        format!("{lambda} is not a finite temperature > 0 (use bon for λ → 0)"),
                    ));
                }
                Ok(())
            }
            Strategy::Rewind {
                n,
                threshold,
                max_draws,
                ..
            } => {
                count("n", *n, "draws per batch")?;
                if !threshold.is_finite() {
                    return Err(EngineError::invalid(
                        "threshold",
                        format!("{threshold} is not finite"),
                    ));
                }
                if *max_draws == 0 {
                    return Err(EngineError::invalid(
                        "max_draws",
                        "0 draws can accept nothing; use at least 1",
                    ));
                }
                if *max_draws > MAX_DRAWS {
                    return Err(EngineError::invalid(
                        "max_draws",
                        format!("{max_draws} is above the cap of {MAX_DRAWS}"),
                    ));
                }
                Ok(())
            }
            Strategy::CdToken {
                lambda,
                top_k,
                scorer,
            } => {
                if !(lambda.is_finite() && *lambda >= 0.0) {
                    return Err(EngineError::invalid(
                        "lambda",
                        format!("{lambda}; λ must be a finite number ≥ 0"),
                    ));
                }
                if *top_k == 0 {
                    return Err(EngineError::invalid(
                        "top_k",
                        "0 candidates per step; k must be at least 1",
                    ));
                }
                scorer_name(scorer)
            }
            Strategy::CdBlock { k, m, scorer } => {
                count("block_k", *k, "continuations per block")?;
                if *m == 0 {
                    return Err(EngineError::invalid(
                        "block_m",
                        "0 tokens per block; M must be at least 1",
                    ));
                }
                scorer_name(scorer)
            }
        }
    }

    /// How the candidates are sampled, for the strategies that sample from a configurable
    /// p (None for cd-token and cd-block, which sample from the model itself).
    pub fn sampling(&self) -> Option<&SamplingParams> {
        match self {
            Strategy::Sample { sampling }
            | Strategy::Bon { sampling, .. }
            | Strategy::Won { sampling, .. }
            | Strategy::SoftBon { sampling, .. }
            | Strategy::Rewind { sampling, .. } => Some(sampling),
            Strategy::CdToken { .. } | Strategy::CdBlock { .. } => None,
        }
    }

    /// The candidates drawn per choice at once: 1 (sample), n (bon, won, soft-bon, rewind's
    /// batch), `min(top_k, vocab)` children per step (cd-token), K (cd-block). What a step
    /// batch and the memory check count.
    pub fn rows(&self, vocab: usize) -> usize {
        match self {
            Strategy::Sample { .. } => 1,
            Strategy::Bon { n, .. }
            | Strategy::Won { n, .. }
            | Strategy::SoftBon { n, .. }
            | Strategy::Rewind { n, .. } => *n,
            Strategy::CdToken { top_k, .. } => (*top_k).min(vocab.max(1)),
            Strategy::CdBlock { k, .. } => *k,
        }
    }

    /// The parameter that sets [`Strategy::rows`] (`n`, `top_k`, `block_k`; none for sample).
    pub fn rows_param(&self) -> &'static str {
        match self {
            Strategy::Sample { .. } => "choices",
            Strategy::CdToken { .. } => "top_k",
            Strategy::CdBlock { .. } => "block_k",
            _ => "n",
        }
    }

    /// The prefix scorer it names (None inside: the engine's default), for the cd
    /// strategies; None for the others.
    pub fn scorer(&self) -> Option<Option<&ScorerSpec>> {
        match self {
            Strategy::CdToken { scorer, .. } | Strategy::CdBlock { scorer, .. } => {
                Some(scorer.as_ref())
            }
            _ => None,
        }
    }

    /// The same strategy guided by the prefix scorer `scorer`, for the cd strategies; any
    /// other strategy unchanged.
    pub fn with_scorer(&self, scorer: Option<ScorerSpec>) -> Strategy {
        match self {
            Strategy::CdToken { lambda, top_k, .. } => Strategy::CdToken {
                lambda: *lambda,
                top_k: *top_k,
                scorer,
            },
            Strategy::CdBlock { k, m, .. } => Strategy::CdBlock {
                k: *k,
                m: *m,
                scorer,
            },
            other => other.clone(),
        }
    }

    /// Whether the output's tokens are final as they are drawn, so that a face can stream
    /// them: `sample` and `cd-token` (one sequence per output); `cd-block` streams a block
    /// once it is kept. The selection strategies know their output only at the end.
    pub fn streams_tokens(&self) -> bool {
        matches!(
            self,
            Strategy::Sample { .. } | Strategy::CdToken { .. } | Strategy::CdBlock { .. }
        )
    }

    /// The label `tilt eval` uses and seeds a strategy by (`sample`, `bon:4`,
    /// `cd-block:K=4,M=8`, `cd-token:lambda=2,k=10`, `won:4`, `soft-bon:n=4,lambda=0.5`,
    /// `rewind:n=4,threshold=0.5,max_draws=64`). Sampling parameters are not part of it.
    pub fn label(&self) -> String {
        match self {
            Strategy::Sample { .. } => "sample".into(),
            Strategy::Bon { n, .. } => format!("bon:{n}"),
            Strategy::Won { n, .. } => format!("won:{n}"),
            Strategy::SoftBon { n, lambda, .. } => format!("soft-bon:n={n},lambda={lambda}"),
            Strategy::Rewind {
                n,
                threshold,
                max_draws,
                ..
            } => format!("rewind:n={n},threshold={threshold},max_draws={max_draws}"),
            Strategy::CdBlock { k, m, scorer } => format!(
                "cd-block:K={k},M={m}{}",
                scorer
                    .as_ref()
                    .map(ScorerSpec::label_suffix)
                    .unwrap_or_default()
            ),
            Strategy::CdToken {
                lambda,
                top_k,
                scorer,
            } => format!(
                "cd-token:lambda={lambda},k={top_k}{}",
                scorer
                    .as_ref()
                    .map(ScorerSpec::label_suffix)
                    .unwrap_or_default()
            ),
        }
    }
}

/// Why `param` is refused with strategy `name` (it does not read it).
fn not_read_reason(name: &str, param: &str) -> String {
    let cd = name.starts_with("cd-");
    match param {
        "temperature" | "top_p" if cd => format!(
            "{name} samples from the model's own distribution p (temperature 1, no top-p), so \
             that its KL accounting is against p; remove {param}"
        ),
        "n" if cd => format!(
            "{name} returns one output per choice; its batch is {} (remove n)",
            if name == "cd-token" {
                "top_k"
            } else {
                "block_k"
            }
        ),
        "n" if name == "sample" => {
            "sample draws one candidate per output; ask for several outputs with choices, or use \
             bon/won for n candidates (remove n)"
                .into()
        }
        _ => format!(
            "{name} does not read {param} (it reads {}); remove it",
            parameters_read(name).join(", ")
        ),
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> StrategyOptions {
        StrategyOptions::default()
    }

    #[test]
    fn an_option_the_strategy_does_not_read_is_refused_even_at_its_default() {
        for (name, o, param) in [
            (
                "bon",
                StrategyOptions {
                    threshold: Some(DEFAULT_THRESHOLD),
                    ..opts()
                },
                "threshold",
            ),
            (
                "cd-block",
                StrategyOptions {
                    temperature: Some(1.0),
                    ..opts()
                },
                "temperature",
            ),
            (
                "cd-token",
                StrategyOptions {
                    n: Some(4),
                    ..opts()
                },
                "n",
            ),
            (
                "sample",
                StrategyOptions {
                    n: Some(1),
                    ..opts()
                },
                "n",
            ),
            (
                "rewind",
                StrategyOptions {
                    scorer: Some("s".into()),
                    ..opts()
                },
                "scorer",
            ),
            (
                "cd-token",
                StrategyOptions {
                    block_k: Some(2),
                    ..opts()
                },
                "block_k",
            ),
        ] {
            let e = Strategy::from_options(name, &o).unwrap_err();
            assert_eq!(e.param(), Some(param), "{name}: {e}");
            assert!(!e.to_string().contains("--"), "no CLI flags in {e}");
        }
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(
            Strategy::from_options("bon", &opts()).unwrap(),
            Strategy::Bon {
                n: 4,
                sampling: SamplingParams::default()
            }
        );
        assert_eq!(
            Strategy::from_options("cd-token", &opts()).unwrap(),
            Strategy::CdToken {
                lambda: 1.0,
                top_k: 10,
                scorer: None
            }
        );
        for (name, o, param) in [
            (
                "bon",
                StrategyOptions {
                    n: Some(0),
                    ..opts()
                },
                "n",
            ),
            (
                "bon",
                StrategyOptions {
                    n: Some(MAX_N + 1),
                    ..opts()
                },
                "n",
            ),
            (
                "soft-bon",
                StrategyOptions {
                    lambda: Some(0.0),
                    ..opts()
                },
                "lambda",
            ),
            (
                "rewind",
                StrategyOptions {
                    max_draws: Some(0),
                    ..opts()
                },
                "max_draws",
            ),
            (
                "rewind",
                StrategyOptions {
                    threshold: Some(f64::NAN),
                    ..opts()
                },
                "threshold",
            ),
            (
                "cd-token",
                StrategyOptions {
                    lambda: Some(-1.0),
                    ..opts()
                },
                "lambda",
            ),
            (
                "cd-block",
                StrategyOptions {
                    block_m: Some(0),
                    ..opts()
                },
                "block_m",
            ),
            (
                "bon",
                StrategyOptions {
                    temperature: Some(0.0),
                    ..opts()
                },
                "temperature",
            ),
            ("beam", opts(), "strategy"),
        ] {
            let e = Strategy::from_options(name, &o).unwrap_err();
            assert_eq!(e.param(), Some(param), "{name}: {e}");
        }
    }

    #[test]
    fn json_round_trips_and_refuses_unknown_fields() {
        for s in [
            Strategy::Sample {
                sampling: SamplingParams::new(0.7, Some(5), None).unwrap(),
            },
            Strategy::Rewind {
                n: 2,
                threshold: -0.5,
                max_draws: 9,
                sampling: SamplingParams::default(),
            },
            Strategy::CdBlock {
                k: 3,
                m: 4,
                scorer: Some("s".into()),
            },
        ] {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Strategy>(&j).unwrap(), s, "{j}");
        }
        for bad in [
            r#"{"name":"bon"}"#,
            r#"{"name":"bon","n":2,"threshold":1}"#,
            r#"{"name":"sample","n":2}"#,
            r#"{"name":"cd-token","lambda":1,"top_k":2,"temperature":1}"#,
            r#"{"name":"bon","n":2,"sampling":{"temperature":-1}}"#,
            r#"{"name":"best"}"#,
        ] {
            assert!(serde_json::from_str::<Strategy>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_are_the_eval_labels() {
        assert_eq!(
            Strategy::from_options("sample", &opts()).unwrap().label(),
            "sample"
        );
        let b = Strategy::Bon {
            n: 16,
            sampling: SamplingParams::default(),
        };
        assert_eq!(b.label(), "bon:16");
        let c = Strategy::CdToken {
            lambda: 5.0,
            top_k: 8,
            scorer: None,
        };
        assert_eq!(c.label(), "cd-token:lambda=5,k=8");
        let d = Strategy::CdBlock {
            k: 4,
            m: 8,
            scorer: None,
        };
        assert_eq!(d.label(), "cd-block:K=4,M=8");
    }
}
