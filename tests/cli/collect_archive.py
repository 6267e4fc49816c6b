#!/usr/bin/env python3
"""The collect job end to end, read with h5py as a user would:
- pooled values (mean, mean_weighted, last, max) and token rows (none) equal HF transformers'
  hidden states (golden fixtures) pooled the same way in NumPy;
- archives from 4 ranks (DP4, TP2xPP2, PP4) equal the 1-rank archive value for value;
- a run killed midway leaves no complete file; --resume finishes it, equal to an
  uninterrupted run; a resume that meets other examples fails loudly;
- float16 storage, attributes, bad input (exit 2, file and line named)."""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402


binary, fixtures = sys.argv[1], sys.argv[2]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")


def run(args, np_=1, env=None, check_rc=True):
    cmd = ([*MPIRUN, "-np", str(np_)] if np_ > 1 else []) + [binary, "collect", "--log-level", "warn"] + args
    if np_ > 1:
        cmd += ["--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check_rc and p.returncode != 0:
        print(p.stdout, p.stderr)
        raise SystemExit(f"collect failed: {' '.join(cmd)}")
    return p


def pool(h, m, method):
    m = m.astype(np.float64)
    if method == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    if method == "mean_weighted":
        pos = np.cumsum(m, 1) * m
        return (h * (pos / pos.sum(1, keepdims=True))[..., None]).sum(1)
    if method == "last":
        return h[np.arange(len(h)), (np.cumsum(m, 1) * m).argmax(1)]
    if method == "max":
        return np.where(m[..., None] > 0, h, -np.inf).max(1)


with tempfile.TemporaryDirectory() as tmp:
    name = "llama_gqa"
    model = os.path.join(fixtures, "models", name)
    g = read_safetensors(os.path.join(fixtures, "golden", name + ".safetensors"))
    ids, mask = g["right_ids"], g["right_mask"]
    data = os.path.join(tmp, "golden.jsonl")
    with open(data, "w") as f:
        for row, m in zip(ids, mask):
            f.write(json.dumps({"tokens": row[m == 1].tolist()}) + "\n")
    L = sum(1 for k in g if k.startswith("right_hidden_"))

    # 1. Against HF, every pooling.
    for method in ("mean", "mean_weighted", "last", "max", "none"):
        out = os.path.join(tmp, f"hf_{method}.h5")
        run(["--model", model, "--data", data, "--out", out, "--pooling", method, "--block-size", "2"])
        with h5py.File(out, "r") as a:
            err = 0.0
            for l in range(L):
                h = g[f"right_hidden_{l}"].astype(np.float64)
                want = h[mask == 1] if method == "none" else pool(h, mask, method)
                err = max(err, float(np.abs(a[f"layers/{l}"][()] - want).max()))
            if method == "none":
                lengths = mask.sum(1)
                ok_index = (a["index"][()] == np.concatenate([[0], np.cumsum(lengths)])).all()
                err = err if ok_index else float("inf")
            check(f"pooling {method} equals HF hidden states pooled in NumPy", err <= 1e-4, f"(max abs diff {err:.1e})")

    # 2. Grids against one rank, on a longer synthetic task.
    rng = np.random.default_rng(0)
    big = os.path.join(tmp, "big.jsonl")
    with open(big, "w") as f:
        for _ in range(45):
            f.write(json.dumps({"tokens": rng.integers(3, 128, rng.integers(2, 30)).tolist()}) + "\n")
    base = ["--model", model, "--data", big, "--num-examples", "41", "--block-size", "4"]
    one = os.path.join(tmp, "one.h5")
    run(base + ["--out", one])
    with h5py.File(one, "r") as a:
        attrs = dict(a.attrs)
        described = all(k in attrs for k in ("model", "data", "pooling", "grid", "tool_version", "config", "dtype"))
        check("archive opens in h5py and describes itself",
              described and attrs["complete"] == 1 and attrs["num_examples"] == 41 and a["layers/0"].shape == (41, 64)
              and (a["example_index"][()] == np.arange(41)).all(), f"({sorted(attrs)})")
    for grid in (["--tp", "1", "--pp", "1"], ["--tp", "2", "--pp", "2"], ["--tp", "1", "--pp", "4"]):
        out = os.path.join(tmp, "grid.h5")
        run(base + ["--out", out, "--overwrite", "--micro-batches", "2", "--length-groups", "2"] + grid, np_=4)
        with h5py.File(one, "r") as a, h5py.File(out, "r") as b:
            err = max(float(np.abs(a[f"layers/{l}"][()] - b[f"layers/{l}"][()]).max()) for l in range(L))
            same_ids = (a["example_hash"][()] == b["example_hash"][()]).all()
            check(f"4 ranks {b.attrs['grid']} equal 1 rank", err <= 1e-5 and same_ids, f"(max abs diff {err:.1e})")

    # Length-sorted passes (the default: 4 per block) against the whole block in one padded pass,
    # pooled and token-level; the token rows must stay in example order.
    for method in ("mean", "none"):
        sorted_out, whole_out = os.path.join(tmp, f"sorted_{method}.h5"), os.path.join(tmp, f"whole_{method}.h5")
        common = ["--model", model, "--data", big, "--num-examples", "41", "--block-size", "8", "--pooling", method]
        run(common + ["--out", sorted_out])
        run(common + ["--out", whole_out, "--length-groups", "1"])
        # Relative to each layer's largest value: token rows reach 12 here, and other batch
        # shapes round differently in fp32.
        with h5py.File(sorted_out, "r") as a, h5py.File(whole_out, "r") as b:
            err = max(float(np.abs(a[f"layers/{l}"][()] - b[f"layers/{l}"][()]).max() / max(1.0, np.abs(b[f"layers/{l}"][()]).max()))
                      for l in range(L))
            check(f"length-sorted passes equal one padded pass per block ({method})", err <= 1e-5,
                  f"(max relative diff {err:.1e})")

    # 3. Killed midway, then resumed on another grid.
    out = os.path.join(tmp, "resume.h5")
    p = run(base + ["--out", out], np_=2, env={"CRASH_TEST_FAIL_AFTER_ROUNDS": "2"}, check_rc=False)
    partial = out + ".partial"
    with h5py.File(partial, "r") as a:
        done = a["blocks_done"][()]
        check("a killed run leaves no complete file", p.returncode != 0 and not os.path.exists(out)
              and a.attrs["complete"] == 0 and 0 < done.sum() < len(done), f"(exit {p.returncode}, {done.sum()}/{len(done)} blocks)")
    run(base + ["--out", out, "--resume", "--tp", "2"], np_=2)
    with h5py.File(one, "r") as a, h5py.File(out, "r") as b:
        err = max(float(np.abs(a[f"layers/{l}"][()] - b[f"layers/{l}"][()]).max()) for l in range(L))
        check("--resume finishes it, equal to an uninterrupted run", b.attrs["complete"] == 1 and err <= 1e-5
              and not os.path.exists(partial), f"(max abs diff {err:.1e})")
    p = run(base + ["--out", out, "--overwrite"], env={"CRASH_TEST_FAIL_AFTER_ROUNDS": "1"}, check_rc=False)
    # The same file name, other contents: the examples of finished blocks changed.
    lines = open(big).read().splitlines()
    os.rename(big, big + ".orig")
    open(big, "w").write("\n".join(lines[1:] + lines[:1]) + "\n")
    p = run(base + ["--out", out, "--resume", "--overwrite"], check_rc=False)
    os.replace(big + ".orig", big)
    check("a resume that meets other examples fails loudly",
          p.returncode == 2 and "is not the one the interrupted run saw" in p.stderr, f"({p.stderr.strip()})")

    # 4. float16 storage.
    half = os.path.join(tmp, "half.h5")
    run(base + ["--out", half, "--store-dtype", "float16"])
    with h5py.File(one, "r") as a, h5py.File(half, "r") as b:
        x, y = a["layers/2"][()], b["layers/2"][()]
        check("float16 storage reads as float16", y.dtype == np.float16 and np.allclose(x, y, rtol=2e-3, atol=2e-3))

    # 5. Bad input: exit 2, file and line named, nothing written.
    bad = os.path.join(tmp, "bad.jsonl")
    open(bad, "w").write('{"tokens": [5, 6]}\n{"tokens": [5,\n')
    long = os.path.join(tmp, "long.jsonl")
    open(long, "w").write(json.dumps({"tokens": [5] * 300}) + "\n")
    cases = [
        ("malformed line", ["--data", bad, "--out", os.path.join(tmp, "x.h5")], "bad.jsonl:2"),
        ("longer than the context", ["--data", long, "--out", os.path.join(tmp, "x.h5")], "long.jsonl:1: 300 tokens exceed"),
        ("existing output", ["--data", big, "--out", one], "exists"),
        ("unknown pooling", ["--data", big, "--out", os.path.join(tmp, "x.h5"), "--pooling", "median"], "median"),
        ("resume without a partial file", ["--data", big, "--out", os.path.join(tmp, "y.h5"), "--resume"], "nothing to resume"),
        ("no length groups", ["--data", big, "--out", os.path.join(tmp, "x.h5"), "--length-groups", "0"], "--length-groups"),
    ]
    for label, args, want in cases:
        p = run(["--model", model] + args, check_rc=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        check(f"bad input: {label}", p.returncode == 2 and len(lines) == 1 and want in p.stderr
              and not os.path.exists(os.path.join(tmp, "x.h5")), f"({p.stderr.strip()})")

print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
sys.exit(0 if all(results) else 1)
