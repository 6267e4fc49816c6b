"""Set-up the bench/*.py drivers share: the checkout's root, the random OPT-125m-shaped model, the
options every run takes, each side's process environment (allocator, threads), the versions and
libraries of both sides, the machine's GEMM rate measured in the run, and FLOP counts.

The drivers run as `python bench/X.py` from any folder: Python puts the script's own folder,
bench/, first on sys.path, so `from common import ...` finds this file. torch and transformers
are imported only where a function needs them (bench/sift_memory.py runs without PyPI), and the
reference side always runs in its own process (the driver's own imports do not count, and
LD_PRELOAD applies from its start).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))

# OPT-125m's shape, the model every script that compares throughput runs.
OPT_125M_SHAPE = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "ffn_dim": 3072, "max_position_embeddings": 2048, "word_embed_proj_dim": 768}

ALLOCATORS = ("tcmalloc", "glibc")
# What the drivers run; the *-glibc / *_glibc twins are the same programs without tcmalloc.
TARGETS = "crash-hpc bench_forward bench_archive bench_gemm crash-hpc-glibc bench_forward_glibc bench_gemm_glibc"


def make_model(path, dropout=0.0):
    """A random OPT-125m-shaped model written by transformers (seed 0) to `path`, once. `dropout` is
    the config's residual dropout (transformers' default for OPT is 0.1); the attention dropout is
    OPT's own 0.0. Both sides read this config, so both train with the same value."""
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            have = json.load(f).get("dropout")
        if have == dropout:
            return
        shutil.rmtree(path)
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(**OPT_125M_SHAPE, dropout=dropout, attention_dropout=0.0)
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def model_path(folder, dropout=0.0):
    """The random model's folder for a dropout value (one folder per value)."""
    return os.path.join(folder, "opt-125m-random" if dropout == 0 else f"opt-125m-random-dropout{dropout:g}")


def arguments(batch, seq, threads=2, allocators="tcmalloc", dtypes="float32", doc=None, model=None, binary=None,
              two_sides=True):
    """An ArgumentParser with the options every driver takes: --threads, --batch, --seq; --model and
    --binary where given a default; and, for the drivers that compare two sides, their options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        ap.add_argument("--model", default=model)
    if binary:
        ap.add_argument("--binary", default=os.path.join(ROOT, "build", binary))
    ap.add_argument("--threads", type=int, default=threads, help="threads of every process on both sides")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    if not two_sides:
        return ap
    ap.add_argument("--allocators", default=allocators,
                    help="comma-separated, each run on both sides: tcmalloc (LD_PRELOAD) and/or glibc")
    ap.add_argument("--dtypes", default=dtypes, help="comma-separated compute types: float32, bfloat16")
    ap.add_argument("--dir", default="/tmp/crash-bench", help="scratch folder (models, data, outputs)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="the build folder")
    ap.add_argument("--gemm-repeats", type=int, default=3, help="timed groups per GEMM kernel")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one side in this process
    return ap


def parse_lists(a):
    a.allocators = [x for x in a.allocators.split(",") if x]
    a.dtypes = [x for x in a.dtypes.split(",") if x]
    for x in a.allocators:
        if x not in ALLOCATORS:
            sys.exit(f"--allocators: unknown '{x}' (expected tcmalloc or glibc)")
    for x in a.dtypes:
        if x not in ("float32", "bfloat16"):
            sys.exit(f"--dtypes: unknown '{x}' (expected float32 or bfloat16)")
    os.makedirs(a.dir, exist_ok=True)
    return a


def write_tokens(path, rows):
    """A JSON Lines input file of the jobs: one {"tokens": [...]} per row of token ids."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"tokens": row}) + "\n")


# ---- each side's process: allocator and threads


def tcmalloc_library():
    found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4"))
    if not found:
        sys.exit("tcmalloc not found: apt-get install libtcmalloc-minimal4 (env/setup.sh lists it)")
    return found[0]


def side_env(allocator, threads):
    """The environment of either side's process: the same threads everywhere, and tcmalloc preloaded
    or nothing preloaded (glibc's malloc)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc_library()
    return env


def allocator_of(program, env):
    """Which malloc `program` gets in `env`: what ldd (which honours LD_PRELOAD) loads."""
    out = subprocess.run(["ldd", program], env=env, capture_output=True, text=True).stdout
    return "tcmalloc" if "tcmalloc" in out else "glibc"


def program(a, allocator, name):
    """The program for a run with this allocator: build/crash-hpc or build/bench/NAME (which link
    tcmalloc, and get it preloaded as well), or their twins built without it for glibc runs
    (preloading cannot take a linked allocator away). Checks that the process gets the allocator."""
    if allocator == "tcmalloc":
        path = os.path.join(a.build, name if name == "crash-hpc" else os.path.join("bench", name))
    else:
        path = os.path.join(a.build, "bench", name + ("-glibc" if name == "crash-hpc" else "_glibc"))
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: cmake --build {a.build} -j2 --target {TARGETS}")
    got = allocator_of(path, side_env(allocator, a.threads))
    if got != allocator:
        sys.exit(f"{path} runs with {got}, not {allocator}")
    return path


def process_allocator():
    """Inside a worker: the malloc this process runs with."""
    with open("/proc/self/maps") as f:
        return "tcmalloc" if "tcmalloc" in f.read() else "glibc"


def run_json(cmd, env, what):
    """Runs one side's process; returns the JSON of its last stdout line (and its stderr)."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def worker_cmd(script, a, *extra):
    """The command that runs this driver's reference side in a process of its own."""
    return [sys.executable, os.path.join(BENCH, script), "--threads", str(a.threads), *map(str, extra)]


# ---- versions and libraries


def cpu_name():
    with open("/proc/cpuinfo") as f:
        name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown CPU")
    with open("/proc/cpuinfo") as f:
        flags = next((l for l in f if l.startswith("flags")), "")
    isa = [x for x in ("avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in flags]
    return f"{name} ({os.cpu_count()} CPUs seen; {', '.join(isa) or 'no AVX-512'})"


def _debian_package(path):
    real = os.path.realpath(path)
    r = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
    if r.returncode != 0:
        return os.path.basename(real)
    pkg = r.stdout.split(":")[0] + (":" + r.stdout.split(":")[1] if r.stdout.count(":") > 1 else "")
    ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True).stdout
    return f"{pkg.split(':')[0]} {ver}"


def libtorch_description(binary, gemm_json):
    """crash-hpc's LibTorch as the binary loads it: headers' version, the Debian package of the
    libtorch_cpu.so and of the BLAS it resolves, oneDNN."""
    libs = {}
    for line in subprocess.run(["ldd", binary], capture_output=True, text=True).stdout.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            libs[parts[0].strip()] = parts[1].split("(")[0].strip()
    torch_lib = next((p for n, p in libs.items() if n.startswith("libtorch_cpu")), None)
    blas_lib = None
    if torch_lib:
        for line in subprocess.run(["ldd", torch_lib], capture_output=True, text=True).stdout.splitlines():
            if "libblas" in line or "openblas" in line:
                blas_lib = line.split("=>")[1].split("(")[0].strip()
    dnnl = gemm_json.get("onednn")
    return (f"LibTorch {gemm_json.get('libtorch_headers', '?')} headers, "
            f"{_debian_package(torch_lib) if torch_lib else 'libtorch not found by ldd'}; "
            f"BLAS {gemm_json.get('blas', '?')} = {_debian_package(blas_lib) if blas_lib else '?'}; "
            f"oneDNN {dnnl if dnnl else 'not built in'}")


def reference_description(gemm_json):
    return (f"torch {gemm_json['torch']}, transformers {gemm_json.get('transformers', '-')}; BLAS {gemm_json['blas']}; "
            f"{gemm_json['onednn']}")


# ---- the machine's GEMM rate, in this run


def gemm_rates(a, allocator, dtypes, rows):
    """Every kernel's rate on both sides' libraries (bench_gemm: LibTorch and oneDNN as crash-hpc
    links them; bench/gemm.py: the venv's torch, MKL and oneDNN), under the allocator's environment.
    Returns (rates {dtype: {kernel: GFLOP/s}}, bench_gemm's JSON, gemm.py's JSON)."""
    env = side_env(allocator, a.threads)
    args = ["--threads", str(a.threads), "--rows", str(rows), "--dtypes", ",".join(dtypes), "--repeats",
            str(a.gemm_repeats)]
    ours, _ = run_json([program(a, allocator, "bench_gemm")] + args, env, "bench_gemm")
    theirs, _ = run_json([sys.executable, os.path.join(BENCH, "gemm.py")] + args, env, "bench/gemm.py")
    rates = {}
    for d in dtypes:
        rates[d] = {f"crash-hpc's {k}": v for k, v in ours["rates"][d].items() if v}
        rates[d].update({f"venv {k}": v for k, v in theirs["rates"][d].items() if isinstance(v, float)})
    return rates, ours, theirs


def print_crash_gemm(build, threads, dtypes, env, allocator, rows=2048):
    """The machine's GEMM rate in this run through crash-hpc's own libraries alone (bench_gemm: no
    PyPI), printed per kernel; returns the best per dtype. For benches whose both sides are crash-hpc."""
    gemm, _ = run_json([os.path.join(build, "bench", "bench_gemm"), "--threads", str(threads), "--rows", str(rows),
                        "--dtypes", ",".join(dtypes), "--repeats", "3"], env, "bench_gemm")
    print(f"GEMM rate in this run (bench_gemm, crash-hpc's LibTorch, {threads} threads, {allocator}):")
    best = {}
    for d in dtypes:
        rates = {k: v for k, v in gemm["rates"][d].items() if v}
        best[d] = max(rates.values())
        print(f"  {d:9s} " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(rates.items())) + f"  (best {best[d]:.1f} GFLOP/s)")
    return best


def print_gemm(rates, rows, threads):
    """Prints every kernel's rate; returns the best per dtype (the machine's rate)."""
    best = {}
    print(f"GEMM rate in this run ([{rows} x K] x [K x N], K x N = 768 x 3072 and 3072 x 768, {threads} threads; "
          "best of the timed groups):")
    for d, r in rates.items():
        for k, v in sorted(r.items(), key=lambda kv: -kv[1]):
            print(f"  {d:9s} {k:40s} {v:8.1f} GFLOP/s")
        best[d] = max(r.values())
        print(f"  {d:9s} {'machine rate (best of the above)':40s} {best[d]:8.1f} GFLOP/s")
    return best


def merge_best(x, y):
    return {d: max(x.get(d, 0.0), y.get(d, 0.0)) for d in set(x) | set(y)}


# ---- FLOP counts (multiply-adds count 2; layer norms, softmax, biases and activations are left out)


def layer_flops(lengths, d=768, ffn=3072):
    """One OPT decoder layer's FLOPs on sequences of these lengths, each run causally on its own
    tokens: the four projections and the MLP (2 n (4 d^2 + 2 d ffn)) and attention's two products
    over the keys each token sees (4 d n (n + 1) / 2)."""
    return sum(2 * n * (4 * d * d + 2 * d * ffn) + 2 * d * n * (n + 1) for n in lengths)


def decoder_flops(lengths, layers=12, d=768, ffn=3072):
    """The decoder's FLOPs (every layer, no LM head) on the real tokens of `lengths`."""
    return layers * layer_flops(lengths, d, ffn)


def head_flops(tokens, d=768, vocab=50272):
    return 2 * tokens * d * vocab


def train_step_flops(trainable, batch, seq, d=768, ffn=3072, vocab=50272, head_trains=False):
    """A training step's FLOPs for layers whose flags (bottom first) say which train: the forward of
    every layer and the LM head; the logits' gradient back into the last hidden state; input
    gradients of every layer above the lowest trainable one; weight gradients of the trainable
    layers (each 1x the layer's forward), and of the LM head when it trains (`head_trains`: a tied
    head, so the embedding trains too). Everything training gives the usual 3x the forward."""
    fwd = layer_flops([seq] * batch, d, ffn)
    lowest = trainable.index(True) if any(trainable) else len(trainable)
    if head_trains:  # a tied head is the embedding, below every layer: each layer's input gradient counts
        lowest = -1
    total = len(trainable) * fwd + head_flops(batch * seq, d, vocab) * (2 if head_trains else 1)
    if any(trainable):
        total += head_flops(batch * seq, d, vocab)
    for i, t in enumerate(trainable):
        total += fwd * (int(t) + int(i > lowest))
    return total


def rate_line(name, work, seconds, flops, gemm, unit="tokens/s"):
    """One side's row: its rate, its GFLOP/s on the FLOPs the job had to do, the fraction of GEMM."""
    g = flops / seconds / 1e9
    return f"  {name:44s} {work / seconds:10.1f} {unit}  {g:7.1f} GFLOP/s  {g / gemm:5.2f} of GEMM"
