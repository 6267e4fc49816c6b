#!/usr/bin/env python3
"""The lens and landscape jobs end to end, read with h5py:
- lens: /kl, /js, /top1_agreement, /lens_loss equal a NumPy fp64 logit lens computed from the
  forward job's hidden states (final norm, projection and head applied in NumPy with the
  weights of model.safetensors), on 1 rank and on TP2, PP2, TP2xPP2, DP2 (and TP4, whose last
  rank holds vocabulary padding), each also against the 1-rank file;
- landscape: alpha = 0 and 1 give the losses of A and B (NumPy from the forward job's logits),
  a point in between the loss of a model folder holding the interpolated weights (written here
  in safetensors format), the plane's points at (0,0), (1,0), (0,1) and its four corners likewise;
  grids (line: DP2; plane: TP2xPP2, DP2xTP2) agree with 1 rank;
- --plot draws PNG files (analysis/plots.py);
- bad input (other architecture, bad --range, missing model, ...) exits 2 with a clear line
  and leaves no output."""
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402


binary, fixtures = sys.argv[1], sys.argv[2]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
TOL = 1e-5
results = []
largest = {}


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def note(kind, value):
    largest[kind] = max(largest.get(kind, 0.0), float(value))


def write_model(folder, source, weights):
    """An HF folder: source's config.json and `weights` (float32) in one model.safetensors:
    8-byte little-endian header length, JSON header, raw little-endian bytes."""
    os.makedirs(folder)
    shutil.copy(os.path.join(source, "config.json"), folder)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(weights):
        data = np.ascontiguousarray(weights[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(weights[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return folder


def run(job, args, np_=1, check_rc=True):
    cmd = ([*MPIRUN, "-np", str(np_)] if np_ > 1 else []) + [binary, job, "--log-level", "warn"] + args
    cmd += ["--threads", "1"]  # more threads than cores (2, shared by the ranks) only slows these tiny models
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check_rc and p.returncode != 0:
        print(p.stdout, p.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return p


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def targets_of(ids, mask):
    """Next-token targets, -1 where the position or its next one is padding (causal_targets)."""
    t = np.full(ids.shape, -1)
    valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    t[:, :-1] = np.where(valid, ids[:, 1:], -1)
    return t


def forward(model, data, tmp, tag):
    out = os.path.join(tmp, f"fwd_{tag}.h5")
    run("forward", ["--model", model, "--input", data, "--out", out, "--batch-size", "4"])
    with h5py.File(out, "r") as f:
        L = int(f.attrs["num_hidden_states"]) - 1
        return (f["input_ids"][()], f["attention_mask"][()], f["logits"][()].astype(np.float64),
                [f[f"hidden_states/{l}"][()].astype(np.float64) for l in range(L + 1)])


def mean_loss(ids, mask, logits):
    t = targets_of(ids, mask)
    logp = log_softmax(logits)
    keep = t >= 0
    return -np.take_along_axis(logp, np.maximum(t, 0)[..., None], -1)[..., 0][keep].mean()


def numpy_lens(model, ids, mask, logits, hidden):
    cfg = json.load(open(os.path.join(model, "config.json")))
    w = {k: v.astype(np.float64) for k, v in read_safetensors(os.path.join(model, "model.safetensors")).items()}
    L = len(hidden) - 1
    if cfg["model_type"] == "llama":
        eps = cfg["rms_norm_eps"]
        def finish(h):
            return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w["model.norm.weight"]
        head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    else:
        def finish(h):
            if cfg["do_layer_norm_before"] and not cfg.get("_remove_final_layer_norm", False):
                mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
                h = (h - mu) / np.sqrt(var + 1e-5) * w["model.decoder.final_layer_norm.weight"] + \
                    w["model.decoder.final_layer_norm.bias"]
            if "model.decoder.project_out.weight" in w:
                h = h @ w["model.decoder.project_out.weight"].T
            return h
        head = w["model.decoder.embed_tokens.weight"]
    keep = mask == 1
    logp = np.stack([log_softmax((finish(h) if l < L else h)[keep] @ head.T) for l, h in enumerate(hidden)], 1)
    # The NumPy head on h_L reproduces the forward job's logits: the weights are read right.
    head_diff = np.abs(logp[:, L] - log_softmax(logits[keep])).max()
    p = np.exp(logp)
    n = L + 1
    kl, js = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            kl[i, j] = (p[:, i] * (logp[:, i] - logp[:, j])).sum(-1).mean()
            m = 0.5 * (p[:, i] + p[:, j])
            logm = np.log(m)
            js[i, j] = (0.5 * (p[:, i] * (logp[:, i] - logm)).sum(-1) + 0.5 * (p[:, j] * (logp[:, j] - logm)).sum(-1)).mean()
    top = logp.argmax(-1)
    top1 = (top == top[:, L:L + 1]).mean(0)
    t = targets_of(ids, mask)[keep]
    has = t >= 0
    loss = -np.take_along_axis(logp[has], np.broadcast_to(t[has][:, None, None], (has.sum(), n, 1)), -1)[..., 0].mean(0)
    return {"kl": kl, "js": js, "top1_agreement": top1, "lens_loss": loss, "num_tokens": int(keep.sum())}, head_diff


def is_png(path):
    return os.path.exists(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def read_h5(path, names):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in names}, dict(f.attrs)


def max_diff(a, b, names):
    return max(float(np.abs(np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64)).max()) for k in names)


LENS = ["kl", "js", "top1_agreement", "lens_loss"]
start = time.time()
with tempfile.TemporaryDirectory() as tmp:
    # Sequences of many lengths (padding in every batch), one of a single token (no target).
    rng = np.random.default_rng(7)
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        for n in (9, 4, 12, 1, 7, 10, 5, 8, 3):
            f.write(json.dumps({"tokens": rng.integers(3, 128, n).tolist()}) + "\n")

    # 1. Logit lens against NumPy, then every grid against 1 rank.
    grids = {"llama_gqa": [(2, 2, 1), (2, 1, 2), (4, 2, 2), (2, 1, 1), (4, 4, 1)],
             "opt_postln_proj": [(4, 2, 2)]}  # tied embedding on both stages, projection, TP
    for name, model_grids in grids.items():
        model = os.path.join(fixtures, "models", name)
        ids, mask, logits, hidden = forward(model, data, tmp, name)
        ref, head_diff = numpy_lens(model, ids, mask, logits, hidden)
        check(f"lens {name}: NumPy head reproduces forward logits", head_diff < 1e-4, f"({head_diff:.1e})")
        one = os.path.join(tmp, f"lens_{name}.h5")
        run("lens", ["--model", model, "--data", data, "--out", one, "--batch-size", "4", "--chunk-tokens", "7", "--plot"])
        check(f"lens {name} --plot draws a PNG", is_png(one[:-3] + ".png"))
        got, attrs = read_h5(one, LENS)
        d = max_diff(got, ref, LENS)
        note("lens vs NumPy", d)
        L = len(hidden) - 1
        shapes = got["kl"].shape == (L + 1, L + 1) and got["js"].shape == (L + 1, L + 1) and got["lens_loss"].shape == (L + 1,)
        sane = (np.abs(np.diag(got["kl"])) < 1e-12).all() and got["top1_agreement"][L] == 1.0 and \
            (got["js"] <= np.log(2) + 1e-12).all() and (got["kl"] >= -1e-9).all() and np.allclose(got["js"], got["js"].T)
        check(f"lens {name} 1 rank vs NumPy fp64", d <= TOL and shapes and sane and attrs["num_tokens"] == ref["num_tokens"],
              f"(max diff {d:.1e}, {attrs['num_tokens']} tokens, KL[0][L] {got['kl'][0, L]:.3f})")
        check(f"lens {name} attributes", attrs["model"] == model and attrs["data"] == data and
              attrs["grid"] and attrs["tool_version"] and attrs["num_examples"] == 9)
        for np_, tp, pp in model_grids:
            out = os.path.join(tmp, f"lens_{name}_{np_}_{tp}_{pp}.h5")
            run("lens", ["--model", model, "--data", data, "--out", out, "--batch-size", "2", "--tp", str(tp),
                         "--pp", str(pp)], np_=np_)
            g, _ = read_h5(out, LENS)
            d1, dn = max_diff(g, got, LENS), max_diff(g, ref, LENS)
            note("lens grid vs 1 rank", d1)
            note("lens vs NumPy", dn)
            check(f"lens {name} np{np_} tp{tp} pp{pp}", d1 <= TOL and dn <= TOL,
                  f"(vs 1 rank {d1:.1e}, vs NumPy {dn:.1e})")

    # 2. Landscape. B and C: A's weights plus noise, in folders of the same architecture.
    model = os.path.join(fixtures, "models", "llama_gqa")
    wa = {k: v.astype(np.float64) for k, v in read_safetensors(os.path.join(model, "model.safetensors")).items()}
    wb = {k: v + 0.02 * rng.standard_normal(v.shape) for k, v in wa.items()}
    wc = {k: v + 0.02 * rng.standard_normal(v.shape) for k, v in wa.items()}
    mb = write_model(os.path.join(tmp, "model_b"), model, wb)
    mc = write_model(os.path.join(tmp, "model_c"), model, wc)
    # theta_A, theta_B, theta_C as the job sees them (float32).
    wa, wb, wc = ({k: v.astype(np.float32).astype(np.float64) for k, v in w.items()} for w in (wa, wb, wc))
    counter = [0]

    def loss_of(a, b=None):
        """Loss of theta_A + a (theta_B - theta_A) [+ b (theta_C - theta_A)] from a written folder."""
        counter[0] += 1
        w = {k: wa[k] + a * (wb[k] - wa[k]) + (b * (wc[k] - wa[k]) if b is not None else 0) for k in wa}
        folder = write_model(os.path.join(tmp, f"point_{counter[0]}"), model, w)
        ids, mask, logits, _ = forward(folder, data, tmp, f"point_{counter[0]}")
        return mean_loss(ids, mask, logits)

    loss_a = mean_loss(*forward(model, data, tmp, "A")[:3])
    loss_b = mean_loss(*forward(mb, data, tmp, "B")[:3])
    loss_c = mean_loss(*forward(mc, data, tmp, "C")[:3])

    line = os.path.join(tmp, "line.h5")
    run("landscape", ["--model", model, "--model-b", mb, "--data", data, "--out", line, "--points", "5"])
    got, attrs = read_h5(line, ["alpha", "loss"])
    expect = {0: loss_a, 4: loss_b, 2: loss_of(0.5), 3: loss_of(0.75)}
    d = max(abs(got["loss"][i] - v) for i, v in expect.items())
    note("landscape vs reference", d)
    check("landscape line: alpha 0, 0.5, 0.75, 1 equal A, written interpolations, B",
          d <= TOL and np.allclose(got["alpha"], np.linspace(0, 1, 5)) and attrs["kind"] == "line" and
          json.loads(attrs["models"]) == [model, mb], f"(max diff {d:.1e}; losses {np.round(got['loss'], 4).tolist()})")

    plane = os.path.join(tmp, "plane.h5")
    run("landscape", ["--model", model, "--model-b", mb, "--model-c", mc, "--data", data, "--out", plane,
                      "--grid", "4", "--range", "-1:2", "--plot"])
    check("landscape plane --plot draws a PNG", is_png(plane[:-3] + ".png"))
    gp, attrs = read_h5(plane, ["a", "b", "loss"])
    axis = [-1.0, 0.0, 1.0, 2.0]
    expect = {(1, 1): loss_a, (2, 1): loss_b, (1, 2): loss_c}
    for i, j in ((0, 0), (0, 3), (3, 0), (3, 3)):
        expect[(i, j)] = loss_of(axis[i], axis[j])
    d = max(abs(gp["loss"][i, j] - v) for (i, j), v in expect.items())
    note("landscape vs reference", d)
    check("landscape plane: (0,0), (1,0), (0,1) equal A, B, C; the four corners equal written models",
          d <= TOL and gp["loss"].shape == (4, 4) and np.allclose(gp["a"], axis) and np.allclose(gp["b"], axis) and
          attrs["kind"] == "plane" and json.loads(attrs["models"]) == [model, mb, mc], f"(max diff {d:.1e})")

    for np_, tp, pp, kind in ((2, 1, 1, "line"), (4, 2, 2, "plane"), (4, 2, 1, "plane")):
        out = os.path.join(tmp, f"{kind}_{np_}_{tp}_{pp}.h5")
        extra = ["--points", "5"] if kind == "line" else ["--model-c", mc, "--grid", "4", "--range", "-1:2"]
        run("landscape", ["--model", model, "--model-b", mb, "--data", data, "--out", out, "--batch-size", "3",
                          "--tp", str(tp), "--pp", str(pp)] + extra, np_=np_)
        g, _ = read_h5(out, ["loss"])
        d = float(np.abs(g["loss"] - (got if kind == "line" else gp)["loss"]).max())
        note("landscape grid vs 1 rank", d)
        check(f"landscape {kind} np{np_} tp{tp} pp{pp} vs 1 rank", d <= TOL, f"({d:.1e})")

    # 3. Bad input: exit 2, one clear line, no output.
    bad_out = os.path.join(tmp, "bad.h5")
    other = os.path.join(fixtures, "models", "llama3_scaled")
    for label, job, args, words in (
            ("other architecture", "landscape", ["--model", model, "--model-b", other], "architecture"),
            ("other architecture (C)", "landscape", ["--model", model, "--model-b", mb, "--model-c",
                                                     os.path.join(fixtures, "models", "opt_postln_proj")], "architecture"),
            ("reversed range", "landscape", ["--model", model, "--model-b", mb, "--range", "1:0"], "--range"),
            ("unreadable range", "landscape", ["--model", model, "--model-b", mb, "--range", "zero:1"], "--range"),
            ("--grid without --model-c", "landscape", ["--model", model, "--model-b", mb, "--grid", "3"], "--grid"),
            ("missing model", "landscape", ["--model", model, "--model-b", os.path.join(tmp, "nowhere")], "nowhere"),
            ("missing model", "lens", ["--model", os.path.join(tmp, "nowhere")], "nowhere"),
            ("zero examples", "lens", ["--model", model, "--num-examples", "0"], "--num-examples")):
        p = run(job, args + ["--data", data, "--out", bad_out], check_rc=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        ok = p.returncode == 2 and len(lines) == 1 and words in lines[0] and not os.path.exists(bad_out)
        check(f"{job} bad input: {label}", ok, f"-> {lines[-1] if lines else '(no message)'}")

print(f"largest differences: " + ", ".join(f"{k} {v:.1e}" for k, v in largest.items()))
print(f"{sum(results)} passed, {len(results) - sum(results)} failed in {time.time() - start:.0f} s")
sys.exit(0 if all(results) else 1)
