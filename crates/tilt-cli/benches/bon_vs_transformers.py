"""Best-of-N end to end: `tilt generate` against the same pipeline in transformers +
sentence-transformers, as a researcher writes it, in one run.

For each of 4 prompts, 16 candidates of at most 64 new tokens from SmolLM2-135M-Instruct
(the same GGUF file for both), each scored by the MiniLM relevance reward (the cosine of
all-MiniLM-L6-v2's embeddings of prompt and candidate, the same model files for both), and
the best returned:

  tilt          `tilt generate --prompts FILE --strategy bon --n 16 --max-new-tokens 64
                --threads 2`: the chat template, the 4 prompts' 64 sequences stepped together,
                MiniLM scoring, selection, KL accounting, JSON output. Its model load is the
                same command with --n 1 --max-new-tokens 1 on one prompt, timed apart and
                subtracted.
  transformers  torch at 2 threads, the GGUF loaded by transformers (f32), one prompt after
                another: `apply_chat_template`, `generate(num_return_sequences=16,
                do_sample=True, temperature=1, top_k=0)`, `batch_decode`, then
                `SentenceTransformer.encode` of the prompt and the 16 candidates and the argmax
                of the cosines. Loading both models is timed apart and left out.

Both sample at temperature 1 with no truncation, stop a sequence at its end-of-turn token,
and draw different candidates (different generators), so the rate compared is tokens
generated per second of the whole pipeline (prefill, decode, detokenising, scoring,
selection), each side counting the tokens of its candidates up to and including their end.
The two alternate, REPEATS times each; figures are medians.

usage: python crates/tilt-cli/benches/bon_vs_transformers.py TILT_BINARY [REPEATS]
       (a Python with torch, transformers, gguf, accelerate and sentence-transformers: the
       venv `cargo bench -p tilt-models --bench decode_vs_transformers` makes in
       target/tilt-bench-venv, e.g. target/tilt-bench-venv/bin/python)
"""

import json
import os
import subprocess
import sys
import tempfile
import time

PROMPTS = [
    "Give me three tips for sleeping well.",
    "How do I boil an egg?",
    "Name a fruit that is rich in vitamin C.",
    "What is a good way to learn a new language?",
]
N, TOKENS, THREADS = 16, 64, 2


def model_paths(tilt):
    """The GGUF and the MiniLM folder, from `tilt models fetch` (fetched on first use)."""
    out = json.loads(subprocess.run([tilt, "models", "fetch"], check=True,
                                    capture_output=True, text=True).stdout)
    files = [f["path"] for m in out["models"] for f in m["files"]]
    gguf = next(f for f in files if f.endswith(".gguf"))
    minilm = next(m["dir"] for m in out["models"] if "minilm" in m["name"])
    return gguf, minilm


def run_tilt(tilt, prompts_file, n, tokens, one_prompt=None):
    cmd = [tilt, "generate", "--strategy", "bon", "--n", str(n), "--max-new-tokens",
           str(tokens), "--threads", str(THREADS)]
    cmd += ["--prompt", one_prompt] if one_prompt else ["--prompts", prompts_file]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    dt = time.perf_counter() - t0
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    tokens = sum(c["new_tokens"] for l in lines for c in l["candidates"])
    return dt, tokens, lines


class Baseline:
    def __init__(self, gguf, minilm):
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(THREADS)
        self.torch = torch
        t0 = time.perf_counter()
        d, name = os.path.dirname(gguf), os.path.basename(gguf)
        self.tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                          dtype=torch.float32).eval()
        self.st = SentenceTransformer(minilm, device="cpu")
        self.load_s = time.perf_counter() - t0
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")

    def run(self, seed):
        torch = self.torch
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        tokens, best = 0, []
        with torch.no_grad():
            for p in PROMPTS:
                ids = self.tok.apply_chat_template([{"role": "user", "content": p}],
                                                   add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
                ids = ids["input_ids"]
                out = self.model.generate(ids, max_new_tokens=TOKENS, do_sample=True,
                                          temperature=1.0, top_k=0, top_p=1.0,
                                          num_return_sequences=N, eos_token_id=self.eos,
                                          pad_token_id=self.eos)
                new = out[:, ids.shape[1]:]
                for row in new.tolist():
                    tokens += row.index(self.eos) + 1 if self.eos in row else len(row)
                texts = self.tok.batch_decode(new, skip_special_tokens=True)
                emb = self.st.encode([p] + texts, normalize_embeddings=True,
                                     convert_to_tensor=True)
                best.append(int((emb[1:] @ emb[0]).argmax()))
        return time.perf_counter() - t0, tokens, best


def main():
    tilt = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    gguf, minilm = model_paths(tilt)
    base = Baseline(gguf, minilm)
    base.run(0)  # warm-up
    with tempfile.TemporaryDirectory() as d:
        prompts = os.path.join(d, "prompts.jsonl")
        with open(prompts, "w") as f:
            for p in PROMPTS:
                f.write(json.dumps({"prompt": p}) + "\n")
        run_tilt(tilt, prompts, 1, 1, PROMPTS[0])  # warm the page cache
        tt, tk, ts, bt, bk = [], [], [], [], []
        for rep in range(repeats):
            dt, k, lines = run_tilt(tilt, prompts, N, TOKENS)
            assert len(lines) == len(PROMPTS), lines
            tt.append(dt)
            tk.append(k)
            ts.append(run_tilt(tilt, prompts, 1, 1, PROMPTS[0])[0])
            dt, k, _ = base.run(rep + 1)
            bt.append(dt)
            bk.append(k)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    t, s, b = med(tt), med(ts), med(bt)
    # Rates per run, then the median: each run's tokens over that run's time.
    tilt_rate = med([k / (x - s) for k, x in zip(tk, tt)])
    base_rate = med([k / x for k, x in zip(bk, bt)])
    print(f"best-of-{N}, {len(PROMPTS)} prompts x at most {TOKENS} new tokens, MiniLM reward, "
          f"{THREADS} threads, medians of {repeats}")
    print("| pipeline | model load s | pipeline s | tokens generated | tok/s |")
    print("|---|---|---|---|---|")
    print(f"| tilt generate | {s:.3f} | {t - s:.3f} | {med(tk)} | {tilt_rate:.1f} |")
    print(f"| transformers + sentence-transformers | {base.load_s:.3f} | {b:.3f} | {med(bk)} | "
          f"{base_rate:.1f} |")
    print(f"tilt / transformers, tokens per second of the whole pipeline: "
          f"{tilt_rate / base_rate:.2f}x")


if __name__ == "__main__":
    main()
