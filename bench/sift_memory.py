#!/usr/bin/env python3
"""Peak memory of `train --train-all` with SIFT (--sparse-increment 0.05) vs dense AdamW, in one run.

The same random OPT-125m-shaped model (fp32, written by build/bench/make_random_checkpoint, no
PyPI needed), the same batch of random token ids, the same steps and threads. Each training runs
as its own child process; its peak resident memory is read from getrusage(RUSAGE_CHILDREN)
(ru_maxrss of the largest child so far, so the smaller run goes first). Also prints the
optimizer-state bytes each run reports. Goal: SIFT / dense <= 0.55 (the SIFT paper: 51.4 GB vs
111 GB for LLaMA-7B). Not part of CI:
  python3 bench/sift_memory.py [--rho 0.05] [--batch 4] [--seq 64] [--steps 3] [--threads 2]
"""
import json
import os
import random
import re
import resource
import subprocess
import tempfile

from common import OPT_125M_SHAPE, ROOT, arguments, write_tokens

OPT_125M = {"_remove_final_layer_norm": False, "architectures": ["OPTForCausalLM"], "model_type": "opt",
            **OPT_125M_SHAPE, "do_layer_norm_before": True, "activation_function": "relu",
            "enable_bias": True, "layer_norm_elementwise_affine": True, "pad_token_id": 1, "bos_token_id": 2,
            "eos_token_id": 2, "tie_word_embeddings": True, "torch_dtype": "float32"}


def make_model(binary, path):
    if os.path.exists(os.path.join(path, "config.json")):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cfg = path + ".config.json"
    with open(cfg, "w") as f:
        json.dump(OPT_125M, f)
    subprocess.run([binary, "--config", cfg, "--out", path, "--dtype", "float32"], check=True)


def peak_child_rss_mib():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def train(binary, model, data, out, steps, batch, threads, extra):
    p = subprocess.run([binary, "train", "--model", model, "--data", data, "--out", out, "--steps", str(steps),
                        "--batch-size", str(batch), "--lr", "1e-4", "--train-all", "--threads", str(threads),
                        "--log-level", "info"] + extra, check=True, capture_output=True, text=True)
    m = re.search(r"optimizer state: (\d+) bytes", p.stdout + p.stderr)
    return peak_child_rss_mib(), int(m.group(1)) if m else -1


def main():
    ap = arguments(batch=4, seq=64, model="/tmp/crash-bench/opt-125m-random-fp32", binary="crash-hpc",
                   two_sides=False)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--maker", default=os.path.join(ROOT, "build", "bench", "make_random_checkpoint"))
    a = ap.parse_args()
    make_model(a.maker, a.model)
    rnd = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        write_tokens(data, ([rnd.randrange(4, 50000) for _ in range(a.seq)] for _ in range(a.batch * a.steps)))
        # ru_maxrss of children is a running maximum: the smaller (SIFT) run first.
        sift_rss, sift_state = train(a.binary, a.model, data, os.path.join(tmp, "sift"), a.steps, a.batch, a.threads,
                                     ["--sparse-increment", str(a.rho)])
        dense_rss, dense_state = train(a.binary, a.model, data, os.path.join(tmp, "dense"), a.steps, a.batch,
                                       a.threads, [])
    if dense_rss <= sift_rss:
        print("note: the dense run's peak did not exceed SIFT's; the dense figure is a lower bound")
    print(f"random OPT-125m (fp32, tied embedding), train --train-all, batch {a.batch} x {a.seq} tokens, "
          f"{a.steps} steps, {a.threads} threads, CPU")
    print(f"dense AdamW:         peak RSS {dense_rss:9.1f} MiB, optimizer state {dense_state / 2**20:8.1f} MiB")
    print(f"SIFT rho={a.rho:<6}:    peak RSS {sift_rss:9.1f} MiB, optimizer state {sift_state / 2**20:8.1f} MiB")
    print(f"ratio SIFT / dense: peak {sift_rss / dense_rss:.3f} (goal <= 0.55), "
          f"optimizer state {sift_state / max(dense_state, 1):.3f}")


if __name__ == "__main__":
    main()
