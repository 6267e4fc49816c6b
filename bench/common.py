"""Set-up the bench/*.py scripts share: the checkout's root, the random OPT-125m-shaped model,
the options every run takes and files of token ids.

The scripts run as `python bench/X.py` from any folder: Python puts the script's own folder,
bench/, first on sys.path, so `from common import ...` finds this file. torch and transformers
are imported only where a function needs them (bench/sift_memory.py runs without PyPI).
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# OPT-125m's shape, the model every script that compares throughput runs.
OPT_125M_SHAPE = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "ffn_dim": 3072, "max_position_embeddings": 2048, "word_embed_proj_dim": 768}


def make_model(path):
    """A random OPT-125m-shaped model written by transformers (seed 0) to `path`, once."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(**OPT_125M_SHAPE)
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def arguments(batch, seq, threads=2, model=None, binary=None):
    """An ArgumentParser with the options every benchmark takes: --threads, --batch, --seq, and
    --model and --binary (a program of build/) where given a default."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    if model:
        ap.add_argument("--model", default=model)
    if binary:
        ap.add_argument("--binary", default=os.path.join(ROOT, "build", binary))
    return ap


def write_tokens(path, rows):
    """A JSON Lines input file of the jobs: one {"tokens": [...]} per row of token ids."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"tokens": row}) + "\n")
