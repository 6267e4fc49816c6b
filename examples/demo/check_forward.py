#!/usr/bin/env python3
"""Checks that `crash-hpc forward` on the demo model gives HF transformers' logits and hidden states.

    python examples/demo/check_forward.py [--binary build/crash-hpc] [--model examples/demo/model]
Inputs: the first 16 test questions (context + gold answer, tokenized as lm-eval/prepare does) and two windows of
the held-out text with the tokenizer's BOS, run as one right-padded batch of varying lengths. Passes when every
logit and hidden state agrees within 1e-4 (fp32), as tests/cli/forward_matches_hf.py requires.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch
from transformers import OPTForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "crash-hpc"))
    ap.add_argument("--model", default=os.path.join(HERE, "model"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    model = OPTForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seqs = []
    for line in open(os.path.join(HERE, "tasks", "wordnet_test.jsonl")).readlines()[:16]:
        r = json.loads(line)
        ctx = tok(r["context"], add_special_tokens=False).input_ids
        seqs.append(tok(r["context"] + r["choices"][r["gold"]], add_special_tokens=False).input_ids)
        assert seqs[-1][:len(ctx)] == ctx
    held = tok(open(os.path.join(HERE, "tasks", "heldout.txt")).read()).input_ids
    seqs += [held[:256], held[256:400]]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.h5")
        with open(inp, "w") as f:
            for s in seqs:
                f.write(json.dumps({"tokens": s}) + "\n")
        subprocess.run([args.binary, "forward", "--model", args.model, "--input", inp, "--out", out, "--batch-size",
                        str(len(seqs)), "--threads", "2", "--log-level", "warn"], check=True)
        with h5py.File(out, "r") as h5:
            mask = h5["attention_mask"][()]
            ours = {"logits": h5["logits"][()]}
            n = int(h5.attrs["num_hidden_states"])
            for l in range(n):
                ours[f"hidden_states/{l}"] = h5[f"hidden_states/{l}"][()]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        am[i, :len(s)] = 1
    assert (mask == am.numpy()).all(), "right padding, same lengths"
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    ref = {"logits": o.logits.numpy()} | {f"hidden_states/{l}": h.numpy() for l, h in enumerate(o.hidden_states)}
    assert n == len(o.hidden_states)
    keep = am.numpy() == 1
    worst = max((np.abs(ours[k] - ref[k])[keep].max(), k) for k in ref)
    ok = worst[0] <= 1e-4
    print(f"{'ok' if ok else 'FAIL'}: {len(seqs)} sequences ({keep.sum()} tokens), logits and {n} hidden states; "
          f"max abs diff {worst[0]:.2e} ({worst[1]})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
