#!/usr/bin/env python3
"""SIGKILL of one rank at a random point of a 2-rank `collect`, `train` and `pipeline` run:

- the other rank and mpirun exit within 30 s of the kill;
- nothing marked complete is corrupt: no final archive (only OUT.partial, without the
  complete flag), training checkpoints complete (manifest and readable shards) or absent, no
  trained model, pipeline stage outputs that exist are whole;
- the interrupted run finished (`--resume`; the pipeline resumes by itself) gives the numbers
  of an uninterrupted run on the same grid: the same archive, the same loss log, the same
  evaluation numbers.

tests/cli/collect_archive.py and train_grids.py kill a single-rank run at a fixed point; this
script kills one rank of two, at a point drawn from a seed printed in the log (give it as the
third argument to replay a run), and covers the pipeline.

  kill_resume.py CRASH_HPC FIXTURES [SEED]

Debian's python3 (numpy, h5py) only.
"""
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from pipeline import write_pairs_task  # noqa: E402  (the pipeline tests' pairs task: one writer)

BIN, FIXTURES = sys.argv[1], sys.argv[2]
SEED = int(sys.argv[3]) if len(sys.argv) > 3 else int(time.time() * 1000) % 1000000
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "OMP_NUM_THREADS=1"]
EXIT_BOUND = 30
rnd = random.Random(SEED)
failures = 0
passes = 0
print(f"kill_resume: seed {SEED} (replay with: kill_resume.py CRASH_HPC FIXTURES {SEED})", flush=True)


def check(ok, what):
    global failures, passes
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    passes += ok
    failures += not ok


last_output = ""


def run(args, timeout=600, log_level="warn"):
    global last_output
    t0 = time.time()
    p = subprocess.run(MPIRUN + [BIN] + args + ["--threads", "1", "--log-level", log_level], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(args[:1])} exited with {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    last_output = p.stdout + p.stderr
    return time.time() - t0


def children(pid):
    """Processes whose parent is `pid` (mpirun's ranks)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError):
                pass
    return sorted(out)


def kill_one_rank(name, args, reference_seconds, started=lambda: True):
    """Starts `args` on 2 ranks, SIGKILLs one rank at a seeded point of the reference run's
    duration once `started()` holds; returns the seconds mpirun took to exit after the kill,
    or None when the run ended before the kill point (the caller retries)."""
    fraction = rnd.uniform(0.3, 0.8)
    victim_index = rnd.randrange(2)
    delay = fraction * reference_seconds
    proc = subprocess.Popen(MPIRUN + [BIN] + args + ["--threads", "1", "--log-level", "warn"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while time.time() - t0 < delay or not started():
        if proc.poll() is not None:
            proc.communicate()
            return None
        if time.time() - t0 > 10 * reference_seconds + 60:
            break
        time.sleep(0.05)
    ranks = children(proc.pid)
    if len(ranks) < 2 or proc.poll() is not None:
        proc.wait()
        return None
    victim = ranks[victim_index]
    print(f"     {name}: SIGKILL to rank process {victim_index} (pid {victim}) after {time.time() - t0:.1f} s "
          f"({fraction:.2f} of the uninterrupted {reference_seconds:.1f} s)", flush=True)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.time()
    try:
        _, err = proc.communicate(timeout=EXIT_BOUND + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return float("inf")
    # The other rank may still be finishing its exit when mpirun returns: it must be gone
    # within the same bound, counted from the kill.
    def alive(r):
        try:
            with open(f"/proc/{r}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    while any(alive(r) for r in ranks) and time.time() - t_kill < EXIT_BOUND:
        time.sleep(0.1)
    waited = time.time() - t_kill
    leftovers = [r for r in ranks if alive(r)]
    check(not leftovers, f"{name}: no rank process left running {EXIT_BOUND} s after the kill")
    check(proc.returncode != 0, f"{name}: mpirun reports the failure (exit code {proc.returncode})")
    return waited


def with_retries(name, args, reference_seconds, reset, started=lambda: True):
    """A kill that lands before the end of the run; a run that ended first is repeated with
    a new draw (at most 4 times)."""
    for attempt in range(4):
        reset()
        waited = kill_one_rank(name, args, reference_seconds, started)
        if waited is not None:
            check(waited <= EXIT_BOUND, f"{name}: mpirun and the other rank exited {waited:.1f} s after the kill "
                                        f"(bound {EXIT_BOUND} s)")
            return True
        print(f"     {name}: the run ended before the kill point; drawing again", flush=True)
        reference_seconds *= 0.6
    check(False, f"{name}: could not kill a rank while the run was going")
    return False


def safetensors_ok(path):
    raw = open(path, "rb").read()
    if len(raw) < 8:
        return False
    n = struct.unpack("<Q", raw[:8])[0]
    if 8 + n > len(raw):
        return False
    header = json.loads(raw[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return max(ends, default=0) == len(raw) - 8 - n


def checkpoints_whole(folder):
    """Every checkpoint that is not a temporary has a manifest naming readable shards."""
    root = os.path.join(folder, "checkpoints")
    if not os.path.isdir(root):
        return True, []
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    for d in done:
        m = os.path.join(root, d, "manifest.json")
        if not os.path.exists(m):
            return False, done
        manifest = json.load(open(m))
        for f in manifest["files"]:
            if not safetensors_ok(os.path.join(root, d, f["file"])):
                return False, done
    return True, done


def archive_layers(path):
    with h5py.File(path, "r") as h:
        return {k: h["layers"][k][:] for k in h["layers"]}, int(h.attrs.get("complete", 0))


def losses(folder):
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [(j["step"], j.get("loss", j.get("val_loss"))) for j in map(json.loads, f)]


work = tempfile.mkdtemp(prefix="crash-kill-")
try:
    W = lambda *p: os.path.join(work, *p)
    opt = os.path.join(FIXTURES, "models", "opt_preln")
    tok_model = os.path.join(FIXTURES, "eval", "model")

    # ---- collect: N examples in blocks of 4, enough that the kill lands among the blocks ----
    N = 480
    data = W("tokens.jsonl")
    r = random.Random(7)
    with open(data, "w") as f:
        for _ in range(N):
            f.write(json.dumps({"tokens": [r.randrange(3, 128) for _ in range(r.randrange(8, 40))]}) + "\n")
    collect = ["collect", "--model", opt, "--data", data, "--num-examples", str(N), "--block-size", "4", "--tp", "2"]
    ref = W("ref.h5")
    seconds = run(collect + ["--out", ref])
    out = W("killed.h5")

    def reset_collect():
        for p in (out, out + ".partial", out + ".partial.new"):
            if os.path.exists(p):
                os.remove(p)

    if with_retries("collect", collect + ["--out", out], seconds, reset_collect,
                    started=lambda: os.path.exists(out + ".partial")):
        check(not os.path.exists(out), "collect: no final archive after the kill")
        # The header is made under another name and renamed once closed, so OUT.partial
        # opens however early the kill came.
        done = 0
        try:
            _, complete = archive_layers(out + ".partial")
            check(complete == 0, "collect: OUT.partial opens and is not marked complete")
            with h5py.File(out + ".partial", "r") as h:
                done = int(h["blocks_done"][:].sum())
        except OSError as e:
            check(False, f"collect: OUT.partial opens after the kill ({e})")
        run(collect + ["--out", out, "--resume"], log_level="info")
        m = re.search(rf"resuming: (\d+) of {N} examples already collected", last_output)
        skipped = int(m.group(1)) if m else 0
        check(skipped == min(N, 4 * done), f"collect: --resume skips the {done} finished blocks ({skipped} examples)")
        a, ca = archive_layers(ref)
        b, cb = archive_layers(out)
        same = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        check(cb == 1 and same, f"collect: the resumed archive equals the uninterrupted one ({len(a)} layers)")

    # ---- train: 30 steps, a checkpoint every 3 ----
    emu = W("emu")
    shutil.copytree(opt, emu)
    with open(os.path.join(emu, "crash_plan.json"), "w") as f:
        json.dump({"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt_preln",
                   "full_layers": 4, "adapters": [1, 1],
                   "slots": [{"source": l, "train": l in (0, 3), "stored_as": l} for l in range(4)]}, f)
    task = W("task.prepared")
    os.makedirs(task)
    with open(os.path.join(task, "shard-00000.jsonl"), "w") as f:
        for i in range(24):
            ctx = [r.randrange(3, 128) for _ in range(r.randrange(4, 14))]
            conts = [[r.randrange(3, 128) for _ in range(r.randrange(1, 4))] for _ in range(3)]
            f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": ctx + conts[0], "context": ctx,
                                "continuations": conts, "gold": 0, "choice_chars": [3, 3, 3]}) + "\n")
    with open(os.path.join(task, "manifest.json"), "w") as f:
        json.dump({"kind": "multiple_choice", "task": "t", "shards": ["shard-00000.jsonl"]}, f)
    train = ["train", "--model", emu, "--data", task, "--batch-size", "4", "--steps", "30", "--save-every", "3",
             "--lr", "3e-3", "--seed", "3", "--tp", "2"]
    seconds = run(train + ["--out", W("train_ref")])
    tout = W("train_killed")

    def reset_train():
        shutil.rmtree(tout, ignore_errors=True)

    if with_retries("train", train + ["--out", tout], seconds, reset_train,
                    started=lambda: os.path.isdir(os.path.join(tout, "checkpoints"))):
        whole, done = checkpoints_whole(tout)
        check(whole, f"train: every checkpoint present is complete ({', '.join(done) or 'none'})")
        check(not os.path.exists(os.path.join(tout, "model")), "train: no trained model after the kill")
        run(train + ["--out", tout] + (["--resume"] if done else ["--overwrite"]))
        check(losses(W("train_ref")) == losses(tout), f"train: resumed from {done[-1] if done else 'scratch'}, "
                                                      "the loss log equals the uninterrupted run's")

    # ---- pipeline: every stage on the eval fixture model ----
    ptask = write_pairs_task(work)
    pipeline = ["pipeline", "--model", tok_model, "--train-task", ptask, "--eval-task", ptask, "--num-examples", "16",
                "--adapters", "1,1", "--k", "1", "--steps", "8", "--save-every", "2", "--warmup", "1",
                "--batch-size", "4", "--lr", "1e-3", "--modes", "uniform,share", "--tp", "2"]
    seconds = run(pipeline + ["--work", W("pipe_ref")])
    pout = W("pipe_killed")

    def reset_pipeline():
        shutil.rmtree(pout, ignore_errors=True)

    def results(folder):
        out = {}
        for name in sorted(os.listdir(os.path.join(folder, "eval"))):
            if name.endswith(".json"):
                with open(os.path.join(folder, "eval", name)) as f:
                    for r_ in json.load(f)["results"]:
                        out[(name, r_["task"])] = {k: v["value"] for k, v in r_["metrics"].items()}
        return out

    if with_retries("pipeline", pipeline + ["--work", pout], seconds, reset_pipeline):
        bad = []
        for dirpath, _, files in os.walk(pout):
            for f in files:
                p = os.path.join(dirpath, f)
                if f.endswith(".json") and not f.endswith(".tmp"):
                    try:
                        json.load(open(p))
                    except ValueError:
                        bad.append(p)
                elif f.endswith(".safetensors") and "checkpoints" not in p and not safetensors_ok(p):
                    bad.append(p)
                elif f == "activations.h5" and archive_layers(p)[1] != 1:
                    bad.append(p)
        check(not bad, f"pipeline: every stage output left by the kill is whole {bad}")
        for dirpath, dirs, _ in os.walk(pout):
            if os.path.basename(dirpath) == "train":
                whole, done = checkpoints_whole(dirpath)
                check(whole, f"pipeline: {os.path.relpath(dirpath, pout)}: checkpoints complete ({', '.join(done) or 'none'})")
        run(pipeline + ["--work", pout])
        a, b = results(W("pipe_ref")), results(pout)
        worst = max((abs(a[k][m] - b[k][m]) for k in a for m in a[k] if k in b and m in b[k]), default=float("inf"))
        check(sorted(a) == sorted(b) and worst <= 1e-6,
              f"pipeline: the resumed run's evaluation numbers equal the uninterrupted run's (largest difference {worst:.3g})")
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"kill_resume (seed {SEED}): {passes} passed, {failures} failed")
sys.exit(1 if failures else 0)
