#!/usr/bin/env python3
"""The similarity and cluster jobs end to end, checked in NumPy (fp64) as a user would:
- CKA of every pair of layers (gram, feature, minibatch, auto) of archives made by `collect`
  on fixture models (pooled and token-level), and of two models' archives, equals a plain
  NumPy CKA within 1e-10; 2 and 4 ranks equal 1 rank within 1e-12;
- the same on random archives written with h5py (float32 and float16 layers);
- cluster: CRaSh's adjacent rule and the optimal segmentation equal a NumPy brute force;
  the JSON the emulate job reads; --layers;
- --plot draws PNGs (and plots.py draws lens and landscape files);
- bad input exits 2 with one clear line."""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

binary, fixtures = sys.argv[1], sys.argv[2]
plots = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "analysis", "plots.py")
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
results = []
worst = {"numpy": 0.0, "ranks": 0.0}
timings = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def run(job, args, np_=1, check_rc=True):
    cmd = ([*MPIRUN, "-np", str(np_)] if np_ > 1 else []) + [binary, job, "--log-level", "warn", "--threads", "1"] + args
    start = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check_rc and p.returncode != 0:
        print(p.stdout, p.stderr)
        raise SystemExit(f"{job} failed: {' '.join(cmd)}")
    p.seconds = time.time() - start
    return p


def cka(x, y):
    x = x.astype(np.float64) - x.astype(np.float64).mean(0)
    y = y.astype(np.float64) - y.astype(np.float64).mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def hsic1(k, l):
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * k.sum(0) @ l.sum(1)) / (n * (n - 3))


def minibatch_cka(x, y, b):
    n = len(x)
    bounds = list(range(0, n, b)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 4:
        del bounds[-2]  # a remainder of fewer than 4 rows joins the batch before it
    s = np.zeros(3)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        xb, yb = x[lo:hi].astype(np.float64), y[lo:hi].astype(np.float64)
        k, l = xb @ xb.T, yb @ yb.T
        s += [hsic1(k, l), hsic1(k, k), hsic1(l, l)]
    return s[0] / np.sqrt(s[1] * s[2])


def layers_of(path):
    with h5py.File(path, "r") as f:
        return [f[f"layers/{l}"][()] for l in range(len(f["layers"]))]


def numpy_matrix(a, b, method, batch):
    return np.array([[minibatch_cka(x, y, batch) if method == "minibatch" else cka(x, y) for y in b] for x in a])


def similarity(tmp, name, archive, method, np_, extra=()):
    out = os.path.join(tmp, f"{name}_{method}_{np_}.h5")
    p = run("similarity", ["--archive", archive, "--out", out, "--method", method, "--overwrite", *extra], np_=np_)
    timings.append((f"{name} {method} {np_} rank(s)", p.seconds))
    with h5py.File(out, "r") as f:
        return f["cka"][()], dict(f.attrs), out


def check_archive(tmp, name, archive, methods, batch, archive_b=None):
    """methods: {method: the rank counts to run besides 1}."""
    a = layers_of(archive)
    b = layers_of(archive_b) if archive_b else a
    extra = ["--batch-size", str(batch)] + (["--archive-b", archive_b] if archive_b else [])
    for method, ranks in methods.items():
        one, attrs, _ = similarity(tmp, name, archive, method, 1, extra)
        want = numpy_matrix(a, b, attrs["method"], batch)
        err = float(np.abs(one - want).max())
        worst["numpy"] = max(worst["numpy"], err)
        check(f"{name}: {method} ({attrs['method']}) equals NumPy", one.shape == want.shape and err <= 1e-10,
              f"(shape {one.shape}, max abs diff {err:.1e})")
        for np_ in ranks:
            many, _, _ = similarity(tmp, name, archive, method, np_, extra)
            err = float(np.abs(many - one).max())
            worst["ranks"] = max(worst["ranks"], err)
            check(f"{name}: {method} on {np_} ranks equals 1 rank", err <= 1e-12, f"(max abs diff {err:.1e})")


def random_archive(path, n, widths, seed, complete=1, hashes=None, half=()):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        x = rng.normal(size=(n, 8))
        for l, w in enumerate(widths):
            x = np.tanh(x @ rng.normal(size=(x.shape[1], w)) / np.sqrt(x.shape[1])) + 0.3 * rng.normal(size=(n, w)) + 1.0
            f[f"layers/{l}"] = x.astype(np.float16 if l in half else np.float32)
        f["example_index"] = np.arange(n, dtype=np.int64)
        f["example_hash"] = np.arange(n, dtype=np.uint64) * 7919 + 1 if hashes is None else hashes
        f.attrs["complete"] = complete
        f.attrs["pooling"] = "mean"
        f.attrs["num_layers"] = len(widths)
        f.attrs["model"] = f"random-{seed}"


def adjacent_clusters(s, k):
    links = np.array([s[i, i + 1] for i in range(len(s) - 1)])
    cuts = sorted(np.argsort(links, kind="stable")[: k - 1])
    return segments(len(s), cuts)


def segments(n, cuts):
    out, cur = [], []
    for i in range(n):
        cur.append(i)
        if i in cuts:
            out.append(cur)
            cur = []
    return out + [cur]


def score(s, clusters):
    """The mean over clusters of the mean within-cluster CKA, weighted by cluster size."""
    return float(sum(len(c) * s[np.ix_(c, c)].mean() for c in clusters) / sum(len(c) for c in clusters))


def best_segmentation(s, k):
    return max((segments(len(s), cuts) for cuts in itertools.combinations(range(len(s) - 1), k - 1)),
               key=lambda c: score(s, c))


def one_line_error(p, want):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    return p.returncode == 2 and len(lines) == 1 and all(w in p.stderr for w in want)


with tempfile.TemporaryDirectory() as tmp:
    # 1. Archives made by collect on fixture models: pooled and token-level, and a second model.
    rng = np.random.default_rng(0)
    data = os.path.join(tmp, "tokens.jsonl")
    with open(data, "w") as f:
        for _ in range(41):
            f.write(json.dumps({"tokens": rng.integers(3, 120, rng.integers(4, 24)).tolist()}) + "\n")
    archives = {}
    for name, model, pooling in (("llama", "llama_gqa", "mean"), ("opt", "opt_postln_proj", "mean"),
                                 ("tokens", "llama_gqa", "none")):
        archives[name] = os.path.join(tmp, f"{name}.h5")
        run("collect", ["--model", os.path.join(fixtures, "models", model), "--data", data, "--out", archives[name],
                        "--pooling", pooling, "--num-examples", "41", "--block-size", "8"])
    # 41 examples < 64 features: auto is the Gram form; ~560 tokens >= 64: auto is the feature form.
    # Every form runs on 2 and 4 ranks somewhere (mpirun start-up dominates: not all of them everywhere).
    check_archive(tmp, "collected pooled", archives["llama"],
                  {"auto": [], "gram": [2, 4], "feature": [], "minibatch": [2, 4]}, 8)
    check_archive(tmp, "collected tokens", archives["tokens"], {"auto": [2], "gram": [], "minibatch": [4]}, 50)
    check_archive(tmp, "two models", archives["llama"], {"auto": [4], "minibatch": []}, 10, archive_b=archives["opt"])
    cka_path = os.path.join(tmp, "collected pooled_auto_1.h5")
    with h5py.File(cka_path, "r") as f:
        attrs = dict(f.attrs)
        summary = json.load(open(cka_path[:-3] + ".json"))
        c = f["cka"][()]
        check("output attributes and JSON summary",
              attrs["method"] == "gram" and json.loads(attrs["archives"]) == [archives["llama"]]
              and attrs["num_examples"] == 41 and attrs["pooling"] == "mean" and "tool_version" in attrs
              and summary["shape"] == [5, 5] and summary["method"] == "gram"
              and np.allclose(summary["adjacent"], [c[l, l + 1] for l in range(4)], rtol=0, atol=1e-15),
              f"({sorted(attrs)}, {summary['adjacent']})")

    # 2. Random archives written with h5py: more rows than features, float16 layers, two archives.
    rand_a, rand_b = os.path.join(tmp, "rand_a.h5"), os.path.join(tmp, "rand_b.h5")
    random_archive(rand_a, 300, [40, 80, 80, 20, 60, 60, 60, 30, 50], 1, half={3})
    random_archive(rand_b, 300, [24, 48, 16], 2)
    check_archive(tmp, "random", rand_a, {"gram": [], "feature": [2, 4], "minibatch": []}, 64)
    check_archive(tmp, "random pair", rand_a, {"gram": [2], "feature": []}, 64, archive_b=rand_b)

    # 3. Clustering the decoder layers: CKA entries (i + 1, j + 1).
    rand_cka = os.path.join(tmp, "random_feature_1.h5")
    with h5py.File(rand_cka, "r") as f:
        full = f["cka"][()]
    s = full[1:, 1:]  # decoder layers 0..7
    for method in ("adjacent", "optimal"):
        for k in (1, 3, 5):
            out = os.path.join(tmp, f"clusters_{method}_{k}.json")
            run("cluster", ["--cka", rand_cka, "--k", str(k), "--out", out, "--method", method])
            got = json.load(open(out))
            want = adjacent_clusters(s, k) if method == "adjacent" else best_segmentation(s, k)
            with h5py.File(out[:-5] + ".h5", "r") as h:
                ids = h["clusters"][()]
            check(f"cluster {method} k={k} equals NumPy",
                  got["format"] == "crash-hpc clusters 1" and got["method"] == method and got["k"] == k
                  and got["layers"] == list(range(8)) and got["clusters"] == want
                  and got["representatives"] == [c[len(c) // 2] for c in want]
                  and abs(got["score"] - score(s, want)) < 1e-12 and got["cka"] == rand_cka
                  and all(ids[l] == i for i, c in enumerate(want) for l in c),
                  f"({got['clusters']}, score {got['score']:.4f})")
    out = os.path.join(tmp, "clusters_sub.json")
    run("cluster", ["--cka", rand_cka, "--k", "2", "--out", out, "--method", "optimal", "--layers", "2:7"])
    got = json.load(open(out))
    want = [[l + 2 for l in c] for c in best_segmentation(full[3:8, 3:8], 2)]
    check("cluster --layers 2:7", got["layers"] == [2, 3, 4, 5, 6] and got["clusters"] == want, f"({got['clusters']})")
    out = os.path.join(tmp, "clusters_avg.json")
    run("cluster", ["--cka", rand_cka, "--k", "3", "--out", out, "--method", "average"])
    got = json.load(open(out))
    check("cluster average: a partition of the layers", sorted(sum(got["clusters"], [])) == list(range(8))
          and len(got["clusters"]) == 3, f"({got['clusters']})")

    # 4. Plots: the jobs' --plot, and plots.py on lens and landscape files.
    def big_png(path):
        return os.path.exists(path) and os.path.getsize(path) > 10_000

    cka_out = os.path.join(tmp, "plotted.h5")
    run("similarity", ["--archive", rand_a, "--out", cka_out, "--plot"])
    clusters_out = os.path.join(tmp, "plotted_clusters.json")
    run("cluster", ["--cka", cka_out, "--k", "3", "--out", clusters_out, "--plot"])
    pngs = [os.path.join(tmp, n) for n in ("plotted.png", "plotted_clusters.png", "plotted_clusters_cka.png")]
    check("--plot draws the heat map, the segments and the heat map with clusters", all(big_png(p) for p in pngs),
          f"({[os.path.getsize(p) if os.path.exists(p) else None for p in pngs]})")
    # No plot script (or no matplotlib): a warning, the job still succeeds.
    skipped = os.path.join(tmp, "noplot.h5")
    p = subprocess.run([binary, "similarity", "--archive", rand_a, "--out", skipped, "--plot", "--threads", "1"],
                       capture_output=True, text=True, env={**os.environ, "CRASH_PLOTS_SCRIPT": "/nonexistent/plots.py"})
    check("--plot without the script: a warning, no failure", p.returncode == 0 and "skipped" in p.stderr + p.stdout
          and os.path.exists(skipped) and not os.path.exists(os.path.join(tmp, "noplot.png")), f"(exit {p.returncode})")
    lens = os.path.join(tmp, "lens.h5")
    with h5py.File(lens, "w") as f:
        m = np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0)))
        f["kl"], f["js"] = m * 1.5, m * 0.1
        f.attrs["model"] = "fixture"
    line, plane = os.path.join(tmp, "line.h5"), os.path.join(tmp, "plane.h5")
    with h5py.File(line, "w") as f:
        f["alpha"] = np.linspace(0, 1, 11)
        f["loss"] = 3 + np.sin(np.linspace(0, 3, 11))
    with h5py.File(plane, "w") as f:
        f["a"], f["b"] = np.linspace(-2, 2, 9), np.linspace(-2, 2, 7)
        f["loss"] = 2 + np.add.outer(np.linspace(-2, 2, 9) ** 2, np.linspace(-2, 2, 7) ** 2)
    ok = True
    for src in (lens, line, plane):
        png = src[:-3] + ".png"
        p = subprocess.run(["/usr/bin/python3", plots, src, "--out", png], capture_output=True, text=True)
        ok = ok and p.returncode == 0 and big_png(png)
    check("plots.py draws lens, 1-D and 2-D landscape files", ok)
    p = subprocess.run(["/usr/bin/python3", plots, data, "--out", os.path.join(tmp, "x.png")], capture_output=True,
                       text=True)
    check("plots.py refuses a file it cannot plot", p.returncode == 2 and "error" in p.stderr, f"({p.stderr.strip()})")

    # 5. Bad input: exit 2, one line naming the file or option, nothing written.
    incomplete = os.path.join(tmp, "incomplete.h5")
    random_archive(incomplete, 20, [8, 8], 3, complete=0)
    other = os.path.join(tmp, "other.h5")
    random_archive(other, 300, [8, 8], 4, hashes=np.arange(300, dtype=np.uint64))
    x = os.path.join(tmp, "x.h5")
    cases = [
        ("missing archive", "similarity", ["--archive", os.path.join(tmp, "nope.h5"), "--out", x], ["nope.h5", "no such"]),
        ("incomplete archive", "similarity", ["--archive", incomplete, "--out", x], ["incomplete.h5", "incomplete"]),
        ("batch of fewer than 4", "similarity", ["--archive", rand_a, "--out", x, "--method", "minibatch",
                                                 "--batch-size", "3"], ["--batch-size", "at least 4"]),
        ("unknown method", "similarity", ["--archive", rand_a, "--out", x, "--method", "svd"], ["--method", "svd"]),
        ("archives of other examples", "similarity", ["--archive", rand_a, "--archive-b", other, "--out", x],
         ["other.h5", "different examples"]),
        ("existing output", "similarity", ["--archive", rand_a, "--out", cka_out], ["plotted.h5", "exists"]),
        ("K out of range", "cluster", ["--cka", rand_cka, "--k", "9", "--out", os.path.join(tmp, "x.json")],
         ["--k", "1 to 8"]),
        ("K zero", "cluster", ["--cka", rand_cka, "--k", "0", "--out", os.path.join(tmp, "x.json")], ["--k"]),
        ("bad --layers", "cluster", ["--cka", rand_cka, "--k", "2", "--out", os.path.join(tmp, "x.json"),
                                     "--layers", "5:3"], ["--layers", "5:3"]),
        ("missing CKA file", "cluster", ["--cka", os.path.join(tmp, "nope.h5"), "--k", "2", "--out",
                                         os.path.join(tmp, "x.json")], ["nope.h5"]),
        ("CKA of two archives", "cluster", ["--cka", os.path.join(tmp, "random pair_gram_1.h5"), "--k", "2", "--out",
                                            os.path.join(tmp, "x.json")], ["two archives"]),
    ]
    for label, job, args, want in cases:
        p = run(job, args, check_rc=False)
        check(f"bad input: {label}", one_line_error(p, want) and not os.path.exists(x)
              and not os.path.exists(os.path.join(tmp, "x.json")), f"(exit {p.returncode}: {p.stderr.strip()})")
    p = run("similarity", ["--archive", incomplete, "--out", x], np_=2, check_rc=False)
    check("bad input on 2 ranks: exit 2, the message once", p.returncode == 2 and p.stderr.count("incomplete archive") == 1,
          f"(exit {p.returncode})")

print(f"largest differences: NumPy vs crash-hpc {worst['numpy']:.1e}, ranks vs 1 rank {worst['ranks']:.1e}")
for label, secs in timings:
    if label.startswith("random ") and "pair" not in label or label.startswith("collected pooled"):
        print(f"  time: similarity {label}: {secs:.2f} s")
print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
sys.exit(0 if all(results) else 1)
