//! `tilt._tilt`: the Python face of tilt (PyO3). The theory functions take NumPy arrays
//! (or lists) and return dicts holding the same fields as the CLI's JSON, with each pmf as a
//! NumPy array; the engine takes keyword arguments into the engine library's own request
//! types, so that it validates exactly as the CLI and the server do. Long work runs with the
//! GIL released. Errors: bad input (the library's invalid-input kind) raises `ValueError`
//! carrying the library's message, which names the parameter; a missing or failing resource
//! raises `RuntimeError` (`ConnectionError` for an unavailable one); nothing is a panic.
//!
//! The Python package around it (`python/tilt`) adds the TRL reward adapter and the type
//! stubs.

use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pythonize::{depythonize, pythonize};
use serde::Serialize;
use tilt_core::infalign::{check_draws, Procedure};
use tilt_core::report::{
    bon_report, divergence_report, infalign_baselines, infalign_point, memoryless_output,
    tilt_report, Bounds, InfalignPolicy, InfalignReport, TiltBy, TransformKind,
};
use tilt_core::{RewardDistribution, TiltError};
use tilt_engine::{
    ChatMessage, EngineConfig, EngineError, ErrorKind, Input, NoProgress, Params, Request,
    RewardConfig, ScorerConfig, ScorerSpec, Strategy, StrategyOptions,
};

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

fn core_error(e: TiltError) -> PyErr {
    match e.kind() {
        tilt_core::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
        tilt_core::ErrorKind::Internal => PyRuntimeError::new_err(e.to_string()),
    }
}

fn engine_error(e: EngineError) -> PyErr {
    match e.kind() {
        ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
        ErrorKind::Unavailable => PyConnectionError::new_err(e.to_string()),
        ErrorKind::Cancelled | ErrorKind::Internal => PyRuntimeError::new_err(e.to_string()),
    }
}

fn invalid(name: &str, problem: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{name}: {problem}"))
}

/// A `scorer` argument: a scorer's name, or a list whose items are `(name, weight)` pairs
/// or `{"name", "weight"}` dicts (the weighted sum; the engine validates the terms).
fn scorer_spec(obj: &Bound<'_, PyAny>) -> PyResult<ScorerSpec> {
    const FORMS: &str =
        "give a scorer's name or a list of (name, weight) pairs or {\"name\", \"weight\"} dicts";
    if let Ok(name) = obj.extract::<String>() {
        return Ok(ScorerSpec::One(name));
    }
    let items = obj
        .try_iter()
        .map_err(|_| invalid("scorer", format!("a {}; {FORMS}", obj.get_type())))?;
    let mut terms = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        let term = if let Ok((name, weight)) = item.extract::<(String, f64)>() {
            tilt_engine::WeightedScorer { name, weight }
        } else {
            depythonize(&item)
                .map_err(|e| invalid(&format!("scorer[{i}]"), format!("{e}; {FORMS}")))?
        };
        terms.push(term);
    }
    Ok(ScorerSpec::Weighted(terms))
}

// ---------------------------------------------------------------------------------------
// Arrays in, dicts out
// ---------------------------------------------------------------------------------------

/// A float64 vector from Python: a contiguous 1-d float64 NumPy array is borrowed as it is
/// (no copy); anything else (a list, an int array, a strided view) is converted.
enum Floats<'py> {
    Borrowed(PyReadonlyArray1<'py, f64>),
    Owned(Vec<f64>),
}

impl<'py> Floats<'py> {
    fn new(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, f64>>() {
            if a.as_slice().is_ok() {
                return Ok(Floats::Borrowed(a));
            }
            return Ok(Floats::Owned(a.as_array().to_vec()));
        }
        obj.extract::<Vec<f64>>().map(Floats::Owned).map_err(|_| {
            invalid(
                name,
                "expected a 1-d array of numbers (a float64 NumPy array or a list)",
            )
        })
    }

    fn as_slice(&self) -> &[f64] {
        match self {
            Floats::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            Floats::Owned(v) => v,
        }
    }
}

/// The reference distribution: `probs` (summing to 1) over outcomes with `rewards`.
fn distribution(
    probs: &Bound<'_, PyAny>,
    rewards: &Bound<'_, PyAny>,
) -> PyResult<RewardDistribution> {
    let p = Floats::new(probs, "probs")?.as_slice().to_vec();
    let r = Floats::new(rewards, "rewards")?.as_slice().to_vec();
    RewardDistribution::new(p, r).map_err(core_error)
}

/// `value` as a dict: the same fields as the CLI's JSON, +∞ as `math.inf` (where the JSON
/// has null) and a field that does not apply as `None`; `pmf`, if given, set as a NumPy
/// array (handed over without a copy).
fn dict_of<'py>(
    py: Python<'py>,
    value: &impl Serialize,
    pmf: Option<Vec<f64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let obj = pythonize(py, value)?;
    if let Some(pmf) = pmf {
        let d = obj.cast::<PyDict>()?;
        d.set_item("pmf", pmf.into_pyarray(py))?;
    }
    Ok(obj)
}

// ---------------------------------------------------------------------------------------
// The theory
// ---------------------------------------------------------------------------------------

/// Exact best-of-n (or worst-of-n) with ties of the reference `probs` over `rewards`
/// (arXiv 2401.01879 §2–§4): the pmf, kl, kl_bound (log n − (n−1)/n), kl_estimate,
/// win_rate, expected_reward; with `pmf=False` the summary alone (no `pmf` key, and the
/// pass that computes it skipped).
#[pyfunction]
#[pyo3(signature = (probs, rewards, n, worst = false, pmf = true))]
fn best_of_n<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
    n: u64,
    worst: bool,
    pmf: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let dist = distribution(probs, rewards)?;
    let mut report = py
        .detach(|| bon_report(&dist, n, worst, pmf))
        .map_err(core_error)?;
    let law = std::mem::take(&mut report.bon.pmf);
    dict_of(py, &report, pmf.then_some(law))
}

/// The KL-regularised optimum p·e^(r/β)/Z (arXiv 2404.01730 §2), given `beta` or a KL
/// budget `kl` (nats): beta (`inf` at KL 0), lambda = 1/β, kl, expected_reward, win_rate,
/// log_partition, pmf.
#[pyfunction]
#[pyo3(signature = (probs, rewards, *, beta = None, kl = None))]
fn tilt<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
    beta: Option<f64>,
    kl: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let by = match (beta, kl) {
        (Some(b), None) => TiltBy::Beta(b),
        (None, Some(k)) => TiltBy::Kl(k),
        _ => return Err(invalid("beta, kl", "give exactly one of beta and kl")),
    };
    let dist = distribution(probs, rewards)?;
    let mut report = py.detach(|| tilt_report(&dist, by)).map_err(core_error)?;
    let pmf = std::mem::take(&mut report.tilt.pmf);
    dict_of(py, &report, Some(pmf))
}

/// Soft best-of-n: draw n, pick draw i with probability ∝ e^(r_i/λ) (arXiv 2505.03156):
/// its exact pmf, kl, expected_reward, win_rate.
#[pyfunction]
#[pyo3(signature = (probs, rewards, n, lam))]
fn soft_best_of_n<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
    n: u64,
    lam: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let dist = distribution(probs, rewards)?;
    let mut s = py
        .detach(|| tilt_core::soft_best_of_n::soft_best_of_n(&dist, n, lam))
        .map_err(core_error)?;
    let pmf = std::mem::take(&mut s.pmf);
    dict_of(py, &s, Some(pmf))
}

/// KL(q‖p), KL(p‖q), Rényi of order `alpha`, TV, χ², squared Hellinger of two pmfs (`inf`
/// where infinite). Contiguous float64 arrays are read in place.
#[pyfunction]
#[pyo3(signature = (q, p, alpha = 2.0))]
fn divergences<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    p: &Bound<'py, PyAny>,
    alpha: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (q, p) = (Floats::new(q, "q")?, Floats::new(p, "p")?);
    let (qs, ps) = (q.as_slice(), p.as_slice());
    let report = py
        .detach(|| divergence_report(qs, ps, alpha))
        .map_err(core_error)?;
    dict_of(py, &report, None)
}

/// The reward-improvement bounds of arXiv 2406.05883 for best-of-n at each of `ns`: the
/// optimal sub-Gaussian proxy σ² of r − E_p r, and per n the KL, √(2σ²·KL), the improvement
/// of best-of-n and of the tilt at that KL, and the f-divergence bounds of best-of-n.
#[pyfunction]
fn bounds<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
    ns: Vec<u64>,
) -> PyResult<Bound<'py, PyAny>> {
    let dist = distribution(probs, rewards)?;
    let (head, rows) = py
        .detach(|| {
            let b = Bounds::new(&dist, false)?;
            let rows = ns
                .iter()
                .map(|&n| b.row(n))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, TiltError>((b.head(), rows))
        })
        .map_err(core_error)?;
    let d = dict_of(py, &head, None)?;
    d.set_item("rows", pythonize(py, &rows)?)?;
    Ok(d)
}

/// The memoryless model of arXiv 2404.01730 (tokens iid with `probs` over per-token
/// `rewards`; a response of `length` tokens) at per-token KL budget `delta`: the tilt's
/// exact reward and KL beside best-of-n's at each length, and their asymptotics.
#[pyfunction]
#[pyo3(signature = (probs, rewards, lengths, delta, grid = None))]
fn memoryless<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
    lengths: Vec<usize>,
    delta: f64,
    grid: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let dist = distribution(probs, rewards)?;
    let (out, _) = py
        .detach(|| memoryless_output(&dist, grid, &lengths, delta, None, || {}))
        .map_err(core_error)?;
    dict_of(py, &out, None)
}

/// InfAlign (arXiv 2412.19792): the calibrated tilt e^(Φ(c)/β) with transform Φ
/// (`identity`, `exp`, `neg-exp`; rate `t`) at `beta` or a KL budget `kl`, or with
/// `optimize_t` the best t at `kl`; its standard and inference-time win rates under
/// best-of-n (`procedure="bon"`) or worst-of-n, and the identity and best-of-m baselines at
/// the same KL.
#[pyfunction]
#[pyo3(signature = (n, *, procedure = "bon", transform = "identity", t = None, beta = None,
                    kl = None, optimize_t = false, t_max = 200.0))]
#[allow(clippy::too_many_arguments)]
fn infalign<'py>(
    py: Python<'py>,
    n: u64,
    procedure: &str,
    transform: &str,
    t: Option<f64>,
    beta: Option<f64>,
    kl: Option<f64>,
    optimize_t: bool,
    t_max: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let procedure = match procedure {
        "bon" => Procedure::Bon,
        "won" => Procedure::Won,
        other => {
            return Err(invalid(
                "procedure",
                format!("{other:?}: use \"bon\" or \"won\""),
            ))
        }
    };
    let kind = match transform {
        "identity" => TransformKind::Identity,
        "exp" => TransformKind::Exp,
        "neg-exp" => TransformKind::NegExp,
        other => {
            return Err(invalid(
                "transform",
                format!("{other:?}: use \"identity\", \"exp\" or \"neg-exp\""),
            ))
        }
    };
    let report = py
        .detach(|| {
            check_draws(n, procedure)?;
            let policy = InfalignPolicy::from_options(kind, t, beta, kl, optimize_t, t_max)?;
            let (point, optimized) = infalign_point(policy, n, procedure)?;
            let at = policy.kl_budget().unwrap_or(point.kl);
            let baselines = infalign_baselines(at, n, procedure)?;
            Ok::<_, TiltError>(InfalignReport::new(
                n,
                procedure,
                &point,
                optimized.as_ref(),
                baselines,
            ))
        })
        .map_err(core_error)?;
    dict_of(py, &report, None)
}

/// The calibrated reward C(y) = P(r(Z) < r(y)) + ½·P(r(Z) = r(y)) of each of `rewards`
/// under the empirical law of `reference_rewards` (InfAlign, arXiv 2412.19792 §3), as a
/// NumPy array.
#[pyfunction]
fn calibrate<'py>(
    py: Python<'py>,
    reference_rewards: &Bound<'py, PyAny>,
    rewards: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let reference = Floats::new(reference_rewards, "reference_rewards")?;
    let r = Floats::new(rewards, "rewards")?;
    let (reference, r) = (reference.as_slice(), r.as_slice());
    if let Some(i) = r.iter().position(|x| !x.is_finite()) {
        return Err(invalid(
            "rewards",
            format!("entry {i} is {} (not finite)", r[i]),
        ));
    }
    let out = py
        .detach(|| {
            let c = tilt_core::calibration::Calibrator::new(reference)?;
            Ok::<_, TiltError>(
                r.iter()
                    .map(|&x| c.calibrated_reward(x))
                    .collect::<Vec<_>>(),
            )
        })
        .map_err(core_error)?;
    Ok(out.into_pyarray(py).into_any())
}

// ---------------------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------------------

/// A loaded policy (default: SmolLM2-135M-Instruct, fetched on first use) with its rewards
/// and prefix scorers. `reward` is a reward spec (default `minilm`), or a dict
/// `{name: spec}` of several, the first the default; `scorers` a dict `{name: path}`.
#[pyclass(frozen, module = "tilt")]
struct Engine {
    inner: tilt_engine::Engine,
}

fn input_of(
    prompt: Option<String>,
    messages: Option<&Bound<'_, PyAny>>,
    raw: bool,
) -> PyResult<Input> {
    match (prompt, messages) {
        (Some(p), None) => Ok(if raw { Input::Raw(p) } else { Input::Prompt(p) }),
        (None, Some(m)) => {
            if raw {
                return Err(invalid("raw", "applies to a prompt, not to messages"));
            }
            let m: Vec<ChatMessage> = depythonize(m).map_err(|e| invalid("messages", e))?;
            Ok(Input::Messages(m))
        }
        _ => Err(invalid(
            "prompt, messages",
            "give exactly one of prompt and messages",
        )),
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model = None, reward = None, scorers = None, threads = 0, max_batch = 64))]
    fn new(
        py: Python<'_>,
        model: Option<std::path::PathBuf>,
        reward: Option<&Bound<'_, PyAny>>,
        scorers: Option<&Bound<'_, PyDict>>,
        threads: usize,
        max_batch: usize,
    ) -> PyResult<Self> {
        let mut config = EngineConfig {
            model,
            threads,
            max_batch,
            ..EngineConfig::default()
        };
        if let Some(r) = reward {
            config.rewards = if let Ok(spec) = r.extract::<String>() {
                vec![RewardConfig {
                    name: spec.split(':').next().unwrap_or(&spec).to_string(),
                    spec,
                }]
            } else if let Ok(d) = r.cast::<PyDict>() {
                d.iter()
                    .map(|(k, v)| {
                        Ok(RewardConfig {
                            name: k.extract()?,
                            spec: v.extract()?,
                        })
                    })
                    .collect::<PyResult<_>>()
                    .map_err(|_| invalid("reward", "a dict of reward specs must map str to str"))?
            } else {
                return Err(invalid("reward", "a spec string or a dict {name: spec}"));
            };
        }
        if let Some(s) = scorers {
            config.scorers = s
                .iter()
                .map(|(k, v)| {
                    Ok(ScorerConfig {
                        name: k.extract()?,
                        path: v.extract()?,
                    })
                })
                .collect::<PyResult<_>>()
                .map_err(|_| invalid("scorers", "a dict {name: path}"))?;
        }
        let inner = py
            .detach(|| tilt_engine::Engine::load(&config, &NoProgress))
            .map_err(engine_error)?;
        Ok(Engine { inner })
    }

    /// Run one request: `prompt` (a user message, or raw text with `raw=True`) or
    /// `messages` (a list of `{"role", "content"}`), with `strategy` and its parameters.
    /// Returns the engine's response as a dict: `outputs` (each with text, tokens,
    /// finish_reason, reward, the KL fields in nats, candidates; the cd strategies'
    /// `scorer_values`; `rewards` for `report_rewards`), `usage`. `scorer` is a configured
    /// scorer's name or a list of `(name, weight)` pairs (or `{"name", "weight"}` dicts):
    /// cd-token and cd-block are then guided by Σ weight·V (arXiv 2310.17022, multi-objective CD).
    #[pyo3(signature = (prompt = None, *, messages = None, raw = false, strategy = "bon",
                        n = None, temperature = None, top_k = None, top_p = None,
                        lam = None, threshold = None, max_draws = None, block_k = None,
                        block_m = None, scorer = None, choices = 1, seed = 0,
                        max_new_tokens = 64, stop = None, reward = None,
                        report_rewards = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: Option<String>,
        messages: Option<&Bound<'py, PyAny>>,
        raw: bool,
        strategy: &str,
        n: Option<usize>,
        temperature: Option<f64>,
        top_k: Option<usize>,
        top_p: Option<f64>,
        lam: Option<f64>,
        threshold: Option<f64>,
        max_draws: Option<usize>,
        block_k: Option<usize>,
        block_m: Option<usize>,
        scorer: Option<&Bound<'py, PyAny>>,
        choices: usize,
        seed: u64,
        max_new_tokens: usize,
        stop: Option<Vec<String>>,
        reward: Option<String>,
        report_rewards: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = input_of(prompt, messages, raw)?;
        let scorer = scorer.map(scorer_spec).transpose()?;
        let options = StrategyOptions {
            n,
            temperature,
            top_k,
            top_p,
            lambda: lam,
            threshold,
            max_draws,
            block_k,
            block_m,
            scorer,
        };
        let params = Params {
            strategy: Strategy::from_options(strategy, &options).map_err(engine_error)?,
            choices,
            seed,
            max_new_tokens,
            stop: stop.unwrap_or_default(),
            reward,
            report_rewards: report_rewards.unwrap_or_default(),
        };
        params.validate().map_err(engine_error)?;
        let request = Request::new(input, params);
        let response = py
            .detach(|| self.inner.generate(&request))
            .map_err(engine_error)?;
        Ok(pythonize(py, &response)?)
    }

    /// The reward (`reward`: a configured name; None: the default) of each (prompt,
    /// response) pair, as a NumPy array.
    #[pyo3(signature = (prompts, responses, reward = None))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        prompts: Vec<String>,
        responses: Vec<String>,
        reward: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let scores = py
            .detach(|| self.inner.score(reward.as_deref(), &prompts, &responses))
            .map_err(engine_error)?;
        Ok(scores.into_pyarray(py).into_any())
    }

    /// log p(response | prompt) under the policy (nats): a dict with `tokens`,
    /// `token_log_probs` (a NumPy array) and `total`. `prompt` is a user message (or raw
    /// text with `raw=True`), or give `messages`.
    #[pyo3(signature = (prompt = None, response = None, *, messages = None, raw = false))]
    fn log_probs<'py>(
        &self,
        py: Python<'py>,
        prompt: Option<String>,
        response: Option<String>,
        messages: Option<&Bound<'py, PyAny>>,
        raw: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = input_of(prompt, messages, raw)?;
        let Some(response) = response else {
            return Err(invalid("response", "missing"));
        };
        let mut lp = py
            .detach(|| self.inner.log_prob(&input, &response))
            .map_err(engine_error)?;
        let per_token = std::mem::take(&mut lp.token_log_probs);
        let d = pythonize(py, &lp)?;
        d.cast::<PyDict>()?
            .set_item("token_log_probs", per_token.into_pyarray(py))?;
        Ok(d)
    }

    /// The reward names configured, the default first.
    #[getter]
    fn rewards<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.reward_names())
    }

    /// The CPU threads the model runs on.
    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// The compiled part of the `tilt` package.
#[pymodule]
fn _tilt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(best_of_n, m)?)?;
    m.add_function(wrap_pyfunction!(tilt, m)?)?;
    m.add_function(wrap_pyfunction!(soft_best_of_n, m)?)?;
    m.add_function(wrap_pyfunction!(divergences, m)?)?;
    m.add_function(wrap_pyfunction!(bounds, m)?)?;
    m.add_function(wrap_pyfunction!(memoryless, m)?)?;
    m.add_function(wrap_pyfunction!(infalign, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add_class::<Engine>()?;
    Ok(())
}
