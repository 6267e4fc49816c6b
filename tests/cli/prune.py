#!/usr/bin/env python3
"""emulate --mode prune / merge end to end on fixture models, checked in NumPy:
- prune --remove: the kept layers' tensors byte-equal to the source's (renumbered), everything
  outside the layers byte-equal, config.json (num_hidden_layers, layer_types re-indexed),
  crash_plan.json (mode, slots, what trains, the removed layers);
- prune --from-importance (block_influence, cka_importance, angular_distance, sleb): the layers
  NumPy picks from the same file (lowest scores; the angular block with the lowest d(l, n); the
  first of SLEB's order), with the scores recorded in the plan; also from a file the importance
  job made;
- merge's LaCo search: replayed in Python from its recorded similarities; its weights and tensors;
- merge (LaCo): each merged tensor equals theta_l + sum_i (theta_l+i - theta_l) in NumPy fp64,
  norms are layer l's; --calibration's cosine similarities equal NumPy's on the forward job's
  final hidden states of both models, and 2 ranks (TP2) give the one-rank numbers;
- importance --methods sleb: the removal order and perplexities of a plain PyTorch run
  (tests/fixtures/sleb/generate.py) on two fixture models, one rank and TP2; emulate from it;
- the forward job runs on the pruned and merged folders; plugin refuses them;
- bad input exits 2 with one line."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

binary, fixtures = sys.argv[1], sys.argv[2]
MODELS = os.path.join(fixtures, "models")
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
results = []
start = time.time()


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def run(job, args, np_=1, check_rc=True):
    cmd = ([*MPIRUN, "-np", str(np_)] if np_ > 1 else []) + [binary, job, "--log-level", "warn", "--threads", "1"] + args
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check_rc and p.returncode != 0:
        print(p.stdout, p.stderr)
        raise SystemExit(f"{job} failed: {' '.join(cmd)}")
    return p


def one_line_error(p, want):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    return p.returncode == 2 and len(lines) == 1 and all(w in p.stderr for w in want)


def raw_tensors(folder):
    """name -> (dtype, shape, bytes) of every tensor in the folder's safetensors files."""
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    out = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for k, info in header.items():
            if k != "__metadata__":
                a, b = info["data_offsets"]
                out[k] = (info["dtype"], info["shape"], data[a:b])
    return out


def as_array(t):
    dtype, shape, data = t
    assert dtype == "F32", dtype
    return np.frombuffer(data, dtype=np.float32).reshape(shape).astype(np.float64)


def layer_of(name):
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def renamed(name, layer):
    parts = name.split(".")
    parts[parts.index("layers") + 1] = str(layer)
    return ".".join(parts)


def config(folder):
    return json.load(open(os.path.join(folder, "config.json")))


def plan(folder):
    return json.load(open(os.path.join(folder, "crash_plan.json")))


def check_pruned(label, src, out, kept, train_last=0):
    """Tensors, config and slots of a folder that keeps the source layers `kept` in order."""
    s, o = raw_tensors(src), raw_tensors(out)
    want = {}
    for name, t in s.items():
        l = layer_of(name)
        if l is None:
            want[name] = t
        elif l in kept:
            want[renamed(name, kept.index(l))] = t
    check(f"{label}: kept tensors byte-equal to the source's layers {kept}", o == want,
          f"({len(o)} tensors, {len(set(o) ^ set(want))} names differ)")
    c, sc = config(out), config(src)
    ok = c["num_hidden_layers"] == len(kept)
    if "layer_types" in sc:
        ok = ok and c["layer_types"] == [sc["layer_types"][l] for l in kept]
    check(f"{label}: config.json num_hidden_layers {c['num_hidden_layers']}, layer_types {c.get('layer_types')}", ok)
    p = plan(out)
    n = len(kept)
    ok = (p["format"] == "crash-hpc emulator plan 1" and p["full_layers"] == config(src)["num_hidden_layers"] and
          [x["source"] for x in p["slots"]] == kept and [x["stored_as"] for x in p["slots"]] == list(range(n)) and
          [x["train"] for x in p["slots"]] == [i >= n - train_last for i in range(n)] and
          p["adapters"] == [0, train_last] and os.path.samefile(p["source_model"], src))
    check(f"{label}: crash_plan.json slots, training, source", ok)
    return p


def write_text_task(folder, n, seed, vocab):
    """A prepared text task with random token ids (the fixture models have no tokenizer)."""
    rnd = np.random.default_rng(seed)
    os.makedirs(folder)
    with open(os.path.join(folder, "shard-00000.jsonl"), "w") as f:
        for i in range(n):
            tokens = [int(x) for x in rnd.integers(3, vocab, int(rnd.integers(5, 14)))]
            f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": tokens}) + "\n")
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"kind": "text", "task": "synthetic", "shards": ["shard-00000.jsonl"]}, f)
    return folder


def write_importance(path, model, L, model_type, scores):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "crash-hpc importance 1"
        f.attrs["methods"] = json.dumps(list(scores))
        f.attrs["num_layers"] = L
        f.attrs["model"] = model
        f.attrs["model_type"] = model_type
        for k, v in scores.items():
            if k == "sleb":
                f["sleb_order"] = np.asarray(v[0], dtype=np.int64)
                f["sleb_perplexity"] = np.asarray(v[1], dtype=np.float64)
            else:
                f[k] = np.asarray(v, dtype=np.float64)


def numpy_choice(path, method, ratio):
    """The layers NumPy removes, from the file's own datasets."""
    with h5py.File(path, "r") as f:
        L = int(f.attrs["num_layers"])
        n = int(round(ratio * L))
        if method == "angular_distance":
            d = f["angular_distance"][()][: L - n + 1, n - 1]
            l = int(np.nanargmin(d))
            return list(range(l, l + n)), d
        if method == "sleb":
            return sorted(int(x) for x in f["sleb_order"][()][:n]), f["sleb_perplexity"][()]
        v = f[method][()]
        order = [int(i) for i in np.argsort(np.where(np.isnan(v), np.inf, v), kind="stable")]
        return sorted(order[:n]), v


def forward_last(model, tokens_file, out):
    """The forward job's final hidden state at each sequence's last token."""
    run("forward", ["--model", model, "--input", tokens_file, "--out", out, "--batch-size", "4"])
    with h5py.File(out, "r") as f:
        n = f.attrs["num_hidden_states"]
        h = f[f"hidden_states/{n - 1}"][()].astype(np.float64)
        last = f["attention_mask"][()].sum(1) - 1
    return h[np.arange(len(h)), last]


with tempfile.TemporaryDirectory() as tmp:
    llama, gemma, qwen2 = (os.path.join(MODELS, m) for m in ("llama_gqa", "gemma2_softcap", "qwen2_bias"))

    # ---- prune --remove ----
    out = os.path.join(tmp, "llama_pruned")
    run("emulate", ["--model", llama, "--mode", "prune", "--remove", "1", "--out", out])
    p = check_pruned("remove 1 (llama_gqa)", llama, out, [0, 2, 3])
    check("remove 1: plan records the method and the removed layers",
          p["mode"] == "prune" and p["pruning"]["method"] == "remove" and p["pruning"]["removed"] == [1])
    out_g = os.path.join(tmp, "gemma_pruned")
    run("emulate", ["--model", gemma, "--mode", "prune", "--remove", "1", "--train-last", "1", "--out", out_g])
    check_pruned("remove 1 --train-last 1 (gemma2: sliding/full layer_types)", gemma, out_g, [0, 2, 3], 1)
    out_q = os.path.join(tmp, "qwen2_pruned")
    run("emulate", ["--model", qwen2, "--mode", "prune", "--remove", "0,2-3", "--out", out_q])
    check_pruned("remove 0,2-3 (qwen2 biases)", qwen2, out_q, [1])

    # ---- prune --from-importance: a file with every method (NaN where a score is missing) ----
    imp = os.path.join(tmp, "qwen2.h5")
    L = 4
    rng = np.random.default_rng(7)
    ang = np.full((L, L), np.nan)
    for l in range(L):
        ang[l, : L - l] = rng.uniform(0.05, 0.5, L - l)
    scores = {"block_influence": [0.31, 0.12, np.nan, 0.12], "angular_distance": ang,
              "cka_importance": rng.uniform(0, 1, L), "sleb": ([2, 0], [5.5, 7.25])}
    write_importance(imp, qwen2, L, "qwen2", scores)
    for method, ratios in (("block_influence", (0.25, 0.5)), ("cka_importance", (0.5,)),
                           ("angular_distance", (0.25, 0.5)), ("sleb", (0.5,))):
        for ratio in ratios:
            out = os.path.join(tmp, f"qwen2_{method}_{ratio}")
            run("emulate", ["--model", qwen2, "--mode", "prune", "--from-importance", imp, "--method", method,
                            "--ratio", str(ratio), "--out", out])
            removed, values = numpy_choice(imp, method, ratio)
            kept = [l for l in range(L) if l not in removed]
            p = check_pruned(f"{method} ratio {ratio}", qwen2, out, kept)
            got = np.array([np.nan if v is None else v for v in p["pruning"]["scores"]["values"]], dtype=np.float64)
            check(f"{method} ratio {ratio}: removes {removed} as NumPy does, scores recorded",
                  p["pruning"]["removed"] == removed and p["pruning"]["method"] == method and
                  p["pruning"]["ratio"] == ratio and os.path.samefile(p["pruning"]["scores"]["file"], imp) and
                  np.array_equal(got, np.asarray(values, dtype=np.float64), equal_nan=True))

    # From a file the importance job made (collect --pooling none on the calibration task).
    calib = write_text_task(os.path.join(tmp, "calib"), 12, 3, 130)
    archive, real = os.path.join(tmp, "llama.h5"), os.path.join(tmp, "llama_importance.h5")
    run("collect", ["--model", llama, "--data", calib, "--out", archive, "--pooling", "none"])
    run("importance", ["--archive", archive, "--model", llama, "--out", real])
    for method in ("block_influence", "angular_distance"):
        out = os.path.join(tmp, f"llama_{method}")
        run("emulate", ["--model", llama, "--mode", "prune", "--from-importance", real, "--method", method, "--ratio",
                        "0.5", "--out", out])
        removed, _ = numpy_choice(real, method, 0.5)
        p = check_pruned(f"importance job's {method}", llama, out, [l for l in range(4) if l not in removed])
        check(f"importance job's {method}: removes {removed}", p["pruning"]["removed"] == removed)

    # ---- merge (LaCo) ----
    tokens = os.path.join(tmp, "tokens.jsonl")
    with open(os.path.join(calib, "shard-00000.jsonl")) as f, open(tokens, "w") as g:
        for line in f:
            g.write(json.dumps({"tokens": json.loads(line)["tokens"]}) + "\n")
    for name, src, groups, kept in (("llama_gqa", llama, "1-3", [0, 1]), ("qwen2_bias", qwen2, "0-1,2-3", [0, 2])):
        out = os.path.join(tmp, f"{name}_merged")
        run("emulate", ["--model", src, "--mode", "merge", "--merge", groups, "--calibration", calib, "--out", out])
        s, o = raw_tensors(src), raw_tensors(out)
        p = plan(out)
        spans = [list(range(int(a), int(b) + 1)) for a, b in (g.split("-") for g in groups.split(","))]
        worst, norms_ok, names_ok = 0.0, True, True
        for slot, first in enumerate(kept):
            group = next((g for g in spans if g[0] == first), [first])
            for t in [n for n in s if layer_of(n) == first]:
                got = o.get(renamed(t, slot))
                if got is None:
                    names_ok = False
                    continue
                if "norm" in t.split(".")[-2]:
                    norms_ok = norms_ok and got == s[t]
                    continue
                base = as_array(s[t])
                want = base + sum(as_array(s[renamed(t, l)]) - base for l in group[1:])
                worst = max(worst, float(np.max(np.abs(as_array(got) - want)) / max(np.max(np.abs(want)), 1e-6)))
        outside_ok = all(o.get(n) == t for n, t in s.items() if layer_of(n) is None)
        check(f"merge {groups} ({name}): merged tensors = theta_l + sum(theta_l+i - theta_l) in NumPy",
              worst < 1e-6 and names_ok and len(o) == len([n for n in s if layer_of(n) is None or layer_of(n) in kept]),
              f"(worst relative {worst:.1e})")
        check(f"merge {groups} ({name}): norms are the first layer's, embeddings and head unchanged",
              norms_ok and outside_ok)
        check(f"merge {groups} ({name}): config and plan",
              config(out)["num_hidden_layers"] == len(kept) and p["mode"] == "merge" and
              [x["source"] for x in p["slots"]] == kept and
              [x.get("merged", []) for x in p["slots"]] == [next((g[1:] for g in spans if g[0] == k), []) for k in kept]
              and p["pruning"]["merged_groups"] == spans)
        # The calibration check against NumPy on the forward job's outputs of both models.
        a = forward_last(src, tokens, os.path.join(tmp, f"{name}_full_fwd.h5"))
        b = forward_last(out, tokens, os.path.join(tmp, f"{name}_merged_fwd.h5"))
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        cal = p["pruning"]["calibration"]
        diff = float(np.max(np.abs(np.asarray(cal["cosine"]) - cos)))
        check(f"merge {groups} ({name}): calibration cosine equals NumPy on the forward job's states",
              cal["num_examples"] == 12 and diff < 1e-5 and abs(cal["mean_cosine"] - cos.mean()) < 1e-5,
              f"(mean {cal['mean_cosine']:.4f}, max diff {diff:.1e})")
    # LaCo's search: replayed in Python from the recorded similarities (which groups it tries, what
    # it keeps), the merged weights as sums of the original layers, the final check equal to the
    # last kept step's similarity.
    out = os.path.join(tmp, "llama_laco")
    run("emulate", ["--model", llama, "--mode", "merge", "--calibration", calib, "--ratio", "0.5", "--merge-size",
                    "2", "--threshold", "0.5", "--out", out])
    p = plan(out)
    steps = p["pruning"]["search"]["steps"]
    slots = [{l: 1.0} for l in range(4)]  # each slot as weights over the original layers
    l, removed, replay_ok, last = 4 - 2, 0, True, None
    for st in steps:
        if not (l >= 0 and removed < 2):
            replay_ok = False
            break
        count = min(2, 2 - removed + 1)
        merged = dict(slots[l])
        for other in slots[l + 1:l + count]:
            for k, v in other.items():
                merged[k] = merged.get(k, 0.0) + v
            for k, v in slots[l].items():
                merged[k] -= v
        replay_ok = replay_ok and st["layers"] == sorted(merged) and st["accepted"] == (st["similarity"] > 0.5)
        if st["accepted"]:
            slots = slots[:l] + [merged] + slots[l + count:]
            removed += count - 1
            last = st["similarity"]
            l -= 1
            l = len(slots) - 2 if l + 2 > len(slots) else l
        else:
            l -= 1
    replay_ok = replay_ok and not (l >= 0 and removed < 2) and p["pruning"]["removed_count"] == removed
    got = [{x["source"]: 1.0} if "merged" not in x else dict(zip([x["source"]] + x["merged"], x["weights"]))
           for x in p["slots"]]
    check("LaCo search: the groups tried and kept replay in Python, the plan's weights match",
          replay_ok and got == slots and len(steps) >= 2, f"({len(steps)} steps, {removed} layers merged away)")
    check("LaCo search: the final calibration check equals the last kept step's similarity",
          last is not None and abs(p["pruning"]["calibration"]["mean_cosine"] - last) < 1e-9,
          f"({p['pruning']['calibration']['mean_cosine']:.6f})")
    s_, o_ = raw_tensors(llama), raw_tensors(out)
    worst = 0.0
    for slot, w in enumerate(slots):
        first = min(w)
        for t in [n for n in s_ if layer_of(n) == first and "norm" not in n.split(".")[-2]]:
            want = sum(x * as_array(s_[renamed(t, k)]) for k, x in w.items())
            worst = max(worst, float(np.max(np.abs(as_array(o_[renamed(t, slot)]) - want))))
    check("LaCo search: the written tensors are the plan's weighted sums", worst < 1e-6, f"(worst {worst:.1e})")
    check("LaCo search: no candidate folder left", not os.path.exists(out + ".laco-candidate"))

    out2 = os.path.join(tmp, "qwen2_bias_merged_tp2")
    run("emulate", ["--model", qwen2, "--mode", "merge", "--merge", "0-1,2-3", "--calibration", calib, "--tp", "2",
                    "--out", out2], np_=2)
    c1 = np.asarray(plan(os.path.join(tmp, "qwen2_bias_merged"))["pruning"]["calibration"]["cosine"])
    c2 = np.asarray(plan(out2)["pruning"]["calibration"]["cosine"])
    check("merge calibration on TP2 equals one rank", np.max(np.abs(c1 - c2)) < 1e-5,
          f"(max diff {np.max(np.abs(c1 - c2)):.1e})")
    check("merge on TP2 writes the same tensors", raw_tensors(out2) == raw_tensors(os.path.join(tmp, "qwen2_bias_merged")))

    # The forward job runs on a pruned folder; plugin refuses pruned and merged models.
    fwd = os.path.join(tmp, "pruned_fwd.h5")
    run("forward", ["--model", out_g, "--input", tokens, "--out", fwd, "--batch-size", "4"])
    with h5py.File(fwd, "r") as f:
        check("forward on the pruned gemma2", f.attrs["num_hidden_states"] == 4 and np.isfinite(f["logits"][()]).all())
    for label, emu, full in (("pruned", os.path.join(tmp, "llama_pruned"), llama),
                             ("merged", os.path.join(tmp, "llama_gqa_merged"), llama)):
        p = run("plugin", ["--model", full, "--emulator", emu, "--out", os.path.join(tmp, "plug")], check_rc=False)
        check(f"plugin refuses a {label} model", one_line_error(p, [label, "nothing"]) or
              one_line_error(p, [label, "no adapter"]), p.stderr.strip())

    # ---- SLEB (importance --methods sleb) against plain PyTorch (tests/fixtures/sleb/generate.py) ----
    expected = json.load(open(os.path.join(fixtures, "sleb", "expected.json")))
    for (name, want), np_ in zip(sorted(expected["models"].items()), (1, 2)):
        src = os.path.join(MODELS, name)
        task = os.path.join(tmp, f"sleb_{name}")
        os.makedirs(task)
        with open(os.path.join(task, "shard-00000.jsonl"), "w") as f:
            for i, t in enumerate(want["sequences"]):
                f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": t}) + "\n")
        with open(os.path.join(task, "manifest.json"), "w") as f:
            json.dump({"kind": "text", "task": "sleb", "shards": ["shard-00000.jsonl"]}, f)
        imp_sleb = os.path.join(tmp, f"sleb_{name}.h5")
        run("importance", ["--model", src, "--methods", "sleb", "--calibration", task, "--ratio",
                           str(expected["ratio"]), "--out", imp_sleb] + (["--tp", "2"] if np_ > 1 else []), np_=np_)
        with h5py.File(imp_sleb, "r") as f:
            order, ppl = list(f["sleb_order"][()]), f["sleb_perplexity"][()]
            methods = json.loads(f.attrs["methods"])
        rel = float(np.max(np.abs(ppl - want["perplexity"]) / np.asarray(want["perplexity"])))
        check(f"sleb on {name} ({np_} rank(s)): removal order {order} and perplexities as PyTorch's",
              order == want["order"] and rel < 1e-5 and methods == ["sleb"], f"(worst relative {rel:.1e})")
        out = os.path.join(tmp, f"{name}_sleb_pruned")
        run("emulate", ["--model", src, "--mode", "prune", "--from-importance", imp_sleb, "--method", "sleb",
                        "--ratio", "0.5", "--out", out])
        removed = sorted(want["order"][:2])
        p = check_pruned(f"emulate from sleb ({name})", src, out, [l for l in range(4) if l not in removed])
        check(f"emulate from sleb ({name}): removes {removed}", p["pruning"]["removed"] == removed)
    p = run("importance", ["--model", llama, "--methods", "sleb", "--calibration", calib, "--out",
                           os.path.join(tmp, "bad.h5")], check_rc=False)
    check("importance --methods sleb without --ratio -> exit 2", one_line_error(p, ["sleb", "--ratio"]), p.stderr.strip())

    # ---- bad input ----
    other = os.path.join(tmp, "other.h5")
    write_importance(other, llama, L, "llama", {"block_influence": [0.1, 0.2, 0.3, 0.4]})
    deeper = os.path.join(tmp, "deeper.h5")
    write_importance(deeper, qwen2, 6, "qwen2", {"block_influence": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    llama3 = os.path.join(MODELS, "llama3_scaled")
    base = ["--mode", "prune", "--out", os.path.join(tmp, "bad")]
    bad = [
        ("bad layer list", ["--model", llama, *base, "--remove", "1,x"], ["--remove", "1,x"]),
        ("layer out of range", ["--model", llama, *base, "--remove", "4"], ["layer 4", "0..3"]),
        ("a backwards range", ["--model", llama, *base, "--remove", "3-1"], ["3-1", "backwards"]),
        ("removing every layer", ["--model", llama, *base, "--remove", "0-3"], ["leaves none"]),
        ("a layer twice", ["--model", llama, *base, "--remove", "1,1"], ["twice"]),
        ("ratio above 1", ["--model", qwen2, *base, "--from-importance", imp, "--method", "block_influence", "--ratio",
                           "1.5"], ["--ratio", "between 0 and 1"]),
        ("ratio rounding to 0 layers", ["--model", qwen2, *base, "--from-importance", imp, "--method",
                                        "block_influence", "--ratio", "0.1"], ["--ratio", "rounds to 0"]),
        ("ratio removing all", ["--model", qwen2, *base, "--from-importance", imp, "--method", "cka_importance",
                                "--ratio", "0.95"], ["--ratio", "rounds to 4"]),
        ("unknown method", ["--model", qwen2, *base, "--from-importance", imp, "--method", "magic", "--ratio", "0.5"],
         ["--method", "magic"]),
        ("method not in the file", ["--model", llama, *base, "--from-importance", other, "--method",
                                    "angular_distance", "--ratio", "0.5"], ["no /angular_distance"]),
        ("importance file of another model type", ["--model", qwen2, *base, "--from-importance", other, "--method",
                                                   "block_influence", "--ratio", "0.5"], ["llama model", "qwen2"]),
        ("importance file of a deeper model", ["--model", qwen2, *base, "--from-importance", deeper, "--method",
                                               "block_influence", "--ratio", "0.5"], ["6-layer"]),
        ("importance file of another llama", ["--model", llama3, *base, "--from-importance", other, "--method",
                                              "block_influence", "--ratio", "0.5"], ["config.json differs"]),
        ("SLEB order shorter than the ratio", ["--model", qwen2, *base, "--from-importance", imp, "--method", "sleb",
                                               "--ratio", "0.75"], ["sleb_order", "removes 2"]),
        ("not an importance file", ["--model", qwen2, *base, "--from-importance", archive, "--method",
                                    "block_influence", "--ratio", "0.5"], ["not an importance file"]),
        ("both --remove and --from-importance", ["--model", llama, *base, "--remove", "1", "--from-importance", imp],
         ["either --remove"]),
        ("--adapters with prune", ["--model", llama, *base, "--remove", "1", "--adapters", "1,1"], ["--train-last"]),
        ("--train-last too large", ["--model", llama, *base, "--remove", "1", "--train-last", "4"], ["--train-last",
                                                                                                   "0..3"]),
        ("merge group of one layer", ["--model", llama, "--mode", "merge", "--merge", "2", "--out",
                                      os.path.join(tmp, "bad")], ["at least two"]),
        ("overlapping merge groups", ["--model", llama, "--mode", "merge", "--merge", "0-1,1-2", "--out",
                                      os.path.join(tmp, "bad")], ["two merge groups"]),
        ("LaCo search without calibration", ["--model", llama, "--mode", "merge", "--ratio", "0.5", "--out",
                                             os.path.join(tmp, "bad")], ["--calibration"]),
        ("LaCo search with a merge size of 1", ["--model", llama, "--mode", "merge", "--ratio", "0.5", "--calibration",
                                                calib, "--merge-size", "1", "--out", os.path.join(tmp, "bad")],
         ["--merge-size"]),
        ("--ratio with merge groups", ["--model", llama, "--mode", "merge", "--merge", "1-2", "--ratio", "0.5",
                                       "--out", os.path.join(tmp, "bad")], ["--ratio", "LaCo's search"]),
        ("merge past the last layer", ["--model", llama, "--mode", "merge", "--merge", "2-4", "--out",
                                       os.path.join(tmp, "bad")], ["layer 4"]),
        ("--remove with an emulator mode", ["--model", llama, "--mode", "uniform", "--keep", "1", "--remove", "1",
                                            "--out", os.path.join(tmp, "bad")], ["--remove", "prune"]),
    ]
    for label, args, want in bad:
        p = run("emulate", args, check_rc=False)
        left = os.path.exists(os.path.join(tmp, "bad"))
        check(f"bad input: {label} -> exit 2, one line, no output", one_line_error(p, want) and not left,
              f"(rc {p.returncode}: {p.stderr.strip()[:160]})")
        shutil.rmtree(os.path.join(tmp, "bad"), ignore_errors=True)

print(f"{sum(results)}/{len(results)} checks passed in {time.time() - start:.1f} s")
sys.exit(0 if all(results) else 1)
