"""tilt.best_of_n against a vectorised NumPy implementation of the same formulas, in one
process, on 10⁶ outcomes (the NumPy code is tilt-core's bench baseline,
crates/tilt-core/benches/numpy_best_of_n.py, imported, not copied).

usage: python crates/tilt-py/bench/best_of_n.py [REPEATS]   (tilt installed in the venv)

Both are timed alternately on the same arrays; each figure is the median of REPEATS runs,
and the ratio is NumPy's median over tilt's. tilt's time includes taking the arrays from
NumPy and handing the pmf back as a NumPy array.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tilt-core", "benches"))
from numpy_best_of_n import best_of_n as numpy_best_of_n  # noqa: E402

import tilt  # noqa: E402


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    rng = np.random.default_rng(0)
    k, n = 1_000_000, 16
    p = rng.random(k)
    p /= p.sum()
    cases = {
        "10^6 distinct rewards": rng.normal(size=k),
        "10^6 outcomes, 1000 reward levels": rng.integers(0, 1000, k).astype(float),
    }
    print(f"tilt.best_of_n vs NumPy, n = {n}, median of {repeats}, numpy {np.__version__}")
    print("| case | tilt (s) | NumPy (s) | NumPy / tilt | |KL difference| |")
    print("|---|---|---|---|---|")
    for name, r in cases.items():
        tt, tn = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            b = tilt.best_of_n(p, r, n)
            tt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, kl, _, _, _ = numpy_best_of_n(p, r, n)
            tn.append(time.perf_counter() - t0)
        mt, mn = sorted(tt)[repeats // 2], sorted(tn)[repeats // 2]
        print(f"| {name} | {mt:.4f} | {mn:.4f} | {mn / mt:.2f}× | {abs(b['kl'] - kl):.1e} |")


if __name__ == "__main__":
    main()
