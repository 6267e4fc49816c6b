#!/usr/bin/env python3
"""SIFT and SFSD on the demo model and task (ctest label e2e), with Debian's python3 only.

  surgery.py BINARY DEMO_DIR WORK

1. Full fine-tuning (every parameter, dense AdamW) and SIFT (--sparse-increment 0.05) of the demo
   model on the WordNet training split, same steps, batch, learning rate and seed: SIFT's gain in
   test accuracy over the zero-shot model is at least 90% of full fine-tuning's.
2. SFSD (decompose) of the fully fine-tuned model at fixed ratios: the accuracy-compression curve is
   printed, and some ratio removes at least 20% of the decoder's parameters while the test accuracy
   stays within 2 points of the uncompressed model's.
"""
import json
import os
import shutil
import subprocess
import sys
import time

failures = []


def check(ok, what):
    print(("ok: " if ok else "FAIL: ") + what, flush=True)
    if not ok:
        failures.append(what)


def run(cmd):
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.time() - t0


def accuracy(path):
    with open(path) as f:
        return json.load(f)["results"][0]["metrics"]["acc"]["value"]


def main():
    binary, demo, work = sys.argv[1:4]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    model = os.path.join(demo, "model")
    common = ["--threads", "2", "--log-level", "warn"]
    data = {}
    for split in ("train", "test"):
        data[split] = os.path.join(work, split)
        run([binary, "prepare", "--task", os.path.join(demo, "tasks", f"wordnet_{split}.jsonl"), "--tokenizer", model,
             "--out", data[split]] + common)

    def evaluate(model_dir, name):
        out = os.path.join(work, name + ".json")
        run([binary, "eval", "--model", model_dir, "--data", data["test"], "--out", out, "--batch-size", "32"] + common)
        return accuracy(out)

    base = evaluate(model, "zero-shot")
    train = [binary, "train", "--model", model, "--data", data["train"], "--steps", "200", "--batch-size", "32",
             "--lr", "1e-3", "--warmup", "20", "--seed", "1234", "--train-all", "--save-every", "0"] + common
    secs = run(train + ["--out", os.path.join(work, "dense")])
    dense = evaluate(os.path.join(work, "dense", "model"), "dense")
    print(f"full fine-tuning: {secs:.0f} s", flush=True)
    secs = run(train + ["--out", os.path.join(work, "sift"), "--sparse-increment", "0.05"])
    sift = evaluate(os.path.join(work, "sift", "model"), "sift")
    print(f"SIFT 0.05: {secs:.0f} s", flush=True)
    print(f"test acc: zero-shot {base:.4f}, full fine-tuning {dense:.4f}, SIFT (rho 0.05) {sift:.4f}", flush=True)
    check(dense > base + 0.05, f"full fine-tuning learns the task ({base:.4f} -> {dense:.4f})")
    share = (sift - base) / (dense - base) if dense > base else 0.0
    check(share >= 0.9, f"SIFT's gain is {100 * share:.0f}% of full fine-tuning's (at least 90%)")

    print("SFSD of the fine-tuned model: ratio, decoder parameters removed, test acc", flush=True)
    best = None
    for ratio in ("0.7", "0.5", "0.3"):
        out = os.path.join(work, f"sfsd_{ratio}")
        run([binary, "decompose", "--model", os.path.join(work, "dense", "model"), "--data", data["train"], "--out", out,
             "--ratio", ratio, "--eval-data", data["test"]] + common)
        with open(os.path.join(out, "sfsd_report.json")) as f:
            report = json.load(f)
        removed = report["decoder_compression"]
        before = report["metrics_before"][0]["metrics"]["acc"]["value"]
        after = report["metrics_after"][0]["metrics"]["acc"]["value"]
        check(abs(before - dense) < 1e-9, f"decompose's own evaluation of the uncompressed model ({before:.4f}) "
              f"equals the eval job's ({dense:.4f})")
        print(f"  {ratio}: {100 * removed:5.1f}% removed, acc {after:.4f} ({100 * (after - before):+.1f} points)",
              flush=True)
        if removed >= 0.2 and after >= before - 0.02 and (best is None or removed > best[1]):
            best = (ratio, removed, after)
    check(best is not None, "some SFSD ratio removes >= 20% of the decoder's parameters within 2 accuracy points"
          + (f" (ratio {best[0]}: {100 * best[1]:.1f}%, acc {best[2]:.4f})" if best else ""))
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")


if __name__ == "__main__":
    main()
