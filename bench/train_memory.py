#!/usr/bin/env python3
"""Peak RSS per rank and step time of `train` with --recompute none, selective and full, in one run
(with --distributed-optimizer: the replicated vs the distributed optimizer; with --distill: the
distillation teacher's memory on 1 rank and on TP ranks).

The model: OPT-1.3B's shape (examples/models/opt-1.3b/config.json: d 2048, 32 heads, ffn 8192,
vocabulary 50272, residual dropout 0.1) cut to --layers decoder layers (default 4 of 24, to fit
the time), random fp32 weights written by build/bench/make_random_checkpoint (no PyPI), with an
emulator plan in which every decoder layer trains (embedding and tied head frozen, as in CRaSh's
adapter training), so the activations, which recomputation drops, are a large part of the peak.
Each run is a child process (`mpirun -np N` with --pp N when --ranks > 1); every rank logs its
own peak RSS (getrusage) at the end. Step time: the median of steps 2.. of train_log.jsonl.
Ratios are against --recompute none measured in the same run; the machine's float32 GEMM rate
(bench_gemm, LibTorch as crash-hpc links it) is measured in the run too, and each mode's rate on
the FLOPs of a step without recomputation is printed as a fraction of it. With --distributed-optimizer it compares instead the replicated AdamW with the distributed
optimizer (ZeRO-1) on --ranks data-parallel ranks (default 2), both with --recompute none: every
rank's optimiser state bytes and peak RSS, and their ratios distributed / replicated (expected
about 1/DP for the optimiser state). Not part of CI:
  python3 bench/train_memory.py [--layers 4] [--batch 4] [--seq 256] [--steps 3] [--threads 2] [--ranks 1]
  python3 bench/train_memory.py --distributed-optimizer [--ranks 2] [--layers 2] [--seq 128]
"""
import json
import os
import random
import re
import statistics
import subprocess
import tempfile

from common import ROOT, arguments, layer_flops, head_flops, write_tokens

MODES = ["none", "selective", "full"]


def make_model(maker, path, layers):
    with open(os.path.join(ROOT, "examples", "models", "opt-1.3b", "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = layers
    cfg["torch_dtype"] = "float32"
    have = os.path.join(path, "config.json")
    if not (os.path.exists(have) and json.load(open(have)) == cfg):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cfg_path = path + ".config.json"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        subprocess.run([maker, "--config", cfg_path, "--out", path, "--dtype", "float32"], check=True)
    plan = {"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt-1.3b-shape",
            "full_layers": layers, "adapters": [layers // 2, layers - layers // 2],
            "slots": [{"source": l, "train": True, "stored_as": l} for l in range(layers)]}
    with open(os.path.join(path, "crash_plan.json"), "w") as f:
        json.dump(plan, f)
    return cfg


def train(a, model, data, out, mode, extra=(), data_parallel=False, ranks=None, grid=None):
    """One training run; `grid` (options such as --tp 2) replaces the default layout of `ranks` ranks
    (pipeline stages, or data-parallel)."""
    ranks = a.ranks if ranks is None else ranks
    cmd = [a.binary, "train", "--model", model, "--data", data, "--out", out, "--steps", str(a.steps),
           "--batch-size", str(a.batch), "--lr", "1e-4", "--threads", str(a.threads), "--log-level", "info",
           "--recompute", mode] + list(extra)
    if ranks > 1:
        layout = list(grid) if grid is not None else [] if data_parallel else ["--pp", str(ranks)]
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)] + cmd + (
            layout) + ["--log-all-ranks"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    rss = {int(r): int(k) / 1024.0 for k, r in re.findall(r"peak RSS: (\d+) KiB on rank (\d+)", p.stdout + p.stderr)}
    if len(rss) != ranks:
        raise SystemExit(f"{mode}: expected a peak RSS line from each of {ranks} ranks:\n{p.stderr[-2000:]}")
    state = {int(r): int(b) for b, r in re.findall(r"optimizer state: (\d+) bytes on rank (\d+)", p.stdout + p.stderr)}
    steps = [json.loads(l) for l in open(os.path.join(out, "train_log.jsonl"))]
    seconds = [j["seconds"] for j in steps if "seconds" in j]
    return rss, statistics.median(seconds[1:] if len(seconds) > 1 else seconds), steps[-1]["loss"], state


def gemm_rate(a):
    p = subprocess.run([a.gemm, "--threads", str(a.threads), "--rows", str(a.batch * a.seq), "--dtypes", "float32",
                        "--repeats", "3"], check=True, capture_output=True, text=True)
    j = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
    rates = {k: v for k, v in j["rates"]["float32"].items() if isinstance(v, float)}
    return max(rates.values()), rates


def main():
    ap = arguments(batch=4, seq=256, model="/tmp/crash-bench/opt-1.3b-shape-random-fp32", binary="crash-hpc",
                   two_sides=False)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=None,
                    help="ranks, as pipeline stages (--pp N; default 1), or data-parallel with --distributed-optimizer "
                         "(default 2)")
    ap.add_argument("--distributed-optimizer", action="store_true",
                    help="compare the replicated optimiser with the distributed one on --ranks DP ranks")
    ap.add_argument("--distill", action="store_true",
                    help="peak RSS per rank of training with --distill-from a teacher of twice the layers: the student "
                         "alone and with the teacher on 1 rank, and with the teacher on --ranks (2) TP ranks")
    ap.add_argument("--maker", default=os.path.join(ROOT, "build", "bench", "make_random_checkpoint"))
    ap.add_argument("--gemm", default=os.path.join(ROOT, "build", "bench", "bench_gemm"))
    a = ap.parse_args()
    if a.ranks is None:
        a.ranks = 2 if a.distributed_optimizer or a.distill else 1
    model = f"{a.model}-{a.layers}l"
    cfg = make_model(a.maker, model, a.layers)
    d, ffn, vocab = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    rnd = random.Random(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        write_tokens(data, ([rnd.randrange(4, vocab) for _ in range(a.seq)] for _ in range(a.batch * a.steps)))
        if a.distill:
            teacher = f"{a.model}-{2 * a.layers}l"
            make_model(a.maker, teacher, 2 * a.layers)
            kd = ["--distill-from", teacher]
            runs = [("student alone, 1 rank", 1, [], None), ("with the teacher, 1 rank", 1, kd, None),
                    (f"with the teacher, TP{a.ranks}", a.ranks, kd, ["--tp", str(a.ranks)])]
            for name, n, extra, grid in runs:
                results[name] = train(a, model, data, os.path.join(tmp, str(len(results))), "none", extra, ranks=n,
                                      grid=grid)
        elif a.distributed_optimizer:
            for name, extra in [("replicated", []), ("distributed", ["--distributed-optimizer"])]:
                results[name] = train(a, model, data, os.path.join(tmp, name), "none", extra, data_parallel=True)
        else:
            for mode in MODES:
                results[mode] = train(a, model, data, os.path.join(tmp, mode), mode)
    best, rates = gemm_rate(a)
    # A step's FLOPs without recomputation: the layers forward and backward (3x), the frozen head
    # forward and its gradient into the last hidden state (2x).
    flops = 3 * a.layers * layer_flops([a.seq] * a.batch, d, ffn) + 2 * head_flops(a.batch * a.seq, d, vocab)
    if a.distributed_optimizer:
        return report_distributed(a, cfg, results, flops, best, rates)
    if a.distill:
        return report_distill(a, cfg, results, best, rates)
    print(f"OPT-1.3B shape cut to {a.layers} layers (d {d}, ffn {ffn}, {cfg['num_attention_heads']} heads, "
          f"dropout {cfg['dropout']}), random fp32 weights, every layer trains (embedding and tied head frozen); "
          f"batch {a.batch} x {a.seq} tokens, {a.steps} steps, {a.threads} threads a rank, {a.ranks} rank(s)"
          f"{' as pipeline stages' if a.ranks > 1 else ''}, CPU")
    print_gemm_line(a, rates, best)
    print(f"a step's FLOPs without recomputation: {flops / 1e12:.3f} TFLOP")
    base_rss, base_time, base_loss, _ = results["none"]
    for mode in MODES:
        rss, sec, loss, _ = results[mode]
        g = flops / sec / 1e9
        per_rank = ", ".join(f"rank {r} {v:8.1f} MiB ({v / base_rss[r]:.3f})" for r, v in sorted(rss.items()))
        print(f"  --recompute {mode:9s} peak RSS {per_rank}; step {sec:7.2f} s ({sec / base_time:.3f} of none), "
              f"{g:6.1f} GFLOP/s = {g / best:.2f} of GEMM; last loss {loss:.6f}"
              f"{'' if loss == base_loss else ' (DIFFERS from none)'}")


def print_gemm_line(a, rates, best):
    print(f"GEMM rate in this run (bench_gemm, [{a.batch * a.seq} x K] x [K x N], float32): " +
          ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + f" GFLOP/s; machine rate {best:.1f} GFLOP/s")


def report_distributed(a, cfg, results, flops, best, rates):
    print(f"OPT-1.3B shape cut to {a.layers} layers (d {cfg['hidden_size']}, ffn {cfg['ffn_dim']}, "
          f"{cfg['num_attention_heads']} heads), random fp32 weights, every layer trains (embedding and tied head "
          f"frozen); batch {a.batch} x {a.seq} tokens, {a.steps} steps, {a.threads} threads a rank, {a.ranks} "
          f"data-parallel ranks, --recompute none, CPU")
    print_gemm_line(a, rates, best)
    print(f"a step's FLOPs (the global batch): {flops / 1e12:.3f} TFLOP")
    base_rss, base_time, base_loss, base_state = results["replicated"]
    for name in ["replicated", "distributed"]:
        rss, sec, loss, state = results[name]
        if sorted(state) != list(range(a.ranks)):
            raise SystemExit(f"{name}: expected an optimizer state line from each of {a.ranks} ranks")
        g = flops / sec / 1e9
        print(f"  {name:11s} optimizer state " + ", ".join(
            f"rank {r} {v / 2**20:8.1f} MiB ({v / base_state[r]:.3f})" for r, v in sorted(state.items())))
        print(f"  {'':11s} peak RSS        " + ", ".join(
            f"rank {r} {v:8.1f} MiB ({v / base_rss[r]:.3f})" for r, v in sorted(rss.items())))
        print(f"  {'':11s} step {sec:7.2f} s ({sec / base_time:.3f} of replicated), {g:6.1f} GFLOP/s = "
              f"{g / best:.2f} of GEMM; last loss {loss:.6f}"
              f"{'' if abs(loss - base_loss) <= 1e-6 * max(1.0, abs(base_loss)) else ' (DIFFERS from replicated)'}")


def report_distill(a, cfg, results, best, rates):
    print(f"OPT-1.3B shape (d {cfg['hidden_size']}, ffn {cfg['ffn_dim']}, vocabulary {cfg['vocab_size']}), random "
          f"fp32 weights: a student of {a.layers} layers, every layer training, and a teacher of {2 * a.layers} "
          f"layers (--distill-from); batch {a.batch} x {a.seq} tokens, {a.steps} steps, {a.threads} threads a rank, CPU")
    print_gemm_line(a, rates, best)
    alone = max(results["student alone, 1 rank"][0].values())
    for name, (rss, sec, loss, _) in results.items():
        print(f"  {name:26s} peak RSS " + ", ".join(f"rank {r} {v:8.1f} MiB" for r, v in sorted(rss.items())) +
              f" (largest {max(rss.values()) / alone:.3f} of the student alone); step {sec:6.2f} s; "
              f"last loss {loss:.6f}")


if __name__ == "__main__":
    main()
