"""tilt's theory from Python: values against independent NumPy computations and against
the Rust core's own bits (the `tilt` CLI's JSON, when the harness names the binary), the
theorems' inequalities on random inputs, ValueError on bad input, 10⁶ outcomes."""

import json
import math
import os
import subprocess

import numpy as np
import pytest

import tilt

RNG = np.random.default_rng(7)


def random_dist(k, levels=None):
    p = RNG.random(k) + 0.01
    p /= p.sum()
    r = RNG.integers(0, levels, k).astype(float) if levels else RNG.normal(size=k)
    return p, r


def bon_numpy(p, r, n, worst=False):
    """Best-of-n with ties from its definition: the best level's law is
    F(ℓ)^n − F(ℓ⁻)^n, shared among the outcomes at ℓ in proportion to p."""
    s = -r if worst else r
    levels, inv = np.unique(s, return_inverse=True)
    mass = np.bincount(inv, weights=p)
    F = np.cumsum(mass)
    Fm = F - mass
    level_law = F**n - Fm**n
    return level_law[inv] * p / mass[inv]


def win_rate_numpy(q, p, r):
    """P(r(Y) > r(Z)) + ½·P(r(Y) = r(Z)), Y ~ q, Z ~ p."""
    gt = (r[:, None] > r[None, :]).astype(float)
    eq = (r[:, None] == r[None, :]).astype(float)
    return float(q @ (gt + 0.5 * eq) @ p)


def kl_numpy(q, p):
    m = q > 0
    return float(np.sum(q[m] * np.log(q[m] / p[m])))


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("worst", [False, True])
def test_best_of_n_against_its_definition(n, worst):
    for levels in (None, 3):
        p, r = random_dist(12, levels)
        b = tilt.best_of_n(p, r, n, worst=worst)
        want = bon_numpy(p, r, n, worst)
        assert isinstance(b["pmf"], np.ndarray) and b["pmf"].dtype == np.float64
        np.testing.assert_allclose(b["pmf"], want, rtol=1e-12, atol=1e-15)
        assert b["kl"] == pytest.approx(kl_numpy(want, p), rel=1e-10, abs=1e-14)
        assert b["expected_reward"] == pytest.approx(float(want @ r), rel=1e-12)
        assert b["units"] == "nats"
        # The bound log n − (n−1)/n, which best-of-n's KL never exceeds.
        assert b["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-15)
        assert b["kl"] <= b["kl_bound"] + 1e-12
        if not worst:
            assert b["win_rate"] == pytest.approx(win_rate_numpy(want, p, r), rel=1e-10)
        # The summary: the same dict, bit for bit, without the pmf.
        s = tilt.best_of_n(p, r, n, worst=worst, pmf=False)
        assert "pmf" not in s
        assert s == {k: v for k, v in b.items() if k != "pmf"}


def test_tilt_is_p_times_exp_r_over_beta_and_hits_its_kl():
    for _ in range(5):
        p, r = random_dist(9)
        beta = float(RNG.uniform(0.2, 3))
        t = tilt.tilt(p, r, beta=beta)
        w = p * np.exp(r / beta)
        np.testing.assert_allclose(t["pmf"], w / w.sum(), rtol=1e-12)
        assert t["log_partition"] == pytest.approx(math.log(float(p @ np.exp(r / beta))), rel=1e-12)
        kl = t["kl"]
        back = tilt.tilt(p, r, kl=kl)
        assert back["beta"] == pytest.approx(beta, rel=1e-8)
        # The tilt is the KL-regularised optimum: at its own KL, best-of-n with the same KL
        # never has a higher expected reward.
        b = tilt.best_of_n(p, r, 4)
        at = tilt.tilt(p, r, kl=b["kl"])
        assert at["expected_reward"] >= b["expected_reward"] - 1e-12


def test_tilt_at_kl_zero_has_beta_infinity():
    p, r = random_dist(5)
    t = tilt.tilt(p, r, kl=0.0)
    assert t["beta"] == math.inf and t["lambda"] == 0.0
    np.testing.assert_allclose(t["pmf"], p, rtol=1e-12)


def test_soft_best_of_n_against_enumeration():
    p = np.array([0.5, 0.3, 0.2])
    r = np.array([0.0, 1.0, 2.0])
    n, lam = 3, 0.7
    s = tilt.soft_best_of_n(p, r, n, lam)
    # Enumerate every n-tuple of draws.
    want = np.zeros(3)
    for idx in np.ndindex(*(3,) * n):
        w = np.exp(r[list(idx)] / lam)
        pr = np.prod(p[list(idx)])
        for j, i in enumerate(idx):
            want[i] += pr * w[j] / w.sum()
    np.testing.assert_allclose(s["pmf"], want, rtol=1e-12)
    assert s["kl"] == pytest.approx(kl_numpy(want, p), rel=1e-10)


def test_divergences_against_numpy():
    for _ in range(5):
        q, _ = random_dist(7)
        p, _ = random_dist(7)
        d = tilt.divergences(q, p, alpha=3.0)
        assert d["kl_q_p"] == pytest.approx(kl_numpy(q, p), rel=1e-12)
        assert d["kl_p_q"] == pytest.approx(kl_numpy(p, q), rel=1e-12)
        assert d["total_variation"] == pytest.approx(0.5 * float(np.abs(q - p).sum()), rel=1e-12)
        assert d["chi_squared_q_p"] == pytest.approx(float(((q - p) ** 2 / p).sum()), rel=1e-10)
        renyi = math.log(float((q**3 * p**-2).sum())) / 2
        assert d["renyi_q_p"] == pytest.approx(renyi, rel=1e-10)
        h2 = 1 - float(np.sqrt(q * p).sum())
        assert d["hellinger_squared"] == pytest.approx(h2, rel=1e-9, abs=1e-15)
        # Pinsker: TV ≤ √(KL/2).
        assert d["total_variation"] <= math.sqrt(d["kl_q_p"] / 2) + 1e-12
    inf = tilt.divergences([0.5, 0.5], [1.0, 0.0])
    assert inf["kl_q_p"] == math.inf  # q puts mass where p has none


def test_calibrate_counts_below_and_half_the_ties():
    ref = RNG.integers(0, 5, 40).astype(float)
    ys = np.array([-1.0, 0.0, 2.0, 2.5, 4.0, 9.0])
    c = tilt.calibrate(ref, ys)
    want = [(np.sum(ref < y) + 0.5 * np.sum(ref == y)) / len(ref) for y in ys]
    np.testing.assert_allclose(c, want, rtol=0, atol=1e-15)


def test_bounds_hold_on_random_distributions():
    for _ in range(3):
        p, r = random_dist(10)
        out = tilt.bounds(p, r, [1, 2, 4, 16])
        assert out["units"] == "nats" and out["sigma2"] > 0
        for row in out["rows"]:
            # E_bon r − E_p r ≤ √(2σ²·KL) (arXiv 2406.05883).
            assert row["bon_improvement"] <= row["bound_sqrt_2_sigma2_kl"] + 1e-12
            assert row["bon_improvement"] <= row["tilt_improvement"] + 1e-12


def test_the_bound_uses_the_one_sided_proxy():
    # Bernoulli(0.9): the rare outcome is the low one; sup over λ > 0 is the variance.
    out = tilt.bounds([0.1, 0.9], [0.0, 1.0], [2, 8])
    ks = (1 - 2 * 0.1) / (2 * math.log(0.9 / 0.1))
    assert out["sigma2"] == pytest.approx(0.09, rel=1e-9)
    assert out["sigma2_two_sided"] == pytest.approx(ks, rel=1e-9)
    for row in out["rows"]:
        assert row["bound_sqrt_2_sigma2_kl"] == pytest.approx(math.sqrt(2 * out["sigma2"] * row["kl"]))


def test_infalign_finds_t_and_beats_the_identity():
    opt = tilt.infalign(4, transform="exp", kl=0.5, optimize_t=True)
    ident = tilt.infalign(4, transform="identity", kl=0.5)
    assert opt["t"] > 0
    assert opt["inference_win_rate"] >= ident["inference_win_rate"] - 1e-9


def test_memoryless_runs():
    out = tilt.memoryless([0.5, 0.5], [0.0, 1.0], [1, 10], 0.05)
    assert out["units"]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: tilt.best_of_n([0.5, 0.6], [0, 1], 2), "probs"),
        (lambda: tilt.best_of_n([0.5, 0.5], [0, 1, 2], 2), "rewards"),
        (lambda: tilt.best_of_n([0.5, 0.5], [0, float("nan")], 2), "rewards"),
        (lambda: tilt.best_of_n([-0.5, 1.5], [0, 1], 2), "probs"),
        (lambda: tilt.best_of_n([0.5, 0.5], [0, 1], 0), "n"),
        (lambda: tilt.best_of_n("ab", [0, 1], 2), "probs"),
        (lambda: tilt.tilt([0.5, 0.5], [0, 1]), "beta"),
        (lambda: tilt.tilt([0.5, 0.5], [0, 1], beta=-1.0), "beta"),
        (lambda: tilt.divergences([0.5, 0.5], [0.5, 0.5], alpha=float("nan")), "alpha"),
        (lambda: tilt.calibrate([], [1.0]), "reference"),
        (lambda: tilt.calibrate([1.0], [float("inf")]), "rewards"),
        (lambda: tilt.infalign(4, procedure="maybe", kl=0.1), "procedure"),
        (lambda: tilt.infalign(4, transform="identity", t=1.0, kl=0.1), "t"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(call, name):
    with pytest.raises(ValueError) as e:
        call()
    assert name in str(e.value)


def test_a_million_outcomes_and_the_input_is_not_modified():
    k = 1_000_000
    p = RNG.random(k)
    p /= p.sum()
    r = RNG.normal(size=k)
    p0 = p.copy()
    b = tilt.best_of_n(p, r, 8)
    assert b["pmf"].shape == (k,)
    assert abs(b["pmf"].sum() - 1) < 1e-9
    assert b["kl"] <= b["kl_bound"]
    assert np.array_equal(p, p0)
    # A strided view and a list work as well as a contiguous array.
    d = tilt.divergences(p[::2] / p[::2].sum(), p[1::2] / p[1::2].sum())
    assert d["kl_q_p"] >= 0


CLI = os.environ.get("TILT_CLI")


@pytest.mark.skipif(not CLI, reason="TILT_CLI (the tilt binary) not given by the harness")
def test_the_same_bits_as_the_rust_core_through_the_cli():
    p, r = random_dist(8, 4)
    args = ["--probs", ",".join(repr(float(x)) for x in p), "--rewards", ",".join(repr(float(x)) for x in r)]
    # The CLI reads the same decimal strings, so both see the same doubles.
    pp = np.array([float(repr(float(x))) for x in p])
    rr = np.array([float(repr(float(x))) for x in r])
    out = json.loads(subprocess.run([CLI, "theory", "bon", *args, "--n", "6"], check=True,
                                    capture_output=True, text=True).stdout)
    b = tilt.best_of_n(pp, rr, 6)
    for key in ("kl", "kl_bound", "kl_estimate", "win_rate", "expected_reward"):
        assert b[key] == out[key], key
    assert b["pmf"].tolist() == out["pmf"]
    out = json.loads(subprocess.run([CLI, "theory", "tilt", *args, "--kl", "0.2"], check=True,
                                    capture_output=True, text=True).stdout)
    t = tilt.tilt(pp, rr, kl=0.2)
    for key in ("beta", "kl", "expected_reward", "log_partition"):
        assert t[key] == out[key], key
