#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, from the repository's fixtures (tests/fixtures).

  seeds.py FIXTURES OUT      writes OUT/<target>/<seed> for every target

safetensors_header: each fixture model's header, kept to its first few tensors with zeroed data
(small seeds mutate faster than the 0.5 MB files); tokenizer: the fixture tokenizer.json files
and their test texts (prefixed by the byte that picks the tokenizer); tasks_jsonl: the eval
fixtures' task files; emulator_plan: plans as the emulate job writes them for the fixtures.
"""
import glob
import json
import os
import struct
import sys

fixtures, out = sys.argv[1], sys.argv[2]


def put(target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


for path in sorted(glob.glob(os.path.join(fixtures, "models", "*", "model.safetensors"))):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    small, offset = {}, 0
    for k in names:
        size = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
        if offset + size > 8192:
            break
        small[k] = dict(header[k], data_offsets=[offset, offset + size])
        offset += size
    if "__metadata__" in header:
        small["__metadata__"] = header["__metadata__"]
    text = json.dumps(small).encode()
    put("safetensors_header", os.path.basename(os.path.dirname(path)),
        struct.pack("<Q", len(text)) + text + bytes(offset))

order = ["opt", "roberta", "llama2", "llama2_metaspace", "llama3", "misc_bytelevel", "misc_metaspace", "misc_suffix"]
expected = json.load(open(os.path.join(fixtures, "tokenizers", "expected.json")))
for i, name in enumerate(order):
    put("tokenizer", name + ".json", open(os.path.join(fixtures, "tokenizers", name, "tokenizer.json"), "rb").read())
    for j, case in enumerate(expected.get(name, {}).get("cases", [])[:6]):
        if isinstance(case, dict) and isinstance(case.get("text"), str):
            put("tokenizer", f"{name}-text{j}", bytes([ord("0") + i]) + case["text"].encode())

for path in sorted(glob.glob(os.path.join(fixtures, "eval", "*.jsonl"))):
    put("tasks_jsonl", os.path.basename(path), open(path, "rb").read())

plan = {"format": "crash-hpc emulator plan 1", "mode": "uniform", "source_model": "opt_preln", "full_layers": 4,
        "adapters": [1, 1], "slots": [{"source": l, "train": l in (0, 3), "stored_as": l} for l in (0, 1, 3)],
        "clusters": []}
put("emulator_plan", "uniform.json", json.dumps(plan))
share = dict(plan, mode="share", full_layers=6, slots=[{"source": 0, "train": True, "stored_as": 0},
                                                       {"source": 2, "train": False, "stored_as": 1},
                                                       {"source": 2, "train": False, "stored_as": 1},
                                                       {"source": 3, "train": False, "stored_as": 3},
                                                       {"source": 4, "train": False, "stored_as": 3},
                                                       {"source": 5, "train": True, "stored_as": 5}],
             clusters=[[1, 2], [3, 4]])
put("emulator_plan", "share.json", json.dumps(share, indent=2))
put("emulator_plan", "remove.json", json.dumps(dict(share, mode="remove", slots=[share["slots"][i] | {"stored_as": k}
                                                                                 for k, i in enumerate((0, 1, 3, 5))])))
