#!/usr/bin/env python3
"""Fine-tuning throughput: crash-hpc train vs the same fine-tuning written with HF transformers +
torch, side by side.

The CRaSh setting: a uniform emulator (2 bottom + 2 top adapter layers trainable, 4 frozen
middle layers) of a random OPT-125m-shaped model whose config carries dropout --dropout (0 by
default: both sides then train without dropout; with P > 0 crash-hpc also gets `train --dropout
P` and HF applies the config's dropout in train mode), AdamW (lr 1e-4, no weight decay, clip
1.0), a batch of --batch x --seq random token ids every step, float32, the same threads and the
same allocator (--allocators: tcmalloc preloaded on both sides, and/or glibc's malloc on both:
crash-hpc-glibc). Each side runs in its own process; the median step after the first counts.

Printed: both sides' configuration, the machine's float32 GEMM rate in this run, each side's
tokens/s, its rate on the step's FLOPs and its fraction of the GEMM rate, and the ratio. FLOPs of a
step: the forward of the 8 layers and the LM head, and the backward's products: input gradients
wherever a trainable layer lies below (the LM head and every layer above the lowest trainable
one), weight gradients of the trainable layers (each 1x the layer's forward). Goal: >= 1.0x HF.
  python bench/train.py [--batch 8] [--seq 128] [--steps 8] [--dropout 0] [--allocators tcmalloc]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import (arguments, cpu_name, gemm_rates, libtorch_description, make_model, model_path, parse_lists,
                    print_gemm, process_allocator, program, rate_line, reference_description, run_json, side_env,
                    train_step_flops, worker_cmd, write_tokens)


def hf_worker(a):
    import torch
    from transformers import OPTForCausalLM
    torch.set_num_threads(a.threads)
    model = OPTForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    with open(os.path.join(a.model, "crash_plan.json")) as f:
        trainable = [i for i, s in enumerate(json.load(f)["slots"]) if s["train"]]
    params = []
    for name, p in model.named_parameters():
        keep = any(f".layers.{i}." in name for i in trainable)
        p.requires_grad_(keep)
        if keep:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    with open(a.data) as f:
        ids = torch.tensor([json.loads(line)["tokens"] for line in f])
    mask = torch.ones_like(ids)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times[1:]), "allocator": process_allocator(),
                      "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
                      "dropout": model.config.dropout, "attention_dropout": model.config.attention_dropout}))


def dropout_option(crash):
    r = subprocess.run([crash, "train", "--help"], capture_output=True, text=True)
    return "--dropout" in r.stdout + r.stderr


def main():
    ap = arguments(batch=8, seq=128, allocators="tcmalloc", dtypes="float32", doc=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout of both sides: the model config's, and crash-hpc train --dropout")
    ap.add_argument("--gemm-rows", type=int, default=1024)
    ap.add_argument("--model")
    ap.add_argument("--data")
    a = parse_lists(ap.parse_args())
    if a.worker == "hf":
        return hf_worker(a)
    if a.dtypes != ["float32"]:
        sys.exit("train.py compares float32 training only (HF's bfloat16 AdamW has no float32 master weights)")
    if a.steps < 3:
        sys.exit("--steps must be at least 3 (the first step is not counted)")
    base = model_path(a.dir, a.dropout)
    make_model(base, a.dropout)
    first = a.allocators[0]
    crash = program(a, first, "crash-hpc")
    has_dropout = dropout_option(crash)
    if a.dropout > 0 and not has_dropout:
        sys.exit("this crash-hpc train has no --dropout option: it cannot train with the same dropout as HF")

    rates, ours_gemm, hf_gemm = gemm_rates(a, first, ["float32"], a.gemm_rows)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        emulator = os.path.join(tmp, "emulator")
        subprocess.run([crash, "emulate", "--model", base, "--mode", "uniform", "--keep", "4", "--adapters", "2,2",
                        "--out", emulator, "--log-level", "warn"], check=True)
        with open(os.path.join(emulator, "crash_plan.json")) as f:
            slots = json.load(f)["slots"]
        flops = train_step_flops([s["train"] for s in slots], a.batch, a.seq)
        import numpy as np
        ids = np.random.default_rng(0).integers(4, 50000, (a.batch, a.seq)).tolist()
        data = os.path.join(tmp, "data.jsonl")
        write_tokens(data, ids)
        tokens = a.batch * a.seq

        print(f"CPU: {cpu_name()}; {a.threads} threads on both sides")
        print(f"crash-hpc: {libtorch_description(crash, ours_gemm)}")
        print(f"reference: {reference_description(hf_gemm)}")
        print(f"model: uniform emulator 2-4-2 of a random OPT-125m shape ({len(slots)} layers, "
              f"{sum(s['train'] for s in slots)} trainable), float32, config dropout {a.dropout:g} "
              f"(crash-hpc train {'--dropout %g' % a.dropout if has_dropout else 'without a --dropout option: no dropout'}"
              f"); batch {a.batch} x {a.seq} tokens, AdamW lr 1e-4, clip 1.0; {flops / 1e12:.3f} TFLOP a step\n")
        best = print_gemm(rates, a.gemm_rows, a.threads)["float32"]
        summary = []
        for alloc in a.allocators:
            env = side_env(alloc, a.threads)
            crash = program(a, alloc, "crash-hpc")
            out = os.path.join(tmp, "train")
            cmd = [crash, "train", "--model", emulator, "--data", data, "--out", out, "--steps", str(a.steps),
                   "--batch-size", str(a.batch), "--lr", "1e-4", "--clip", "1.0", "--threads", str(a.threads),
                   "--log-level", "warn", "--overwrite"]
            if has_dropout:
                cmd += ["--dropout", str(a.dropout)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"crash-hpc train failed ({r.returncode}):\n{r.stderr[-3000:]}")
            with open(os.path.join(out, "train_log.jsonl")) as f:
                log = [json.loads(line) for line in f]
            o = statistics.median([x["seconds"] for x in log if "seconds" in x][1:])
            hf, _ = run_json(worker_cmd("train.py", a, "--worker", "hf", "--model", emulator, "--data", data, "--steps",
                                        a.steps), env, "HF side")
            h = hf["median_s"]
            print(f"\ntrain, float32, allocator: crash-hpc {alloc}, HF {hf['allocator']}; HF dropout {hf['dropout']:g} "
                  f"(attention {hf['attention_dropout']:g}), attention '{hf['attention']}'; GEMM rate {best:.1f} GFLOP/s; "
                  f"median of steps 2-{a.steps}")
            print(rate_line("crash-hpc train", tokens, o, flops, best))
            print(rate_line("HF + torch AdamW", tokens, h, flops, best))
            print(f"  ratio crash-hpc / HF: {h / o:.2f} (goal >= 1.0)")
            summary.append((alloc, h / o, flops / o / 1e9 / best, flops / h / 1e9 / best))
    print("\nsummary:")
    for alloc, r, fo, fh in summary:
        print(f"  float32   {alloc:9s} ratio {r:5.2f}   of the GEMM rate: crash-hpc {fo:.2f}, HF {fh:.2f}")


if __name__ == "__main__":
    main()
