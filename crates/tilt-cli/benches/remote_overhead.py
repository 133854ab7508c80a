"""tilt's overhead over a remote engine's own rate: best-of-16 through `tilt generate --engine`
against the same candidates asked of the engine directly.

The engine is a `tilt serve` started here on 127.0.0.1 (any OpenAI-compatible engine would
do; this one is deterministic by seed and honours `n`). For each of 4 prompts, 16 candidates
of 64 new tokens:

  engine alone   one POST /v1/chat/completions per prompt with n = 16 and logprobs, the 4
                 prompts at once (what a client that does no selection pays, with the
                 concurrency tilt uses); the same one prompt after another is shown too;
  tilt           `tilt generate --engine openai:URL --prompts FILE --strategy bon --n 16`:
                 the same requests (4 prompts in flight at once, as max-concurrency allows),
                 plus MiniLM scoring of the 64 candidates, selection and KL accounting;
  tilt, free reward  the same with a reward that costs next to nothing (`command:` running a
                 shell loop, the length of each request line), so that what remains is tilt's own
                 overhead: requests, answers, selection, KL accounting, output;
  tilt startup   the same command with --n 1 --max-new-tokens 1 (process start, MiniLM load,
                 the engine's probe), reported so that the per-request overhead can be read.

Both are timed alternately, REPEATS times each; figures are medians; the ratio is tilt's
median over the engine's. On these 2 cores the engine and tilt share the CPU (the reward's
scoring competes with the engine's decoding), so the overhead here is an upper bound on what
it is beside a GPU engine.

usage: python crates/tilt-cli/benches/remote_overhead.py TILT_BINARY [REPEATS]
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "Give me three tips for sleeping well.",
    "How do I boil an egg?",
    "Name a fruit that is rich in vitamin C.",
    "What is a good way to learn a new language?",
]
N, TOKENS = 16, 64


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    tilt = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    server = subprocess.Popen(
        ["timeout", "1200", tilt, "serve", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stderr:
            if " on http://" in line:
                base = "http://" + line.split(" on http://")[1].split()[0] + "/v1"
                break
        model = post_get(base + "/models")["data"][0]["id"]
        with tempfile.TemporaryDirectory() as d:
            prompts = os.path.join(d, "prompts.jsonl")
            with open(prompts, "w") as f:
                for p in PROMPTS:
                    f.write(json.dumps({"prompt": p}) + "\n")
            cmd = [tilt, "generate", "--engine", f"openai:{base}", "--prompts", prompts,
                   "--strategy", "bon", "--max-new-tokens", str(TOKENS)]

            def one(i):
                r = post(base + "/chat/completions", {
                    "model": model, "messages": [{"role": "user", "content": PROMPTS[i]}],
                    "n": N, "max_tokens": TOKENS, "seed": i, "logprobs": True,
                })
                assert len(r["choices"]) == N

            def engine_alone():
                with ThreadPoolExecutor(len(PROMPTS)) as ex:
                    list(ex.map(one, range(len(PROMPTS))))

            def engine_sequential():
                for i in range(len(PROMPTS)):
                    one(i)

            def through_tilt(n, tokens, extra=()):
                c = list(cmd)
                c[c.index("--max-new-tokens") + 1] = str(tokens)
                subprocess.run(c + ["--n", str(n), *extra], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            free = ["--reward", "command:while IFS= read -r l; do echo ${#l}; done"]
            te, tq, tt, tf, ts = [], [], [], [], []
            engine_alone()  # warm
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine_alone()
                te.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine_sequential()
                tq.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                through_tilt(N, TOKENS)
                tt.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                through_tilt(N, TOKENS, free)
                tf.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                through_tilt(1, 1)
                ts.append(time.perf_counter() - t0)
        med = lambda xs: sorted(xs)[len(xs) // 2]
        e, q, t, f, s = med(te), med(tq), med(tt), med(tf), med(ts)
        print(f"best-of-{N}, {len(PROMPTS)} prompts x {TOKENS} new tokens, engine = tilt serve "
              f"on 127.0.0.1, medians of {repeats}")
        print("| what | seconds | / engine alone |")
        print("|---|---|---|")
        print(f"| engine alone (n = {N}, the {len(PROMPTS)} prompts at once) | {e:.3f} | 1.00 |")
        print(f"| engine alone, one prompt after another | {q:.3f} | {q / e:.2f} |")
        print(f"| tilt generate --engine (bon:{N}, MiniLM reward) | {t:.3f} | {t / e:.2f} |")
        print(f"| tilt generate --engine (bon:{N}, a reward that costs nothing) | {f:.3f} | "
              f"{f / e:.2f} |")
        print(f"| tilt startup (process, MiniLM load, probe) | {s:.3f} | {s / e:.2f} |")
        print(f"| tilt without its startup | {t - s:.3f} | {(t - s) / e:.2f} |")
    finally:
        server.terminate()
        server.wait()


def post_get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    main()
