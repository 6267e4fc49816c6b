#!/usr/bin/env python3
"""`crash-hpc decompose` (SFSD) against a NumPy fp64 reference, and its bad inputs.

usage: sfsd_numpy.py CRASH_HPC FIXTURES [NP TP PP]
Prepares the eval fixture's multiple-choice task, decomposes the fixture model (OPT, pre-LN) with
--ratio 0.25 in float64 and recomputes, for layer 0's q/k/v projections (whose inputs NumPy gets
from the embeddings and the first layer norm), the output mean and covariance over the
calibration tokens, the top-r eigenvectors and the factors: B A = P W, B B^T = P and
b' = P b + (I - P) mu (P = V_r V_r^T: independent of the eigenvectors' signs) within 1e-8.
The same --ratio run and checks on two new families: the eval fixture's Qwen2 (q/k/v biases, tied
head) on its own task and qwen3_kv1 (q/k norms, head_dim != hidden / heads, one KV head) on random
tokens, within 1e-6 (their RMSNorm rounds the inputs to float32) and B^T B = I, B A = B B^T W within
1e-12; tensors that are not factored are kept bit for bit.
Checks sfsd_ranks.json and sfsd_report.json, --budget's and the budget candidates' ranks
(int(b in out / (in + out))), and that bad inputs exit 2. With NP > 1 the run is
on NP ranks (mpirun) with --tp/--pp and must give the same factors.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402

TOL = 1e-8
# RMSNorm computes in float32 whatever the dtype (as HF's does), so NumPy's inputs of an RMSNorm family's
# layer agree with the job's only to float32 rounding (its order of summation is torch's): the factors
# are then compared within TOL_RMS, and their algebra (B^T B = I, B A = B B^T W) within TOL_ALGEBRA.
TOL_RMS = 1e-6
TOL_ALGEBRA = 1e-12
TOKENS = 16


def run(cmd, expect=0, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != expect:
        sys.exit(f"command exited {r.returncode}, expected {expect}: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def load_safetensors(path):
    return {name: t.astype(np.float64) for name, t in read_safetensors(path).items()}


def prepared_tokens(folder):
    shards = sorted(f for f in os.listdir(folder) if f.startswith("shard-"))
    out = []
    for s in shards:
        with open(os.path.join(folder, s)) as f:
            out += [json.loads(line)["tokens"] for line in f if line.strip()]
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    # In float32 whatever the model's dtype, as HF's (and crash-hpc's) RMSNorm, then times the weight.
    xf = x.astype(np.float32)
    var = (xf * xf).mean(-1, keepdims=True, dtype=np.float32)
    r = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    return (xf * r).astype(np.float64) * w


def layer0_inputs(cfg, w0, seqs):
    """Layer 0's attention input for each sequence, concatenated: OPT's embeddings (+ learned
    positions, offset 2) through its first layer norm; the LLaMA-style families' embeddings
    through input_layernorm (RMSNorm; their positions enter inside attention)."""
    x = []
    for t in seqs:
        if cfg["model_type"] == "opt":
            pre = "model.decoder."
            h = w0[pre + "embed_tokens.weight"][t] + w0[pre + "embed_positions.weight"][np.arange(len(t)) + 2]
            x.append(layer_norm(h, w0[pre + "layers.0.self_attn_layer_norm.weight"],
                                w0[pre + "layers.0.self_attn_layer_norm.bias"], 1e-5))
        else:
            x.append(rms_norm(w0["model.embed_tokens.weight"][t], w0["model.layers.0.input_layernorm.weight"],
                              cfg["rms_norm_eps"]))
    return np.concatenate(x)


def mpi(np_, cmd):
    if np_ == 1:
        return cmd
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1",
            "-np", str(np_)] + cmd


def check_factors(crash, model, data, out, grid, env):
    """decompose --ratio 0.25 in float64 on NP ranks; layer 0's q/k/v factors against NumPy, every
    tensor that is not factored (norms, embeddings, Qwen3's q/k norms) copied bit for bit.
    Returns the largest relative difference, the ranks, the report."""
    np_, tp, pp = grid
    run(mpi(np_, [crash, "decompose", "--model", model, "--data", data, "--out", out, "--ratio", "0.25", "--tokens",
                  str(TOKENS), "--batch-size", "3", "--dtype", "float64", "--threads", "1", "--eval-data", data,
                  "--tp", str(tp), "--pp", str(pp)]), env=env)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    w0 = load_safetensors(os.path.join(model, "model.safetensors"))
    w1 = load_safetensors(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "sfsd_ranks.json")) as f:
        ranks = json.load(f)
    with open(os.path.join(out, "sfsd_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        out_cfg = json.load(f)
    seqs = [t[:TOKENS] for t in prepared_tokens(data)]
    x = layer0_inputs(cfg, w0, seqs)
    check(abs(report["calibration_tokens"] - len(x)) == 0, f"calibration tokens {report['calibration_tokens']} vs {len(x)}")
    kept = [n for n in w1 if ".factor_" not in n]
    check(kept and all(n in w0 and np.array_equal(w0[n], w1[n]) for n in kept),
          f"{cfg['model_type']}: tensors that are not factored kept as they were")

    worst = 0.0
    pre = "model.decoder." if cfg["model_type"] == "opt" else "model."
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = pre + "layers.0.self_attn." + proj
        W = w0[name + ".weight"]
        b = w0.get(name + ".bias", np.zeros(W.shape[0]))
        r = ranks[name]["rank"]
        check(r == int(np.ceil(0.25 * min(W.shape))), f"{name}: rank {r}")
        check(out_cfg["crash_sfsd_ranks"][name] == r, f"{name}: config.json rank")
        check(name + ".weight" not in w1, f"{name}: dense weight still saved")
        y = x @ W.T + b
        mu = y.mean(0)
        C = (y - mu).T @ (y - mu) / len(y)
        evals, evecs = np.linalg.eigh(C)
        V = evecs[:, ::-1][:, :r]
        P = V @ V.T
        A, B, bias = w1[name + ".factor_a.weight"], w1[name + ".factor_b.weight"], w1[name + ".factor_b.bias"]
        check(A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r), f"{name}: factor shapes")
        scale = max(1.0, np.abs(W).max(), np.abs(mu).max())
        errs = [np.abs(B @ A - P @ W).max(), np.abs(B @ B.T - P).max(),
                np.abs(bias - (P @ b + (np.eye(len(P)) - P) @ mu)).max()]
        worst = max(worst, max(errs) / scale)
        # The factored layer's outputs: the projection of the originals, the rest at their mean.
        y1 = x @ A.T @ B.T + bias
        worst = max(worst, np.abs(y1 - (mu + (y - mu) @ P)).max() / scale)
        algebra = max(np.abs(B.T @ B - np.eye(r)).max(), np.abs(B @ A - B @ B.T @ W).max() / scale)
        check(algebra <= TOL_ALGEBRA, f"{name}: B^T B = I, B A = B B^T W within {algebra:.3g} (> {TOL_ALGEBRA})")
    tol = TOL if cfg["model_type"] == "opt" else TOL_RMS
    check(worst <= tol, f"{cfg['model_type']}: factors differ from the NumPy reference by {worst:.3g} (> {tol})")
    total = sum(m["params_before"] - m["params_after"] for m in ranks.values())
    check(report["decoder_params_before"] - report["decoder_params_after"] == total, "report parameter counts")
    check(report["flops_per_token_after"] < report["flops_per_token_before"], "fewer FLOPs per token")
    check(len(report["metrics_before"]) == 1 and len(report["metrics_after"]) == 1, "metrics before and after")
    return worst, ranks, report


def write_mc(folder, n, seed, vocab):
    """A multiple-choice task in prepare's format with random token ids (for a fixture model
    without a tokenizer)."""
    rnd = random.Random(seed)
    os.makedirs(folder)
    with open(os.path.join(folder, "shard-00000.jsonl"), "w") as f:
        for i in range(n):
            ctx = [rnd.randrange(3, vocab) for _ in range(rnd.randrange(6, 20))]
            conts = [[rnd.randrange(3, vocab) for _ in range(rnd.randrange(1, 4))] for _ in range(3)]
            gold = rnd.randrange(3)
            f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": ctx + conts[gold], "context": ctx,
                                "continuations": conts, "gold": gold,
                                "choice_chars": [len(c) * 3 for c in conts]}) + "\n")
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"kind": "multiple_choice", "task": "synthetic", "shards": ["shard-00000.jsonl"]}, f)
    return folder


def main():
    crash, fixtures = sys.argv[1], sys.argv[2]
    np_, tp, pp = (int(x) for x in sys.argv[3:6]) if len(sys.argv) > 3 else (1, 1, 1)
    model = os.path.join(fixtures, "eval", "model")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        # New families: Qwen2 (q/k/v biases split with their columns, tied head; the eval fixture's
        # Qwen2 on its own multiple-choice task) and Qwen3 (q/k norms, head_dim 24 != 72 / 4, one KV
        # head, replicated under TP; random tokens).
        qwen2 = os.path.join(fixtures, "eval", "qwen2", "model")
        q2data = os.path.join(tmp, "mc_qwen2")
        run([crash, "prepare", "--task", os.path.join(fixtures, "eval", "qwen2", "mc.jsonl"), "--tokenizer", qwen2,
             "--out", q2data])
        qwen3 = os.path.join(fixtures, "models", "qwen3_kv1")
        q3data = write_mc(os.path.join(tmp, "mc_qwen3"), 12, 3, 128)
        family_worst = {}
        for name, m, d in (("qwen2", qwen2, q2data), ("qwen3", qwen3, q3data)):
            family_worst[name], _, _ = check_factors(crash, m, d, os.path.join(tmp, "factored_" + name),
                                                     (np_, tp, pp), env)

        data = os.path.join(tmp, "mc")
        run([crash, "prepare", "--task", os.path.join(fixtures, "eval", "mc.jsonl"), "--tokenizer", model, "--out", data])
        out = os.path.join(tmp, "factored")
        worst, ranks, report = check_factors(crash, model, data, out, (np_, tp, pp), env)

        # Greedy search, validated on the task itself. Tolerance 1 accepts everything: every module
        # takes its smallest candidate that saves parameters. Tolerance 0: the result keeps the
        # reference accuracy, and is the last plan the search accepted.
        cands = [0.1, 0.25, 0.5]
        for tol in (1.0, 0.0):
            g = os.path.join(tmp, f"greedy_{tol}")
            cmd = [crash, "decompose", "--model", model, "--data", data, "--out", g, "--search", "greedy",
                   "--val-data", data, "--tolerance", str(tol), "--candidates", ",".join(map(str, cands)),
                   "--tokens", str(TOKENS), "--eval-data", data, "--threads", "1", "--tp", str(tp), "--pp", str(pp)]
            if np_ > 1:
                cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x",
                       "OMP_NUM_THREADS=1", "-np", str(np_)] + cmd
            run(cmd, env=env)
            with open(os.path.join(g, "sfsd_report.json")) as f:
                rep = json.load(f)
            with open(os.path.join(g, "config.json")) as f:
                got = json.load(f)["crash_sfsd_ranks"]
            if tol == 1.0:
                want = {}
                for name, m in ranks.items():
                    for c in cands:
                        r = int(np.ceil(c * min(m["in"], m["out"]) - 1e-9))
                        if r * (m["in"] + m["out"]) < m["in"] * m["out"]:
                            want[name] = r
                            break
                check(got == want, f"greedy, tolerance 1: ranks {got} vs {want}")
                check(all(s["accepted"] for s in rep["search"]), "greedy, tolerance 1: every trial accepted")
            else:
                acc0 = rep["metrics_before"][0]["metrics"]["acc"]["value"]
                acc1 = rep["metrics_after"][0]["metrics"]["acc"]["value"]
                check(acc1 >= acc0 - 1e-12, f"greedy, tolerance 0: accuracy {acc1} < reference {acc0}")
                accepted = [s for s in rep["search"] if s["accepted"]]
                check(not accepted or accepted[-1]["ranks"] == got, "greedy: result is the last accepted plan")
                check(all(s["metric"] >= acc0 - 1e-12 for s in accepted), "greedy: accepted plans keep the metric")

        # --budget B keeps int(B in out / (in + out)) directions (modules that would not save stay
        # dense); the greedy search with --candidate-unit budget tries those ranks, so tolerance 1
        # takes each module's smallest.
        def budget_rank(m, b):
            return max(1, int(m["in"] * m["out"] / (m["in"] + m["out"]) * b))

        def saves(m, r):
            return r * (m["in"] + m["out"]) < m["in"] * m["out"]

        for args, want_of in [
            (["--budget", "0.6"], lambda m: budget_rank(m, 0.6)),
            (["--search", "greedy", "--val-data", data, "--tolerance", "1", "--candidate-unit", "budget",
              "--candidates", "0.7,0.3"], lambda m: budget_rank(m, 0.3)),
        ]:
            g = os.path.join(tmp, "budget_" + args[1])
            cmd = [crash, "decompose", "--model", model, "--data", data, "--out", g, "--tokens", str(TOKENS),
                   "--threads", "1", "--tp", str(tp), "--pp", str(pp)] + args
            if np_ > 1:
                cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x",
                       "OMP_NUM_THREADS=1", "-np", str(np_)] + cmd
            run(cmd, env=env)
            with open(os.path.join(g, "config.json")) as f:
                got = json.load(f)["crash_sfsd_ranks"]
            with open(os.path.join(g, "sfsd_report.json")) as f:
                rep = json.load(f)
            want = {n: want_of(m) for n, m in ranks.items() if saves(m, want_of(m))}
            check(want and got == want, f"{args}: ranks {got} vs {want}")
            if args[0] == "--budget":
                check(rep["method"] == "budget" and rep["budget"] == 0.6 and rep["ratio"] is None, "budget report")
            else:
                check(rep["candidate_unit"] == "budget", "greedy report: candidate unit")

        # Bad inputs: exit 2 with one line naming the problem.
        base = [crash, "decompose", "--model", model, "--data", data, "--threads", "1"]
        for args, words in [
            (["--out", os.path.join(tmp, "x"), "--ratio", "0"], "--ratio"),
            (["--out", os.path.join(tmp, "x"), "--ratio", "1.5"], "--ratio"),
            (["--out", os.path.join(tmp, "x")], "--ratio"),
            (["--out", os.path.join(tmp, "x"), "--ratio", "0.5", "--search", "greedy"], "exclude"),
            (["--out", os.path.join(tmp, "x"), "--ratio", "0.5", "--budget", "0.5"], "exclude"),
            (["--out", os.path.join(tmp, "x"), "--budget", "0.5", "--search", "greedy"], "exclude"),
            (["--out", os.path.join(tmp, "x"), "--budget", "0"], "--budget"),
            (["--out", os.path.join(tmp, "x"), "--budget", "1.5"], "--budget"),
            (["--out", os.path.join(tmp, "x"), "--search", "greedy", "--val-data", data, "--candidate-unit", "rank"],
             "--candidate-unit"),
            (["--out", os.path.join(tmp, "x"), "--search", "beam"], "--search"),
            (["--out", os.path.join(tmp, "x"), "--search", "greedy"], "--val-data"),
            (["--out", os.path.join(tmp, "x"), "--search", "greedy", "--val-data", data, "--candidates", "0.5,2"],
             "--candidates"),
            (["--out", out, "--ratio", "0.5"], "exists"),
            (["--out", os.path.join(tmp, "x"), "--ratio", "0.5", "--data", os.path.join(tmp, "missing")], "missing"),
            (["--out", os.path.join(tmp, "x"), "--ratio", "0.5", "--num-examples", "0"], "--num-examples"),
        ]:
            r = run(base + args, expect=2)
            check(words in r.stderr, f"{args}: '{words}' not in: {r.stderr}")
        # A factored model is not decomposed again.
        r = run([crash, "decompose", "--model", out, "--data", data, "--out", os.path.join(tmp, "x"), "--ratio", "0.5"],
                expect=2)
        check("already factored" in r.stderr, f"refactoring: {r.stderr}")
    print(f"ok: SFSD factors match NumPy within {worst:.2g} (np {np_}, tp {tp}, pp {pp}); "
          + ", ".join(f"{k} within {v:.2g}" for k, v in family_worst.items()))


if __name__ == "__main__":
    main()
