#!/usr/bin/env python3
"""A full disk during archive writes (collect) and training checkpoint writes (train): a clear
error (exit code 2, one line naming the file and the lack of space), no final output, and
the previous checkpoint intact: removing the cause and resuming gives the uninterrupted run.

The small disk is a tmpfs (`mount -t tmpfs -o size=...`, as root); where mounting is not
allowed, a file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG)
stands in. The log says which ran.

  disk_full.py CRASH_HPC FIXTURES

Debian's python3 (numpy, h5py) only.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

BIN, FIXTURES = sys.argv[1], sys.argv[2]
failures = 0
passes = 0
# What the message may say about the lack of space (ENOSPC under tmpfs, EFBIG under the limit).
SPACE_WORDS = ("No space left", "disk full", "File too large", "no space")


def check(ok, what):
    global failures, passes
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    passes += ok
    failures += not ok


def run(args, fsize=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([BIN] + args + ["--threads", "1", "--log-level", "warn"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=limit if fsize else None)


def expect_space_error(name, p, path_word):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    ok = (p.returncode == 2 and len(lines) == 1 and path_word in p.stderr
          and any(w in p.stderr for w in SPACE_WORDS))
    check(ok, f"{name}: exit code {p.returncode}, message: {p.stderr.strip()[:300]}")


def losses(folder):
    with open(os.path.join(folder, "train_log.jsonl")) as f:
        return [(j["step"], j.get("loss", j.get("val_loss"))) for j in map(json.loads, f)]


work = tempfile.mkdtemp(prefix="crash-full-")
small = os.path.join(work, "small")
os.makedirs(small)
mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", small], capture_output=True).returncode == 0
print("disk full by: " + ("a 4 MiB tmpfs mounted on " + small if mounted else "RLIMIT_FSIZE (tmpfs mount not allowed)"),
      flush=True)


def fill(leave):
    """Fills the tmpfs but `leave` bytes (no-op under RLIMIT_FSIZE)."""
    if not mounted:
        return
    st = os.statvfs(small)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(small, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def unfill():
    p = os.path.join(small, "filler")
    if os.path.exists(p):
        os.remove(p)


try:
    opt = os.path.join(FIXTURES, "models", "opt_preln")

    # ---- collect: an unpooled archive of several MiB into 4 MiB (or past a 1 MiB file limit) ----
    data = os.path.join(work, "tokens.jsonl")
    with open(data, "w") as f:
        for i in range(200):
            f.write(json.dumps({"tokens": [(5 + i * 7 + k * 3) % 120 + 3 for k in range(60)]}) + "\n")
    out = os.path.join(small, "acts.h5")
    p = run(["collect", "--model", opt, "--data", data, "--num-examples", "200", "--pooling", "none",
             "--block-size", "8", "--out", out], fsize=None if mounted else 1 << 20)
    expect_space_error("collect on a full disk", p, "acts.h5")
    check(not os.path.exists(out), "collect: no final archive")
    for f in os.listdir(small):
        if f.startswith("acts.h5"):
            os.remove(os.path.join(small, f))

    # ---- train: the checkpoint after step 2 fits, the one after step 4 does not ----
    emu = os.path.join(work, "emu")
    shutil.copytree(opt, emu)
    with open(os.path.join(emu, "crash_plan.json"), "w") as f:
        json.dump({"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt_preln",
                   "full_layers": 4, "adapters": [1, 1],
                   "slots": [{"source": l, "train": l in (0, 3), "stored_as": l} for l in range(4)]}, f)
    task = os.path.join(work, "task.prepared")
    os.makedirs(task)
    with open(os.path.join(task, "shard-00000.jsonl"), "w") as f:
        for i in range(16):
            ctx = [(i * 11 + k) % 120 + 3 for k in range(8)]
            conts = [[(i + 40) % 120 + 3], [7], [99]]
            f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": ctx + conts[0], "context": ctx,
                                "continuations": conts, "gold": 0, "choice_chars": [3, 3, 3]}) + "\n")
    with open(os.path.join(task, "manifest.json"), "w") as f:
        json.dump({"kind": "multiple_choice", "task": "t", "shards": ["shard-00000.jsonl"]}, f)
    train = ["train", "--model", emu, "--data", task, "--batch-size", "4", "--steps", "6", "--save-every", "2",
             "--keep-checkpoints", "5", "--lr", "3e-3", "--seed", "2"]
    ref = os.path.join(work, "ref")
    p = run(train + ["--out", ref])
    if p.returncode != 0:
        raise SystemExit("FAIL: reference training run: " + p.stderr)

    tout = os.path.join(small, "train")
    p = run(train + ["--out", tout, "--stop-after", "2"])
    if p.returncode != 0:
        raise SystemExit("FAIL: training run up to the first checkpoint: " + p.stderr)
    ck = os.path.join(tout, "checkpoints", "step-000002")
    before = {f: open(os.path.join(ck, f), "rb").read() for f in sorted(os.listdir(ck))}
    ck_bytes = sum(len(b) for b in before.values())
    fill(ck_bytes // 2)  # room for half a checkpoint
    p = run(train + ["--out", tout, "--resume"], fsize=None if mounted else ck_bytes // 4)
    expect_space_error("train: checkpoint on a full disk", p, tout)
    unfill()
    after = {f: open(os.path.join(ck, f), "rb").read() for f in sorted(os.listdir(ck))} if os.path.isdir(ck) else {}
    check(after == before, "train: the step-2 checkpoint is intact, byte for byte")
    done = sorted(d for d in os.listdir(os.path.join(tout, "checkpoints")) if not d.endswith(".tmp"))
    check(done == ["step-000002"], f"train: no later checkpoint marked complete ({done})")
    check(not os.path.exists(os.path.join(tout, "model")), "train: no trained model")
    p = run(train + ["--out", tout, "--resume"])
    check(p.returncode == 0 and losses(ref) == losses(tout),
          f"train: resumed with space again, the loss log equals the uninterrupted run's (exit code {p.returncode})")
finally:
    if mounted:
        subprocess.run(["umount", small])
    shutil.rmtree(work, ignore_errors=True)

print(f"disk_full: {passes} passed, {failures} failed")
sys.exit(1 if failures else 0)
