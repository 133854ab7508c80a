"""tilt.trl.calibrated_reward against TRL's documented reward-function contract: called as
``reward_func(prompts=…, completions=…, **kwargs)`` (kwargs: the dataset's other columns,
``completion_ids``, ``trainer_state``), returning one float per completion, with a
``__name__`` for logging; standard (string) and conversational (message list) formats."""

import inspect
import math

import pytest

import tilt
from tilt.trl import calibrated_reward, transform_of


def length_reward(prompts, completions, **kwargs):
    """TRL's own example shape: a reward of each completion alone."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t)) for t in texts]


class Sampler:
    """Reference completions of lengths 0, 1, …, m−1, counting the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, m):
        self.calls.append(prompt)
        if isinstance(prompt, str):
            return ["x" * i for i in range(m)]
        return [[{"role": "assistant", "content": "x" * i}] for i in range(m)]


def test_the_trl_signature_and_calibrated_values():
    s = Sampler()
    f = calibrated_reward(length_reward, reference_samples=4, transform="identity", sampler=s)
    params = inspect.signature(f).parameters
    assert list(params)[:2] == ["prompts", "completions"]
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())
    assert f.__name__ == "calibrated_length_reward"
    # Reference rewards 0, 1, 2, 3: a completion of length 2 is below 2 of them, ties 1.
    out = f(prompts=["p", "p", "q"], completions=["xx", "xxxxxx", ""],
            completion_ids=[[1], [2], [3]], trainer_state=None, extra_column=[1, 2, 3])
    assert out == [2.5 / 4, 1.0, 0.5 / 4]
    assert all(isinstance(v, float) for v in out)
    # The reference of each prompt is drawn once.
    f(prompts=["p"], completions=["x"])
    assert s.calls == ["p", "q"]


def test_conversational_prompts_and_completions():
    s = Sampler()
    f = calibrated_reward(length_reward, reference_samples=2, transform="identity", sampler=s)
    prompt = [{"role": "user", "content": "hi"}]
    out = f(prompts=[prompt], completions=[[{"role": "assistant", "content": "x"}]])
    assert out == [0.75]


def test_transforms():
    s = Sampler()
    f = calibrated_reward(length_reward, reference_samples=4, transform="exp:2", sampler=s)
    assert f(prompts=["p"], completions=["xx"]) == [pytest.approx(math.exp(2 * 2.5 / 4))]
    g = calibrated_reward(length_reward, reference_samples=4, transform="neg-exp:2", sampler=s)
    assert g(prompts=["p"], completions=["xx"]) == [pytest.approx(-math.exp(-2 * 2.5 / 4))]
    # bon:N takes InfAlign's optimal t at the KL budget.
    t = tilt.infalign(4, transform="exp", kl=0.5, optimize_t=True)["t"]
    phi = transform_of("bon:4", kl=0.5)
    assert phi(0.3) == pytest.approx(math.exp(t * 0.3), rel=1e-12)
    h = calibrated_reward(length_reward, reference_samples=4, transform="bon:4", sampler=s, kl=0.5)
    assert h(prompts=["p"], completions=["xx"]) == [pytest.approx(math.exp(t * 2.5 / 4))]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"transform": "bon"}, "transform"),
        ({"transform": "soft"}, "transform"),
        ({"transform": "exp:-1"}, "transform"),
        ({"reference_samples": 0}, "reference_samples"),
        ({"sampler": None}, "sampler"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(kwargs, name):
    args = {"reference_samples": 4, "transform": "identity", "sampler": Sampler()}
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        calibrated_reward(length_reward, **args)
    assert name in str(e.value)


def test_a_sampler_or_reward_that_miscounts_is_an_error():
    f = calibrated_reward(length_reward, reference_samples=4, transform="identity",
                          sampler=lambda p, m: ["x"])
    with pytest.raises(ValueError, match="sampler"):
        f(prompts=["p"], completions=["x"])
    g = calibrated_reward(lambda prompts, completions, **kw: [1.0], reference_samples=2,
                          transform="identity", sampler=Sampler())
    with pytest.raises(ValueError, match="reward_fn"):
        g(prompts=["p", "q"], completions=["x", "y"])
