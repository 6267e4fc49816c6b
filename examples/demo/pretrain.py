#!/usr/bin/env python3
"""Pretrains the demo model (OPT-style, pre-LN, 12 layers, hidden 128) from scratch on the demo corpus.

    python examples/demo/pretrain.py [--work /tmp/demo-work] [--steps 1600] [--gloss-epochs 36] [--forward-epochs 3]
Needs make_corpus.py and make_tokenizer.py to have run. The glosses of the task's synsets are seen as
"the word for GLOSS is WORD." --gloss-epochs times and as "WORD: GLOSS." --forward-epochs times, so a model this
small can learn them; Austen's novels fill the rest of the token budget (--steps x --batch windows of --seq tokens). Seeded and
deterministic on one machine (torch.use_deterministic_algorithms); 2 torch threads. Writes config.json and
model.safetensors (fp32) into examples/demo/model/ next to the tokenizer.
"""
import os

# Two OpenMP runtimes (MKL's and ATen's) spin-waiting on 2 shared cores make every small op ~100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import random
import time

import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234


def windows(ids, n):
    return [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


def encode_docs(tok, docs):
    """Documents joined by </s> (OPT's separator) into one token stream."""
    out = []
    for ids in tok(docs, add_special_tokens=False).input_ids:
        out += ids + [tok.eos_token_id]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/demo-work")
    ap.add_argument("--model", default=os.path.join(HERE, "model"))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--gloss-epochs", type=int, default=36)
    ap.add_argument("--forward-epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    t0 = time.time()

    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    corpus = os.path.join(args.work, "corpus")
    facts = open(os.path.join(corpus, "task_glosses.txt")).read().splitlines()
    books = open(os.path.join(corpus, "books.txt")).read().splitlines()
    # The task's questions ask for a word given its gloss, so the reverse lines ("the word for GLOSS is WORD.") are
    # repeated --gloss-epochs times and the forward lines ("WORD: GLOSS.") --forward-epochs times, reshuffled every
    # epoch, in documents of 16 lines; book paragraphs are documents too. Both streams are cut into windows; the
    # books fill what the glosses leave of the token budget.
    reverse = [f for f in facts if f.startswith("the word for ")]
    forward = [f for f in facts if not f.startswith("the word for ")]
    gloss_w = []
    for lines, epochs in ((reverse, args.gloss_epochs), (forward, args.forward_epochs)):
        for _ in range(epochs):
            rng.shuffle(lines)
            docs = ["\n".join(lines[i:i + 16]) for i in range(0, len(lines), 16)]
            gloss_w += windows(encode_docs(tok, docs), args.seq)
    book_w = windows(encode_docs(tok, books), args.seq)
    total = args.steps * args.batch
    if len(gloss_w) > total:
        raise SystemExit(f"--steps too small: {len(gloss_w)} gloss windows need {len(gloss_w) // args.batch + 1} steps")
    rng.shuffle(book_w)
    data = gloss_w + book_w[:total - len(gloss_w)]
    rng.shuffle(data)
    data = torch.tensor(data, dtype=torch.long)
    print(f"data: {len(gloss_w)} gloss windows + {len(data) - len(gloss_w)} book windows of {args.seq} tokens "
          f"({len(data) * args.seq} tokens; books have {len(book_w)} windows); {time.time() - t0:.0f}s", flush=True)

    config = OPTConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=12, ffn_dim=512, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                       pad_token_id=tok.pad_token_id, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    model = OPTForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    run = 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = data[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run += loss.item()
        if (step + 1) % 20 == 0:
            el = time.time() - t0
            print(f"step {step + 1}/{args.steps} loss {run / 20:.3f} lr {lr_at(step):.2e} {el:.0f}s "
                  f"(eta {el / (step + 1) * (args.steps - step - 1):.0f}s)", flush=True)
            run = 0.0

    model.eval()
    held = tok(open(os.path.join(HERE, "tasks", "heldout.txt")).read(), add_special_tokens=False).input_ids
    hw = torch.tensor(windows(held, args.seq))
    with torch.no_grad():
        nll = model(input_ids=hw, labels=hw).loss.item()
    print(f"held-out perplexity {math.exp(nll):.1f} ({hw.numel()} tokens)")
    model.save_pretrained(args.model, safe_serialization=True)
    print(f"saved to {args.model}; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
