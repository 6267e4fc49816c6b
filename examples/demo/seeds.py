#!/usr/bin/env python3
"""The demo's CRaSh table over several fine-tuning seeds: mean and spread of every cell (run by hand).

    python3 examples/demo/seeds.py [--seeds 1234,1,2] [--work /tmp/demo-seeds] [--binary build/crash-hpc]

Runs `crash-hpc pipeline --config examples/demo/pipeline.ini --seed S` once per seed (each in WORK/seed-S; a run
whose table exists is reused, so an interrupted sweep resumes; the stages the seed does not change, up to the
emulators' zero-shot evaluation, are copied from the first seed's run), then prints a Markdown table: per task, emulator
and column, the mean and the sample standard deviation over the seeds, and each seed's value. Needs Debian's
python3 only. The seed drives the fine-tuning (data order); collection, CKA and clustering do not depend on it.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLUMNS = [("full-zero-shot", "Full zero-shot"), ("emulator-zero-shot", "Emulator zero-shot"),
           ("emulator-fine-tuned", "Emulator fine-tuned"), ("plugin", "Plug-in")]


def reuse_seed_independent(first, work):
    """Copies what --seed does not change (every stage before fine-tuning) from the first seed's run."""
    if not os.path.exists(os.path.join(first, "crash_table.json")) or os.path.exists(work):
        return
    os.makedirs(os.path.join(work, "eval"))
    for rel in ["prepared", "activations.h5", "cka.h5", "cka.json", "clusters.h5", "clusters.json", "eval/full.json"]:
        src = os.path.join(first, rel)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(work, rel))
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(work, rel))
    for mode in ("uniform", "remove", "share"):
        if os.path.isdir(os.path.join(first, mode, "emulator")):
            shutil.copytree(os.path.join(first, mode, "emulator"), os.path.join(work, mode, "emulator"))
            shutil.copy2(os.path.join(first, "eval", f"{mode}-emulator-zero-shot.json"), os.path.join(work, "eval"))


def run_seed(binary, config, work, seed, first=None):
    table = os.path.join(work, "crash_table.json")
    if first:
        reuse_seed_independent(first, work)
    if not os.path.exists(table):
        t0 = time.time()
        cmd = [binary, "pipeline", "--config", config, "--work", work, "--seed", str(seed)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"seed {seed}: pipeline failed ({r.returncode})\n{r.stderr[-3000:]}")
        print(f"seed {seed}: pipeline {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    with open(table) as f:
        return json.load(f)


def cell(values):
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1234,1,2")
    p.add_argument("--work", default="/tmp/demo-seeds")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "crash-hpc"))
    p.add_argument("--config", default=os.path.join(ROOT, "examples", "demo", "pipeline.ini"))
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s]
    if len(seeds) < 2:
        sys.exit("--seeds: give at least two seeds")
    first = os.path.join(a.work, f"seed-{seeds[0]}")
    tables = {s: run_seed(a.binary, a.config, os.path.join(a.work, f"seed-{s}"), s, first if s != seeds[0] else None)
              for s in seeds}
    first = tables[seeds[0]]
    print(f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} "
          f"(per-seed values in brackets, in that order).\n")
    print("| Task | Metric | Emulator | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for task, row in first.items():
        for mode in (m for m in row if m != "metric"):
            cells = []
            for key, _ in COLUMNS:
                values = [tables[s][task][mode][key] for s in seeds]
                cells.append(f"{cell(values)} [{', '.join(f'{v:.4f}' for v in values)}]")
            print(f"| {task} | {row['metric']} | {mode} | " + " | ".join(cells) + " |")
    # CRaSh's claim per seed: the best of remove/share plug-in beats the uniform plug-in.
    for task, row in first.items():
        if row["metric"] == "perplexity" or not {"uniform", "remove", "share"} <= set(row):
            continue
        wins = sum(max(tables[s][task]["remove"]["plugin"], tables[s][task]["share"]["plugin"]) >
                   tables[s][task]["uniform"]["plugin"] for s in seeds)
        print(f"\n{task}: the best CRaSh plug-in beats the uniform plug-in for {wins} of {len(seeds)} seeds.")


if __name__ == "__main__":
    main()
