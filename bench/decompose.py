#!/usr/bin/env python3
"""SFSD calibration throughput, side by side in one run (not part of CI).

crash-hpc decompose's calibration (every decoder Linear's output sums and sums of outer
products in fp64 over the non-padding tokens; the job logs "calibration: N tokens in S s") vs
the same statistics in PyTorch: the HF model with a forward hook on each Linear, same examples,
same batch size, same threads. Only the calibration pass is timed on both sides (the job's model
load, decomposition and saving are not). The two sides' sums are also compared.
Needs torch and transformers from PyPI:
  python bench/decompose.py --model examples/demo/model --data PREPARED [--threads 2]
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")


def prepared_tokens(folder, n, t):
    out = []
    for s in sorted(f for f in os.listdir(folder) if f.startswith("shard-")):
        with open(os.path.join(folder, s)) as f:
            out += [json.loads(line)["tokens"][:t] for line in f if line.strip()]
    return out[:n]


def torch_reference(model_dir, seqs, batch, pad):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    stats, valid = {}, [None]

    def hook(name):
        def fn(_module, _inputs, y):
            y = y.reshape(-1, y.shape[-1])[valid[0]].double()
            s = stats.setdefault(name, [0, 0, 0])
            s[0] += y.shape[0]
            s[1] = s[1] + y.sum(0)
            s[2] = s[2] + y.T @ y
        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers." in name and name.split(".")[-1] in LINEARS:
            m.register_forward_hook(hook(name))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(seqs), batch):
            part = seqs[b:b + batch]
            T = max(len(s) for s in part)
            ids = torch.tensor([s + [pad] * (T - len(s)) for s in part])
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in part])
            valid[0] = mask.reshape(-1).bool()
            model(input_ids=ids, attention_mask=mask)
    secs = time.perf_counter() - t0
    return stats, secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "examples", "demo", "model"))
    ap.add_argument("--data", required=True, help="prepared task folder")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([os.path.join(ROOT, "build", "crash-hpc"), "decompose", "--model", a.model, "--data",
                            a.data, "--out", os.path.join(tmp, "f"), "--ratio", "0.5", "--num-examples",
                            str(a.examples), "--tokens", str(a.tokens), "--batch-size", str(a.batch), "--threads",
                            str(a.threads)], capture_output=True, text=True, check=True)
    m = re.search(r"calibration: (\d+) tokens in ([0-9.]+) s", r.stdout + r.stderr)
    ours_tokens, ours_secs = float(m.group(1)), float(m.group(2))
    with open(os.path.join(a.model, "config.json")) as f:
        pad = json.load(f).get("pad_token_id") or 0
    seqs = prepared_tokens(a.data, a.examples, a.tokens)
    stats, ref_secs = torch_reference(a.model, seqs, a.batch, pad)
    ref_tokens = next(iter(stats.values()))[0]
    print(f"calibration, {len(stats)} Linears, {int(ours_tokens)} tokens, {a.threads} threads:")
    print(f"  crash-hpc decompose  {ours_tokens / ours_secs:10.0f} tokens/s ({ours_secs:.2f} s)")
    print(f"  torch + HF hooks     {ref_tokens / ref_secs:10.0f} tokens/s ({ref_secs:.2f} s)")
    print(f"  ratio {ref_secs / ours_secs * ours_tokens / ref_tokens:.2f}x")
    if ref_tokens != ours_tokens:
        print(f"  WARNING: token counts differ ({ours_tokens} vs {ref_tokens})")


if __name__ == "__main__":
    main()
