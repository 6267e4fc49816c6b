#!/usr/bin/env python3
"""The train job as a user runs it, on a tiny emulator of a fixture model and a multiple-choice
task written in prepare's format (loss on the gold continuation only).

  train_grids.py CRASH_HPC FIXTURES grids    TP2, PP2, DP2, TP2xPP2 and gradient accumulation give
                                             1 rank's losses; the saved models give the same logits
  train_grids.py CRASH_HPC FIXTURES resume   resume on the same grid (1 rank, TP2) is exact
  train_grids.py CRASH_HPC FIXTURES reshard  a TP2xDP2 checkpoint resumed on PP2 and on 1 rank
                                             continues the uninterrupted curve
  train_grids.py CRASH_HPC FIXTURES bad      bad input: one line, exit code 2
  train_grids.py CRASH_HPC FIXTURES dropout  --dropout 0.1 and attention_dropout 0.1: TP2, PP2, DP2, TP2xPP2,
                                             micro-batches and accumulation give 1 rank's losses and weights;
                                             --dropout 0 is today's run; resume is exact; bad rates refused
  train_grids.py CRASH_HPC FIXTURES sift     SIFT (--sparse-increment): RHO=1 equals dense AdamW, exactly k
                                             entries train, the same mask on DP2/TP2/TP2xPP2, resume,
                                             increments and merge, bad input; on Qwen2 (qwen2_bias) 1 rank
                                             vs TP2 and merge
  train_grids.py CRASH_HPC FIXTURES recompute  --recompute full and selective (with dropout, every parameter
                                             training): losses, gradient norms and weights identical bit for
                                             bit to none on 1 rank and on TP2; TP2 and PP2 equal 1 rank;
                                             resume with another mode is exact; bad values refused
  train_grids.py CRASH_HPC FIXTURES zero     --distributed-optimizer (ZeRO-1): DP2, TP2xDP2, PP2xDP2, DP2 bf16,
                                             DP2 with accumulation and 1 rank give the replicated optimiser's
                                             weights (and 1 rank's); checkpoints
                                             resume on another DP size with or without it; optimiser state per
                                             rank is 1/DP of the replicated one; SIFT refused

Debian's python3 (numpy, h5py) only.
"""
import json
import os
import re
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402


BIN, FIXTURES, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
TOL = 1e-5
failures = 0
passes = 0


def check(ok, what):
    global failures, passes
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if ok:
        passes += 1
    else:
        failures += 1


def run(args, np_=1, expect=0):
    cmd = ([] if np_ == 1 else MPIRUN + ["-np", str(np_)]) + [BIN] + args + ["--threads", "1", "--log-level", "warn"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if p.returncode != expect:
        print(" ".join(cmd), "\n", p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"FAIL: exit code {p.returncode}, expected {expect}")
    return p


def model_tensors(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(read_safetensors(os.path.join(folder, f)))
    return out


def losses(out):
    """[(step, 'loss'|'val_loss', value)] of OUT/train_log.jsonl."""
    rows = []
    with open(os.path.join(out, "train_log.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            kind = "loss" if "loss" in j else "val_loss"
            rows.append((j["step"], kind, j[kind]))
    return rows


def compare(a, b, name, exact=False):
    if [(s, k) for s, k, _ in a] != [(s, k) for s, k, _ in b]:
        check(False, f"{name}: the logs hold different steps: {[(s, k) for s, k, _ in b]}")
        return
    diff = max(abs(x - y) for (_, _, x), (_, _, y) in zip(a, b))
    if exact:
        check(all(x == y for (_, _, x), (_, _, y) in zip(a, b)), f"{name}: identical losses (max diff {diff:.3g})")
    else:
        check(diff <= TOL, f"{name}: max loss diff {diff:.3g} over {len(a)} values")


work = tempfile.mkdtemp(prefix="crash-train-")
try:
    # An emulator of opt_preln's 4 layers: layers 0 and 3 are the adapters.
    emu = os.path.join(work, "emu")
    shutil.copytree(os.path.join(FIXTURES, "models", "opt_preln"), emu)
    plan = {"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt_preln", "full_layers": 4,
            "adapters": [1, 1], "slots": [{"source": l, "train": l in (0, 3), "stored_as": l} for l in range(4)]}
    with open(os.path.join(emu, "crash_plan.json"), "w") as f:
        json.dump(plan, f)

    # A multiple-choice task in prepare's format: tokens = context + gold continuation.
    def task(folder, n, seed):
        rnd = random.Random(seed)
        os.makedirs(folder)
        with open(os.path.join(folder, "shard-00000.jsonl"), "w") as f:
            for i in range(n):
                ctx = [rnd.randrange(3, 128) for _ in range(rnd.randrange(4, 14))]
                conts = [[rnd.randrange(3, 128) for _ in range(rnd.randrange(1, 4))] for _ in range(3)]
                gold = rnd.randrange(3)
                f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": ctx + conts[gold], "context": ctx,
                                    "continuations": conts, "gold": gold, "choice_chars": [len(c) * 3 for c in conts]}) + "\n")
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"kind": "multiple_choice", "task": "synthetic", "shards": ["shard-00000.jsonl"]}, f)
        return folder

    data = task(os.path.join(work, "train.prepared"), 24, 1)
    val = task(os.path.join(work, "val.prepared"), 7, 2)
    common = ["train", "--model", emu, "--data", data, "--batch-size", "4", "--lr", "3e-3", "--warmup", "2",
              "--weight-decay", "0.01", "--seed", "5"]

    def out(name):
        return os.path.join(work, name)

    if MODE == "grids":
        args = common + ["--val-data", val, "--steps", "20", "--eval-every", "6", "--micro-batches", "2"]
        run(args + ["--out", out("one")])
        ref = losses(out("one"))
        check(len(ref) == 20 + 4, f"1 rank: 20 steps and 4 validations logged ({len(ref)} lines)")
        for name, np_, grid in [("tp2", 2, ["--tp", "2"]), ("pp2", 2, ["--pp", "2"]), ("dp2", 2, []),
                                ("tp2pp2", 4, ["--tp", "2", "--pp", "2"]), ("tp2dp2", 4, ["--tp", "2"])]:
            run(args + ["--out", out(name)] + grid, np_)
            compare(ref, losses(out(name)), f"{name} vs 1 rank")
        run(common + ["--val-data", val, "--steps", "20", "--eval-every", "6", "--grad-accum", "2",
                      "--out", out("accum")])
        compare(ref, losses(out("accum")), "--grad-accum 2 vs 1")
        # Knowledge distillation from the full model (here the emulator's own source weights, so
        # the first step's KL is 0 and its loss is (1 - alpha) CE), on 1 rank and on TP2xPP2.
        kd = common + ["--steps", "3", "--micro-batches", "2", "--kd-alpha", "0.5", "--kd-temperature", "2",
                       "--distill-from", os.path.join(FIXTURES, "models", "opt_preln")]
        run(kd + ["--out", out("kd_one")])
        run(kd + ["--out", out("kd_tp2pp2"), "--tp", "2", "--pp", "2"], 4)
        compare(losses(out("kd_one")), losses(out("kd_tp2pp2")), "distillation: tp2pp2 vs 1 rank")
        first = losses(out("kd_one"))[0][2]
        check(abs(first - 0.5 * ref[0][2]) <= 1e-6, f"distillation, step 1: {first:.7f} = (1 - alpha) CE {ref[0][2]:.7f}")

        # The saved models: frozen layers as in the source, adapters trained; PP2 wrote a sharded folder.
        src, one = model_tensors(emu), model_tensors(out("one/model"))
        check(sorted(src) == sorted(one), "OUT/model holds the source's tensor names")
        frozen = [n for n in src if ".layers.0." not in n and ".layers.3." not in n]
        check(all(np.array_equal(src[n], one[n]) for n in frozen), f"{len(frozen)} frozen tensors unchanged bit for bit")
        check(all(not np.array_equal(src[n], one[n]) for n in src if n not in frozen), "every adapter tensor changed")
        check(os.path.exists(out("pp2/model/model.safetensors.index.json")), "PP2 model: sharded folder with an index")
        check(os.path.exists(out("one/model/crash_plan.json")), "OUT/model carries crash_plan.json")
        tokens = os.path.join(work, "in.jsonl")
        with open(tokens, "w") as f:
            f.write('{"tokens": [5, 9, 17, 33, 2, 41]}\n{"tokens": [12, 7, 99]}\n')
        logits = {}
        for name in ["one", "pp2", "tp2pp2"]:
            run(["forward", "--model", out(name + "/model"), "--input", tokens, "--out", out(name + ".h5")])
            with h5py.File(out(name + ".h5")) as h:
                logits[name] = h["logits"][:]
        for name in ["pp2", "tp2pp2"]:
            d = float(np.abs(logits[name] - logits["one"]).max())
            check(d <= TOL, f"forward on {name}'s saved model: logits max diff {d:.3g} from 1 rank's")

    elif MODE == "dropout":
        # The emulator with attention_dropout 0.1 in its config; --dropout 0.1 on the residual branches.
        emu_d = os.path.join(work, "emu_dropout")
        shutil.copytree(emu, emu_d)
        with open(os.path.join(emu_d, "config.json")) as f:
            cfg = json.load(f)
        cfg["attention_dropout"] = 0.1
        with open(os.path.join(emu_d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        dcommon = [emu_d if a == emu else a for a in common]
        args = dcommon + ["--val-data", val, "--steps", "8", "--eval-every", "4", "--dropout", "0.1"]
        run(args + ["--out", out("one"), "--micro-batches", "2"])
        ref = losses(out("one"))
        check(len(ref) == 8 + 2, f"1 rank: 8 steps and 2 validations logged ({len(ref)} lines)")
        log = [json.loads(l) for l in open(out("one/train_log.jsonl"))]
        check(all(j["dropout"] == 0.1 and j["attention_dropout"] == 0.1 for j in log if "loss" in j),
              "the log records dropout 0.1 and attention_dropout 0.1 on every step")
        src, one = model_tensors(emu_d), model_tensors(out("one/model"))
        # k_proj.bias is left out: softmax ignores it, so its gradient is rounding noise that Adam
        # normalises into steps that differ between grids.
        real = [n for n in src if not n.endswith("k_proj.bias")]
        for name, np_, grid in [("tp2", 2, ["--tp", "2", "--micro-batches", "2"]), ("pp2", 2, ["--pp", "2", "--micro-batches", "2"]),
                                ("dp2", 2, []), ("tp2pp2", 4, ["--tp", "2", "--pp", "2"]), ("accum", 1, ["--grad-accum", "2"])]:
            run(args + ["--out", out(name)] + grid, np_)
            compare(ref, losses(out(name)), f"dropout, {name} vs 1 rank")
            w = model_tensors(out(name + "/model"))
            d = max(float(np.abs(w[n] - one[n]).max()) for n in real)
            check(d <= TOL, f"dropout, {name} vs 1 rank: final weights max diff {d:.3g}")

        # Dropout changes the run; --dropout 0 on a config with none is today's run, bit for bit.
        nodrop = common + ["--val-data", val, "--steps", "8", "--eval-every", "4"]
        run(nodrop + ["--out", out("plain")])
        run(nodrop + ["--out", out("zero"), "--dropout", "0"])
        plain = losses(out("plain"))
        check(abs(plain[0][2] - ref[0][2]) > 1e-4, f"dropout changes the first loss ({ref[0][2]:.6f} vs {plain[0][2]:.6f})")
        compare(plain, losses(out("zero")), "--dropout 0 vs no --dropout", exact=True)

        # Resume: the masks follow the step, so a cut run continues exactly; another rate is refused.
        rargs = args + ["--save-every", "2"]
        run(rargs + ["--out", out("full")])
        run(rargs + ["--out", out("cut"), "--stop-after", "3"])
        run(rargs + ["--out", out("cut"), "--resume"])
        compare(losses(out("full")), losses(out("cut")), "dropout, resumed from step 2", exact=True)
        other = [("0.2" if prev == "--dropout" else a) for prev, a in zip([""] + rargs, rargs)]
        p = run(other + ["--out", out("cut"), "--resume"], 1, expect=2)
        check("dropout" in p.stderr, "resume with another --dropout refused")

        for bad in ["1", "-0.1", "1.5", "nan"]:
            p = run(common + ["--steps", "2", "--dropout", bad, "--out", out("x")], 1, expect=2)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(len(lines) == 1 and "--dropout" in lines[0], f"--dropout {bad}: {lines[-1] if lines else ''}")
        check(not os.path.exists(out("x")), "no output left behind by the failures")

    elif MODE == "recompute":
        # Dropout on both sites, so the rerun forward must draw the masks of the first one.
        emu_d = os.path.join(work, "emu_dropout")
        shutil.copytree(emu, emu_d)
        with open(os.path.join(emu_d, "config.json")) as f:
            cfg = json.load(f)
        cfg["attention_dropout"] = 0.1
        with open(os.path.join(emu_d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        rcommon = [emu_d if a == emu else a for a in common]
        args = rcommon + ["--steps", "6", "--train-all", "--dropout", "0.1", "--micro-batches", "2"]

        def log_of(name):
            return [json.loads(l) for l in open(out(name + "/train_log.jsonl"))]

        def same_run(a, b, what):
            la, lb = log_of(a), log_of(b)
            check([(j["step"], j["loss"], j["grad_norm"]) for j in la] == [(j["step"], j["loss"], j["grad_norm"]) for j in lb],
                  f"{what}: identical losses and gradient norms over {len(la)} steps")
            wa, wb = model_tensors(out(a + "/model")), model_tensors(out(b + "/model"))
            check(sorted(wa) == sorted(wb) and all(np.array_equal(wa[n], wb[n]) for n in wa),
                  f"{what}: identical weights after {len(la)} AdamW steps ({len(wa)} tensors)")

        run(args + ["--out", out("none")])
        for mode in ["full", "selective"]:
            run(args + ["--out", out(mode), "--recompute", mode])
            same_run("none", mode, f"1 rank, --recompute {mode} vs none")
        ref, one = losses(out("none")), model_tensors(out("none/model"))
        # k_proj.bias: softmax ignores it, so its gradient is rounding noise (see the dropout mode).
        real = [n for n in one if not n.endswith("k_proj.bias")]
        for name, np_, grid in [("tp2", 2, ["--tp", "2"]), ("pp2", 2, ["--pp", "2"])]:
            for mode in ["none", "full", "selective"]:
                run(args + ["--out", out(f"{name}_{mode}"), "--recompute", mode] + grid, np_)
                compare(ref, losses(out(f"{name}_{mode}")), f"{name} --recompute {mode} vs 1 rank")
                w = model_tensors(out(f"{name}_{mode}/model"))
                d = max(float(np.abs(w[n] - one[n]).max()) for n in real)
                check(d <= TOL, f"{name} --recompute {mode} vs 1 rank: final weights max diff {d:.3g}")
            for mode in ["full", "selective"]:
                same_run(f"{name}_none", f"{name}_{mode}", f"{name}, --recompute {mode} vs none")

        # Recomputation changes no number, so a run resumes with another mode exactly.
        rargs = args + ["--save-every", "2"]
        run(rargs + ["--out", out("cut"), "--stop-after", "3"])
        run(rargs + ["--out", out("cut"), "--resume", "--recompute", "selective"])
        compare(ref, losses(out("cut")), "cut with none, resumed with --recompute selective", exact=True)

        for bad in ["yes", "FULL", ""]:
            p = run(common + ["--steps", "2", "--recompute", bad, "--out", out("x")], 1, expect=2)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(len(lines) == 1 and "--recompute" in lines[0], f"--recompute '{bad}': {lines[-1] if lines else ''}")
        check(not os.path.exists(out("x")), "no output left behind by the failures")

    elif MODE == "resume":
        args = common + ["--steps", "6", "--save-every", "2", "--train-all"]
        run(args + ["--out", out("one")])
        ref = losses(out("one"))
        ckpts = sorted(os.listdir(out("one/checkpoints")))
        check(ckpts == ["step-000004", "step-000006"], f"the newest 2 checkpoints kept: {ckpts}")
        manifest = json.load(open(out("one/checkpoints/step-000006/manifest.json")))
        check(manifest["step"] == 6 and manifest["trainer"]["data_position"] == 24, "manifest: step and data position")

        # Killed after step 3 (newest checkpoint: step 2), resumed on the same grid: bit for bit.
        run(args + ["--out", out("one_cut"), "--stop-after", "3"])
        check(len(losses(out("one_cut"))) == 3, "interrupted run logged 3 steps")
        run(args + ["--out", out("one_cut"), "--resume"])
        compare(ref, losses(out("one_cut")), "1 rank, resumed from step 2", exact=True)
        check(open(out("one/model/model.safetensors"), "rb").read() == open(out("one_cut/model/model.safetensors"), "rb").read(),
              "resumed run's model identical to the uninterrupted one")
        run(args + ["--out", out("tp2"), "--tp", "2"], 2)
        run(args + ["--out", out("tp2_cut"), "--tp", "2", "--stop-after", "3"], 2)
        run(args + ["--out", out("tp2_cut"), "--tp", "2", "--resume"], 2)
        compare(losses(out("tp2")), losses(out("tp2_cut")), "TP2, resumed from step 2", exact=True)

        # A real kill (SIGKILL while it runs, once a checkpoint is complete), then --resume.
        long = common + ["--steps", "40", "--save-every", "2", "--train-all"]
        run(long + ["--out", out("long")])
        cmd = [BIN] + long + ["--out", out("killed"), "--threads", "1", "--log-level", "warn"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt = out("killed/checkpoints/step-000004")
        while proc.poll() is None and not os.path.exists(ckpt):
            pass
        proc.kill()
        proc.wait()
        done = len([l for l in losses(out("killed")) if l]) if os.path.exists(out("killed/train_log.jsonl")) else 0
        check(not os.path.exists(out("killed/model")), f"killed before the end (no model yet; {done} log lines)")
        run(long + ["--out", out("killed"), "--resume"])
        compare(losses(out("long")), losses(out("killed")), "killed and resumed", exact=True)

    elif MODE == "reshard":
        # Written by TP2xDP2, resumed by PP2 and by one rank: resharded parameters and moments.
        args = common + ["--steps", "6", "--save-every", "2", "--train-all"]
        run(args + ["--out", out("one")])
        ref = losses(out("one"))
        run(args + ["--out", out("tp2dp2"), "--tp", "2", "--stop-after", "3"], 4)
        for name, np_, grid in [("pp2", 2, ["--pp", "2"]), ("1", 1, [])]:
            shutil.copytree(out("tp2dp2"), out("re_" + name))
            run(args + ["--out", out("re_" + name), "--resume"] + grid, np_)
            compare(ref, losses(out("re_" + name)), f"TP2xDP2 checkpoint resumed on {name}")

    elif MODE == "sift":
        def read_increments(path):
            t = read_safetensors(path)
            return {n[: -len(".sift_index")]: (t[n], t[n[: -len(".sift_index")] + ".sift_delta"])
                    for n in t if n.endswith(".sift_index")}

        # RHO = 1 trains every entry: the same as dense AdamW (clipping, weight decay, schedule).
        args = common + ["--steps", "10", "--train-all", "--micro-batches", "2"]
        run(args + ["--out", out("dense")])
        run(args + ["--out", out("rho1"), "--sparse-increment", "1"])
        compare(losses(out("dense")), losses(out("rho1")), "RHO=1 vs dense AdamW, 10 steps")
        dense, rho1 = model_tensors(out("dense/model")), model_tensors(out("rho1/model"))
        d = max(float(np.abs(dense[n] - rho1[n]).max()) for n in dense)
        check(d <= TOL, f"RHO=1 vs dense AdamW: final weights max diff {d:.3g}")

        # RHO = 0.05: exactly k entries per tensor train; the rest stay bit for bit.
        rho = 0.05
        sargs = common + ["--steps", "6", "--train-all", "--sparse-increment", str(rho), "--save-every", "2"]
        run(sargs + ["--out", out("s1"), "--save-increments", out("s1.safetensors")])
        src, s1 = model_tensors(emu), model_tensors(out("s1/model"))
        inc1 = read_increments(out("s1.safetensors"))
        check(sorted(inc1) == sorted(n for n in src), f"increments of every trained tensor ({len(inc1)})")
        sizes = {n: (len(inc1[n][0]), int(np.floor(rho * src[n].size)) + 1) for n in inc1}
        check(all(a == b for a, b in sizes.values()), "exactly floor(rho numel) + 1 entries per tensor")
        untouched = changed = True
        for n, (idx, delta) in inc1.items():
            mask = np.zeros(src[n].size, bool)
            mask[idx] = True
            untouched &= np.array_equal(src[n].reshape(-1)[~mask], s1[n].reshape(-1)[~mask])
            changed &= np.array_equal(s1[n].reshape(-1)[idx] - src[n].reshape(-1)[idx], delta)
        check(untouched, "entries outside the mask bit-identical to the base")
        check(changed, "increments = trained - base at the mask (fp32, bitwise)")
        check(np.mean([float(np.abs(inc1[n][1]).max()) > 0 for n in inc1]) == 1.0, "every tensor's increment nonzero")

        # The mask (and the run) on other grids: DP2 broadcasts rank 0's, TP2 selects over shards.
        # k_proj.bias is left out: softmax ignores it, so its gradient is 0 but for rounding, and
        # its mask and Adam-normalised steps are rounding noise that differs between grids.
        real = [n for n in inc1 if not n.endswith("k_proj.bias")]
        for name, np_, grid in [("dp2", 2, []), ("tp2", 2, ["--tp", "2"]), ("tp2pp2", 4, ["--tp", "2", "--pp", "2"])]:
            run(sargs + ["--out", out("s_" + name), "--save-increments", out(name + ".safetensors")] + grid, np_)
            inc = read_increments(out(name + ".safetensors"))
            check(sorted(inc) == sorted(inc1) and all(len(inc[n][0]) == len(inc1[n][0]) for n in inc1),
                  f"{name}: increments of the same tensors, k entries each")
            same = all(np.array_equal(inc[n][0], inc1[n][0]) for n in real)
            check(same, f"{name}: the same k-set as 1 rank in all {len(real)} tensors with a real gradient")
            d = max(float(np.abs(inc[n][1] - inc1[n][1]).max()) for n in real)
            check(d <= TOL, f"{name}: increments max diff {d:.3g} from 1 rank's")
            compare(losses(out("s1")), losses(out("s_" + name)), f"{name} vs 1 rank, SIFT losses")

        # Resume on the same grid continues exactly; another grid is refused.
        run(sargs + ["--out", out("s1_cut"), "--stop-after", "3"])
        run(sargs + ["--out", out("s1_cut"), "--resume", "--save-increments", out("cut.safetensors")])
        compare(losses(out("s1")), losses(out("s1_cut")), "SIFT, resumed from step 2", exact=True)
        check(open(out("s1.safetensors"), "rb").read() == open(out("cut.safetensors"), "rb").read(),
              "resumed run's increments identical to the uninterrupted one")
        p = run(sargs + ["--out", out("s1_cut"), "--resume", "--tp", "2"], 2, expect=2)
        check("same TP and PP" in p.stderr, "SIFT checkpoint resumed on TP2: refused (exit 2)")

        # merge: base + increments, bitwise in fp32.
        run(["merge", "--model", emu, "--increments", out("s1.safetensors"), "--out", out("merged")])
        merged = model_tensors(out("merged"))
        ok = sorted(merged) == sorted(src)
        for n in src:
            want = src[n].reshape(-1).copy()
            if n in inc1:
                want[inc1[n][0]] = want[inc1[n][0]] + inc1[n][1]
            ok &= np.array_equal(merged[n].reshape(-1), want)
        check(ok, "merged weights == base + increments (bitwise, fp32)")
        logits = {}
        tokens = os.path.join(work, "in.jsonl")
        with open(tokens, "w") as f:
            f.write('{"tokens": [5, 9, 17, 33, 2, 41]}\n')
        for name in ["merged", "s1/model"]:
            run(["forward", "--model", out(name), "--input", tokens, "--out", out(name.replace("/", "_") + ".h5")])
            with h5py.File(out(name.replace("/", "_") + ".h5")) as h:
                logits[name] = h["logits"][:]
        d = float(np.abs(logits["merged"] - logits["s1/model"]).max())
        check(d <= TOL, f"merged model's logits vs the trained model's: max diff {d:.3g}")

        # A new family: Qwen2 with q/k/v biases (split with their columns under TP), two KV heads and
        # tied embeddings (one tensor, one increment). TP2 selects the same k entries and gives 1 rank's
        # increments and losses; merge adds the increments to the base.
        qwen = os.path.join(FIXTURES, "models", "qwen2_bias")
        qargs = ["train", "--model", qwen, "--data", data, "--batch-size", "4", "--lr", "3e-3", "--warmup", "2",
                 "--weight-decay", "0.01", "--seed", "5", "--steps", "4", "--train-all", "--sparse-increment", str(rho)]
        run(qargs + ["--out", out("q1"), "--save-increments", out("q1.safetensors")])
        qsrc, q1 = model_tensors(qwen), model_tensors(out("q1/model"))
        qinc = read_increments(out("q1.safetensors"))
        check(sorted(q1) == sorted(qsrc) and "lm_head.weight" not in qinc and sorted(qinc) == sorted(qsrc),
              f"qwen2: increments of every tensor, the tied head once ({len(qinc)})")
        check(all(len(qinc[n][0]) == int(np.floor(rho * qsrc[n].size)) + 1 for n in qinc),
              "qwen2: exactly floor(rho numel) + 1 entries per tensor")
        ok = True
        for n, (idx, delta) in qinc.items():
            mask = np.zeros(qsrc[n].size, bool)
            mask[idx] = True
            ok &= np.array_equal(qsrc[n].reshape(-1)[~mask], q1[n].reshape(-1)[~mask])
            ok &= np.array_equal(q1[n].reshape(-1)[idx] - qsrc[n].reshape(-1)[idx], delta)
        check(ok, "qwen2: only the k entries move, increments = trained - base (bitwise)")
        run(qargs + ["--out", out("q_tp2"), "--save-increments", out("q_tp2.safetensors"), "--tp", "2"], 2)
        inc = read_increments(out("q_tp2.safetensors"))
        real = [n for n in qinc if not n.endswith("k_proj.bias")]  # see the k_proj.bias note above
        check(sorted(inc) == sorted(qinc) and all(np.array_equal(inc[n][0], qinc[n][0]) for n in real),
              f"qwen2 TP2: the same k-set as 1 rank in all {len(real)} tensors with a real gradient")
        d = max(float(np.abs(inc[n][1] - qinc[n][1]).max()) for n in real)
        check(d <= TOL, f"qwen2 TP2: increments max diff {d:.3g} from 1 rank's")
        compare(losses(out("q1")), losses(out("q_tp2")), "qwen2 TP2 vs 1 rank, SIFT losses")
        run(["merge", "--model", qwen, "--increments", out("q1.safetensors"), "--out", out("q_merged")])
        merged = model_tensors(out("q_merged"))
        ok = sorted(merged) == sorted(qsrc)
        for n in qsrc:
            want = qsrc[n].reshape(-1).copy()
            want[qinc[n][0]] += qinc[n][1]
            ok &= np.array_equal(merged[n].reshape(-1), want)
        d = max(float(np.abs(merged[n] - q1[n]).max()) for n in q1)
        check(ok and d <= TOL, f"qwen2: merged weights == base + increments (bitwise, fp32), {d:.3g} from the trained")

        # Bad input: one line, exit code 2.
        def expect_error(name, args, *words):
            p = run(args, 1, expect=2)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(len(lines) == 1 and all(w in lines[0] for w in words), f"{name}: {lines[-1] if lines else ''}")

        for bad in ["0", "-0.1", "1.5"]:
            expect_error(f"--sparse-increment {bad}", common + ["--steps", "2", "--train-all", "--sparse-increment", bad,
                                                                "--out", out("x")], "--sparse-increment")
        expect_error("--save-increments without SIFT", common + ["--steps", "2", "--train-all", "--save-increments",
                                                                 out("i.safetensors"), "--out", out("x")], "--sparse-increment")
        expect_error("merge of a missing file", ["merge", "--model", emu, "--increments", out("none.safetensors"),
                                                 "--out", out("x")], "none.safetensors", "not found")
        other = os.path.join(FIXTURES, "models", "llama_gqa")
        expect_error("merge into another model", ["merge", "--model", other, "--increments", out("s1.safetensors"),
                                                  "--out", out("x")], "not in the base model")
        # The same names with another shape: the increments' recorded shape of one tensor changed.
        with open(out("s1.safetensors"), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            rest = f.read()
        shapes = json.loads(header["__metadata__"]["shapes"])
        first = sorted(shapes)[0]
        shapes[first] = [x + 1 for x in shapes[first]]
        header["__metadata__"]["shapes"] = json.dumps(shapes)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(out("badshape.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + rest)
        expect_error("merge with a mismatched shape", ["merge", "--model", emu, "--increments", out("badshape.safetensors"),
                                                       "--out", out("x")], first, "shape")
        check(not os.path.exists(out("x")), "no output left behind by the failures")

    elif MODE == "bad":
        def expect_error(name, args, *words):
            p = run(args, 1, expect=2)
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            ok = len(lines) == 1 and all(w in lines[0] for w in words)
            check(ok, f"{name}: {lines[-1] if lines else '(no message)'}")

        args = common + ["--steps", "2"]
        expect_error("resume without a checkpoint", args + ["--out", out("none"), "--resume"], "no complete checkpoint")
        expect_error("--steps 0", common + ["--steps", "0", "--out", out("x")], "--steps")
        expect_error("missing data", ["train", "--model", emu, "--data", out("nope.jsonl"), "--out", out("x")],
                     "nope.jsonl", "not found")
        expect_error("batch does not split", args + ["--micro-batches", "3", "--out", out("x")], "--micro-batches")
        plain = os.path.join(FIXTURES, "models", "opt_preln")
        expect_error("no plan, no --train-all", ["train", "--model", plain, "--data", data, "--out", out("x")],
                     "crash_plan.json", "--train-all")
        frozen = os.path.join(work, "frozen")
        shutil.copytree(emu, frozen)
        plan["slots"] = [{"source": l, "train": False, "stored_as": l} for l in range(4)]
        with open(os.path.join(frozen, "crash_plan.json"), "w") as f:
            json.dump(plan, f)
        expect_error("plan without trainable layers", ["train", "--model", frozen, "--data", data, "--out", out("x")],
                     "no trainable")
        expect_error("--train-last beyond the model", args + ["--train-last", "9", "--out", out("x")], "--train-last 9")
        expect_error("--train-last with --train-all", args + ["--train-all", "--train-last", "1", "--out", out("x")],
                     "--train-all")
        expect_error("--train-head with LoRA", args + ["--train-last", "1", "--train-head", "--lora-rank", "2", "--out",
                                                       out("x")], "--train-head")
        expect_error("--log-interval 0", args + ["--log-interval", "0", "--out", out("x")], "--log-interval")
        # A log line at steps 1, 2, 4 and 5 of 5 with --log-interval 2, each with the mean loss since the last.
        p = subprocess.run([BIN] + common + ["--steps", "5", "--log-interval", "2", "--out", out("logged"), "--threads",
                                             "1"], capture_output=True, text=True, timeout=300)
        lines = re.findall(r"step (\d+)/5: loss ([0-9.]+)", p.stderr)
        with open(out("logged/train_log.jsonl")) as f:
            losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
        want = {1: losses[1], 2: losses[2], 4: (losses[3] + losses[4]) / 2, 5: losses[5]}
        check([int(a) for a, _ in lines] == [1, 2, 4, 5] and all(
            abs(float(b) - want[int(a)]) < 1e-4 for a, b in lines), f"--log-interval 2: lines {lines}, want {want}")
        run(args + ["--out", out("done")])
        expect_error("existing OUT", args + ["--out", out("done")], "--resume", "--overwrite")
        other_lr = [("1e-2" if prev == "--lr" else a) for prev, a in zip([""] + args, args)]
        expect_error("resume with another --lr", other_lr + ["--out", out("done"), "--resume"], "lr", "0.01")
        shutil.rmtree(out("done/checkpoints/step-000002"))
        os.makedirs(out("done/checkpoints/step-000002"))
        expect_error("checkpoint without manifest", args + ["--out", out("done"), "--resume"],
                     "no complete checkpoint")
        check(not os.path.exists(out("x")), "no output left behind by the failures")
    elif MODE == "zero":
        # lr 3e-4: AdamW's first steps turn rounding in near-zero gradients into weight changes of
        # order lr x rounding / eps, so at 3e-3 the replicated DP2 run is already 1.2e-6 from 1 rank.
        args = [("3e-4" if prev == "--lr" else a) for prev, a in zip([""] + common, common)] + [
            "--steps", "3", "--train-all", "--save-every", "1"]
        ZTOL = 1e-6

        def weights_diff(a, b, skip_noise=False):
            wa, wb = model_tensors(out(a + "/model")), model_tensors(out(b + "/model"))
            if sorted(wa) != sorted(wb):
                return float("inf")
            # k_proj.bias: softmax ignores it, so its gradient is rounding noise that differs
            # between grids (not between optimisers on one grid).
            names = [n for n in wa if not (skip_noise and n.endswith("k_proj.bias"))]
            return max(float(np.abs(wa[n].astype(np.float64) - wb[n]).max()) for n in names)

        def first_bytes(name):
            return json.loads(open(out(name + "/train_log.jsonl")).readline())["optimizer_state_bytes"]

        def run_info(extra, np_):
            """A run at --log-level info: every rank's set-up line {rank: optimiser bytes}."""
            cmd = MPIRUN + ["-np", str(np_), BIN] + args + extra + ["--threads", "1", "--log-level", "info", "--log-all-ranks"]
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               timeout=300)
            if p.returncode != 0:
                raise SystemExit(f"FAIL: {' '.join(cmd)}\n{p.stderr[-3000:]}")
            return {int(r): int(b) for b, r in re.findall(r"optimizer state at set-up: (\d+) bytes on rank (\d+)",
                                                           p.stdout + p.stderr)}

        run(args + ["--out", out("one")])
        for name, np_, grid in [("dp2", 2, []), ("tp2dp2", 4, ["--tp", "2"]), ("pp2dp2", 4, ["--pp", "2"])]:
            if name != "pp2dp2":
                run(args + ["--out", out(name)] + grid, np_)
            if name == "dp2":
                per_rank = run_info(["--out", out(name + "_zero"), "--distributed-optimizer"], np_)
            else:
                run(args + ["--out", out(name + "_zero"), "--distributed-optimizer"] + grid, np_)
            if name != "pp2dp2":
                compare(losses(out(name)), losses(out(name + "_zero")), f"{name}: distributed vs replicated optimiser",
                        exact=True)
                d = weights_diff(name, name + "_zero")
                check(d <= ZTOL, f"{name}: weights after 3 steps, distributed vs replicated optimiser: max diff {d:.3g}")
            d = weights_diff("one", name + "_zero", skip_noise=True)
            check(d <= ZTOL, f"{name} distributed optimiser vs 1 rank: weights max diff {d:.3g}")
            # fp32 moments of this rank's parameters (fp32 parameters are their own masters), split
            # into DP equal parts: rank 0 holds the first ceil(n / 2).
            if name != "pp2dp2":
                rep, zero = first_bytes(name), first_bytes(name + "_zero")
                n = rep // 8
                check(zero == 8 * ((n + 1) // 2), f"{name}: rank 0's optimiser state {zero} bytes, replicated {rep}")

        # Every rank's figure (info log): the DP ranks' parts add up to the replicated state.
        rep = first_bytes("dp2")
        check(sorted(per_rank) == [0, 1] and sum(per_rank.values()) == rep and
              max(per_rank.values()) - min(per_rank.values()) <= 8, f"DP2 per-rank optimiser state {per_rank}, replicated {rep}")

        # One rank: the option is accepted and is AdamW. Accumulation adds into the flat buffer.
        run(args + ["--out", out("one_zero"), "--distributed-optimizer"])
        d = weights_diff("one", "one_zero")
        check(d <= ZTOL, f"1 rank: weights with the option vs without: max diff {d:.3g}")
        run(args + ["--out", out("acc"), "--grad-accum", "2"], 2)
        run(args + ["--out", out("acc_zero"), "--grad-accum", "2", "--distributed-optimizer"], 2)
        d = weights_diff("acc", "acc_zero")
        check(d <= ZTOL, f"DP2 --grad-accum 2: weights distributed vs replicated optimiser: max diff {d:.3g}")

        # bf16 parameters, fp32 masters: the same arithmetic as the replicated optimiser.
        bf = args + ["--dtype", "bfloat16"]
        run(bf + ["--out", out("bf_dp2")], 2)
        run(bf + ["--out", out("bf_dp2_zero"), "--distributed-optimizer"], 2)
        d = weights_diff("bf_dp2", "bf_dp2_zero")
        check(d <= ZTOL, f"bf16 DP2: weights distributed vs replicated optimiser: max diff {d:.3g}")
        rep, zero = first_bytes("bf_dp2"), first_bytes("bf_dp2_zero")
        check(zero == 12 * ((rep // 12 + 1) // 2), f"bf16 DP2: rank 0's state {zero} bytes (masters too), replicated {rep}")

        # Checkpoints resume on another DP size, with or without the option.
        ref = losses(out("one"))
        for name, np_, grid, flag, rnp, rgrid, rflag in [
            ("dp2z_to_1", 2, [], True, 1, [], False),
            ("dp4z_to_dp2z", 4, [], True, 2, [], True),
            ("1_to_dp2z", 1, [], False, 2, [], True),
        ]:
            z = ["--distributed-optimizer"]
            run(args + ["--out", out(name), "--stop-after", "2"] + grid + (z if flag else []), np_)
            run(args + ["--out", out(name), "--resume"] + rgrid + (z if rflag else []), rnp)
            compare(ref, losses(out(name)), f"{name}: resumed run vs uninterrupted 1 rank")
            d = weights_diff("one", name, skip_noise=True)
            check(d <= ZTOL, f"{name}: resumed run's weights vs uninterrupted 1 rank: max diff {d:.3g}")
        files = sorted(os.listdir(out("dp4z_to_dp2z/checkpoints/step-000002")))
        check(sum("-dp" in f for f in files) == 3, f"DP4 checkpoint: a file per DP rank: {files}")

        p = run(common + ["--steps", "2", "--distributed-optimizer", "--sparse-increment", "0.5", "--out", out("x")],
                1, expect=2)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        check(len(lines) == 1 and "--distributed-optimizer" in lines[0], f"with SIFT: {lines[-1] if lines else ''}")
        check(not os.path.exists(out("x")), "no output left behind by the failure")
    else:
        raise SystemExit(f"unknown mode {MODE}")
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"{passes} passed, {failures} failed")
sys.exit(1 if failures else 0)
