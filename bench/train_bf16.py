#!/usr/bin/env python3
"""Mixed precision on this CPU: `train --dtype bfloat16` (bf16 weights and compute; fp32 master
weights and AdamW moments; softmax, norms, the loss and the gradient norm in fp32) against
`--dtype float32` of the same program, in one run.

The model: the demo model (examples/demo/model: a pretrained 12-layer OPT, d 128, vocabulary 8192),
every parameter trained (--train-all) on the demo's WordNet training task for --steps steps
(default 200; batch --batch, lr 1e-3, warm-up 20, seed 1234), so the loss curve is a real one.
Each dtype runs in its own child process with the same threads and allocator. Printed: the
machine's GEMM rate for float32 and bfloat16 in this run (bench_gemm, LibTorch as crash-hpc links
it), each dtype's median step time and tokens/s, the bf16/fp32 time ratio, and the loss curves
against each other: the largest and the mean |loss_bf16 - loss_fp32| over the steps, the mean of
the last 20 steps of each, and the curve every 20 steps. Not part of CI:
  python3 bench/train_bf16.py [--steps 200] [--batch 16] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import ROOT, print_crash_gemm, side_env

DTYPES = ["float32", "bfloat16"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--allocator", default="tcmalloc", choices=["tcmalloc", "glibc"])
    a = ap.parse_args()
    binary = os.path.join(a.build, "crash-hpc")
    env = side_env(a.allocator, a.threads)
    demo = os.path.join(ROOT, "examples", "demo")

    best = print_crash_gemm(a.build, a.threads, DTYPES, env, a.allocator)

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train")
        subprocess.run([binary, "prepare", "--task", os.path.join(demo, "tasks", "wordnet_train.jsonl"), "--tokenizer",
                        os.path.join(demo, "model"), "--out", data], check=True, capture_output=True)
        curves, times, tokens = {}, {}, {}
        for d in DTYPES:
            out = os.path.join(tmp, d)
            cmd = [binary, "train", "--model", os.path.join(demo, "model"), "--data", data, "--out", out, "--train-all",
                   "--steps", str(a.steps), "--batch-size", str(a.batch), "--lr", "1e-3", "--warmup", "20", "--seed",
                   "1234", "--dtype", d, "--threads", str(a.threads), "--log-interval", "50"]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"train --dtype {d} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            with open(os.path.join(out, "train_log.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            steps = [x for x in rows if "loss" in x]
            curves[d] = [x["loss"] for x in steps]
            times[d] = statistics.median(x["seconds"] for x in steps[1:])
            tokens[d] = statistics.median(x["tokens"] for x in steps[1:])

    print(f"\n{a.steps} steps, batch {a.batch}, every parameter of the demo model trained:")
    for d in DTYPES:
        print(f"  {d:9s} median step {times[d] * 1e3:8.1f} ms  {tokens[d] / times[d]:9.1f} tokens/s")
    print(f"  bf16 / fp32 step time: {times['bfloat16'] / times['float32']:.2f}x "
          f"(GEMM rate bf16 / fp32 in this run: {best['bfloat16'] / best['float32']:.2f}x)")
    a32, a16 = curves["float32"], curves["bfloat16"]
    diffs = [abs(x - y) for x, y in zip(a32, a16)]
    print("\nloss curves, bf16 against fp32:")
    print(f"  largest |difference| {max(diffs):.4f}, mean {statistics.mean(diffs):.4f} over {len(diffs)} steps")
    print(f"  mean of the last 20 steps: fp32 {statistics.mean(a32[-20:]):.4f}, bf16 {statistics.mean(a16[-20:]):.4f}")
    print("  step   fp32     bf16")
    for s in list(range(0, len(a32), 20)) + [len(a32) - 1]:
        print(f"  {s + 1:4d}  {a32[s]:.4f}  {a16[s]:.4f}")


if __name__ == "__main__":
    main()
