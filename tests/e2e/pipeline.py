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
  pipeline.py BINARY study FIXTURES NP TP PP
      pipeline --study pruning on the fixture OPT with every method (CRaSh's three emulators,
      ShortGPT, angular distance, SLEB, LaCo) on multiple choice, perplexity and generation: the
      table (markdown, JSON) and figure are written, each row's pruned model has the layers and
      parameters its method gives, and the MPI grid's table equals the one-rank run's (1e-5).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402

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


def write_study_tasks(folder):
    """Multiple choice, a text and a generation task that fit the fixture's 64 positions."""
    pairs = write_pairs_task(folder)
    text = os.path.join(folder, "text.txt")
    with open(text, "w") as f:
        f.write("the cat sat on the house by the river.\nbirds fly over the hill and the sea.\n")
    gen = os.path.join(folder, "gen.jsonl")
    with open(gen, "w") as f:
        for i, w in enumerate(["cat", "tree", "stone", "cloud", "apple", "sea"]):
            f.write(json.dumps({"context": f"Say {w}:", "answers": [f" {w}"]}) + "\n")
    return pairs, text, gen


def study(binary, fixtures, np_, tp, pp):
    model = os.path.join(fixtures, "eval", "model")
    methods = ["uniform", "remove", "share", "shortgpt", "angular", "sleb", "laco"]
    with tempfile.TemporaryDirectory() as tmp:
        pairs, text, gen = write_study_tasks(tmp)
        base = [binary, "pipeline", "--study", "pruning", "--model", model, "--train-task", pairs, "--eval-task", pairs,
                "--eval-task", text, "--eval-task", gen, "--num-examples", "16", "--importance-examples", "8",
                "--calibration-examples", "8", "--adapters", "1,1", "--ratio", "0.25", "--heal-layers", "1",
                "--laco-merge-size", "2", "--laco-threshold", "0", "--steps", "3", "--warmup", "1", "--batch-size",
                "4", "--lr", "1e-3", "--threads", "1", "--plot"]
        one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        r, seconds = run(base + ["--work", one])
        print(f"one rank: {seconds:.1f} s", flush=True)
        check("Layer-pruning study" in r.stdout, "the study's table is printed")
        for rel in ["pruning_study.md", "pruning_study.json", "importance.h5", "activations_tokens.h5"]:
            check(os.path.exists(os.path.join(one, rel)), f"{rel} written")
        png = os.path.join(one, "pruning_study.png")
        check(os.path.exists(png) and os.path.getsize(png) > 10_000, "the study's figure is drawn")
        with open(os.path.join(one, "pruning_study.json")) as f:
            table = json.load(f)
        check([r["method"] for r in table["rows"]] == methods, f"one row per method ({[r['method'] for r in table['rows']]})")
        check(table["metrics"] == {"pairs": "acc", "text": "perplexity", "gen": "exact_match"},
              f"the tasks' metrics ({table['metrics']})")
        full_params = table["full"]["parameters"]
        for row in table["rows"]:
            m = row["method"]
            # 4 layers at ratio 0.25: one goes (share keeps 4 slots, storing 3; LaCo merges two into one).
            check(row["layers"] == (4 if m == "share" else 3), f"{m}: {row['layers']} layers")
            check(row["stored_layers"] == 3, f"{m}: {row['stored_layers']} stored layers")
            check(row["parameters"] < full_params and abs(row["kept_fraction"] - row["parameters"] / full_params) < 1e-12,
                  f"{m}: kept parameters {row['parameters']} of {full_params}")
            with open(os.path.join(one, "pruning", f"{m}-r25", "model", "crash_plan.json")) as f:
                plan = json.load(f)
            expected_mode = {"shortgpt": "prune", "angular": "prune", "sleb": "prune", "laco": "merge"}.get(m, m)
            check(plan["mode"] == expected_mode, f"{m}: plan mode {plan['mode']}")
            if expected_mode == "prune":
                method = {"shortgpt": "block_influence", "angular": "angular_distance", "sleb": "sleb"}[m]
                check(plan["pruning"]["method"] == method, f"{m}: removed by {plan['pruning']['method']}")
            for stage in ("pruned", "healed"):
                check(set(row[stage]) == {"pairs", "text", "gen"}, f"{m}: {stage} scores of every task")
        # Healing (--heal-layers 1) trains the last layer and the tied head only.
        for m in ("shortgpt", "laco"):
            a = read_safetensors(os.path.join(one, "pruning", f"{m}-r25", "model", "model.safetensors"))
            b = read_safetensors(os.path.join(one, "pruning", f"{m}-r25", "heal", "model", "model.safetensors"))
            changed = sorted(k for k in a if not (a[k] == b[k]).all())
            # The fixture's head is untied: lm_head trains, the embedding stays.
            head = {"lm_head.weight", "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"}
            last = {k for k in a if k.startswith("model.decoder.layers.2.")}
            check(set(changed) == head | last, f"{m}: healing changes the last layer and the head, nothing else "
                                               f"(unexpected: {sorted(set(changed) - head - last)}, "
                                               f"unchanged: {sorted(head | last - set(changed))})")
        mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np_)]
        r, seconds = run(mpirun + base + ["--work", many, "--tp", str(tp), "--pp", str(pp)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"{np_} ranks (tp {tp}, pp {pp}): {seconds:.1f} s", flush=True)
        with open(os.path.join(many, "pruning_study.json")) as f:
            other = json.load(f)
        worst = 0.0
        for a, b in zip(table["rows"], other["rows"]):
            check(a["source_layers"] == b["source_layers"] and a["method"] == b["method"],
                  f"{a['method']}: the same layers kept on the grid")
            for stage in ("pruned", "healed"):
                for t in a[stage]:
                    d = abs(a[stage][t] - b[stage][t]) / max(1.0, abs(a[stage][t]))
                    worst = max(worst, d)
        for t in table["full"]["scores"]:
            a = table["full"]["scores"][t]
            worst = max(worst, abs(a - other["full"]["scores"][t]) / max(1.0, abs(a)))
        # The generations themselves, not only their (tiny model's) exact match.
        texts = 0
        for name in sorted(n for n in os.listdir(os.path.join(one, "eval")) if n.endswith(".details.jsonl")):
            with open(os.path.join(one, "eval", name)) as fa, open(os.path.join(many, "eval", name)) as fb:
                ga = [json.loads(x).get("generation") for x in fa]
                gb = [json.loads(x).get("generation") for x in fb]
            texts += sum(g is not None for g in ga)
            check(ga == gb, f"{name}: the grid generates the same texts")
        check(texts >= 15 * 6, f"generations compared: {texts}")
        print(f"largest difference of the study's numbers, {np_} ranks vs 1 (relative to max(1, |x|)): {worst:.3g}; "
              f"{texts} generations identical")
        check(worst <= 1e-5, f"the study's numbers differ by {worst:.3g}")


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
    elif mode == "study":
        study(binary, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif mode == "resume_train":
        resume_train(binary, sys.argv[3])
    else:
        grid(binary, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), *sys.argv[7:8])
    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
