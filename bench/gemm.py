#!/usr/bin/env python3
"""The machine's GEMM rate as PyTorch reaches it, on the products of an OPT-125m decoder layer.

x [rows, K] times a Linear's weight [N, K] (transposed) for the MLP's two shapes, K x N = 768 x 3072
and 3072 x 768, with every kernel this torch has: its BLAS (MKL in the PyPI wheel, through
torch.nn.functional.linear) and oneDNN (a Linear converted with torch.utils.mkldnn, weights
prepacked once). float64 is the [out, rows] x [rows, out] product of SFSD's statistics
(out 768 and 3072). Each kernel's rate is its best of --repeats timed groups (the best the machine
reaches, since other load only slows it down). Prints one JSON line; the bench drivers run it
under the same allocator and threads as the side they compare:
  python bench/gemm.py [--threads 2] [--rows 1024] [--dtypes float32,bfloat16]
"""
import argparse
import json
import time
import warnings

import torch

SHAPES = ((768, 3072), (3072, 768))  # (K, N) of fc1 and fc2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def best_rate(fn, flops, repeats, min_seconds=0.2):
    """GFLOP/s of fn's best timed group; a group repeats fn until it has run min_seconds."""
    t0 = time.perf_counter()
    fn()  # first call: kernel selection, weight packing, page faults
    if time.perf_counter() - t0 > min_seconds:
        repeats = 1  # a slow kernel: one timed call says enough
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, flops * n / dt / 1e9)
    return best


def pair_rate(make, rows, repeats):
    """Rate over both MLP shapes together: total FLOPs over total time, each timed apart."""
    secs, flops = 0.0, 0.0
    for k, n in SHAPES:
        fn = make(k, n)
        f = 2.0 * rows * k * n
        secs += f / (best_rate(fn, f, repeats) * 1e9)
        flops += f
    return flops / secs / 1e9


def rates(rows, dtypes, repeats):
    out = {}
    g = torch.Generator().manual_seed(0)
    for name in dtypes:
        dt = DTYPES[name]
        r = {}
        if name == "float64":
            def make(k, n):
                y = torch.randn(rows, n, generator=g, dtype=dt)
                acc = torch.zeros(n, n, dtype=dt)
                return lambda: acc.addmm_(y.t(), y)

            secs, flops = 0.0, 0.0
            for out_dim in (768, 3072):
                f = 2.0 * rows * out_dim * out_dim
                secs += f / (best_rate(make(0, out_dim), f, repeats) * 1e9)
                flops += f
            r["torch addmm_ (BLAS)"] = flops / secs / 1e9
            out[name] = r
            continue

        def blas(k, n):
            x, w = torch.randn(rows, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
            return lambda: torch.nn.functional.linear(x, w)

        r["torch linear (BLAS)" if dt == torch.float32 else "torch linear"] = pair_rate(blas, rows, repeats)
        if torch.backends.mkldnn.is_available():
            with warnings.catch_warnings():  # torch.jit deprecation notices of the module
                warnings.simplefilter("ignore")
                from torch.utils import mkldnn as mk

            def dnnl(k, n):
                lin = torch.nn.Linear(k, n, bias=False).eval()
                lin = mk.to_mkldnn(lin, dt) if dt != torch.float32 else mk.to_mkldnn(lin)
                x = torch.randn(rows, k, generator=g).to(dt).to_mkldnn()
                return lambda: lin(x)

            try:
                with torch.inference_mode():
                    r["torch mkldnn linear (oneDNN)"] = pair_rate(dnnl, rows, repeats)
            except RuntimeError as e:  # a dtype this oneDNN build has no kernel for
                r["torch mkldnn linear (oneDNN)"] = None
                r["note"] = str(e).splitlines()[0]
        out[name] = r
    return out


def describe():
    """Version, BLAS and oneDNN of this torch, from its build configuration."""
    cfg = torch.__config__.show()
    blas = next((l.strip(" -") for l in cfg.splitlines() if "Math Kernel Library" in l or "OpenBLAS" in l), "")
    dnnl = next((l.strip(" -") for l in cfg.splitlines() if "MKL-DNN" in l or "oneDNN" in l), "")
    info = {"torch": torch.__version__, "blas": blas or "BLAS_INFO=" + cfg.split("BLAS_INFO=")[-1].split(",")[0],
            "onednn": dnnl, "threads": torch.get_num_threads()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps({"rows": a.rows, **describe(), "rates": rates(a.rows, a.dtypes.split(","), a.repeats)}))


if __name__ == "__main__":
    main()
