#!/usr/bin/env python3
"""The GPU check: one run on a one-GPU machine (PyPI torch with CUDA and transformers there; no
system MPI or HDF5; no network). bench/gpu_check.sh starts it with the kit that bench/gpu_kit.sh
prepares (crash-hpc built against that machine's LibTorch, and the Debian libraries it loads).

Steps, each on its own (a failure is recorded with its output, and the next step runs):
  machine   the card, the versions of both sides, and the GEMM rate in this run: torch.matmul of
            8192^3 in bfloat16 and in float32 (TF32 off), through the LibTorch crash-hpc links too;
            the card's dense bfloat16 peak from its spec sheet
  nccl      comm_test --nccl: the NCCL communicator's collectives and the tensor-parallel layers,
            cross-entropy and KL on CUDA tensors, one rank; crash-hpc preflight --backend nccl
  parity    crash-hpc forward on the GPU against HF transformers on the same GPU (eager
            attention), on the fixture model of every family (tests/fixtures/models):
            float32 logits and hidden states within 1e-4 of max(1, |HF|); bfloat16: crash-hpc's
            mean |logit error| against HF float32 at most 1.5x HF bfloat16's own
  parity_large  the same on a random OPT-1.3B shape, 4 rows of 200-512 tokens
  train     crash-hpc train --dtype bfloat16 (bf16 compute, fp32 masters and moments) against
            HF + torch AMP (autocast bf16 over fp32 weights, fused AdamW), the same batch each
            step, AdamW lr 1e-4, no weight decay, clip 1.0, no dropout: the OPT-1.3B shape
            training every layer
  train_emulator  the same on a 2-18-2 uniform emulator of a random OPT-6.7B shape (the 2
            bottom and 2 top layers train; HF keeps the frozen layers in bf16 and the trained
            ones in fp32, as a careful user would)
  collect   crash-hpc collect (mean pooling, every layer, float32 archive, bfloat16 compute)
            against the HF loop of bench/collect.py on the GPU (AutoModel, length-sorted batches,
            inference_mode, h5py), the OPT-1.3B shape
Each timed step prints tokens/s (examples/s), the rate on the FLOPs the job had to do
(bench/common.py's counts), its fraction of the measured GEMM rate and of the spec peak (MFU),
and the ratio to HF. Results go to OUT/gpu_check.json (after every step) and OUT/gpu_check.md.

--cpu runs the same steps on the CPU with small shapes and the MPI communicator, so the script
and the kit are tested where no GPU is:
  python3 bench/gpu_check.py --bin DIR --out DIR [--cpu] [--only a,b] [--skip a,b]
"""
import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback

from common import ROOT, layer_flops, train_step_flops, write_tokens

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PARITY_MODELS = ("opt_preln", "opt_postln_proj", "llama_gqa", "llama_mha_tied", "llama3_scaled", "qwen2_bias",
                 "qwen3_kv1", "mistral_swa", "qwen2_swa", "gemma2_softcap", "gemma3_local_rope")
# Dense bfloat16 peaks from the vendors' spec sheets, TFLOP/s without sparsity; first match wins.
SPEC_BF16 = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
             ("A100", 312.0), ("L40S", 362.0))
OPT = {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True,
       "activation_function": "relu", "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 1,
       "bos_token_id": 2, "eos_token_id": 2}
# The shapes: the real ones on the GPU; on the CPU small ones that take the same paths.
SHAPES = {
    "cuda": {"large": dict(hidden_size=2048, ffn_dim=8192, num_attention_heads=32, num_hidden_layers=24),
             "emulated": dict(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, num_hidden_layers=22),
             "parity_lengths": [512, 384, 256, 200], "batch": 8, "seq": 1024, "steps": 10,
             "examples": 512, "min_len": 256, "max_len": 1024, "block": 32, "gemm_n": 8192, "threads": 8},
    "cpu": {"large": dict(hidden_size=256, ffn_dim=1024, num_attention_heads=4, num_hidden_layers=4),
            "emulated": dict(hidden_size=256, ffn_dim=1024, num_attention_heads=4, num_hidden_layers=22),
            "parity_lengths": [64, 48, 32, 20], "batch": 2, "seq": 128, "steps": 4,
            "examples": 32, "min_len": 32, "max_len": 128, "block": 8, "gemm_n": 1024, "threads": 2},
}
EMULATOR = {"keep": 18, "adapters": (2, 2)}  # 2-18-2 of the 22 layers made for it
STEPS = ("machine", "nccl", "parity", "parity_large", "train", "train_emulator", "collect")


class Failure(Exception):
    pass


def _text(x):
    """A timed-out process's partial output (bytes, whatever the text mode)."""
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# ---- the reference side: workers, each in a process of its own, printing one JSON line


def _torch(device, threads):
    import torch
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(torch, device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def worker_machine(a):
    import transformers
    torch = _torch(a["device"], a["threads"])
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__}
    if a["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                   multiprocessors=p.multi_processor_count)
    else:
        out.update(device="CPU", threads=torch.get_num_threads())
    n = a["gemm_n"]
    rates = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        x = torch.randn(n, n, device=a["device"], dtype=dtype)
        y = torch.randn(n, n, device=a["device"], dtype=dtype)
        for _ in range(3):
            torch.matmul(x, y)
        _sync(torch, a["device"])
        reps = 10 if a["device"] == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(x, y)
        _sync(torch, a["device"])
        rates[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    out["gemm_tflops"] = rates
    print(json.dumps(out))


def worker_make_model(a):
    """A random OPT of a shape, written by transformers (seed 0, its own initialisation)."""
    torch = _torch(a["device"], a["threads"])
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(**a["config"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(a["device"]):
        model = OPTForCausalLM(cfg).to(getattr(torch, a["dtype"]))
    model.save_pretrained(a["out"], safe_serialization=True)
    print(json.dumps({"seconds": time.perf_counter() - t0, "parameters": sum(p.numel() for p in model.parameters())}))


def _batch(torch, rows, device, pad=1):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def worker_parity(a):
    """HF float32 and bfloat16 on the device against crash-hpc's two HDF5 outputs, per case."""
    import h5py
    import numpy as np
    torch = _torch(a["device"], a["threads"])
    from transformers import AutoModelForCausalLM
    results = []
    for case in a["cases"]:
        with open(case["input"]) as f:
            rows = [json.loads(line)["tokens"] for line in f]
        ids, mask = _batch(torch, rows, a["device"])
        keep = mask.bool().cpu().numpy()
        hf = {}
        for dt in ("float32", "bfloat16"):
            model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=getattr(torch, dt),
                                                         attn_implementation="eager").to(a["device"]).eval()
            with torch.inference_mode():
                o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hf[dt] = (o.logits.float().cpu().numpy(), [h.float().cpu().numpy() for h in o.hidden_states])
            del model, o
            if a["device"] == "cuda":
                torch.cuda.empty_cache()
        ref_logits, ref_hidden = hf["float32"]
        with h5py.File(case["crash_float32"], "r") as h5:
            if not (h5["attention_mask"][()] == keep).all():
                raise SystemExit(f"{case['name']}: crash-hpc's attention mask differs from the input's")
            logits = h5["logits"][()]
            hidden = [h5[f"hidden_states/{i}"][()] for i in range(h5.attrs["num_hidden_states"])]
        with h5py.File(case["crash_bfloat16"], "r") as h5:
            logits_bf16 = h5["logits"][()].astype(np.float32)

        def rel(x, ref):
            return float(np.abs(x - ref)[keep].max() / max(1.0, float(np.abs(ref[keep]).max())))

        fp32 = max([rel(logits, ref_logits)] + [rel(h, r) for h, r in zip(hidden, ref_hidden)])
        crash_err = np.abs(logits_bf16 - ref_logits)[keep]
        hf_err = np.abs(hf["bfloat16"][0] - ref_logits)[keep]
        results.append({"name": case["name"], "float32_max_rel": fp32, "hidden_states": len(hidden),
                        "hidden_states_hf": len(ref_hidden), "bf16_mean_err": float(crash_err.mean()),
                        "bf16_max_err": float(crash_err.max()), "hf_bf16_mean_err": float(hf_err.mean()),
                        "hf_bf16_max_err": float(hf_err.max()), "logit_scale": float(np.abs(ref_logits[keep]).max())})
    print(json.dumps({"cases": results}))


def worker_train(a):
    """HF + torch AMP: fp32 trained weights, autocast bf16, fused AdamW; frozen layers in bf16."""
    torch = _torch(a["device"], a["threads"])
    from transformers import OPTForCausalLM
    full = a["trainable"] is None
    model = OPTForCausalLM.from_pretrained(a["model"], dtype=torch.float32 if full else torch.bfloat16)
    model.to(a["device"]).train()
    for name, p in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        train = full or (m is not None and int(m.group(1)) in a["trainable"])
        p.requires_grad_(train)
    if not full:
        for i in a["trainable"]:
            model.model.decoder.layers[i].float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=a["device"] == "cuda")
    with open(a["data"]) as f:
        ids = torch.tensor([json.loads(line)["tokens"] for line in f], device=a["device"])
    mask = torch.ones_like(ids)
    times, losses = [], []
    for _ in range(a["steps"]):
        _sync(torch, a["device"])
        t0 = time.perf_counter()
        with torch.autocast(device_type=a["device"], dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        _sync(torch, a["device"])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times[1:]), "losses": losses, "peak_gib": _peak_gib(torch, a["device"]),
                      "attention": model.config._attn_implementation, "trainable_parameters": sum(p.numel() for p in params)}))


def worker_collect(a):
    """bench/collect.py's HF loop, on the device: mean pooling of every layer into HDF5."""
    import h5py
    import numpy as np
    torch = _torch(a["device"], a["threads"])
    from transformers import AutoModel
    with open(a["data"]) as f:
        seqs = [json.loads(line)["tokens"] for line in f]
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(a["model"], dtype=torch.bfloat16).to(a["device"]).eval()
    _sync(torch, a["device"])
    load = time.perf_counter() - t0
    n = len(seqs)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    t0 = time.perf_counter()
    pooled = None
    with torch.inference_mode():
        for b in range(0, n, a["batch"]):
            idx = order[b:b + a["batch"]]
            ids, mask = _batch(torch, [seqs[i] for i in idx], a["device"])
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            if pooled is None:
                pooled = [np.empty((n, h.shape[-1]), dtype=np.float32) for h in hs]
            m = mask.unsqueeze(-1).float()
            for l, h in enumerate(hs):
                pooled[l][idx] = ((h.float() * m).sum(1) / m.sum(1)).cpu().numpy()
    with h5py.File(a["out"], "w") as h5:
        for l, p in enumerate(pooled):
            h5.create_dataset(f"layers/{l}", data=p)
    print(json.dumps({"load_s": load, "loop_s": time.perf_counter() - t0, "peak_gib": _peak_gib(torch, a["device"]),
                      "attention": model.config._attn_implementation}))


WORKERS = {"machine": worker_machine, "make_model": worker_make_model, "parity": worker_parity, "train": worker_train,
           "collect": worker_collect}


# ---- the driver


class Check:
    def __init__(self, a):
        self.a = a
        self.device = "cpu" if a.cpu else "cuda"
        self.backend = "mpi" if a.cpu else "nccl"
        self.shape = SHAPES[self.device]
        self.work = a.work
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(a.out, exist_ok=True)
        self.env = dict(os.environ)
        if a.ld_path:
            self.env["LD_LIBRARY_PATH"] = a.ld_path
        self.env.setdefault("OMPI_MCA_ess_singleton_isolated", "1")  # without a launcher: no orted to start
        self.launcher = shlex.split(a.launcher)
        self.results = {"mode": self.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        self.machine = None
        self.models = {}

    # binaries: the kit's bin/ holds them side by side; a build folder has them in tests/ and bench/
    def binary(self, name):
        for sub in ("", "tests", "bench"):
            p = os.path.join(self.a.bin, sub, name)
            if os.path.exists(p):
                return p
        raise Failure(f"{name} not found under {self.a.bin}")

    def run(self, cmd, what, timeout=240):
        # A hang (a collective that never completes) ends its step, not the whole check: the device
        # call has 10 minutes in all.
        t0 = time.perf_counter()
        try:
            r = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Failure(f"{what} did not finish in {timeout} s: {' '.join(map(str, cmd))}\n"
                          f"{(_text(e.stdout) + _text(e.stderr))[-3000:]}")
        if r.returncode != 0:
            raise Failure(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n"
                          f"{(r.stdout + r.stderr)[-4000:]}")
        return r, time.perf_counter() - t0

    def crash(self, job, *args, what=None, timeout=240):
        return self.run([*self.launcher, self.binary("crash-hpc"), job, *args, "--backend", self.backend, "--threads",
                         self.shape["threads"]], what or f"crash-hpc {job}", timeout)

    def worker(self, name, **args):
        args.setdefault("device", self.device)
        args.setdefault("threads", self.shape["threads"])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--args", json.dumps(args)]
        try:  # the python side's own environment
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
        except subprocess.TimeoutExpired:
            raise Failure(f"HF worker '{name}' did not finish in 360 s")
        if r.returncode != 0:
            raise Failure(f"HF worker '{name}' failed (exit {r.returncode})\n{(r.stdout + r.stderr)[-4000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def model(self, kind, dtype):
        """The random OPT of `kind` (large: OPT-1.3B shape; emulated: 22 layers of OPT-6.7B's),
        made once by transformers."""
        key = (kind, dtype)
        if key not in self.models:
            path = os.path.join(self.work, f"opt-{kind}-{dtype}")
            if not os.path.exists(os.path.join(path, "config.json")):
                made = self.worker("make_model", config={**OPT, **self.shape[kind],
                                                         "word_embed_proj_dim": self.shape[kind]["hidden_size"]},
                                   dtype=dtype, out=path)
                print(f"  made {path}: {made['parameters'] / 1e9:.2f}B parameters in {made['seconds']:.1f} s")
            self.models[key] = path
        return self.models[key]

    def gemm(self):
        if self.machine is None:
            raise Failure("the machine step did not run, so no GEMM rate is known")
        return self.machine["gemm_tflops"]["bfloat16"]

    def peak(self):
        return self.machine.get("spec_bf16_tflops") if self.machine else None

    def rate(self, flops, seconds):
        """TFLOP/s, fraction of the GEMM rate of this run, fraction of the spec peak (MFU)."""
        t = flops / seconds / 1e12
        peak = self.peak()
        return {"tflops": t, "of_gemm": t / self.gemm(), "mfu": t / peak if peak else None}

    def save(self):
        with open(os.path.join(self.a.out, "gpu_check.json"), "w") as f:
            json.dump(self.results, f, indent=1)


def step_machine(c):
    m = c.worker("machine", gemm_n=c.shape["gemm_n"])
    if c.device == "cuda":
        m["spec_bf16_tflops"] = next((v for k, v in SPEC_BF16 if k in m["device"]), None)
    m["disk_free_gib"] = shutil.disk_usage(c.work).free / 2**30
    c.machine = m
    kit = os.path.join(c.a.bin, "..", "kit.json")
    if os.path.exists(kit):
        with open(kit) as f:
            m["kit"] = json.load(f)
    print(f"  {m['device']}; torch {m['torch']} (CUDA {m['torch_cuda']}), transformers {m['transformers']}; "
          f"GEMM {c.shape['gemm_n']}^3: bf16 {m['gemm_tflops']['bfloat16']:.1f}, fp32 {m['gemm_tflops']['float32']:.1f} "
          f"TFLOP/s; spec bf16 peak {m.get('spec_bf16_tflops')}; {m['disk_free_gib']:.0f} GiB free in {c.work}")
    m["ok"] = True
    return m


def step_nccl(c):
    out = {}
    args = ["--nccl"] if c.backend == "nccl" else []
    r, s = c.run([*c.launcher, c.binary("comm_test"), *args], "comm_test " + " ".join(args), timeout=120)
    found = re.findall(r"(\d+) passed, (\d+) failed", r.stdout)
    if not found:
        raise Failure("comm_test printed no verdict:\n" + r.stdout[-2000:])
    out["comm_test"] = {"passed": int(found[-1][0]), "failed": int(found[-1][1]), "seconds": s,
                        "lines": [l for l in r.stdout.splitlines() if l.startswith(("ok", "FAIL"))]}
    pre = os.path.join(c.work, "preflight")
    os.makedirs(pre, exist_ok=True)
    r, s = c.crash("preflight", "--out", pre, what="crash-hpc preflight")
    text = r.stdout + r.stderr
    out["preflight"] = {"checks": re.findall(r"preflight: (.+?) ok", text), "seconds": s}
    out["ok"] = out["comm_test"]["failed"] == 0 and out["comm_test"]["passed"] > 0 and (
        c.backend != "nccl" or any("NCCL" in x for x in out["preflight"]["checks"]))
    print(f"  comm_test: {out['comm_test']['passed']} passed, {out['comm_test']['failed']} failed; preflight: "
          + ", ".join(out["preflight"]["checks"]))
    return out


def parity_cases(c, cases):
    """Runs crash-hpc forward in float32 and bfloat16 on each (name, model, rows); HF compares."""
    todo = []
    for name, model, rows in cases:
        d = os.path.join(c.work, "parity", name)
        os.makedirs(d, exist_ok=True)
        inp = os.path.join(d, "in.jsonl")
        write_tokens(inp, rows)
        case = {"name": name, "model": model, "input": inp}
        for dt in ("float32", "bfloat16"):
            case[f"crash_{dt}"] = os.path.join(d, f"{dt}.h5")
            c.crash("forward", "--model", model, "--input", inp, "--out", case[f"crash_{dt}"], "--dtype", dt,
                    "--batch-size", len(rows), "--overwrite", "--log-level", "warn")
        todo.append(case)
    got = c.worker("parity", cases=todo)["cases"]
    for r in got:
        r["float32_ok"] = r["float32_max_rel"] <= 1e-4 and r["hidden_states"] == r["hidden_states_hf"]
        r["bf16_ratio"] = r["bf16_mean_err"] / max(r["hf_bf16_mean_err"], 1e-12)
        r["bf16_ok"] = r["bf16_ratio"] <= 1.5
        print(f"  {'ok  ' if r['float32_ok'] and r['bf16_ok'] else 'FAIL'} {r['name']:18s} float32 {r['float32_max_rel']:.1e} "
              f"(of max(1, |HF|)); bf16 mean |logit error| {r['bf16_mean_err']:.2e} vs HF bf16's "
              f"{r['hf_bf16_mean_err']:.2e} ({r['bf16_ratio']:.2f}x), max {r['bf16_max_err']:.2e} vs {r['hf_bf16_max_err']:.2e}")
    return {"cases": got, "ok": all(r["float32_ok"] and r["bf16_ok"] for r in got)}


def step_parity(c):
    from safetensors_np import read_safetensors
    cases = []
    for name in PARITY_MODELS:
        g = read_safetensors(os.path.join(FIXTURES, "golden", name + ".safetensors"))
        rows = [r[m == 1].tolist() for r, m in zip(g["right_ids"], g["right_mask"])]
        cases.append((name, os.path.join(FIXTURES, "models", name), rows))
    return parity_cases(c, cases)


def random_rows(lengths, seed, vocab=50000):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, n).tolist() for n in lengths]


def step_parity_large(c):
    return parity_cases(c, [("opt-large", c.model("large", "float32"), random_rows(c.shape["parity_lengths"], 1))])


def train_compare(c, model, trainable, flags, label):
    """crash-hpc train vs the HF worker on one model; `trainable` lists the trained layers (None: all)."""
    sh = c.shape
    d = os.path.join(c.work, label)
    os.makedirs(d, exist_ok=True)
    data = os.path.join(d, "data.jsonl")
    write_tokens(data, random_rows([sh["seq"]] * sh["batch"], 2))
    out = os.path.join(d, "crash")
    cmd = ["--model", model, "--data", data, "--out", out, "--steps", sh["steps"], "--batch-size", sh["batch"], "--lr",
           "1e-4", "--warmup", "0", "--weight-decay", "0", "--clip", "1.0", "--dtype", "bfloat16", "--overwrite",
           "--log-level", "warn", *flags]
    _, wall = c.crash("train", *cmd, what=f"crash-hpc train ({label})", timeout=360)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f if '"seconds"' in line]
    ours = statistics.median([x["seconds"] for x in log][1:])
    # The output holds the model and a checkpoint with the optimizer state (about 20 GB for the
    # OPT-1.3B shape, every layer training): the GPU machine has 64 GB of disk.
    shutil.rmtree(out, ignore_errors=True)
    hf = c.worker("train", model=model, data=data, steps=sh["steps"], trainable=trainable)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    layers = cfg["num_hidden_layers"]
    flags_t = [True] * layers if trainable is None else [i in trainable for i in range(layers)]
    # Everything trains when `trainable` is None (--train-all): the tied head's weight gradient too.
    flops = train_step_flops(flags_t, sh["batch"], sh["seq"], cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"],
                             head_trains=trainable is None)
    tokens = sh["batch"] * sh["seq"]
    res = {"layers": layers, "trained_layers": sum(flags_t), "tokens_per_step": tokens, "step_tflop": flops / 1e12,
           "crash": {"median_s": ours, "tokens_per_s": tokens / ours, "wall_s": wall,
                     "losses": [x["loss"] for x in log], **c.rate(flops, ours)},
           "hf": {"median_s": hf["median_s"], "tokens_per_s": tokens / hf["median_s"], "losses": hf["losses"],
                  "peak_gib": hf["peak_gib"], "attention": hf["attention"], **c.rate(flops, hf["median_s"])}}
    res["ratio"] = hf["median_s"] / ours
    res["first_loss_diff"] = abs(res["crash"]["losses"][0] - hf["losses"][0])
    # The same weights and batch: the first losses agree to bf16's precision, and both sides learn.
    res["ok"] = res["first_loss_diff"] <= 0.05 * max(1.0, hf["losses"][0]) and res["crash"]["losses"][-1] < res["crash"]["losses"][0]
    for side in ("crash", "hf"):
        x = res[side]
        mfu = f", MFU {x['mfu']:.3f}" if x["mfu"] else ""
        print(f"  {side:5s} {x['tokens_per_s']:10.0f} tokens/s  {x['tflops']:7.1f} TFLOP/s  {x['of_gemm']:.3f} of GEMM{mfu}; "
              f"loss {x['losses'][0]:.4f} -> {x['losses'][-1]:.4f}")
    print(f"  ratio crash-hpc / HF: {res['ratio']:.2f}; first losses differ by {res['first_loss_diff']:.2e}")
    return res


def step_train(c):
    return train_compare(c, c.model("large", "float32"), None, ["--train-all"], "train")


def step_train_emulator(c):
    base = c.model("emulated", "bfloat16")
    emulator = os.path.join(c.work, "emulator-2-18-2")
    a, b = EMULATOR["adapters"]
    c.crash("emulate", "--model", base, "--mode", "uniform", "--keep", EMULATOR["keep"], "--adapters", f"{a},{b}",
            "--out", emulator, "--overwrite", "--log-level", "warn", what="crash-hpc emulate")
    with open(os.path.join(emulator, "crash_plan.json")) as f:
        trainable = [i for i, s in enumerate(json.load(f)["slots"]) if s["train"]]
    shutil.rmtree(base)  # 9 GB the emulator has copied
    c.models.pop(("emulated", "bfloat16"))
    return train_compare(c, emulator, trainable, [], "train_emulator")


def step_collect(c):
    import numpy as np
    sh = c.shape
    model = c.model("large", "float32")
    rng = np.random.default_rng(3)
    lengths = rng.integers(sh["min_len"], sh["max_len"] + 1, sh["examples"]).tolist()
    d = os.path.join(c.work, "collect")
    os.makedirs(d, exist_ok=True)
    data = os.path.join(d, "data.jsonl")
    write_tokens(data, random_rows(lengths, 4))
    ours_h5, hf_h5 = os.path.join(d, "crash.h5"), os.path.join(d, "hf.h5")
    r, wall = c.crash("collect", "--model", model, "--data", data, "--out", ours_h5, "--num-examples", sh["examples"],
                      "--block-size", sh["block"], "--dtype", "bfloat16", "--overwrite", "--log-level", "info")
    m = re.findall(r"collect: (\d+)/(\d+) examples in \S+, ([0-9.e+-]+) examples/s", r.stdout + r.stderr)
    if not m:
        raise Failure("crash-hpc collect printed no final progress line:\n" + (r.stdout + r.stderr)[-3000:])
    ours = sh["examples"] / float(m[-1][2])
    hf = c.worker("collect", model=model, data=data, out=hf_h5, batch=sh["block"])
    import h5py
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    with h5py.File(ours_h5, "r") as x, h5py.File(hf_h5, "r") as y:
        n = cfg["num_hidden_layers"] + 1
        diff = max(float(np.abs(x[f"layers/{l}"][()] - y[f"layers/{l}"][()]).max() /
                         max(1e-30, float(np.abs(y[f"layers/{l}"][()]).max()))) for l in range(n))
    flops = cfg["num_hidden_layers"] * layer_flops(lengths, cfg["hidden_size"], cfg["ffn_dim"])
    res = {"examples": sh["examples"], "tokens": sum(lengths), "tflop": flops / 1e12, "agreement": diff,
           "crash": {"seconds": ours, "examples_per_s": sh["examples"] / ours, "wall_s": wall, **c.rate(flops, ours)},
           "hf": {"seconds": hf["loop_s"], "examples_per_s": sh["examples"] / hf["loop_s"], "load_s": hf["load_s"],
                  "peak_gib": hf["peak_gib"], "attention": hf["attention"], **c.rate(flops, hf["loop_s"])}}
    res["ratio"] = hf["loop_s"] / ours
    # Both in bf16 with different kernels: the pooled states agree to bf16's precision.
    res["ok"] = diff <= 5e-2
    for side in ("crash", "hf"):
        x = res[side]
        mfu = f", MFU {x['mfu']:.3f}" if x["mfu"] else ""
        print(f"  {side:5s} {x['examples_per_s']:8.1f} examples/s  {x['tflops']:7.1f} TFLOP/s  {x['of_gemm']:.3f} of GEMM{mfu}")
    print(f"  ratio crash-hpc / HF: {res['ratio']:.2f}; archives agree to {diff:.1e} of the largest value")
    return res


def markdown(c):
    r, m = c.results["steps"], c.machine or {}
    lines = [f"GPU check ({c.device}), {c.results['started']}: {m.get('device', '?')}, torch {m.get('torch', '?')} "
             f"(CUDA {m.get('torch_cuda', '-')}), transformers {m.get('transformers', '?')}; GEMM in this run "
             + (f"bf16 {m['gemm_tflops']['bfloat16']:.1f}, fp32 {m['gemm_tflops']['float32']:.1f} TFLOP/s; "
                f"spec bf16 peak {m.get('spec_bf16_tflops')}" if m else "not measured"), "",
             "| step | result | figures |", "|---|---|---|"]
    for name in STEPS:
        if name not in r:
            continue
        s = r[name]
        fig = s.get("error", "").splitlines()[0] if "error" in s else ""
        if name in ("train", "train_emulator", "collect") and "crash" in s:
            unit = "examples_per_s" if name == "collect" else "tokens_per_s"
            fig = "; ".join(
                f"{side} {s[side][unit]:.0f} {unit.split('_per')[0]}/s, {s[side]['tflops']:.1f} TFLOP/s, "
                f"{s[side]['of_gemm']:.2f} of GEMM" + (f", MFU {s[side]['mfu']:.3f}" if s[side]['mfu'] else "")
                for side in ("crash", "hf")) + f"; ratio {s['ratio']:.2f}"
        elif name.startswith("parity") and "cases" in s:
            fig = (f"{len(s['cases'])} models; float32 worst {max(x['float32_max_rel'] for x in s['cases']):.1e}; "
                   f"bf16 error / HF's worst {max(x['bf16_ratio'] for x in s['cases']):.2f}x")
        elif name == "nccl" and "comm_test" in s:
            fig = f"comm_test {s['comm_test']['passed']} passed, {s['comm_test']['failed']} failed"
        lines.append(f"| {name} | {'ok' if s.get('ok') else 'FAIL'} ({s.get('seconds', 0):.0f} s) | {fig} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="folder with crash-hpc, comm_test (a kit's bin/, or a build folder)")
    ap.add_argument("--ld-path", default="", help="LD_LIBRARY_PATH of the crash-hpc processes")
    ap.add_argument("--launcher", default="", help="the command that starts each crash-hpc process, e.g. "
                    "'mpirun -np 1' (the jobs' groups are then MPI/NCCL communicators, not local ones)")
    ap.add_argument("--out", default="/tmp/crash-gpu-check/out", help="results: gpu_check.json, gpu_check.md")
    ap.add_argument("--work", default="/tmp/crash-gpu-check/work", help="scratch (models, data, outputs)")
    ap.add_argument("--cpu", action="store_true", help="the same steps on the CPU with small shapes")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return WORKERS[a.worker](json.loads(a.args))
    if not a.bin:
        ap.error("--bin is required")
    only = [x for x in a.only.split(",") if x]
    skip = [x for x in a.skip.split(",") if x]
    for x in only + skip:
        if x not in STEPS:
            ap.error(f"unknown step '{x}' (steps: {', '.join(STEPS)})")
    sys.path.insert(0, os.path.join(ROOT, "tests", "common"))
    c = Check(a)
    for name in STEPS:
        if (only and name not in only and name != "machine") or name in skip:
            continue
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            res = globals()["step_" + name](c)
        except Failure as e:
            res = {"ok": False, "error": str(e)}
        except Exception:  # a bug of this script or a library: recorded, and the next step runs
            res = {"ok": False, "error": traceback.format_exc()[-4000:]}
        res["seconds"] = time.perf_counter() - t0
        if "error" in res:
            print("  FAILED: " + res["error"])
        c.results["steps"][name] = res
        c.save()
        sys.stdout.flush()
    md = markdown(c)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    return 0 if all(s.get("ok") for s in c.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
