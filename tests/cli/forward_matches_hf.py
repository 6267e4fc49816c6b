#!/usr/bin/env python3
"""The forward job end to end: its HDF5 output, read with h5py, equals the HF transformers
outputs stored in the golden fixtures (read with numpy alone)."""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from safetensors_np import read_safetensors  # noqa: E402


def main():
    binary, fixtures = sys.argv[1], sys.argv[2]
    # Optional grid: NP TP PP, run under mpirun (rank 0 writes the file).
    launch, grid = [], []
    if len(sys.argv) > 3:
        np_, tp, pp = sys.argv[3:6]
        launch = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", np_]
        grid = ["--tp", tp, "--pp", pp, "--threads", "1"]
    failures = 0
    names = ("opt_preln", "opt_postln_proj", "llama_gqa", "llama3_scaled", "qwen2_bias", "qwen3_kv1", "mistral_swa",
             "qwen2_swa", "gemma2_softcap", "gemma3_local_rope")
    for name in names:
        g = read_safetensors(os.path.join(fixtures, "golden", name + ".safetensors"))
        ids, mask = g["right_ids"], g["right_mask"]
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.h5")
            with open(inp, "w") as f:
                for row, m in zip(ids, mask):
                    f.write(json.dumps({"tokens": row[m == 1].tolist()}) + "\n")
            threads = [] if grid else ["--threads", "2"]
            subprocess.run(launch + [binary, "forward", "--model", os.path.join(fixtures, "models", name), "--input",
                                     inp, "--out", out, "--batch-size", "2", "--log-level", "warn"] + threads + grid,
                           check=True)
            with h5py.File(out, "r") as h5:
                keep = h5["attention_mask"][()] == 1
                assert (h5["attention_mask"][()] == mask).all(), "right padding as in the fixture"
                diffs = [np.abs(h5["logits"][()] - g["right_logits"])[keep].max()]
                n = h5.attrs["num_hidden_states"]
                for l in range(n):
                    diffs.append(np.abs(h5[f"hidden_states/{l}"][()] - g[f"right_hidden_{l}"])[keep].max())
                ok = max(diffs) <= 1e-4 and n == len([k for k in g if k.startswith("right_hidden_")])
                with open(os.path.join(fixtures, "models", name, "config.json")) as f:
                    model_type = json.load(f)["model_type"]
                ok = ok and h5.attrs["model_type"] == model_type and h5.attrs["num_examples"] == len(ids)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs diff {max(diffs):.2e} over logits and {n} hidden states")
        failures += not ok
    print(f"{len(names) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
