#!/usr/bin/env python3
"""Tokenizer encode speed: crash-hpc vs the Rust `tokenizers` library (PyPI), same files, same
text, one thread each, in one run; also checks that both give the same ids.
  python bench/tokenizer.py [TEXT_FILE]   (default: Debian licence texts, about 1 MB)"""
import glob
import json
import os
import subprocess
import sys
import time

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["RAYON_NUM_THREADS"] = "1"
if len(sys.argv) > 1:
    text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
else:
    text = ""
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            text += open(path, encoding="utf-8", errors="replace").read()
text_file = "/tmp/crash-bench-tokenizer.txt"
open(text_file, "w", encoding="utf-8").write(text)
for name in ("opt", "llama2", "llama3"):
    path = os.path.join(ROOT, "tests", "fixtures", "tokenizers", name, "tokenizer.json")
    ours = json.loads(subprocess.run([os.path.join(ROOT, "build", "bench", "bench_tokenizer"), path, text_file],
                                     check=True, capture_output=True, text=True).stdout)
    tok = Tokenizer.from_file(path)
    t = time.perf_counter()
    ids = tok.encode(text, add_special_tokens=False).ids
    theirs = len(text.encode()) / 1e6 / (time.perf_counter() - t)
    same = len(ids) == ours["tokens"]
    print(f"{name:7s} crash-hpc {ours['mb_per_s']:6.1f} MB/s, tokenizers {theirs:6.1f} MB/s, "
          f"ratio {ours['mb_per_s'] / theirs:.1f}, same token count: {same}")
