"""CTRL's calibrated and transformed reward for TRL's trainers (InfAlign, arXiv 2412.19792).

InfAlign shows that a policy trained for an inference-time procedure (best-of-N, worst-of-N)
should be trained on a transform of the *calibrated* reward: for a prompt x and response y,

    C(y) = P(r(x, Z) < r(x, y)) + ½·P(r(x, Z) = r(x, y)),   Z ~ p(· | x),

the reward's quantile under the reference policy p, then Φ(C) with Φ(c) = e^(t·c) for
best-of-N and Φ(c) = −e^(−t·c) for worst-of-N, t chosen for the KL budget (§4; tilt's
``infalign(..., optimize_t=True)`` finds it). ``calibrated_reward`` wraps any reward function
with TRL's ``reward_funcs`` signature into that reward, with the same signature, so a
``GRPOTrainer`` / ``RLOOTrainer`` user trains for best-of-N by changing one line::

    from tilt.trl import calibrated_reward, engine_sampler
    reward = calibrated_reward(my_reward, reference_samples=32, transform="bon:4",
                               sampler=engine_sampler(tilt.Engine(reward="minilm")))
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], ...)

The reference rewards of each prompt are drawn once (``sampler(prompt, m)`` returns m
reference completions, in the format the reward function takes) and cached.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import _tilt

RewardFn = Callable[..., List[float]]
Sampler = Callable[[Any, int], Sequence[Any]]


def transform_of(transform: str, kl: float = 1.0) -> Callable[[float], float]:
    """The transform Φ named by ``transform``:

    - ``"identity"``: Φ(c) = c (standard RLHF on the calibrated reward);
    - ``"exp:T"``: Φ(c) = e^(T·c); ``"neg-exp:T"``: Φ(c) = −e^(−T·c);
    - ``"bon:N"``: e^(t·c) with the t that maximises best-of-N's inference-time win rate at
      KL budget ``kl`` (nats); ``"won:N"``: −e^(−t·c), the same for worst-of-N.

    Raises ``ValueError`` naming ``transform`` or ``kl``.
    """
    name, _, arg = transform.partition(":")
    if name == "identity" and not arg:
        return lambda c: c
    if name in ("exp", "neg-exp"):
        try:
            t = float(arg)
        except ValueError:
            raise ValueError(f"transform: {transform!r}: {name} needs a rate, e.g. {name}:4") from None
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"transform: {transform!r}: the rate must be finite and ≥ 0")
        return (lambda c: math.exp(t * c)) if name == "exp" else (lambda c: -math.exp(-t * c))
    if name in ("bon", "won"):
        try:
            n = int(arg)
        except ValueError:
            raise ValueError(f"transform: {transform!r}: {name} needs N, e.g. {name}:4") from None
        family = "exp" if name == "bon" else "neg-exp"
        t = _tilt.infalign(n, procedure=name, transform=family, kl=kl, optimize_t=True)["t"]
        return transform_of(f"{family}:{t!r}")
    raise ValueError(
        f"transform: {transform!r}: use identity, exp:T, neg-exp:T, bon:N or won:N"
    )


def _key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def calibrated_reward(
    reward_fn: RewardFn,
    reference_samples: int = 16,
    transform: str = "bon:4",
    *,
    sampler: Optional[Sampler] = None,
    kl: float = 1.0,
) -> RewardFn:
    """``reward_fn`` calibrated against the reference and transformed (see the module doc).

    ``reward_fn(prompts, completions, **kwargs) -> list[float]`` is TRL's reward function
    signature; the result has it too and returns Φ(C(y)) for each completion. ``sampler``
    draws the ``reference_samples`` reference completions of a prompt (required);
    ``transform`` as in :func:`transform_of`, ``kl`` its budget in nats for ``bon:N`` and
    ``won:N``.
    """
    if not callable(reward_fn):
        raise ValueError("reward_fn: must be callable as reward_fn(prompts, completions, **kwargs)")
    if sampler is None or not callable(sampler):
        raise ValueError("sampler: give a callable sampler(prompt, m) returning m reference completions")
    if not isinstance(reference_samples, int) or reference_samples < 1:
        raise ValueError(f"reference_samples: {reference_samples!r}: must be a whole number ≥ 1")
    phi = transform_of(transform, kl)
    cache: Dict[str, Any] = {}

    def reference_rewards(prompt: Any):
        key = _key(prompt)
        if key not in cache:
            refs = list(sampler(prompt, reference_samples))
            if len(refs) != reference_samples:
                raise ValueError(
                    f"sampler: returned {len(refs)} completions, asked {reference_samples}"
                )
            scores = reward_fn(prompts=[prompt] * len(refs), completions=refs)
            if len(scores) != len(refs):
                raise ValueError(
                    f"reward_fn: returned {len(scores)} rewards for {len(refs)} reference completions"
                )
            cache[key] = [float(s) for s in scores]
        return cache[key]

    def reward(prompts, completions, **kwargs) -> List[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"completions: {len(completions)} for {len(prompts)} prompts: give one per prompt"
            )
        raw = reward_fn(prompts=prompts, completions=completions, **kwargs)
        if len(raw) != len(completions):
            raise ValueError(
                f"reward_fn: returned {len(raw)} rewards for {len(completions)} completions"
            )
        out = []
        for prompt, r in zip(prompts, raw):
            c = float(_tilt.calibrate(reference_rewards(prompt), [float(r)])[0])
            out.append(float(phi(c)))
        return out

    reward.__name__ = f"calibrated_{getattr(reward_fn, '__name__', 'reward')}"
    reward.__doc__ = f"CTRL reward: {transform} of the calibrated {reward.__name__[11:]}"
    return reward


def engine_sampler(engine, max_new_tokens: int = 64, seed: int = 0) -> Sampler:
    """A ``sampler`` drawing reference completions from a :class:`tilt.Engine`'s policy
    (strategy ``sample``, seeded): plain strings for a string prompt, and one assistant
    message per completion for a conversational prompt (a list of messages), as TRL's
    reward functions receive them.
    """

    def sample(prompt: Any, m: int):
        if isinstance(prompt, str):
            r = engine.generate(prompt, strategy="sample", choices=m, seed=seed,
                                max_new_tokens=max_new_tokens)
            return [o["text"] for o in r["outputs"]]
        r = engine.generate(messages=prompt, strategy="sample", choices=m, seed=seed,
                            max_new_tokens=max_new_tokens)
        return [[{"role": "assistant", "content": o["text"]}] for o in r["outputs"]]

    return sample
