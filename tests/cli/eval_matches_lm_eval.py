#!/usr/bin/env python3
"""`crash-hpc eval` against lm-eval's own results on two fixtures: tests/fixtures/eval/ (an OPT with the
OPT tokenizer, which has a BOS; expected.json made by generate.py with lm-eval's HFLM) and
tests/fixtures/eval/qwen2/ (a Qwen2: q/k/v biases, tied head, Qwen2's tokenizer, no BOS, so lm-eval
conditions an empty context on EOS; made by generate_qwen2.py; mc, gen and lm only).

usage: eval_matches_lm_eval.py CRASH_HPC FIXTURES [NP TP PP]
Prepares each fixture's tasks, runs eval on NP ranks (mpirun when NP > 1) with --tp/--pp, and checks
against lm-eval:
  mc     every choice's log-likelihood within 1e-4, the predictions and acc/acc_norm (and stderr) equal
  webqs  (lm-eval's own webqs task: several gold aliases) every choice's log-likelihood within 1e-4,
         every choice's is_greedy equal, each example's exact_match equal, exact_match (and stderr)
         the only metric, equal
  race   (lm-eval's own race task: one article a document) every choice's log-likelihood within 1e-4,
         each example's acc equal, acc (and stderr) equal
and against HF directly: every generation and exact_match equal (greedy decoding, lm-eval's
generate_until settings), perplexity of prepare's windows within 1e-6 relative.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

TOL_LL = 1e-4


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r


FIXTURE = ""  # the fixture being checked, named in failures


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL ({FIXTURE}): {what}")


def check_fixture(crash, here, np_, tp, pp):
    """Prepares and evaluates one fixture folder's tasks (those its expected.json holds) with its
    model/, checks them against expected.json; returns the largest log-likelihood difference."""
    model = os.path.join(here, "model")
    with open(os.path.join(here, "expected.json")) as f:
        exp = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        names = [n for n in ("mc", "gen", "lm", "webqs", "race") if n in exp]
        for name in names:
            run([crash, "prepare", "--task", os.path.join(here, f"{name}.jsonl"), "--tokenizer", model, "--out",
                 os.path.join(tmp, name), "--window", str(exp["window"])])
        out, details = os.path.join(tmp, "results.json"), os.path.join(tmp, "details.jsonl")
        data = [x for name in names for x in ("--data", os.path.join(tmp, name))]
        cmd = [crash, "eval", "--model", model] + data + ["--out", out, "--details", details, "--batch-size", "3",
               "--max-new-tokens", str(exp["max_new_tokens"]), "--tp", str(tp), "--pp", str(pp), "--threads", "1"]
        if np_ > 1:
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1",
                   "-np", str(np_)] + cmd
        r = run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
        check("|mc " in r.stdout and "acc_norm" in r.stdout, f"no results table on stdout:\n{r.stdout}")
        with open(out) as f:
            res = {t["task"]: t for t in json.load(f)["results"]}
        with open(details) as f:
            det = [json.loads(line) for line in f]

    # Multiple choice.
    mc = [d for d in det if d["task"] == "mc"]
    check(len(mc) == len(exp["mc"]["logliks"]), "one detail line per multiple-choice example")
    worst = 0.0
    for d, ll, p, pn in zip(mc, exp["mc"]["logliks"], exp["mc"]["pred"], exp["mc"]["pred_norm"]):
        check(len(d["logliks"]) == len(ll), f"example {d['index']}: number of choices")
        worst = max(worst, max(abs(a - b) for a, b in zip(d["logliks"], ll)))
        check(d["pred"] == p and d["pred_norm"] == pn, f"example {d['index']}: predictions {d} vs {p}, {pn}")
    check(worst <= TOL_LL, f"log-likelihoods differ from lm-eval's by {worst:.3g} (> {TOL_LL})")
    m = res["mc"]["metrics"]
    for k in ("acc", "acc_norm"):
        check(abs(m[k]["value"] - exp["mc"][k]) < 1e-12, f"{k} {m[k]['value']} vs lm-eval {exp['mc'][k]}")
        check(abs(m[k]["stderr"] - exp["mc"][k + "_stderr"]) < 1e-12, f"{k} stderr")
    check(res["mc"]["kind"] == "multiple_choice" and res["mc"]["num_examples"] == len(mc), "mc kind and count")

    # lm-eval's own tasks: per choice log-likelihood, per example score, the metrics it reports.
    for name, score in (("webqs", "exact_match"), ("race", "acc")):
        if name not in exp:
            continue
        e = exp[name]
        rows = [d for d in det if d["task"] == name]
        check(len(rows) == len(e["logliks"]), f"{name}: one detail line per document")
        for d, ll, sc in zip(rows, e["logliks"], e["scores"]):
            check(len(d["logliks"]) == len(ll), f"{name} example {d['index']}: number of choices")
            diff = max(abs(a - b) for a, b in zip(d["logliks"], ll))
            check(diff <= TOL_LL, f"{name} example {d['index']}: log-likelihoods differ from lm-eval's by {diff:.3g}")
            worst = max(worst, diff)
            check(d[score] == sc[score], f"{name} example {d['index']}: {score} {d[score]} vs lm-eval {sc[score]}")
        if name == "webqs":
            for d, g in zip(rows, e["greedy"]):
                check(d["greedy"] == g, f"webqs example {d['index']}: is_greedy {d['greedy']} vs lm-eval {g}")
        m = res[name]["metrics"]
        check(sorted(m) == e["metrics"] if name == "webqs" else score in m, f"{name}: metrics {sorted(m)}")
        check(abs(m[score]["value"] - e[score]) < 1e-12, f"{name}: {score} {m[score]['value']} vs lm-eval {e[score]}")
        check(abs(m[score]["stderr"] - e[score + "_stderr"]) < 1e-12, f"{name}: {score} stderr")
        check(res[name]["kind"] == "multiple_choice" and res[name]["num_examples"] == len(rows), f"{name} kind, count")

    # Generation.
    gen = [d for d in det if d["task"] == "gen"]
    for d, g, e in zip(gen, exp["gen"]["generations"], exp["gen"]["exact_match_per_example"]):
        check(d["generation"] == g, f"example {d['index']}: generation {d['generation']!r} vs lm-eval {g!r}")
        check(d["exact_match"] == e, f"example {d['index']}: exact_match {d['exact_match']} vs {e}")
    check(len(gen) == len(exp["gen"]["generations"]), "one detail line per generation example")
    g = res["gen"]["metrics"]["exact_match"]
    check(abs(g["value"] - exp["gen"]["exact_match"]) < 1e-12, "exact_match")
    check(abs(g["stderr"] - exp["gen"]["exact_match_stderr"]) < 1e-12, "exact_match stderr")

    # Perplexity.
    lm = [d for d in det if d["task"] == "lm"]
    check([d["tokens"] for d in lm] == exp["lm"]["tokens_per_window"], "scored tokens per window")
    for d, n in zip(lm, exp["lm"]["nll_per_window"]):
        check(abs(d["nll"] - n) <= TOL_LL, f"window {d['index']}: nll {d['nll']} vs {n}")
    for k in ("nll", "perplexity", "bits_per_token"):
        v = res["lm"]["metrics"][k]["value"]
        check(math.isclose(v, exp["lm"][k], rel_tol=1e-6), f"{k} {v} vs {exp['lm'][k]}")
    return worst


def main():
    crash, fixtures = sys.argv[1], sys.argv[2]
    np_, tp, pp = (int(x) for x in sys.argv[3:6]) if len(sys.argv) > 3 else (1, 1, 1)
    # OPT (the OPT tokenizer, BOS) and Qwen2 (q/k/v biases, tied head, no BOS; fixtures/eval/qwen2).
    global FIXTURE
    for FIXTURE, here in (("opt", os.path.join(fixtures, "eval")), ("qwen2", os.path.join(fixtures, "eval", "qwen2"))):
        worst = check_fixture(crash, here, np_, tp, pp)
        print(f"ok: {FIXTURE}, np {np_} tp {tp} pp {pp}; largest log-likelihood difference vs lm-eval {worst:.3g}")


if __name__ == "__main__":
    main()
