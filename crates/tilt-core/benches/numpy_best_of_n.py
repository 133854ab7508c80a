"""Vectorised NumPy baseline for the Rust bench `best_of_n_vs_numpy`.

The same formulas as tilt-core's best_of_n.rs (arXiv 2401.01879 with ties): sort outcomes
into reward levels, level masses, tails summed from each end, then per level
log pi = n log F + log(-expm1(n log1p(-m/F))), KL, win rate, expected reward, and the pmf
scattered back to input order. Prints one JSON object per case on stdout.

usage: numpy_best_of_n.py DATA_DIR N REPEATS CASE...
"""

import json
import os
import sys
import time

import numpy as np


def best_of_n(p, r, n):
    order = np.argsort(r, kind="stable")
    rs = r[order]
    ps = p[order]
    new_level = np.empty(rs.shape[0], dtype=bool)
    new_level[0] = True
    np.not_equal(rs[1:], rs[:-1], out=new_level[1:])
    starts = np.flatnonzero(new_level)
    mass = np.add.reduceat(ps, starts)
    level_reward = rs[starts]
    csum = np.cumsum(mass)
    below = np.concatenate(([0.0], csum[:-1]))
    rsum = np.cumsum(mass[::-1])[::-1]
    above = np.concatenate((rsum[1:], [0.0]))
    F = below + mass
    with np.errstate(divide="ignore", invalid="ignore"):
        log_f = np.where(above < 0.5, np.log1p(-above), np.log(F))
        c = n * np.log1p(-np.minimum(mass / F, 1.0))
        log_pi = n * log_f + np.log(-np.expm1(c))
        pi = np.exp(log_pi)
        pos = pi > 0
        kl = float(np.sum(pi[pos] * (log_pi[pos] - np.log(mass[pos]))))
        ratio = np.where(mass > 0, pi / mass, 0.0)
    expected = float(np.dot(pi, level_reward))
    win = float(np.dot(pi, below + 0.5 * mass))
    level_of_sorted = np.cumsum(new_level) - 1
    pmf = np.empty_like(p)
    pmf[order] = ps * ratio[level_of_sorted]
    return pmf, kl, win, expected, len(starts)


def main():
    data_dir, n, repeats = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    for case in sys.argv[4:]:
        p = np.fromfile(os.path.join(data_dir, case + "_probs.f64"), dtype="<f8")
        r = np.fromfile(os.path.join(data_dir, case + "_rewards.f64"), dtype="<f8")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pmf, kl, win, er, levels = best_of_n(p, r, n)
            times.append(time.perf_counter() - t0)
        print(json.dumps({
            "case": case,
            "seconds": sorted(times)[len(times) // 2],
            "kl": kl,
            "win_rate": win,
            "expected_reward": er,
            "levels": levels,
            "pmf_sum": float(pmf.sum()),
            "numpy": np.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
