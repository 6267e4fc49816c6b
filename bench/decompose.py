#!/usr/bin/env python3
"""SFSD calibration throughput: crash-hpc decompose vs the same statistics in PyTorch, side by side.

The work: every decoder Linear's output sums and sums of outer products, in float64, over the
tokens of --examples calibration examples of --seq random token ids (no padding), --batch rows
a pass, on a random OPT-125m-shaped model (72 Linears; the model runs in float32).
- crash-hpc decompose --ratio 0.5: only its calibration is timed (its "calibration: N tokens in
  S s" line); the bench stops the job once that line is out (the decomposition that follows is
  not compared).
- PyTorch: the base model (transformers' AutoModel, no LM head) with a forward hook on each
  Linear that accumulates in place (sum.add_, sum_outer.addmm_ in float64), the same batches,
  torch.inference_mode(); the loop is timed.
Same threads and the same allocator (--allocators) on both sides, each side in its own process.

Printed: both sides' configuration, the machine's float32 and float64 GEMM rates in this run, each
side's tokens/s, GFLOP/s on the work's FLOPs (the decoder's forward in float32 and the float64
products 2 out^2 per token and Linear) and its fraction of the physical limit: the time those
FLOPs take at the two GEMM rates over the time taken. Goal: >= 1.0x PyTorch.
  python bench/decompose.py [--examples 64] [--seq 128] [--batch 8] [--allocators tcmalloc]
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import (arguments, cpu_name, decoder_flops, gemm_rates, libtorch_description, make_model, model_path,
                    parse_lists, print_gemm, process_allocator, program, reference_description, run_json, side_env,
                    worker_cmd)

CALIBRATION = re.compile(r"calibration: (\d+) tokens in ([0-9.]+) s")
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def hf_worker(a):
    import torch
    from transformers import AutoModel
    torch.set_num_threads(a.threads)
    model = AutoModel.from_pretrained(a.model, dtype=torch.float32).eval()
    with open(a.data) as f:
        seqs = [json.loads(line)["tokens"][:a.seq] for line in f]
    stats, valid = {}, [None]

    def hook(name, out):
        s = stats[name] = [0, torch.zeros(out, dtype=torch.float64), torch.zeros(out, out, dtype=torch.float64)]

        def fn(_module, _inputs, y):
            y = y.reshape(-1, y.shape[-1])[valid[0]].double()
            s[0] += y.shape[0]
            s[1].add_(y.sum(0))
            s[2].addmm_(y.t(), y)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers." in name and name.split(".")[-1] in LINEARS:
            m.register_forward_hook(hook(name, m.out_features))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(seqs), a.batch):
            part = seqs[b:b + a.batch]
            T = max(len(s) for s in part)
            ids = torch.tensor([s + [pad] * (T - len(s)) for s in part])
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in part])
            valid[0] = mask.reshape(-1).bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "tokens": next(iter(stats.values()))[0], "linears": len(stats),
                      "allocator": process_allocator(), "threads": torch.get_num_threads()}))


def write_prepared(folder, seqs):
    """A prepared text task of token ids (what crash-hpc prepare writes)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "shard-00000.jsonl"), "w") as f:
        for i, s in enumerate(seqs):
            f.write(json.dumps({"index": i, "hash": f"{i:016x}", "tokens": s}) + "\n")
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"kind": "text", "shards": ["shard-00000.jsonl"]}, f)


def run_crash(cmd, env):
    """Runs decompose until it logs its calibration time, then stops it; returns (tokens, seconds)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in p.stdout:
        log.append(line)
        m = CALIBRATION.search(line)
        if m:
            p.terminate()
            p.wait()
            return float(m.group(1)), float(m.group(2))
    p.wait()
    sys.exit(f"crash-hpc decompose printed no calibration line ({p.returncode}):\n{''.join(log)[-3000:]}")


def main():
    ap = arguments(batch=8, seq=128, allocators="tcmalloc", dtypes="float32", doc=__doc__)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--gemm-rows", type=int, default=1024)
    ap.add_argument("--model")
    ap.add_argument("--data")
    a = parse_lists(ap.parse_args())
    if a.worker == "hf":
        return hf_worker(a)
    if a.dtypes != ["float32"]:
        sys.exit("decompose.py compares float32 calibration only")
    model = model_path(a.dir)
    make_model(model)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 50000, a.seq).tolist() for _ in range(a.examples)]
    tokens = a.examples * a.seq
    d, ffn, layers = 768, 3072, 12
    fwd = decoder_flops([a.seq] * a.examples)
    acc = layers * tokens * 2 * (4 * d * d + ffn * ffn + d * d)  # q, k, v, out, fc1, fc2 outputs

    first = a.allocators[0]
    rates, ours_gemm, hf_gemm = gemm_rates(a, first, ["float32", "float64"], a.gemm_rows)
    print(f"CPU: {cpu_name()}; {a.threads} threads on both sides")
    print(f"crash-hpc: {libtorch_description(program(a, first, 'crash-hpc'), ours_gemm)}")
    print(f"reference: {reference_description(hf_gemm)}")
    print(f"model: random OPT-125m shape (12 layers, 72 Linears), float32; {a.examples} examples x {a.seq} tokens, "
          f"batches of {a.batch}; {fwd / 1e12:.3f} TFLOP of float32 forward, {acc / 1e12:.3f} TFLOP of float64 sums\n")
    best = print_gemm(rates, a.gemm_rows, a.threads)
    bound = fwd / (best["float32"] * 1e9) + acc / (best["float64"] * 1e9)
    print(f"physical limit: {bound:.2f} s (the forward at the float32 rate, the sums at the float64 rate)")
    summary = []
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        data = os.path.join(tmp, "calibration")
        write_prepared(data, seqs)
        with open(os.path.join(tmp, "hf.jsonl"), "w") as f:
            for s in seqs:
                f.write(json.dumps({"tokens": s}) + "\n")
        for alloc in a.allocators:
            env = side_env(alloc, a.threads)
            ours_tokens, o = run_crash([program(a, alloc, "crash-hpc"), "decompose", "--model", model, "--data", data,
                                        "--out", os.path.join(tmp, "factored"), "--ratio", "0.5", "--num-examples",
                                        str(a.examples), "--tokens", str(a.seq), "--batch-size", str(a.batch),
                                        "--threads", str(a.threads), "--overwrite", "--log-level", "info"], env)
            hf, _ = run_json(worker_cmd("decompose.py", a, "--worker", "hf", "--model", model, "--data",
                                        os.path.join(tmp, "hf.jsonl"), "--batch", a.batch, "--seq", a.seq), env,
                             "PyTorch side")
            h = hf["seconds"]
            print(f"\ncalibration, float32 model, float64 sums, allocator: crash-hpc {alloc}, PyTorch {hf['allocator']}; "
                  f"{hf['linears']} Linears hooked")
            for name, secs in (("crash-hpc decompose", o), ("PyTorch hooks (AutoModel, addmm_)", h)):
                print(f"  {name:36s} {tokens / secs:9.0f} tokens/s  {(fwd + acc) / secs / 1e9:7.1f} GFLOP/s  "
                      f"{bound / secs:5.2f} of the limit  ({secs:.2f} s)")
            print(f"  ratio crash-hpc / PyTorch: {h / o:.2f} (goal >= 1.0)")
            if int(ours_tokens) != hf["tokens"] or hf["tokens"] != tokens:
                print(f"  WARNING: token counts differ (crash-hpc {ours_tokens:.0f}, PyTorch {hf['tokens']}, "
                      f"expected {tokens})")
            summary.append((alloc, h / o, bound / o, bound / h))
    print("\nsummary:")
    for alloc, r, fo, fh in summary:
        print(f"  float32   {alloc:9s} ratio {r:5.2f}   of the limit: crash-hpc {fo:.2f}, PyTorch {fh:.2f}")


if __name__ == "__main__":
    main()
