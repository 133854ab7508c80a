"""tilt: inference-time alignment, with the exact theory beside every method.

The theory (exact, on finite supports; every value in nats where it is a KL):

- ``best_of_n(probs, rewards, n, worst=False)``: the law of best-of-n (worst-of-n) with
  ties, its KL, the bound log n − (n−1)/n, the estimator, win rate, expected reward
  (Beirami et al., arXiv 2401.01879).
- ``tilt(probs, rewards, beta=… | kl=…)``: the KL-regularised optimum p·e^(r/β)/Z
  (arXiv 2404.01730 §2).
- ``soft_best_of_n(probs, rewards, n, lam)``: soft best-of-n (arXiv 2505.03156).
- ``divergences(q, p, alpha=2.0)``: KL both ways, Rényi, TV, χ², squared Hellinger.
- ``bounds(probs, rewards, ns)``: the sub-Gaussian improvement bound √(2σ²·KL) and the
  f-divergence bounds of best-of-n (arXiv 2406.05883).
- ``memoryless(probs, rewards, lengths, delta)``: the memoryless asymptotics (2404.01730).
- ``infalign(n, procedure=…, transform=…, kl=…, optimize_t=…)``: InfAlign's calibrated
  tilts and their inference-time win rates (arXiv 2412.19792).
- ``calibrate(reference_rewards, rewards)``: the calibrated reward C(y) = P(r(Z) < r(y))
  + ½·P(r(Z) = r(y)).

Arrays are float64 NumPy arrays or lists; pmfs come back as NumPy arrays, every other field
as in the ``tilt`` CLI's JSON, except that +∞ (β at KL 0, an infinite divergence) is
``math.inf`` where the JSON prints null; ``None`` is a field that does not apply. Bad input
raises ``ValueError`` naming the parameter.

The engine: ``Engine(model=None, reward="minilm", threads=0)`` loads the policy (default
SmolLM2-135M-Instruct, fetched on first use) and its rewards; ``.generate(...)`` runs one of
the seven strategies, ``.score(prompts, responses)`` scores, ``.log_probs(prompt,
response)`` gives log p of a response.

For TRL: ``tilt.trl.calibrated_reward(reward_fn, ...)`` (CTRL's calibrated, transformed
reward as a ``reward_funcs`` entry).
"""

from ._tilt import (  # noqa: F401
    Engine,
    __version__,
    best_of_n,
    bounds,
    calibrate,
    divergences,
    infalign,
    memoryless,
    soft_best_of_n,
    tilt,
)

__all__ = [
    "Engine",
    "best_of_n",
    "bounds",
    "calibrate",
    "divergences",
    "infalign",
    "memoryless",
    "soft_best_of_n",
    "tilt",
    "trl",
]


def __getattr__(name):
    # `tilt.trl` without importing it eagerly (it is pure Python and needs nothing else).
    if name == "trl":
        from . import trl

        return trl
    raise AttributeError(f"module 'tilt' has no attribute {name!r}")
