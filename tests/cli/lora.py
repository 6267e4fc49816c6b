#!/usr/bin/env python3
"""`crash-hpc train --lora-rank` against PEFT + transformers (tests/fixtures/lora, made by its
generate.py): from the same starting adapter (--lora-init), 3 steps of AdamW with clipping and the
linear schedule on one full batch.

  lora.py CRASH_HPC FIXTURES MODEL   on 1 rank, TP2, PP2, DP2 (and TP4 for llama_gqa, whose 2
                                     key/value heads are then each held by 2 ranks): the per-step losses and gradient
                                     norms, the adapter (OUT/adapter, PEFT's names and format) and
                                     the merged weights (OUT/model) equal PEFT's; every other weight
                                     is the base's; OUT/model = base + (alpha / R) B A of OUT/adapter;
                                     an interrupted run resumed on 1 rank and on TP2 is exact;
                                     with --lora-dropout 0.1 TP2, PP2, DP2, micro-batches and
                                     recomputation give the one-rank run, resume is exact
  lora.py CRASH_HPC FIXTURES bad     bad LoRA options: one line, exit code 2

Debian's python3 (numpy) only.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402

BIN, FIXTURES, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
TOL = 1e-5
ADAM_TOL = 5e-4  # 5% of the peak learning rate (1e-2)
failures = 0


def check(ok, what):
    global failures
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    failures += 0 if ok else 1


def run(args, np_=1, expect=0):
    cmd = ([] if np_ == 1 else MPIRUN + ["-np", str(np_)]) + [BIN] + args + ["--threads", "1", "--log-level", "warn"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    if p.returncode != expect:
        print(" ".join(cmd), "\n", p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"FAIL: exit code {p.returncode}, expected {expect}")
    return p


def folder_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(read_safetensors(os.path.join(folder, f)))
    return out


def log_of(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r]


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


work = tempfile.mkdtemp(prefix="crash_lora_")
try:
    if MODE == "bad":
        model = os.path.join(FIXTURES, "models", "opt_preln")
        data = os.path.join(FIXTURES, "lora", "data.jsonl")
        base = ["train", "--model", model, "--data", data, "--out", os.path.join(work, "x"), "--steps", "2",
                "--batch-size", "4", "--train-all"]

        def expect_error(name, args, *words):
            p = run(base + args, 1, expect=2)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            ok = len(lines) == 1 and all(w in lines[0] for w in words)
            check(ok, f"{name}: {lines[-1] if lines else '(no message)'}")

        expect_error("rank 0", ["--lora-rank", "0"], "--lora-rank", "positive")
        expect_error("rank -2", ["--lora-rank", "-2"], "--lora-rank", "positive")
        expect_error("alpha 0", ["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha")
        expect_error("dropout 1", ["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout", "[0, 1)")
        expect_error("dropout -0.1", ["--lora-rank", "4", "--lora-dropout", "-0.1"], "--lora-dropout", "[0, 1)")
        expect_error("OPT has no gate", ["--lora-rank", "4", "--lora-targets", "q,gate"], "opt", "'gate'")
        expect_error("unknown target", ["--lora-rank", "4", "--lora-targets", "q,query"], "unknown target 'query'")
        expect_error("empty target", ["--lora-rank", "4", "--lora-targets", "q,,v"], "unknown target ''")
        expect_error("target twice", ["--lora-rank", "4", "--lora-targets", "q,v,q"], "'q' given twice")
        expect_error("alpha without rank", ["--lora-alpha", "16"], "need --lora-rank")
        expect_error("with SIFT", ["--lora-rank", "4", "--sparse-increment", "0.1"], "--lora-rank", "--sparse-increment")
        expect_error("init not an adapter", ["--lora-rank", "4", "--lora-init", work], "--lora-init",
                     "adapter_model.safetensors")
        init = os.path.join(FIXTURES, "lora", "opt_preln", "init")
        expect_error("init of another rank", ["--lora-rank", "8", "--lora-init", init], "rank 4", "--lora-rank is 8")
        check(not os.path.exists(os.path.join(work, "x", "model")), "no model written by the failures")
    else:
        name = MODE
        ref_dir = os.path.join(FIXTURES, "lora", name)
        with open(os.path.join(ref_dir, "golden.json")) as f:
            g = json.load(f)
        golden = read_safetensors(os.path.join(ref_dir, "golden.safetensors"))
        model = os.path.join(FIXTURES, "models", name)
        base_w = folder_tensors(model)
        scaling = g["alpha"] / g["rank"]
        args = ["train", "--model", model, "--data", os.path.join(FIXTURES, "lora", "data.jsonl"), "--steps",
                str(g["steps"]), "--batch-size", str(g["batch_size"]), "--lr", str(g["lr"]), "--clip", str(g["clip"]),
                "--weight-decay", str(g["weight_decay"]), "--train-all", "--lora-rank", str(g["rank"]),
                "--lora-targets", ",".join(g["targets"]), "--lora-init", os.path.join(ref_dir, "init")]
        if g["alpha"] != 8:
            args += ["--lora-alpha", str(g["alpha"])]

        def out(n):
            return os.path.join(work, n)

        grids = {"one": (1, []), "tp2": (2, ["--tp", "2"]), "pp2": (2, ["--pp", "2"]), "dp2": (2, [])}
        if name == "llama_gqa":  # 2 key/value heads over 4 TP ranks: each held by 2 ranks
            grids["tp4"] = (4, ["--tp", "4"])
        for grid, (np_, extra) in grids.items():
            run(args + extra + ["--out", out(grid)], np_)
            log = log_of(out(grid))
            d = max_diff([r["loss"] for r in log], g["loss"])
            check(len(log) == g["steps"] and d <= TOL, f"{name} {grid}: losses vs PEFT, max diff {d:.3g}")
            d = max_diff([r["grad_norm"] for r in log], g["grad_norm"])
            check(d <= TOL * 10, f"{name} {grid}: gradient norms vs PEFT, max diff {d:.3g}")

            adapter = read_safetensors(os.path.join(out(grid), "adapter", "adapter_model.safetensors"))
            want = {k: v for k, v in golden.items() if not k.startswith("merged.")}
            check(sorted(adapter) == sorted(want), f"{name} {grid}: adapter holds PEFT's {len(want)} tensor names")
            # Adam moves an entry by about lr whatever its gradient's size, so an entry whose first
            # gradient cancels to below eps (1e-8) moves by an amount fp32 rounding decides (PEFT's own
            # fp32 run is 3.7e-5 from its fp64 run there): those few get ADAM_TOL, the rest TOL.
            diffs = np.concatenate([np.abs(adapter[k].astype(np.float64) - want[k]).ravel() for k in want if k in adapter])
            loose = int((diffs > TOL).sum())
            check(diffs.max() <= ADAM_TOL and loose <= diffs.size // 1000,
                  f"{name} {grid}: adapter tensors vs PEFT, max diff {diffs.max():.3g}, {loose} of {diffs.size} "
                  f"entries beyond {TOL:g}")
            with open(os.path.join(out(grid), "adapter", "adapter_config.json")) as f:
                c = json.load(f)
            check(c["peft_type"] == "LORA" and c["task_type"] == "CAUSAL_LM" and c["r"] == g["rank"] and
                  c["lora_alpha"] == g["alpha"] and c["lora_dropout"] == 0 and c["bias"] == "none" and
                  c["fan_in_fan_out"] is False and sorted(c["target_modules"]) == sorted(g["modules"]) and
                  "layers_to_transform" not in c, f"{name} {grid}: adapter_config.json")

            merged = folder_tensors(os.path.join(out(grid), "model"))
            d = max(max_diff(merged[k[len("merged."):]], v) for k, v in golden.items() if k.startswith("merged."))
            check(d <= TOL, f"{name} {grid}: merged last-layer q and down weights vs PEFT's merge, max diff {d:.3g}")
            # Every adapted weight is base + (alpha / R) B A of the written adapter; the rest is the base.
            worst, same = 0.0, True
            for k, w in merged.items():
                a_name = "base_model.model." + k[: -len(".weight")] + ".lora_A.weight"
                if a_name in adapter:
                    b = adapter[a_name.replace("lora_A", "lora_B")]
                    expect = base_w[k].astype(np.float64) + scaling * (b.astype(np.float64) @ adapter[a_name])
                    worst = max(worst, max_diff(w, expect))
                else:
                    same = same and k in base_w and np.array_equal(w, base_w[k])
            check(worst <= 1e-6 and same, f"{name} {grid}: model = base + scaling B A ({worst:.3g}), others untouched")

        # Resume: stop after 2 steps with a checkpoint each step, continue; the same as uninterrupted.
        for grid, (np_, extra) in {"one": (1, []), "tp2": (2, ["--tp", "2"])}.items():
            cut = out(grid + "_cut")
            run(args + extra + ["--out", cut, "--save-every", "1", "--stop-after", "2"], np_)
            run(args + extra + ["--out", cut, "--resume"], np_)
            a, b = log_of(out(grid)), log_of(cut)
            check([r["loss"] for r in a] == [r["loss"] for r in b], f"{name} {grid}: resumed losses identical")
            x = read_safetensors(os.path.join(out(grid), "adapter", "adapter_model.safetensors"))
            y = read_safetensors(os.path.join(cut, "adapter", "adapter_model.safetensors"))
            check(all(np.array_equal(x[k], y[k]) for k in x), f"{name} {grid}: resumed adapter identical")

        # --lora-dropout: masks from (seed, step, example, layer, module), so every grid, micro-batching
        # and recomputation draw the one-rank run's; PEFT's torch RNG cannot be matched, so the grids
        # are compared with each other.
        drop = args + ["--lora-dropout", "0.1"]
        runs = {"one": (1, []), "tp2": (2, ["--tp", "2"]), "pp2": (2, ["--pp", "2"]), "dp2": (2, []),
                "micro2": (1, ["--micro-batches", "2"]), "recompute": (1, ["--recompute", "full"])}
        for grid, (np_, extra) in runs.items():
            run(drop + extra + ["--out", out("drop_" + grid)], np_)
        ref = [r["loss"] for r in log_of(out("drop_one"))]
        ref_adapter = read_safetensors(os.path.join(out("drop_one"), "adapter", "adapter_model.safetensors"))
        check(abs(ref[0] - g["loss"][0]) > 1e-3, f"{name}: --lora-dropout 0.1 changes the first loss "
                                                  f"({ref[0]:.6f} vs {g['loss'][0]:.6f})")
        for grid in runs:
            if grid == "one":
                continue
            losses = [r["loss"] for r in log_of(out("drop_" + grid))]
            d = max_diff(losses, ref)
            exact = grid == "recompute"
            check(losses == ref if exact else d <= TOL,
                  f"{name} dropout {grid} vs 1 rank: losses {'identical' if exact else f'max diff {d:.3g}'}")
            x = read_safetensors(os.path.join(out("drop_" + grid), "adapter", "adapter_model.safetensors"))
            diffs = np.concatenate([np.abs(x[k].astype(np.float64) - ref_adapter[k]).ravel() for k in ref_adapter])
            check(diffs.max() <= ADAM_TOL and int((diffs > TOL).sum()) <= diffs.size // 1000,
                  f"{name} dropout {grid} vs 1 rank: adapter max diff {diffs.max():.3g}")
        cut = out("drop_cut")
        run(drop + ["--tp", "2", "--out", cut, "--save-every", "1", "--stop-after", "1"], 2)
        run(drop + ["--tp", "2", "--out", cut, "--resume"], 2)
        check([r["loss"] for r in log_of(cut)] == [r["loss"] for r in log_of(out("drop_tp2"))],
              f"{name} dropout tp2: resumed losses identical")
finally:
    shutil.rmtree(work, ignore_errors=True)

if failures:
    raise SystemExit(f"{failures} check(s) failed")
print("all checks passed")
