#!/usr/bin/env python3
"""Hostile input to every file type the jobs read: truncated, corrupted and adversarial files
(huge and overflowing sizes and offsets, JSON nested 100000 deep, wrong types, NaN, empty
files, binary garbage). Each must end with exit code 2 and one line naming the file: no signal,
no exit 1/134/139, no hang (timeout) and no output left behind.

tests/cli/bad_input.sh and eval_bad_input.sh already cover the ordinary mistakes (a missing
field, one wrong type, a truncated model file, offsets past the end, overlapping tensors); this
script covers what they do not.

  hostile_inputs.py CRASH_HPC FIXTURES

Debian's python3 (numpy, h5py) only.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import h5py
import numpy as np

BIN, FIXTURES = sys.argv[1], sys.argv[2]
TIMEOUT = 60
DEEP = "[" * 100000
failures = 0
passes = 0


def run(args, timeout=TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([BIN] + args + ["--threads", "1", "--log-level", "warn"], capture_output=True, text=True, env=env,
                          timeout=timeout, errors="replace")


def expect_error(name, args, want, outputs):
    """Runs a job that must fail cleanly. `want`: substrings of the message (the file's name
    at least); `outputs`: paths that must not exist afterwards."""
    global failures, passes
    for o in outputs:  # a leftover from an earlier case would hide a new one
        for p in (o, o + ".tmp", o + ".partial"):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    problems = []
    try:
        p = run(args)
    except subprocess.TimeoutExpired:
        problems.append(f"no exit within {TIMEOUT} s (hang)")
        p = None
    if p is not None:
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        if p.returncode < 0:
            problems.append(f"killed by signal {-p.returncode}")
        elif p.returncode != 2:
            problems.append(f"exit code {p.returncode}, expected 2")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr, expected 1")
        for w in want:
            if w not in p.stderr:
                problems.append(f"'{w}' not in the message")
    for o in outputs:
        for q in (o, o + ".tmp", o + ".partial"):
            if os.path.exists(q):
                problems.append(f"output {q} left behind")
    if problems:
        failures += 1
        print(f"FAIL {name}: " + "; ".join(problems))
        if p is not None:
            print("     stderr: " + p.stderr[-1500:].replace("\n", "\n     "))
    else:
        passes += 1
        print(f"ok   {name}: {lines[0][:160]}")


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def safetensors_bytes(header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


work = tempfile.mkdtemp(prefix="crash-hostile-")
try:
    W = lambda *p: os.path.join(work, *p)
    llama = os.path.join(FIXTURES, "models", "llama_gqa")
    tok_model = os.path.join(FIXTURES, "eval", "model")  # a model with a tokenizer.json
    tokens = write(W("tokens.jsonl"), '{"tokens": [5, 6, 7]}\n{"tokens": [8, 9]}\n')

    def model_copy(name, src=llama):
        d = W(name)
        if os.path.exists(d):
            shutil.rmtree(d)
        shutil.copytree(src, d)
        return d

    # ---- config.json (read by every job that loads a model; here forward) ----
    fwd_out = W("fwd.h5")
    for name, text, want in [
        ("empty", "", ["config.json"]),
        ("deep nesting", DEEP, ["config.json"]),
        ("deep value", '{"hidden_size": ' + DEEP + "}", ["config.json"]),
        ("number 1e400", '{"model_type": "llama", "hidden_size": 1e400}', ["config.json"]),
        ("deep closed value", '{"model_type": "llama", "x": ' + DEEP + "]" * 100000 + "}", ["config.json"]),
        ("a list", "[1, 2, 3]", ["config.json"]),
        ("NaN literal", None, ["config.json"]),
        ("binary", b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 50, ["config.json"]),
    ]:
        m = model_copy("cfg")
        if text is None:
            text = open(os.path.join(llama, "config.json")).read().replace('"rms_norm_eps": ', '"rms_norm_eps": NaN, "x": ')
        write(os.path.join(m, "config.json"), text)
        expect_error(f"config.json {name}", ["forward", "--model", m, "--input", tokens, "--out", fwd_out], want, [fwd_out])
    base_cfg = json.load(open(os.path.join(llama, "config.json")))
    for name, edit, want in [
        ("huge hidden_size", {"hidden_size": 2**62}, ["config.json", "hidden_size"]),
        ("negative layers", {"num_hidden_layers": -3}, ["config.json", "num_hidden_layers"]),
        ("zero heads", {"num_attention_heads": 0}, ["config.json", "num_attention_heads"]),
        ("layers overflow int64", {"num_hidden_layers": 2**64 - 1}, ["config.json", "num_hidden_layers"]),
        ("huge vocabulary", {"vocab_size": 2**40}, ["config.json"]),
        ("heads not dividing", {"num_key_value_heads": 3}, ["config.json"]),
        ("float layers", {"num_hidden_layers": 2.5}, ["config.json", "num_hidden_layers"]),
    ]:
        m = model_copy("cfg")
        c = dict(base_cfg, **edit)
        write(os.path.join(m, "config.json"), json.dumps(c))
        expect_error(f"config.json {name}", ["forward", "--model", m, "--input", tokens, "--out", fwd_out], want, [fwd_out])

    # ---- safetensors (model.safetensors; forward loads it) ----
    raw = open(os.path.join(llama, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    first = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[0]

    def with_entry(**entry):
        h = json.loads(json.dumps(header))
        h[first].update(entry)
        return safetensors_bytes(h, data)

    for name, blob, want in [
        ("empty", b"", ["model.safetensors"]),
        ("7 bytes", b"\x08\x00\x00\x00\x00\x00\x00", ["model.safetensors"]),
        ("header size 2^64-1", struct.pack("<Q", 2**64 - 1) + raw[8:], ["model.safetensors"]),
        ("header size 2^63", struct.pack("<Q", 2**63) + raw[8:], ["model.safetensors"]),
        ("header size 0", struct.pack("<Q", 0) + raw[8:], ["model.safetensors"]),
        ("deep header", safetensors_bytes(DEEP.encode()), ["model.safetensors"]),
        ("header a list", safetensors_bytes([1, 2]), ["model.safetensors"]),
        ("header not UTF-8", safetensors_bytes(b'{"\xff\xfe": 1}'), ["model.safetensors"]),
        # nlohmann throws out_of_range (not parse_error) for a number no double holds.
        ("number 1e400 in header", safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}'),
         ["model.safetensors"]),
        ("NaN in header", safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
         ["model.safetensors"]),
        ("negative offset", with_entry(data_offsets=[-4, header[first]["data_offsets"][1]]), ["model.safetensors", first]),
        ("offset 2^64-1", with_entry(data_offsets=[2**64 - 1, 2**64 - 1]), ["model.safetensors", first]),
        ("offsets reversed", with_entry(data_offsets=header[first]["data_offsets"][::-1]), ["model.safetensors", first]),
        ("float offsets", with_entry(data_offsets=[0.0, 4.5]), ["model.safetensors", first]),
        ("three offsets", with_entry(data_offsets=[0, 4, 8]), ["model.safetensors", first]),
        ("negative dim", with_entry(shape=[-1, 4]), ["model.safetensors", first]),
        ("dim 2^64-1", with_entry(shape=[2**64 - 1]), ["model.safetensors", first]),
        # 2^43 cubed times 4 bytes wraps a 128-bit product to 0: an empty span must not pass.
        ("shape product overflows", with_entry(shape=[2**43, 2**43, 2**43], data_offsets=[0, 0]), ["model.safetensors", first]),
        ("shape overflows int64", with_entry(shape=[2**32, 2**32, 0, 2**40], data_offsets=[0, 0]), ["model.safetensors", first]),
        ("shape a string", with_entry(shape="4x4"), ["model.safetensors", first]),
        ("dtype a number", with_entry(dtype=32), ["model.safetensors", first]),
        ("unknown dtype", with_entry(dtype="F8_E4M3"), ["model.safetensors", first]),
        ("metadata not strings", safetensors_bytes(dict(header, __metadata__={"format": [1]}), data), ["model.safetensors"]),
        ("data cut off", raw[: 8 + n + len(data) // 2], ["model.safetensors"]),
    ]:
        m = model_copy("st")
        write(os.path.join(m, "model.safetensors"), blob)
        expect_error(f"safetensors {name}", ["forward", "--model", m, "--input", tokens, "--out", fwd_out], want, [fwd_out])

    # An index naming a shard outside the folder, a list, deep nesting.
    for name, text, want in [
        ("index deep", DEEP, ["model.safetensors.index.json"]),
        ("index weight_map a list", '{"weight_map": [1, 2]}', ["model.safetensors.index.json"]),
        ("index shard a number", '{"weight_map": {"model.norm.weight": 7}}', ["model.safetensors.index.json"]),
    ]:
        m = model_copy("idx")
        os.remove(os.path.join(m, "model.safetensors"))
        write(os.path.join(m, "model.safetensors.index.json"), text)
        expect_error(name, ["forward", "--model", m, "--input", tokens, "--out", fwd_out], want, [fwd_out])

    # ---- tokenizer.json (prepare reads it with a task) ----
    mc = os.path.join(FIXTURES, "eval", "mc.jsonl")
    prep_out = W("prep")
    tok_json = json.load(open(os.path.join(tok_model, "tokenizer.json")))

    def tok_variant(edit):
        t = json.loads(json.dumps(tok_json))
        edit(t)
        return json.dumps(t)

    first_merge = tok_json["model"]["merges"][0]
    for name, text, want in [
        ("empty", "", ["tokenizer.json"]),
        ("deep nesting", DEEP, ["tokenizer.json"]),
        ("deep model", '{"model": ' + DEEP + "}", ["tokenizer.json"]),
        ("a string", '"BPE"', ["tokenizer.json"]),
        ("model a list", tok_variant(lambda t: t.update(model=[1])), ["tokenizer.json"]),
        ("vocab a list", tok_variant(lambda t: t["model"].update(vocab=["a", "b"])), ["tokenizer.json"]),
        ("negative id", tok_variant(lambda t: t["model"]["vocab"].update({"Ġthe": -5})), ["tokenizer.json"]),
        ("id 2^62", tok_variant(lambda t: t["model"]["vocab"].update({"Ġthe": 2**62})), ["tokenizer.json"]),
        ("id a float", tok_variant(lambda t: t["model"]["vocab"].update({"Ġthe": 1.5})), ["tokenizer.json"]),
        ("merge of unknown pieces", tok_variant(lambda t: t["model"]["merges"].insert(0, "zzq qqz" if isinstance(first_merge, str) else ["zzq", "qqz"])),
         ["tokenizer.json"]),
        ("merge a number", tok_variant(lambda t: t["model"]["merges"].insert(0, 42)), ["tokenizer.json"]),
        ("merges deep", tok_variant(lambda t: t["model"].update(merges="@DEEP@")).replace('"@DEEP@"', DEEP + "]" * 100000),
         ["tokenizer.json"]),
        ("added token content a list", tok_variant(lambda t: t.update(added_tokens=[{"id": 1, "content": [1], "special": True}])),
         ["tokenizer.json"]),
        ("pre_tokenizer regex broken", tok_variant(lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(((["},
                                                                                     "behavior": "Isolated", "invert": False})),
         ["tokenizer.json"]),
        ("normalizer unknown type", tok_variant(lambda t: t.update(normalizer={"type": "Frobnicate"})), ["tokenizer.json"]),
        ("NaN dropout", tok_variant(lambda t: t["model"].update(dropout="@NAN@")).replace('"@NAN@"', "NaN"), ["tokenizer.json"]),
    ]:
        tdir = W("tok")
        os.makedirs(tdir, exist_ok=True)
        write(os.path.join(tdir, "tokenizer.json"), text)
        expect_error(f"tokenizer.json {name}", ["prepare", "--task", mc, "--tokenizer", os.path.join(tdir, "tokenizer.json"),
                                                "--out", prep_out], want, [prep_out])

    # ---- JSONL tasks (prepare) ----
    for name, text, want in [
        ("empty", "", ["bad.jsonl"]),
        ("only blank lines", "\n \n\t\n", ["bad.jsonl"]),
        ("deep line", DEEP + "\n", ["bad.jsonl:1"]),
        ("deep choices", '{"context": "a", "choices": [' + DEEP + "]" * 100001 + ', "gold": 0}\n', ["bad.jsonl:1"]),
        ("deep choice value", '{"context": "a", "choices": ["x", ' + "[" * 50000 + "]" * 50000 + '], "gold": 0}\n',
         ["bad.jsonl:1"]),
        ("gold 1e400", '{"context": "a", "choices": ["x", "y"], "gold": 1e400}\n', ["bad.jsonl:1"]),
        ("NaN gold", '{"context": "a", "choices": ["x", "y"], "gold": NaN}\n', ["bad.jsonl:1"]),
        ("gold 1e300", '{"context": "a", "choices": ["x", "y"], "gold": 1e300}\n', ["bad.jsonl:1", "gold"]),
        ("gold 2^64-1", '{"context": "a", "choices": ["x", "y"], "gold": 18446744073709551615}\n', ["bad.jsonl:1", "gold"]),
        ("gold -2^63", '{"context": "a", "choices": ["x", "y"], "gold": -9223372036854775808}\n', ["bad.jsonl:1", "gold"]),
        ("context a number", '{"context": 5, "choices": ["x"], "gold": 0}\n', ["bad.jsonl:1", "context"]),
        ("context an object", '{"context": {"a": 1}, "answers": ["x"]}\n', ["bad.jsonl:1", "context"]),
        ("text null", '{"text": null}\n', ["bad.jsonl:1", "text"]),
        ("binary", b"\x00\x01\x02\xff\xfe{\"text\": \"a\"}\n", ["bad.jsonl:1"]),
        ("invalid UTF-8 in a string", b'{"text": "ab\xff\xfecd"}\n', ["bad.jsonl:1"]),
        ("line cut mid-string", '{"text": "a"}\n{"text": "abc', ["bad.jsonl:2"]),
        ("top-level array", '[{"text": "a"}]\n', ["bad.jsonl:1"]),
    ]:
        bad = write(W("bad.jsonl"), text)
        expect_error(f"task JSONL {name}", ["prepare", "--task", bad, "--tokenizer", tok_model, "--out", prep_out],
                     want, [prep_out])

    # ---- INI config files (--config) ----
    for name, text, want in [
        ("binary", b"\x00\xff\x00\xfe" * 100, ["bad.ini"]),
        ("unknown key", "frobnicate = 3\n", ["bad.ini", "frobnicate"]),
        ("value not a number", "block-size = lots\n", ["bad.ini", "block-size"]),
        ("number overflows", "block-size = 99999999999999999999999\n", ["bad.ini", "block-size"]),
        ("negative size", "block-size = -5\n", ["block-size"]),
        ("deep section", "[" * 100000 + "\n", ["bad.ini"]),
        ("unterminated section", "[collect\nmodel = x\n", ["bad.ini"]),
    ]:
        ini = write(W("bad.ini"), text)
        col_out = W("col.h5")
        expect_error(f"INI {name}", ["collect", "--config", ini, "--model", llama, "--data", tokens, "--out", col_out],
                     want, [col_out])
    expect_error("INI missing file", ["collect", "--config", W("absent.ini"), "--model", llama, "--data", tokens,
                                      "--out", W("col.h5")], ["absent.ini"], [W("col.h5")])

    # ---- HDF5 activation archives (similarity reads them) ----
    good = W("good.h5")
    p = run(["collect", "--model", llama, "--data", tokens, "--out", good])
    if p.returncode != 0:
        raise SystemExit("FAIL: collect for the archive cases: " + p.stderr)
    good_bytes = open(good, "rb").read()
    sim_out = W("sim.h5")

    def archive(name, edit=None, blob=None):
        path = W(name)
        if blob is not None:
            write(path, blob)
        else:
            shutil.copy(good, path)
            with h5py.File(path, "r+") as h:
                edit(h)
        return path

    def set_layer(h, name, value):
        del h[name]
        h[name] = value

    layer0 = "layers/0"
    for name, path, want in [
        ("empty", archive("empty.h5", blob=b""), ["empty.h5"]),
        ("garbage", archive("garbage.h5", blob=os.urandom(4096)), ["garbage.h5"]),
        ("truncated", archive("cut.h5", blob=good_bytes[: len(good_bytes) // 2]), ["cut.h5"]),
        ("superblock only", archive("super.h5", blob=good_bytes[:512]), ["super.h5"]),
        ("no complete flag", archive("nocomplete.h5", lambda h: h.attrs.__delitem__("complete") if "complete" in h.attrs
                                     else h.__delitem__("complete")), ["nocomplete.h5"]),
        ("no layers", archive("nolayers.h5", lambda h: h.__delitem__("layers")), ["nolayers.h5"]),
        ("layer of strings", archive("strlayer.h5", lambda h: set_layer(h, layer0, np.array([b"a", b"b"]))), ["strlayer.h5"]),
        ("layer 1-D", archive("onedim.h5", lambda h: set_layer(h, layer0, np.zeros(7, np.float32))), ["onedim.h5"]),
        ("layer wrong rows", archive("rows.h5", lambda h: set_layer(h, layer0, np.zeros((5, h[layer0].shape[1]), np.float32))),
         ["rows.h5"]),
        ("layer a group", archive("group.h5", lambda h: (h.__delitem__(layer0), h.create_group(layer0))), ["group.h5"]),
    ]:
        expect_error(f"archive {name}", ["similarity", "--archive", path, "--out", sim_out], want, [sim_out, W("sim.json")])
    # NaN in a layer: the CKA would be NaN; the job must refuse rather than write it.
    nan = archive("nan.h5", lambda h: h[layer0].__setitem__((0, 0), np.nan))
    expect_error("archive NaN activations", ["similarity", "--archive", nan, "--out", sim_out], ["nan.h5"],
                 [sim_out, W("sim.json")])

    # ---- emulator plans (crash_plan.json; plugin reads the emulator's) ----
    opt = os.path.join(FIXTURES, "models", "opt_preln")
    good_plan = {"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt_preln", "full_layers": 4,
                 "adapters": [1, 1], "slots": [{"source": l, "train": l in (0, 3), "stored_as": l} for l in range(4)]}
    plug_out = W("plugged")
    for name, text, want in [
        ("empty", "", ["crash_plan.json"]),
        ("deep nesting", DEEP, ["crash_plan.json"]),
        ("deep slots", json.dumps(dict(good_plan, slots="@")).replace('"@"', DEEP + "]" * 100000), ["crash_plan.json"]),
        ("deep format", json.dumps(dict(good_plan, format="@")).replace('"@"', "[" * 50000 + "]" * 50000),
         ["crash_plan.json", "nested"]),
        ("slots an object", json.dumps(dict(good_plan, slots={"a": 1})), ["crash_plan.json", "slots"]),
        ("slot a number", json.dumps(dict(good_plan, slots=[1, 2, 3, 4])), ["crash_plan.json"]),
        ("source 2^64-1", json.dumps(dict(good_plan, slots=[dict(s, source=2**64 - 1) for s in good_plan["slots"]])),
         ["crash_plan.json", "source"]),
        ("stored_as -1", json.dumps(dict(good_plan, slots=[dict(s, stored_as=-1) for s in good_plan["slots"]])),
         ["crash_plan.json", "stored_as"]),
        ("stored_as a cycle", json.dumps(dict(good_plan, slots=[dict(s, stored_as=(i + 1) % 4, train=False)
                                                                for i, s in enumerate(good_plan["slots"])])),
         ["crash_plan.json"]),
        ("full_layers huge", json.dumps(dict(good_plan, full_layers=2**62)), ["emu", "4611686018427387904-layer"]),
        ("full_layers NaN", json.dumps(good_plan).replace('"full_layers": 4', '"full_layers": NaN'), ["crash_plan.json"]),
        ("adapters floats", json.dumps(dict(good_plan, adapters=[1.5, 1])), ["crash_plan.json", "adapters"]),
        ("clusters deep", json.dumps(dict(good_plan, clusters="@")).replace('"@"', "[" * 50000 + "]" * 50000),
         ["crash_plan.json"]),
    ]:
        emu = model_copy("emu", opt)
        write(os.path.join(emu, "crash_plan.json"), text)
        expect_error(f"crash_plan.json {name}", ["plugin", "--model", opt, "--emulator", emu, "--out", plug_out],
                     want, [plug_out])

    # ---- prepared folders (eval and train read them) ----
    prepared = W("good.prepared")
    p = run(["prepare", "--task", mc, "--tokenizer", tok_model, "--out", prepared])
    if p.returncode != 0:
        raise SystemExit("FAIL: prepare for the prepared-folder cases: " + p.stderr)
    shard = sorted(f for f in os.listdir(prepared) if f.endswith(".jsonl"))[0]
    manifest = json.load(open(os.path.join(prepared, "manifest.json")))
    good_line = open(os.path.join(prepared, shard)).readline()
    eval_out = W("eval.json")

    def prepared_copy(manifest_text=None, shard_text=None):
        d = W("bad.prepared")
        if os.path.exists(d):
            shutil.rmtree(d)
        shutil.copytree(prepared, d)
        if manifest_text is not None:
            write(os.path.join(d, "manifest.json"), manifest_text)
        if shard_text is not None:
            write(os.path.join(d, shard), shard_text)
        return d

    line = json.loads(good_line)
    P = lambda **kw: lambda: prepared_copy(**kw)
    for name, make, want in [
        ("manifest empty", P(manifest_text=""), ["manifest.json"]),
        ("manifest deep", P(manifest_text=DEEP), ["manifest.json"]),
        ("manifest a list", P(manifest_text="[]"), ["manifest.json"]),
        ("shards a string", P(manifest_text=json.dumps(dict(manifest, shards="shard"))), ["manifest.json"]),
        ("shard outside the folder", P(manifest_text=json.dumps(dict(manifest, shards=["../../../etc/passwd"]))),
         ["etc/passwd"]),
        ("kind a number", P(manifest_text=json.dumps(dict(manifest, kind=3))), ["manifest.json", "kind"]),
        ("shard empty", P(shard_text=""), ["bad.prepared"]),
        ("shard deep line", P(shard_text=DEEP + "\n"), [shard]),
        ("token id 2^64-1", P(shard_text=json.dumps(dict(line, tokens=[2**64 - 1])) + "\n"), [shard]),
        ("token id a float", P(shard_text=json.dumps(dict(line, tokens=[1.5])) + "\n"), [shard]),
        ("tokens deep", P(shard_text=json.dumps(dict(line, tokens="@")).replace('"@"', "[" * 50000 + "]" * 50000)
                        + "\n"), [shard]),
        ("hash huge", P(shard_text=json.dumps(dict(line, hash="f" * 40)) + "\n"), [shard, "hash"]),
        ("hash negative", P(shard_text=json.dumps(dict(line, hash="-1")) + "\n"), [shard, "hash"]),
        ("choice_chars zero", P(shard_text=json.dumps(dict(line, choice_chars=[0] * len(line["continuations"])))
                              + "\n"), [shard]),
        ("continuations a number", P(shard_text=json.dumps(dict(line, continuations=5)) + "\n"), [shard]),
        ("token 1e400", P(shard_text=json.dumps(dict(line, tokens="@")).replace('"@"', "[1e400]") + "\n"), [shard]),
        ("line cut", P(shard_text=good_line[: len(good_line) // 2]), [shard]),
    ]:
        expect_error(f"prepared {name}", ["eval", "--model", tok_model, "--data", make(), "--out", eval_out], want,
                     [eval_out])

    # ---- training checkpoints (train --resume reads manifest.json and the shards) ----
    emu = model_copy("temu", opt)
    write(os.path.join(emu, "crash_plan.json"), json.dumps(good_plan))
    task = W("train.prepared")
    os.makedirs(task)
    with open(os.path.join(task, "shard-00000.jsonl"), "w") as f:
        for i in range(8):
            ctx, cont = [5 + i, 9, 17, 33], [[41 + i], [7], [99]]
            f.write(json.dumps({"index": i, "hash": f"{i + 1:016x}", "tokens": ctx + cont[0], "context": ctx,
                                "continuations": cont, "gold": 0, "choice_chars": [3, 3, 3]}) + "\n")
    write(os.path.join(task, "manifest.json"), json.dumps({"kind": "multiple_choice", "task": "t",
                                                           "shards": ["shard-00000.jsonl"]}))
    train = ["train", "--model", emu, "--data", task, "--batch-size", "4", "--steps", "4", "--save-every", "2"]
    ref = W("trained")
    p = run(train + ["--out", ref, "--stop-after", "2"])
    if p.returncode != 0:
        raise SystemExit("FAIL: train for the checkpoint cases: " + p.stderr)
    ck = os.path.join(ref, "checkpoints", "step-000002")
    ck_manifest = json.load(open(os.path.join(ck, "manifest.json")))
    ck_shard = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[0]
    ck_bytes = open(os.path.join(ck, ck_shard), "rb").read()

    def checkpoint_copy(manifest_text=None, shard_blob=None):
        d = W("resume")
        if os.path.exists(d):
            shutil.rmtree(d)
        shutil.copytree(ref, d)
        c = os.path.join(d, "checkpoints", "step-000002")
        if manifest_text is not None:
            write(os.path.join(c, "manifest.json"), manifest_text)
        if shard_blob is not None:
            write(os.path.join(c, ck_shard), shard_blob)
        return d

    def mf(**edit):
        return json.dumps(dict(ck_manifest, **edit))

    ck_n = struct.unpack("<Q", ck_bytes[:8])[0]
    C = lambda **kw: lambda: checkpoint_copy(**kw)
    for name, make, want in [
        ("manifest empty", C(manifest_text=""), ["manifest.json"]),
        ("manifest deep", C(manifest_text=DEEP), ["manifest.json"]),
        ("manifest a list", C(manifest_text="[1]"), ["manifest.json"]),
        ("step a string", C(manifest_text=mf(step="two")), ["manifest.json", "step"]),
        ("step negative", C(manifest_text=mf(step=-2)), ["manifest.json", "step"]),
        ("files a number", C(manifest_text=mf(files=3)), ["manifest.json"]),
        ("file entry a string", C(manifest_text=mf(files=["x"])), ["manifest.json"]),
        ("file outside the folder", C(manifest_text=mf(files=[dict(f, file="../../../../etc/passwd")
                                                                          for f in ck_manifest["files"]])),
         ["etc/passwd"]),
        ("grid a list", C(manifest_text=mf(grid=[1, 2])), ["manifest.json", "grid"]),
        ("trainer deep", C(manifest_text=mf(trainer="@").replace('"@"', "[" * 50000 + "]" * 50000)),
         ["manifest.json"]),
        ("optimizer_steps NaN", C(manifest_text=mf(optimizer_steps="@").replace('"@"', "NaN")), ["manifest.json"]),
        ("optimizer_steps a string", C(manifest_text=mf(optimizer_steps="x")), ["manifest.json", "optimizer_steps"]),
        ("grid tp zero", C(manifest_text=mf(grid=dict(ck_manifest["grid"], tp=0))), ["manifest.json", "tp"]),
        ("data_hash a number", C(manifest_text=mf(trainer=dict(ck_manifest["trainer"], data_hash=5))),
         ["manifest.json", "data_hash"]),
        ("shard truncated", C(shard_blob=ck_bytes[: len(ck_bytes) // 2]), [ck_shard]),
        ("shard empty", C(shard_blob=b""), [ck_shard]),
        ("shard header size huge", C(shard_blob=struct.pack("<Q", 2**63) + ck_bytes[8:]), [ck_shard]),
        ("shard header deep", C(shard_blob=safetensors_bytes(DEEP.encode())), [ck_shard]),
        ("shard header cut", C(shard_blob=ck_bytes[: 8 + ck_n // 2]), [ck_shard]),
    ]:
        # The resumed run must not write a model: the checkpoint is unusable.
        d = make()
        expect_error(f"checkpoint {name}", train + ["--out", d, "--resume"], want, [os.path.join(d, "model")])
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"{passes} passed, {failures} failed")
sys.exit(1 if failures else 0)
