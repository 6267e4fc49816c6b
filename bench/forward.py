#!/usr/bin/env python3
"""crash-hpc forward vs HF transformers forward, side by side in one run.

Same random OPT-125m-shaped model (written once with transformers), same token batch shape,
same thread count; reports tokens/s of both and the ratio crash-hpc / HF (goal >= 1.0).
Needs torch and transformers from PyPI (not part of the build or CI):
  python bench/forward.py [--threads 2] [--batch 8] [--seq 128] [--iters 5]
"""
import json
import statistics
import subprocess
import time

import torch
from common import arguments, make_model
from transformers import OPTForCausalLM


def hf_tokens_per_s(path, batch, seq, threads, iters):
    torch.set_num_threads(threads)
    model = OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(4, model.config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times), model.config._attn_implementation


def main():
    ap = arguments(batch=8, seq=128, model="/tmp/crash-bench/opt-125m-random", binary="bench/bench_forward")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    make_model(a.model)
    ours = json.loads(subprocess.run([a.binary, "--model", a.model, "--batch", str(a.batch), "--seq", str(a.seq),
                                      "--threads", str(a.threads), "--iters", str(a.iters)],
                                     check=True, capture_output=True, text=True).stdout.splitlines()[-1])["tokens_per_s"]
    hf, attn = hf_tokens_per_s(a.model, a.batch, a.seq, a.threads, a.iters)
    print(f"OPT-125m shape, batch {a.batch} x {a.seq} tokens, {a.threads} threads, fp32 CPU")
    print(f"crash-hpc (LibTorch {ours and 'Debian 1.13'}): {ours:10.1f} tokens/s")
    print(f"HF transformers {torch.__version__} ({attn}): {hf:10.1f} tokens/s")
    print(f"ratio crash-hpc / HF: {ours / hf:.2f}")


if __name__ == "__main__":
    main()
