"""Baseline for benches/minilm.rs: sentence-transformers on the same 64 texts, same
batch sizes, best of 3, torch limited to 2 threads. Run side by side with the Rust bench:

    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python benches/minilm_sentence_transformers.py \
        ~/.cache/tilt/models/all-minilm-l6-v2
"""

import sys
import time

import torch
from sentence_transformers import SentenceTransformer

torch.set_num_threads(2)
model = SentenceTransformer(sys.argv[1], device="cpu")
texts = [
    f"Response number {i}: the quick brown fox jumps over the lazy dog while the "
    f"committee reviews item {i * 7} of the quarterly budget and the weather stays mild."
    for i in range(64)
]
model.encode(texts[:16], batch_size=16)
for batch in [1, 8, 16, 32]:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        model.encode(texts, batch_size=batch)
        best = min(best, time.perf_counter() - t)
    print(f"sentence-transformers, batch {batch:>2}, 64 texts x ~40 tokens: "
          f"{len(texts) / best:7.1f} sentences/s (best of 3)")
