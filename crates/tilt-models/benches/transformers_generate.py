"""Baseline for benches/decode_vs_transformers.rs: HF transformers `generate` on a GGUF.

Loads the GGUF with transformers (dequantised to f32, CPU), then for each N generates
`--new-tokens` tokens after the given prompt ids with `num_return_sequences = N` (plain sampling,
temperature 1, no truncation: transformers refuses `num_return_sequences > 1` for greedy
decoding; the sampler's cost is small beside the forward), and prints one JSON line
per N: prefill time (one forward of the prompt), total rate (prefill included, N × new
tokens / generate time) and a decode-only rate (generate time minus one prefill).

Requirements: torch==2.15.0 transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0 numpy
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--batches", default="1,4,16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, name = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=0)  # warm-up
        for n in [int(x) for x in a.batches.split(",")]:
            t0 = time.perf_counter()
            model(ids.repeat(n, 1))
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                max_new_tokens=a.new_tokens,
                min_new_tokens=a.new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_beams=1,
                num_return_sequences=n,
                pad_token_id=0,
            )
            total = time.perf_counter() - t0
            new = (out.shape[1] - ids.shape[1]) * n
            print(
                json.dumps(
                    {
                        "n": n,
                        "prefill_s": prefill,
                        "decode_tok_s": new / max(total - prefill, 1e-9),
                        "total_tok_s": new / total,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
