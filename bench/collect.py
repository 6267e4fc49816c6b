#!/usr/bin/env python3
"""Collection throughput: crash-hpc collect vs the HF loop a careful user writes, side by side.

Both sides pool every layer's hidden states (mean over each example's tokens) of the same random
OPT-125m-shaped model on the same examples (random token ids, lengths from --seq/2 to --seq) and
store them as float32 [N, 768] per layer in HDF5:
- crash-hpc collect --block-size B (its default of 4 length-sorted, packed passes per block);
- HF: the base model (transformers' AutoModel, no LM head), output_hidden_states=True, examples
  sorted by length into batches of B, right-padded, torch.inference_mode(), the mean pooled in
  float32, h5py datasets written once.
Same threads, same compute type (--dtypes: float32 and bfloat16, HF's dtype=torch.bfloat16),
and the same allocator on both sides (--allocators: both under tcmalloc through LD_PRELOAD, then
both with glibc's malloc: crash-hpc-glibc, the same program built without tcmalloc).
Each side runs in its own process, alternating, --repeats times; each side's best run counts.
Timed: the collection itself (crash-hpc: its progress line, from the first block to the last
write; HF: from the first batch to the closed file); model loading is printed apart.

Printed: both sides' configuration, the machine's GEMM rate in this run (crash-hpc's LibTorch and
oneDNN, the venv's torch with MKL and oneDNN; the best is the machine's rate), each side's rate on
the decoder's FLOPs (real tokens, no padding) and its fraction of the GEMM rate, the ratio, and
how far the two archives agree. Goals: crash-hpc >= 0.90 of the GEMM rate and >= 1.1x HF.
  python bench/collect.py [--examples 128] [--repeats 2] [--allocators tcmalloc,glibc] [--dtypes float32,bfloat16]
"""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from common import (arguments, cpu_name, decoder_flops, gemm_rates, libtorch_description, make_model, merge_best,
                    model_path, parse_lists, print_gemm, process_allocator, program, rate_line, reference_description,
                    run_json, side_env, worker_cmd, write_tokens)

PROGRESS = re.compile(r"collect: (\d+)/(\d+) examples in \S+, ([0-9.e+-]+) examples/s")


def hf_worker(a):
    """The reference side, in its own process: prints one JSON line."""
    import h5py
    import torch
    from transformers import AutoModel
    torch.set_num_threads(a.threads)
    with open(a.data) as f:
        seqs = [json.loads(line)["tokens"] for line in f][:a.examples]
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(a.model, dtype=getattr(torch, a.dtypes[0])).eval()
    load = time.perf_counter() - t0
    n = len(seqs)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 1
    t0 = time.perf_counter()
    pooled = None
    with torch.inference_mode():
        for b in range(0, n, a.batch):
            idx = order[b:b + a.batch]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            if pooled is None:
                pooled = [np.empty((n, h.shape[-1]), dtype=np.float32) for h in hs]
            m = mask.unsqueeze(-1).float()
            rows = torch.tensor(idx)
            for l, h in enumerate(hs):
                pooled[l][rows.numpy()] = ((h.float() * m).sum(1) / m.sum(1)).numpy()
    with h5py.File(a.out, "w") as h5:
        for l, p in enumerate(pooled):
            h5.create_dataset(f"layers/{l}", data=p)
    loop = time.perf_counter() - t0
    print(json.dumps({"load_s": load, "loop_s": loop, "examples": n, "allocator": process_allocator(),
                      "threads": torch.get_num_threads(), "attention": model.config._attn_implementation}))


def main():
    ap = arguments(batch=32, seq=128, allocators="tcmalloc,glibc", dtypes="float32,bfloat16", doc=__doc__)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the best counts")
    ap.add_argument("--gemm-rows", type=int, default=1024, help="rows of the GEMM probe (tokens of a pass)")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = parse_lists(ap.parse_args())
    if a.worker == "hf":
        return hf_worker(a)

    model = model_path(a.dir)
    make_model(model)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 50000, rng.integers(a.seq // 2, a.seq + 1)).tolist() for _ in range(a.examples)]
    data = os.path.join(a.dir, "collect.jsonl")
    write_tokens(data, seqs)
    lengths = [len(s) for s in seqs]
    flops = decoder_flops(lengths)
    ours_h5, hf_h5 = os.path.join(a.dir, "collect.h5"), os.path.join(a.dir, "collect-hf.h5")

    first = a.allocators[0]
    rates, ours_gemm, hf_gemm = gemm_rates(a, first, a.dtypes, a.gemm_rows)
    print(f"CPU: {cpu_name()}; {a.threads} threads on both sides")
    print(f"crash-hpc: {libtorch_description(program(a, first, 'crash-hpc'), ours_gemm)}")
    print(f"reference: {reference_description(hf_gemm)}")
    print(f"model: random OPT-125m shape (12 layers, d 768, ffn 3072), {a.examples} examples of "
          f"{min(lengths)}-{max(lengths)} tokens ({sum(lengths)} tokens), mean pooling, float32 archive")
    print(f"crash-hpc: collect --block-size {a.batch} (4 length-sorted packed passes a block); "
          f"HF: AutoModel (no LM head), length-sorted batches of {a.batch}, right padding, inference_mode")
    print(f"decoder FLOPs on the real tokens: {flops / 1e12:.3f} TFLOP a run\n")
    best = print_gemm(rates, a.gemm_rows, a.threads)

    results = {}
    for dtype in a.dtypes:
        for alloc in a.allocators:
            env = side_env(alloc, a.threads)
            crash = program(a, alloc, "crash-hpc")
            ours, hf, ours_wall, hf_load = [], [], [], []
            hf_alloc = None
            for _ in range(a.repeats):
                t = time.perf_counter()
                r = subprocess.run([crash, "collect", "--model", model, "--data", data, "--out", ours_h5, "--num-examples",
                                    str(a.examples), "--block-size", str(a.batch), "--threads", str(a.threads),
                                    "--dtype", dtype, "--overwrite", "--log-level", "info"],
                                   env=env, capture_output=True, text=True)
                ours_wall.append(time.perf_counter() - t)
                if r.returncode != 0:
                    sys.exit(f"crash-hpc collect failed ({r.returncode}):\n{r.stderr[-3000:]}")
                m = PROGRESS.findall(r.stdout + r.stderr)
                if not m:
                    sys.exit("crash-hpc collect printed no final progress line:\n" + (r.stdout + r.stderr)[-3000:])
                ours.append(a.examples / float(m[-1][2]))
                j, _ = run_json(worker_cmd("collect.py", a, "--worker", "hf", "--model", model, "--data", data, "--out",
                                           hf_h5, "--examples", a.examples, "--batch", a.batch, "--dtypes", dtype),
                                env, "HF side")
                hf.append(j["loop_s"])
                hf_load.append(j["load_s"])
                hf_alloc = j["allocator"]
            import h5py
            with h5py.File(ours_h5, "r") as x, h5py.File(hf_h5, "r") as y:
                diff = max(float(np.abs(x[f"layers/{l}"][()] - y[f"layers/{l}"][()]).max() /
                                 max(1e-30, float(np.abs(y[f"layers/{l}"][()]).max()))) for l in range(13))
            o, h = min(ours), min(hf)
            results[(dtype, alloc)] = (o, h)
            print(f"\ncollect, {dtype}, allocator: crash-hpc {alloc} "
                  f"({'LD_PRELOAD' if alloc == 'tcmalloc' else 'crash-hpc-glibc, nothing preloaded'}), "
                  f"HF {hf_alloc}; GEMM rate {best[dtype]:.1f} GFLOP/s")
            print(rate_line("crash-hpc collect", a.examples, o, flops, best[dtype], "examples/s") +
                  f"  (runs {', '.join(f'{x:.2f}' for x in ours)} s; whole process {min(ours_wall):.2f} s)")
            print(rate_line("HF AutoModel + h5py", a.examples, h, flops, best[dtype], "examples/s") +
                  f"  (runs {', '.join(f'{x:.2f}' for x in hf)} s; model load {min(hf_load):.2f} s)")
            print(f"  ratio crash-hpc / HF: {h / o:.2f} (goal >= 1.1); crash-hpc at {flops / o / 1e9 / best[dtype]:.2f} "
                  f"of the GEMM rate (goal >= 0.90); archives agree to {diff:.1e} of the largest value")

    # The machine's rate again at the end: the best of both measurements is the physical limit.
    end_rates, _, _ = gemm_rates(a, first, a.dtypes, a.gemm_rows)
    end_best = {d: max(r.values()) for d, r in end_rates.items()}
    if any(end_best[d] > best[d] * 1.05 for d in a.dtypes):
        print("\nnote: the GEMM rate measured at the end is higher than at the start: "
              + ", ".join(f"{d} {end_best[d]:.1f} GFLOP/s" for d in a.dtypes) + " (the machine was busier at first)")
    best = merge_best(best, end_best)
    print("\nsummary (ratio crash-hpc / HF; crash-hpc's fraction of the best GEMM rate of the run):")
    for (dtype, alloc), (o, h) in results.items():
        g = best[dtype]
        print(f"  {dtype:9s} {alloc:9s} ratio {h / o:5.2f}   crash-hpc {flops / o / 1e9 / g:.2f}, HF {flops / h / 1e9 / g:.2f} "
              f"of the GEMM rate {g:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
