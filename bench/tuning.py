#!/usr/bin/env python3
"""Full fine-tuning, LoRA and SIFT of CRaSh's adapter layers on the demo task, side by side.

The CRaSh pipeline on the demo model (examples/demo/pipeline.ini's model, tasks, clusters, adapters,
steps, batch, learning rate and seed) run once per `--tuning` (full: dense AdamW; lora: LoRA of
--lora-rank on every linear of the adapter layers; sift: sparse increments of --sift-density), in
one run of this script, each in its own child process with the same threads. The reference side is
`--tuning full`, the pipeline's default. Printed first: the machine's float32 GEMM rate in this run
(bench_gemm); then, per tuning and emulator: the emulator's accuracy
after fine-tuning and the plug-in's (wordnet_test, 500 questions, chance 0.25), the plug-in's
held-out perplexity, the fine-tuning stage's time and peak RSS, and the optimizer state bytes
(train_log.jsonl's first record). Not part of CI:
  python3 bench/tuning.py [--modes uniform,remove,share] [--lora-rank 8] [--sift-density 0.05] [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import ROOT, print_crash_gemm, side_env

TUNINGS = ["full", "lora", "sift"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="uniform,remove,share")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--sift-density", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--allocator", default="tcmalloc", choices=["tcmalloc", "glibc"])
    a = ap.parse_args()
    demo = os.path.join(ROOT, "examples", "demo")
    tasks = os.path.join(demo, "tasks")
    modes = a.modes.split(",")
    env = side_env(a.allocator, a.threads)
    print_crash_gemm(a.build, a.threads, ["float32"], env, a.allocator)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tuning in TUNINGS:
            work = os.path.join(tmp, tuning)
            cmd = [os.path.join(a.build, "crash-hpc"), "pipeline", "--model", os.path.join(demo, "model"),
                   "--train-task", os.path.join(tasks, "wordnet_train.jsonl"),
                   "--valid-task", os.path.join(tasks, "wordnet_valid.jsonl"),
                   "--eval-task", os.path.join(tasks, "wordnet_test.jsonl"),
                   "--eval-task", os.path.join(tasks, "heldout.txt"), "--work", work, "--num-examples", "512",
                   "--k", "4", "--adapters", "2,2", "--modes", a.modes, "--steps", "200", "--batch-size", "32",
                   "--lr", "1e-3", "--warmup", "20", "--seed", "1234", "--eval-batch-size", "32", "--threads",
                   str(a.threads), "--tuning", tuning, "--lora-rank", str(a.lora_rank), "--sift-density",
                   str(a.sift_density)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                sys.exit(f"pipeline --tuning {tuning} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            with open(os.path.join(work, "crash_table.json")) as f:
                table = json.load(f)
            with open(os.path.join(work, "logs", "stages.jsonl")) as f:
                stages = {s["stage"]: s for s in map(json.loads, f)}
            for mode in modes:
                with open(os.path.join(work, mode, "train", "train_log.jsonl")) as f:
                    first = json.loads(f.readline())
                train = stages[f"train {mode}"]
                rows.append((tuning, mode, table["wordnet_test"][mode]["emulator-fine-tuned"],
                             table["wordnet_test"][mode]["plugin"], table["heldout"][mode]["plugin"],
                             train["seconds"], train["peak_rss_bytes"] / 2**20,
                             first.get("optimizer_state_bytes", float("nan")) / 2**20))
            full = table["wordnet_test"][modes[0]]["full-zero-shot"]
    print(f"CRaSh on the demo model, 200 steps, batch 32, lr 1e-3; LoRA rank {a.lora_rank} on every linear; "
          f"SIFT density {a.sift_density}; {a.threads} threads. Full model zero-shot acc {full:.4f}.")
    print("| tuning | emulator | fine-tuned acc | plug-in acc | plug-in heldout ppl | train s | train peak MiB | "
          "optimizer state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for t, m, ft, pl, ppl, sec, rss, opt in rows:
        print(f"| {t} | {m} | {ft:.4f} | {pl:.4f} | {ppl:.1f} | {sec:.1f} | {rss:.0f} | {opt:.2f} |")


if __name__ == "__main__":
    main()
