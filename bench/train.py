#!/usr/bin/env python3
"""crash-hpc train vs the same fine-tuning written with HF transformers + torch, in one run.

The CRaSh setting: a uniform emulator (2 bottom + 2 top adapters trainable, 4 frozen middle
layers) of a random OPT-125m-shaped model, AdamW (lr 1e-4, clip 1.0), batch B x T tokens of
random ids, the same thread count. Prints tokens/s of both (median over the timed steps) and
the ratio crash-hpc / HF (goal >= 1.0 on CPU). Needs torch and transformers from PyPI:
  python bench/train.py [--threads 2] [--batch 8] [--seq 128] [--steps 8]
"""
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from common import arguments, make_model, write_tokens
from transformers import OPTForCausalLM


def hf_tokens_per_s(emulator, ids, steps, threads):
    torch.set_num_threads(threads)
    model = OPTForCausalLM.from_pretrained(emulator, dtype=torch.float32)
    model.train()
    with open(os.path.join(emulator, "crash_plan.json")) as f:
        trainable = [i for i, s in enumerate(json.load(f)["slots"]) if s["train"]]
    params = []
    for name, p in model.named_parameters():
        keep = any(f".layers.{i}." in name for i in trainable)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times[1:])


def main():
    ap = arguments(batch=8, seq=128, model="/tmp/crash-bench/opt-125m-random", binary="crash-hpc")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    make_model(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        emulator = os.path.join(tmp, "emulator")
        subprocess.run([a.binary, "emulate", "--model", a.model, "--mode", "uniform", "--keep", "4", "--adapters", "2,2",
                        "--out", emulator, "--log-level", "warn"], check=True)
        torch.manual_seed(0)
        ids = torch.randint(4, 50000, (a.batch, a.seq))
        data = os.path.join(tmp, "data.jsonl")
        write_tokens(data, ids.tolist())
        out = os.path.join(tmp, "train")
        subprocess.run([a.binary, "train", "--model", emulator, "--data", data, "--out", out, "--steps", str(a.steps),
                        "--batch-size", str(a.batch), "--lr", "1e-4", "--threads", str(a.threads), "--log-level",
                        "warn"], check=True)
        with open(os.path.join(out, "train_log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]
        ours = statistics.median(rates)
        hf = hf_tokens_per_s(emulator, ids, a.steps, a.threads)
    print(f"uniform emulator 2-4-2 of a random OPT-125m, batch {a.batch} x {a.seq} tokens, {a.threads} threads, "
          f"fp32 CPU, AdamW on the 4 adapter layers")
    print(f"crash-hpc train (LibTorch, Debian 1.13): {ours:10.1f} tokens/s")
    print(f"HF transformers + torch {torch.__version__}:      {hf:10.1f} tokens/s")
    print(f"ratio crash-hpc / HF: {ours / hf:.2f}")


if __name__ == "__main__":
    main()
