#!/usr/bin/env python3
"""The CRaSh pipeline end to end (ctest label e2e), with Debian's python3 only.

  pipeline.py BINARY demo CONFIG.ini WORK
      The README's main job on the demo model: every stage's output is there, the CRaSh table
      is printed and written, the plots exist, Plug-in beats Full zero-shot on the held-out
      task for every emulator, the best CRaSh plug-in (remove or share) beats the uniform
      (Offsite-Tuning) plug-in, and a second run skips every stage (a crashed pipeline resumes).
  pipeline.py BINARY resume_train FIXTURES
      A pipeline whose fine-tuning stopped after it had saved a best model resumes the fine-tuning (not skips it)
      and ends with the uninterrupted run's numbers.
  pipeline.py BINARY grid FIXTURES NP TP PP [MODEL]
      The pipeline on a tiny fixture model (MODEL, a folder under FIXTURES with a tokenizer;
      default eval/model, an OPT) on an MPI grid equals the one-rank run: the same clusters and
      the same evaluation numbers of every stage (within 1e-5).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what, flush=True)


def run(cmd, **kw):
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r, time.time() - t0


def stage_outputs(work, modes):
    out = ["activations.h5", "cka.h5", "clusters.json", "eval/full.json", "crash_table.md", "crash_table.json"]
    for m in modes:
        out += [f"{m}/emulator/crash_plan.json", f"{m}/train/model/config.json", f"{m}/plugin/model.safetensors",
                f"eval/{m}-emulator-zero-shot.json", f"eval/{m}-emulator-fine-tuned.json", f"eval/{m}-plugin.json"]
    return out


def results(path):
    with open(path) as f:
        return {r["task"]: {k: v["value"] for k, v in r["metrics"].items()} for r in json.load(f)["results"]}


def demo(binary, config, work):
    modes = ["uniform", "remove", "share"]
    shutil.rmtree(work, ignore_errors=True)
    r, seconds = run([binary, "pipeline", "--config", config, "--work", work, "--plot"])
    print(f"pipeline: {seconds:.0f} s", flush=True)
    for rel in stage_outputs(work, modes):
        check(os.path.exists(os.path.join(work, rel)), f"missing stage output {rel}")
    check("CRaSh results" in r.stdout and "Plug-in" in r.stdout, "the CRaSh table is printed")
    # The console: one line per stage, then the table and where the report is; the rest is in logs/.
    head = r.stdout.split("CRaSh results")[0].strip().splitlines()
    print(f"console: {len(head)} lines before the table, {len(r.stderr.splitlines())} on stderr", flush=True)
    check(all(line.startswith("pipeline: ") for line in head) and len(head) <= 40,
          f"one console line per stage, at most 40 ({len(head)}; not so: "
          f"{[l for l in head if not l.startswith('pipeline: ')][:3]})")
    check(not r.stderr.strip(), f"nothing on stderr ({r.stderr.strip()[:300]})")
    check(f"report: {os.path.join(work, 'report.html')}" in r.stdout, "the report's path is printed")
    for rel in ["lens.h5", "report.html", "run.json", "logs/stages.jsonl"] + [f"{m}/landscape.h5" for m in modes]:
        check(os.path.exists(os.path.join(work, rel)), f"{rel} written")
    with open(os.path.join(work, "logs", "stages.jsonl")) as f:
        stages = [json.loads(line) for line in f]
    check(all(s["status"] == "ran" and s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 and os.path.exists(
        os.path.join(work, s["log"])) for s in stages), f"{len(stages)} stage records with time, memory and log")
    with open(os.path.join(work, "logs", "train-uniform.log")) as f:
        steps = [line for line in f if " step " in line and "validation" not in line]
    check(len(steps) == 200 // 10 + 1, f"train logs every 10th step and the first: {len(steps)} step lines")
    for png in ("cka.png", "clusters.png"):
        p = os.path.join(work, png)
        check(os.path.exists(p) and os.path.getsize(p) > 10_000, f"plot {png} written")
    with open(os.path.join(work, "crash_table.json")) as f:
        table = json.load(f)
    for task, row in table.items():
        for m in modes:
            full, plug = row[m]["full-zero-shot"], row[m]["plugin"]
            print(f"{task} {m}: full zero-shot {full:.4f}, emulator zero-shot {row[m]['emulator-zero-shot']:.4f}, "
                  f"emulator fine-tuned {row[m]['emulator-fine-tuned']:.4f}, plug-in {plug:.4f}", flush=True)
            if row["metric"] == "perplexity":  # held-out text: reported, lower is better, not the demo's claim
                continue
            check(plug > full, f"{task} {m}: plug-in {plug:.4f} does not beat full zero-shot {full:.4f}")
        if row["metric"] != "perplexity":
            # CRaSh's claim: its best plug-in (remove or share) beats the uniform (Offsite-Tuning) one.
            best = max(("remove", "share"), key=lambda m: row[m]["plugin"])
            check(row[best]["plugin"] > row["uniform"]["plugin"],
                  f"{task}: best CRaSh plug-in ({best} {row[best]['plugin']:.4f}) does not beat uniform "
                  f"{row['uniform']['plugin']:.4f}")
    # A second run finds every stage's output and does nothing but print the table again.
    r, seconds = run([binary, "pipeline", "--config", config, "--work", work, "--plot"])
    check(r.stdout.count("CRaSh results") == 1, "second run prints the table")
    check("skipped" in r.stdout + r.stderr and seconds < 60, f"second run skips every stage ({seconds:.0f} s)")


def write_pairs_task(folder):
    """A short multiple-choice task that fits the eval fixture model's 64 positions."""
    task = os.path.join(folder, "pairs.jsonl")
    words = ["cat", "house", "tree", "river", "stone", "bird", "cloud", "road", "apple", "light", "sea", "hill"]
    with open(task, "w") as f:
        for i in range(24):
            a, b = words[i % len(words)], words[(i * 5 + 1) % len(words)]
            f.write(json.dumps({"context": f"Which comes first, {a} or {b}?\nAnswer:", "choices": [f" {a}", f" {b}"],
                                "gold": i % 2}) + "\n")
    return task


def grid(binary, fixtures, np_, tp, pp, model="eval/model"):
    model = os.path.join(fixtures, model)
    with tempfile.TemporaryDirectory() as tmp:
        task = write_pairs_task(tmp)
        grid_runs(binary, model, task, tmp, np_, tp, pp)


def grid_runs(binary, model, task, tmp, np_, tp, pp):
    base = [binary, "pipeline", "--model", model, "--train-task", task, "--eval-task", task, "--num-examples", "16",
            "--adapters", "1,1", "--k", "1", "--steps", "4", "--warmup", "1", "--batch-size", "4", "--lr", "1e-3",
            "--modes", "uniform,share", "--threads", "1"]
    one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
    run(base + ["--work", one])
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np_)]
    run(mpirun + base + ["--work", many, "--tp", str(tp), "--pp", str(pp), "--report"],
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    check(os.path.getsize(os.path.join(many, "report.html")) > 20_000, "rank 0 of the grid writes the report")
    for rel in stage_outputs(many, ["uniform", "share"]):
        check(os.path.exists(os.path.join(many, rel)), f"missing stage output {rel}")
    with open(os.path.join(one, "clusters.json")) as a, open(os.path.join(many, "clusters.json")) as b:
        check(json.load(a)["clusters"] == json.load(b)["clusters"], "clusters equal")
    worst = 0.0
    for name in sorted(n for n in os.listdir(os.path.join(one, "eval")) if n.endswith(".json")):
        a, b = results(os.path.join(one, "eval", name)), results(os.path.join(many, "eval", name))
        for t in a:
            for k in a[t]:
                worst = max(worst, abs(a[t][k] - b[t][k]))
    print(f"largest difference of evaluation numbers, {np_} ranks (tp {tp}, pp {pp}) vs 1: {worst:.3g}")
    check(worst <= 1e-5, f"evaluation numbers differ by {worst:.3g}")


def resume_train(binary, fixtures):
    """A fine-tuning interrupted after it saved a best model (validation every 2 steps) is resumed, not skipped."""
    model = os.path.join(fixtures, "eval", "model")
    with tempfile.TemporaryDirectory() as tmp:
        task = write_pairs_task(tmp)
        ref, cut = os.path.join(tmp, "ref"), os.path.join(tmp, "cut")
        steps = ["--steps", "8", "--warmup", "1", "--batch-size", "4", "--lr", "1e-3", "--seed", "7", "--save-every", "2"]
        base = [binary, "pipeline", "--model", model, "--train-task", task, "--valid-task", task, "--eval-task", task,
                "--num-examples", "16", "--adapters", "1,1", "--k", "1", "--modes", "uniform", "--eval-every", "2",
                "--threads", "1"] + steps
        run(base + ["--work", ref])
        # The same work folder as a pipeline killed at step 4 of fine-tuning leaves it: the stages before train
        # complete, train/ holding checkpoints of steps 2 and 4 and the best model so far.
        shutil.copytree(ref, cut)
        for rel in ["uniform/train", "uniform/plugin", "eval/uniform-emulator-fine-tuned.json", "eval/uniform-plugin.json",
                    "crash_table.md", "crash_table.json"]:
            p = os.path.join(cut, rel)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        prepared = os.path.join(cut, "prepared", "pairs")
        run([binary, "train", "--model", os.path.join(cut, "uniform", "emulator"), "--data", prepared, "--val-data",
             prepared, "--eval-every", "2", "--out", os.path.join(cut, "uniform", "train"), "--stop-after", "4",
             "--threads", "1"] + steps)
        check(os.path.isdir(os.path.join(cut, "uniform", "train", "model")), "the cut fine-tuning saved a best model")
        r, _ = run(base + ["--work", cut])
        log = r.stdout + r.stderr
        check(re.search(r"pipeline: train uniform +\S+ +peak", log) and not re.search(r"pipeline: train uniform +skipped", log),
              "the second run runs the train stage again")
        with open(os.path.join(ref, "uniform", "train", "model", "model.safetensors"), "rb") as a, \
                open(os.path.join(cut, "uniform", "train", "model", "model.safetensors"), "rb") as b:
            check(a.read() == b.read(), "the resumed fine-tuning's best model equals the uninterrupted run's, byte for byte")
        a = results(os.path.join(ref, "eval", "uniform-plugin.json"))
        b = results(os.path.join(cut, "eval", "uniform-plugin.json"))
        worst = max(abs(a[t][k] - b[t][k]) for t in a for k in a[t])
        print(f"resumed fine-tuning vs uninterrupted: largest difference of plug-in evaluation numbers {worst:.3g}")
        check(worst <= 1e-6, f"the resumed pipeline's plug-in numbers equal the uninterrupted run's ({worst:.3g})")
        with open(os.path.join(cut, "uniform", "train", "train_log.jsonl")) as f:
            last = max(json.loads(line).get("step", 0) for line in f if line.strip())
        check(last == 8, f"the resumed fine-tuning reached step 8 (log ends at {last})")


def main():
    binary, mode = sys.argv[1], sys.argv[2]
    if mode == "demo":
        demo(binary, sys.argv[3], sys.argv[4])
    elif mode == "resume_train":
        resume_train(binary, sys.argv[3])
    else:
        grid(binary, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), *sys.argv[7:8])
    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
