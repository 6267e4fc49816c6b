#!/usr/bin/env python3
"""CKA throughput side by side in one run (not part of CI); Debian's python3, numpy and h5py.

On one synthetic archive (L hidden states [N, d], float32, each layer a noisy continuation of the
one below), the exact full-batch CKA of every pair of layers, in the feature form
(||Xc_u^T Xc_v||_F^2 over fp64 cross-covariances, 2 N d^2 flops a pair):
1. crash-hpc similarity --method feature on 1 rank, against the same computation in NumPy and,
   when `import torch` works (a PyPI venv), in PyTorch; all fp64, same thread count.
2. Its rate as a fraction of the machine's fp64 GEMM rate (NumPy on the same BLAS, measured
   here). Goal: >= 0.70.
3. Scaling from 1 rank to 2 ranks (each rank with the same threads): parallel efficiency
   t1 / (2 t2). Goal: >= 0.8.
The times are the job's own compute time (its "similarity: feature form, X s" line: archive reads,
centring, GEMMs, allreduce) and the reference's compute time from the archive already in memory.

  /usr/bin/python3 bench/cka.py [--rows 8192] [--width 1024] [--layers 13] [--threads 1] [--dir /tmp/crash-bench-cka]
"""
import argparse
import os
import re
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=8192)
ap.add_argument("--width", type=int, default=1024)
ap.add_argument("--layers", type=int, default=13)
ap.add_argument("--threads", type=int, default=1, help="threads of every process (each rank, NumPy, torch)")
ap.add_argument("--repeats", type=int, default=3, help="runs of each; the median is reported")
ap.add_argument("--dir", default="/tmp/crash-bench-cka")
args = ap.parse_args()
# BLAS threads are fixed when NumPy loads.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "build", "crash-hpc")


def make_archive(path, rows, width, layers):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, width), dtype=np.float32)
    mix = rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)
    with h5py.File(path + ".tmp", "w") as f:
        for l in range(layers):
            f.create_dataset(f"layers/{l}", data=x, chunks=(min(rows, 256), width))
            x = x + 0.5 * (x @ mix) + 0.1 * rng.standard_normal((rows, width), dtype=np.float32)
        f.create_dataset("example_hash", data=np.arange(rows, dtype=np.uint64))
        f.create_dataset("example_index", data=np.arange(rows, dtype=np.int64))
        f.attrs["complete"] = 1
        f.attrs["num_layers"] = layers
        f.attrs["pooling"] = "mean"
    os.replace(path + ".tmp", path)


def feature_cka(xs, lib):
    """Every pair's CKA in the feature form; xs: fp64 arrays or tensors [N, d]."""
    cs = [x - x.mean(0) for x in xs]
    L = len(cs)
    h = [[0.0] * L for _ in range(L)]
    for u in range(L):
        for v in range(u, L):
            h[u][v] = h[v][u] = float((cs[u].T @ cs[v]).square().sum() if lib == "torch" else
                                      np.square(cs[u].T @ cs[v]).sum())
    return np.array([[h[u][v] / np.sqrt(h[u][u] * h[v][v]) for v in range(L)] for u in range(L)])


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def run_similarity(archive, out, ranks):
    cmd = [BINARY, "similarity", "--archive", archive, "--out", out, "--method", "feature", "--overwrite",
           "--threads", str(args.threads)]
    if ranks > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if r.returncode != 0:
        sys.exit(f"similarity failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = re.search(r"similarity: feature form, ([0-9.]+) s", r.stdout + r.stderr)
    if not m:
        sys.exit("similarity printed no timing line:\n" + r.stderr[-3000:])
    return float(m.group(1))


def main():
    os.makedirs(args.dir, exist_ok=True)
    N, d, L = args.rows, args.width, args.layers
    archive = os.path.join(args.dir, f"archive_{N}x{d}x{L}.h5")
    if not os.path.exists(archive):
        make_archive(archive, N, d, L)
    pairs = L * (L + 1) // 2
    flops = 2.0 * N * d * d * pairs
    print(f"archive: {L} layers x [{N}, {d}] float32 ({os.path.getsize(archive) / 2**20:.0f} MiB), {pairs} pairs, "
          f"{flops / 1e9:.1f} GFLOP a run, {args.threads} thread(s) per process")

    # The machine's fp64 GEMM rate on the same BLAS, a square product the size of one pair's.
    a = np.random.default_rng(1).standard_normal((d, N))
    b = a.T.copy()
    gemm_t, _ = timed(lambda: a @ b, args.repeats)
    gemm = 2.0 * d * d * N / gemm_t / 1e9
    print(f"fp64 GEMM [{d}x{N}]x[{N}x{d}] (NumPy, OpenBLAS): {gemm:.1f} GFLOP/s")

    out = os.path.join(args.dir, "cka.h5")
    t1s = [run_similarity(archive, out, 1) for _ in range(args.repeats)]
    t1 = float(np.median(t1s))
    with h5py.File(out) as f:
        ours = f["cka"][:]
    t2 = float(np.median([run_similarity(archive, out, 2) for _ in range(args.repeats)]))
    with h5py.File(out) as f:
        ours2 = f["cka"][:]

    with h5py.File(archive) as f:
        xs = [f[f"layers/{l}"][:].astype(np.float64) for l in range(L)]
    np_t, ref = timed(lambda: feature_cka(xs, "numpy"), args.repeats)
    rows = [("crash-hpc (1 rank)", t1), ("crash-hpc (2 ranks)", t2), ("NumPy fp64", np_t)]
    try:
        import torch
        torch.set_num_threads(args.threads)
        txs = [torch.from_numpy(x) for x in xs]
        torch_t, tref = timed(lambda: feature_cka(txs, "torch"), args.repeats)
        rows.append((f"PyTorch {torch.__version__} fp64", torch_t))
        print(f"PyTorch vs NumPy CKA: max abs diff {np.abs(tref - ref).max():.2e}")
    except ImportError:
        torch_t = None
        print("PyTorch: not importable here (run in a venv with torch to add it)")
    print(f"crash-hpc vs NumPy CKA: max abs diff {np.abs(ours - ref).max():.2e} (1 rank), "
          f"{np.abs(ours2 - ref).max():.2e} (2 ranks)")

    print(f"\n{'':24s} {'seconds':>8s} {'GFLOP/s':>8s} {'of GEMM':>8s}")
    for name, t in rows:
        print(f"{name:24s} {t:8.2f} {flops / t / 1e9:8.1f} {flops / t / 1e9 / gemm:8.2f}")
    print(f"\nratio crash-hpc / NumPy: {np_t / t1:.2f}")
    if torch_t:
        print(f"ratio crash-hpc / PyTorch: {torch_t / t1:.2f}")
    print(f"fraction of GEMM rate (1 rank): {flops / t1 / 1e9 / gemm:.2f} (goal >= 0.70)")
    print(f"parallel efficiency 1 -> 2 ranks: {t1 / (2 * t2):.2f} (goal >= 0.80; this machine has {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
