"""tilt.Engine on the real default models (SmolLM2-135M-Instruct Q4_1, MiniLM reward): the
same answers as the `tilt` CLI for the same seed, log-probabilities that agree with the
generated candidates', rewards, ValueError naming a bad parameter, and the TRL adapter with
the engine as its reference sampler."""

import json
import math
import os
import subprocess

import numpy as np
import pytest

import tilt
from tilt.trl import calibrated_reward, engine_sampler

PROMPT = "Name a fruit."


@pytest.fixture(scope="module")
def engine():
    return tilt.Engine(threads=2)


def test_bon_answer_carries_its_cost_and_is_seeded(engine):
    r = engine.generate(PROMPT, strategy="bon", n=4, max_new_tokens=12, seed=3)
    (o,) = r["outputs"]
    assert o["units"] == "nats" and o["strategy"] == "bon" and o["n"] == 4
    assert o["kl_bound"] == pytest.approx(math.log(4) - 3 / 4, abs=1e-15)
    assert len(o["candidates"]) == 4
    best = max(c["reward"] for c in o["candidates"])
    assert o["reward"] == best
    assert r["usage"]["completion_tokens"] == sum(c["new_tokens"] for c in o["candidates"])
    again = engine.generate(PROMPT, strategy="bon", n=4, max_new_tokens=12, seed=3)
    assert again == r
    other = engine.generate(PROMPT, strategy="bon", n=4, max_new_tokens=12, seed=4)
    assert other["outputs"][0]["candidates"] != o["candidates"]


CLI = os.environ.get("TILT_CLI")


@pytest.mark.skipif(not CLI, reason="TILT_CLI (the tilt binary) not given by the harness")
def test_the_same_answer_as_the_cli(engine):
    line = subprocess.run(
        [CLI, "generate", "--prompt", PROMPT, "--strategy", "bon", "--n", "4",
         "--max-new-tokens", "12", "--seed", "3", "--threads", "2"],
        check=True, capture_output=True, text=True,
    ).stdout
    cli = json.loads(line)
    o = engine.generate(PROMPT, strategy="bon", n=4, max_new_tokens=12, seed=3)["outputs"][0]
    for key in ("text", "reward", "kl_bound", "kl_estimate", "selected", "candidates"):
        assert o[key] == cli[key], key


def test_messages_and_every_strategy(engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    for strategy, extra in [("sample", {}), ("won", {"n": 2}), ("soft-bon", {"n": 2, "lam": 0.5}),
                            ("rewind", {"n": 2, "threshold": 0.1, "max_draws": 4})]:
        r = engine.generate(messages=msgs, strategy=strategy, max_new_tokens=6, seed=1, **extra)
        assert r["outputs"][0]["strategy"] == strategy


def test_log_probs_agree_with_the_candidates(engine):
    o = engine.generate(PROMPT, strategy="bon", n=4, max_new_tokens=12, seed=3)["outputs"][0]
    matched = 0
    for c in o["candidates"]:
        lp = engine.log_probs(PROMPT, c["text"])
        assert isinstance(lp["token_log_probs"], np.ndarray)
        assert lp["total"] == pytest.approx(float(lp["token_log_probs"].sum()), abs=1e-9)
        assert lp["total"] < 0
        if len(lp["tokens"]) == c["new_tokens"]:
            # The text re-encodes to the tokens drawn: the same log-probability.
            assert lp["total"] == pytest.approx(c["log_prob"], abs=1e-4)
            matched += 1
    assert matched >= 2


def test_score_is_the_reward_of_each_pair(engine):
    o = engine.generate(PROMPT, strategy="bon", n=2, max_new_tokens=8, seed=0)["outputs"][0]
    texts = [c["text"] for c in o["candidates"]]
    s = engine.score([PROMPT] * 2, texts)
    assert s.dtype == np.float64 and s.shape == (2,)
    np.testing.assert_allclose(s, [c["reward"] for c in o["candidates"]], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"strategy": "bon", "threshold": 0.5}, "threshold"),
        ({"strategy": "bon", "n": 0}, "n"),
        ({"strategy": "best"}, "strategy"),
        ({"strategy": "sample", "temperature": -1.0}, "temperature"),
        ({"strategy": "cd-token"}, "scorer"),
        ({"strategy": "bon", "reward": "gold"}, "gold"),
        ({"strategy": "sample", "max_new_tokens": 10**7}, "max_new_tokens"),
    ],
)
def test_bad_requests_are_value_errors_naming_the_parameter(engine, kwargs, name):
    with pytest.raises(ValueError) as e:
        engine.generate(PROMPT, **kwargs)
    assert name in str(e.value)


def test_bad_inputs(engine):
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(strategy="sample")
    with pytest.raises(ValueError, match="messages"):
        engine.generate(messages=[{"role": "wizard", "content": "x"}], strategy="sample")
    with pytest.raises(ValueError, match="responses"):
        engine.score([PROMPT], ["a", "b"])
    with pytest.raises(ValueError, match="response"):
        engine.log_probs(PROMPT, "")
    with pytest.raises(ValueError, match="reward"):
        tilt.Engine(reward="no-such-reward-kind:x")


def test_trl_reward_with_the_engine_as_reference(engine):
    def minilm(prompts, completions, **kwargs):
        return [float(x) for x in engine.score(list(prompts), list(completions))]

    f = calibrated_reward(minilm, reference_samples=8, transform="bon:4",
                          sampler=engine_sampler(engine, max_new_tokens=8), kl=0.5)
    out = f(prompts=[PROMPT, PROMPT], completions=["An apple.", "Zebra crossing."])
    t = tilt.infalign(4, transform="exp", kl=0.5, optimize_t=True)["t"]
    assert all(1.0 <= v <= math.exp(t) for v in out)


SCORER = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "cd",
                      "scorer.safetensors")


def test_weighted_scorers_and_reported_rewards():
    polite = "minilm:target=A kind and polite answer."
    e = tilt.Engine(reward={"minilm": "minilm", "polite": polite},
                    scorers={"a": SCORER, "b": SCORER}, threads=2)
    common = dict(strategy="cd-block", block_k=2, block_m=3, max_new_tokens=6, seed=1)
    for scorer in ([("a", 0.25), ("b", 0.75)],
                   [{"name": "a", "weight": 0.25}, {"name": "b", "weight": 0.75}]):
        r = e.generate(PROMPT, scorer=scorer, report_rewards=["polite"], **common)
        (o,) = r["outputs"]
        sv = o["scorer_values"]
        assert [(v["name"], v["weight"]) for v in sv] == [("a", 0.25), ("b", 0.75)]
        # The same file under two names: the same value at the same last token.
        assert sv[0]["value"] == sv[1]["value"] and math.isfinite(sv[0]["value"])
        assert [v["name"] for v in o["rewards"]] == ["polite"]
        assert o["rewards"][0]["value"] == e.score([PROMPT], [o["text"]], reward="polite")[0]
    one = e.generate(PROMPT, scorer="b", **common)["outputs"][0]
    assert [(v["name"], v["weight"]) for v in one["scorer_values"]] == [("b", 1.0)]
    assert "rewards" not in one
    for bad, name in [([("a", float("nan"))], "scorer"), (5, "scorer"), ([], "scorer"),
                      ([("a", 1.0), ("zzz", 1.0)], "zzz")]:
        with pytest.raises(ValueError, match=name):
            e.generate(PROMPT, scorer=bad, **common)
    with pytest.raises(ValueError, match="report_rewards"):
        e.generate(PROMPT, strategy="sample", report_rewards=["nope"])
