#!/usr/bin/env python3
"""The importance job end to end, checked in NumPy (fp64) from the archives' own hidden states:
- Block Influence, the angular distance of every block (l, n) and 1 - adjacent CKA, from a
  token-level archive collected on a fixture model and the similarity job's output, equal NumPy
  within 1e-9 relative; 2 ranks (and small chunks) equal 1 rank within 1e-12;
- an archive pooled with "last" gives the same angular distances;
- OPT with project_out (h_L narrower): NaN where the widths differ;
- the file's datasets and attributes; --plot draws a PNG;
- bad input exits 2 with one clear line."""
import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

binary, fixtures = sys.argv[1], sys.argv[2]
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
    timings.append((f"{job} {np_} rank(s)", time.time() - start))
    return p


def one_line_error(p, want):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    return p.returncode == 2 and len(lines) == 1 and all(w in p.stderr for w in want)


def cos(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def numpy_scores(archive):
    """Block influence [L] and angular distance [L, L] ([l, n-1] = d(l, n)) in fp64."""
    with h5py.File(archive, "r") as f:
        h = [f[f"layers/{l}"][()].astype(np.float64) for l in range(len(f["layers"]))]
        index = f["index"][()] if "index" in f else None
    L = len(h) - 1
    last = index[1:] - 1 if index is not None else np.arange(len(h[0]))
    bi = np.full(L, np.nan)
    ang = np.full((L, L), np.nan)
    for l in range(L):
        if index is not None and h[l].shape[1] == h[l + 1].shape[1]:
            bi[l] = 1 - cos(h[l], h[l + 1]).mean()
        for n in range(1, L - l + 1):
            a, b = h[l][last], h[l + n][last]
            if a.shape[1] == b.shape[1]:
                ang[l, n - 1] = np.mean(np.arccos(np.clip(cos(a, b), -1, 1)) / np.pi)
    return bi, ang


def rel_diff(got, want):
    """Largest |got - want| / max(|want|, 1e-3) where both are numbers; inf if NaNs differ."""
    if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf")
    ok = ~np.isnan(want)
    return float(np.max(np.abs(got[ok] - want[ok]) / np.maximum(np.abs(want[ok]), 1e-3), initial=0.0))


def read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs), {k: dict(f[k].attrs) for k in f}


def importance(tmp, name, args, np_=1):
    out = os.path.join(tmp, f"importance_{name}.h5")
    run("importance", [*args, "--out", out, "--overwrite"], np_=np_)
    return (out, *read(out))


with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    data = os.path.join(tmp, "tokens.jsonl")
    with open(data, "w") as f:
        for _ in range(37):
            f.write(json.dumps({"tokens": rng.integers(3, 120, rng.integers(3, 22)).tolist()}) + "\n")
    llama = os.path.join(fixtures, "models", "llama_gqa")
    opt = os.path.join(fixtures, "models", "opt_postln_proj")
    archives = {}
    for name, model, pooling in (("tokens", llama, "none"), ("mean", llama, "mean"), ("last", llama, "last"),
                                 ("opt", opt, "none")):
        archives[name] = os.path.join(tmp, f"{name}.h5")
        run("collect", ["--model", model, "--data", data, "--out", archives[name], "--pooling", pooling,
                        "--num-examples", "37", "--block-size", "8"])
    cka_path = os.path.join(tmp, "cka.h5")
    run("similarity", ["--archive", archives["mean"], "--out", cka_path])
    with h5py.File(cka_path, "r") as f:
        cka = f["cka"][()]

    # 1. Every score on one rank against NumPy, then on 2 ranks (and with small chunks) against one rank.
    bi, ang = numpy_scores(archives["tokens"])
    L = len(bi)
    out1, one, attrs, dattrs = importance(tmp, "one", ["--archive", archives["tokens"], "--cka", cka_path,
                                                       "--model", llama, "--plot"])
    want_cka = np.array([1 - cka[l, l + 1] for l in range(L)])
    for key, want in (("block_influence", bi), ("angular_distance", ang), ("cka_importance", want_cka)):
        err = rel_diff(one.get(key, np.zeros(0)), want)
        worst["numpy"] = max(worst["numpy"], err)
        check(f"{key} equals NumPy fp64", err <= 1e-9, f"(shape {want.shape}, max rel diff {err:.1e})")
    check("angular distance: NaN exactly where l + n > L",
          all(np.isnan(one["angular_distance"][l, n - 1]) == (l + n > L) for l in range(L) for n in range(1, L + 1)))
    for np_, chunk in ((2, "8192"), (2, "20"), (1, "1")):
        _, many, _, _ = importance(tmp, f"ranks{np_}_{chunk}", ["--archive", archives["tokens"], "--cka", cka_path,
                                                                "--chunk-tokens", chunk], np_=np_)
        err = max(rel_diff(many[k], one[k]) for k in one)
        worst["ranks"] = max(worst["ranks"], err)
        check(f"{np_} rank(s), --chunk-tokens {chunk}: equals 1 rank", sorted(many) == sorted(one) and err <= 1e-12,
              f"(max rel diff {err:.1e})")

    # 2. The file: datasets and attributes another job reads.
    with h5py.File(archives["tokens"], "r") as f:
        tokens = int(f["index"][-1])
    check("file attributes",
          attrs["format"] == "crash-hpc importance 1"
          and json.loads(attrs["methods"]) == ["block_influence", "angular_distance", "cka_importance"]
          and attrs["num_layers"] == L == 4 and attrs["model"] == llama and attrs["model_type"] == "llama"
          and attrs["num_examples"] == 37 and attrs["archive"] == archives["tokens"]
          and "after the final norm" in attrs["last_hidden_state"] and "tool_version" in attrs
          and dattrs["block_influence"]["num_tokens"] == tokens and dattrs["block_influence"]["num_examples"] == 37
          and "last token" in dattrs["angular_distance"]["hidden_states"]
          and dattrs["cka_importance"]["cka_file"] == cka_path and dattrs["cka_importance"]["cka_pooling"] == "mean"
          and all(dattrs[k]["method"] == k and dattrs[k]["reference"] and dattrs[k]["prune"] for k in one),
          f"({sorted(attrs)}, {tokens} tokens)")
    try:
        import matplotlib  # noqa: F401
        png = out1[:-3] + ".png"
        check("--plot draws a PNG", os.path.exists(png) and os.path.getsize(png) > 10_000)
    except ImportError:
        print("skip --plot (no matplotlib)")

    # 3. Only some methods; an archive pooled with "last"; OPT's narrower h_L.
    _, only, attrs, _ = importance(tmp, "only_cka", ["--cka", cka_path, "--methods", "cka"])
    check("--methods cka alone", sorted(only) == ["cka_importance"] and json.loads(attrs["methods"]) == ["cka_importance"]
          and rel_diff(only["cka_importance"], want_cka) == 0)
    _, last, attrs, _ = importance(tmp, "last", ["--archive", archives["last"]], np_=2)
    err = rel_diff(last.get("angular_distance", np.zeros(0)), ang)
    check("archive pooled 'last': angular distance alone, equal to the token-level one",
          sorted(last) == ["angular_distance"] and err <= 1e-12, f"(max rel diff {err:.1e})")
    bi_o, ang_o = numpy_scores(archives["opt"])
    _, o, _, _ = importance(tmp, "opt", ["--archive", archives["opt"], "--methods", "block_influence,angular_distance"],
                            np_=2)
    err = max(rel_diff(o["block_influence"], bi_o), rel_diff(o["angular_distance"], ang_o))
    worst["numpy"] = max(worst["numpy"], err)
    Lo = len(bi_o)
    check("OPT project_out: equals NumPy, NaN where h_L is narrower", err <= 1e-9 and np.isnan(o["block_influence"][-1])
          and np.isnan(o["angular_distance"][np.arange(Lo), Lo - 1 - np.arange(Lo)]).all()
          and not np.isnan(o["block_influence"][:-1]).any(), f"(max rel diff {err:.1e})")

    # 4. Bad input: one line, exit 2.
    out = os.path.join(tmp, "bad.h5")
    cka_opt = os.path.join(tmp, "cka_opt.h5")
    run("similarity", ["--archive", archives["opt"], "--out", cka_opt])
    for label, args, want in (
            ("missing archive", ["--archive", os.path.join(tmp, "none.h5")], ["none.h5", "no such archive"]),
            ("archive of another model", ["--archive", archives["opt"], "--model", llama],
             ["archive of another model", "opt_postln_proj"]),
            ("CKA of another model", ["--archive", archives["tokens"], "--cka", cka_opt], ["CKA of another model"]),
            ("unknown method", ["--archive", archives["tokens"], "--methods", "block_influence,magic"],
             ["unknown method 'magic'"]),
            ("pooled archive for block influence", ["--archive", archives["mean"], "--methods", "block_influence"],
             ["needs every token", "--pooling none"]),
            ("cka without --cka", ["--archive", archives["tokens"], "--methods", "cka"], ["needs --cka"]),
            ("no input", [], ["nothing to score"]),
            ("output exists", ["--archive", archives["tokens"], "--out", out1], ["output exists"])):
        p = run("importance", (["--out", out] if "--out" not in args else []) + args, check_rc=False)
        check(f"bad input: {label}", one_line_error(p, want) and not os.path.exists(out),
              f"(rc {p.returncode}: {p.stderr.strip()})")
    p = run("importance", ["--archive", archives["opt"], "--model", llama, "--out", out], np_=2, check_rc=False)
    check("bad input on 2 ranks: exit 2, the message once",
          p.returncode == 2 and p.stderr.count("archive of another model") == 1,
          f"(rc {p.returncode}: {p.stderr.strip()})")

print(f"worst: NumPy {worst['numpy']:.1e} relative, ranks {worst['ranks']:.1e}")
print("times: " + ", ".join(f"{n} {s:.1f}s" for n, s in timings))
print(f"{sum(results)}/{len(results)} checks passed")
sys.exit(0 if results and all(results) else 1)
