"""`tilt theory bon --dist FILE` end to end against pandas + NumPy running the same formulas.

Both sides are whole commands, timed alternately on the same 10^6-row CSV (`prob,reward`,
rewards N(0,1), every float written in full): parse, compute, print one JSON summary. The
NumPy side is tilt-core's bench baseline (crates/tilt-core/benches/numpy_best_of_n.py,
imported, not copied) after `pandas.read_csv`; it prints KL, win rate and expected reward.
tilt runs with `--no-pmf` (the same summary) and, as a third row, with the full 10^6-entry
pmf printed. Each figure is the median of REPEATS runs; ratios are pandas' median over
tilt's.

usage: python crates/tilt-cli/benches/theory_bon_vs_pandas.py TILT_BINARY [REPEATS]
       (a Python with numpy and pandas, e.g. pip install numpy==2.2.6 pandas==2.2.3)
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
N_DRAWS = 16
ROWS = 1_000_000


def baseline(path, n):
    """What the researcher writes: read the CSV with pandas, run the vectorised formulas."""
    import pandas as pd

    sys.path.insert(0, os.path.join(HERE, "..", "..", "tilt-core", "benches"))
    from numpy_best_of_n import best_of_n

    df = pd.read_csv(path)
    p = df["prob"].to_numpy(dtype=float)
    r = df["reward"].to_numpy(dtype=float)
    _, kl, win, er, levels = best_of_n(p, r, n)
    print(json.dumps({"kl": kl, "win_rate": win, "expected_reward": er, "levels": levels}))


def timed(cmd):
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--baseline":
        baseline(sys.argv[2], float(sys.argv[3]))
        return
    tilt = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    p = rng.random(ROWS)
    p /= p.sum()
    r = rng.normal(size=ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dist.csv")
        pd.DataFrame({"prob": p, "reward": r}).to_csv(path, index=False, float_format="%.17g")
        commands = {
            "tilt --no-pmf": [tilt, "theory", "bon", "--dist", path, "--n", str(N_DRAWS), "--no-pmf"],
            "pandas + NumPy": [sys.executable, __file__, "--baseline", path, str(N_DRAWS)],
            "tilt (pmf printed)": [tilt, "theory", "bon", "--dist", path, "--n", str(N_DRAWS)],
        }
        times = {k: [] for k in commands}
        outs = {}
        for _ in range(repeats):
            for name, cmd in commands.items():
                t, out = timed(cmd)
                times[name].append(t)
                outs[name] = out
        med = {k: sorted(v)[repeats // 2] for k, v in times.items()}
        kl_tilt = json.loads(outs["tilt --no-pmf"])["kl"]
        kl_np = json.loads(outs["pandas + NumPy"])["kl"]
        print(f"tilt theory bon on {ROWS} outcomes, n = {N_DRAWS}, median of {repeats}, "
              f"numpy {np.__version__}, pandas {pd.__version__}; |KL difference| "
              f"{abs(kl_tilt - kl_np):.1e} nats")
        print("| command | seconds | pandas + NumPy / this |")
        print("|---|---|---|")
        for name in commands:
            print(f"| {name} | {med[name]:.3f} | {med['pandas + NumPy'] / med[name]:.2f}× |")


if __name__ == "__main__":
    main()
