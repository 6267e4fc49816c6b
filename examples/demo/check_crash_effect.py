#!/usr/bin/env python3
"""Checks, with HF transformers, that the demo shows the CRaSh effect before the C++ pipeline runs it:
Plug-in accuracy above Full zero-shot on the held-out test split.

    python examples/demo/check_crash_effect.py [--steps 200 --batch 32 --lr 1e-3 --warmup 20]
1. Full zero-shot: score wordnet_test.jsonl lm-eval style (sum of the continuation's log-probs; acc_norm divides it
   by the choice's length in characters, without the leading space; tokens split as lm-eval splits them, no special tokens).
2. Uniform emulator: the bottom 2 and top 2 layers are trainable adapters, round(i*(M-1)/(n-1)) of the M middle
   layers are kept frozen (n = M/2). Emulator zero-shot.
3. Fine-tune only the adapters on wordnet_train.jsonl (AdamW, weight decay 0, linear warm-up and decay, clip 1.0,
   loss on the gold continuation's tokens only). Emulator fine-tuned.
4. Plug-in: the tuned adapter layers copied into the full model. Plug-in.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pretrain.py

import argparse
import copy
import json
import math
import random
import time

import torch
from transformers import OPTForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path, limit=None):
    rows = [json.loads(l) for l in open(path)]
    return rows[:limit] if limit else rows


def split(tok, context, continuation):
    """lm-eval's split: trailing spaces move to the continuation; its tokens follow encode(context)."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return whole[:len(ctx)], whole[len(ctx):]


def encode_task(tok, rows, max_len):
    """Per example: per choice (input ids, number of continuation tokens); inputs keep their last max_len tokens."""
    out = []
    for r in rows:
        seqs = []
        for c in r["choices"]:
            ctx, cont = split(tok, r["context"], c)
            ids = (ctx + cont)[-max_len:]
            seqs.append((ids, len(cont)))
        out.append(seqs)
    return out


def batch_tensors(seqs, pad):
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, _) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def score(model, enc, rows, pad, batch=64):
    """acc and acc_norm (lm-eval) of the model on the encoded multiple-choice task."""
    model.eval()
    flat = [(e, c, s) for e, seqs in enumerate(enc) for c, s in enumerate(seqs)]
    ll = torch.zeros(len(enc), len(enc[0]))
    for b in range(0, len(flat), batch):
        chunk = flat[b:b + batch]
        ids, mask = batch_tensors([s for _, _, s in chunk], pad)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (e, c, (s, n)) in enumerate(chunk):
            L = len(s)
            tgt = torch.tensor(s[L - n:])
            ll[e, c] = logp[i, L - n - 1:L - 1].gather(-1, tgt[:, None]).sum()
    gold = torch.tensor([r["gold"] for r in rows])
    chars = torch.tensor([[len(c) - c.startswith(" ") for c in r["choices"]] for r in rows], dtype=torch.float)  # as prepare: no delimiter
    acc = (ll.argmax(1) == gold).float().mean().item()
    acc_norm = ((ll / chars).argmax(1) == gold).float().mean().item()
    return acc, acc_norm


def uniform_plan(L, a, b, n):
    """Source layer of each emulator slot: a bottom adapters, n kept middle layers, b top adapters."""
    M = L - a - b
    mid = [a + int(math.floor(i * (M - 1) / (n - 1) + 0.5)) for i in range(n)]
    return list(range(a)) + mid + list(range(L - b, L))


def make_emulator(full, plan, a, b):
    emu = copy.deepcopy(full)
    layers = full.model.decoder.layers
    emu.model.decoder.layers = torch.nn.ModuleList([copy.deepcopy(layers[s]) for s in plan])
    emu.config.num_hidden_layers = len(plan)
    for i, layer in enumerate(emu.model.decoder.layers):  # keep HF's per-layer index consistent
        layer.self_attn.layer_idx = i
    for p in emu.parameters():
        p.requires_grad_(False)
    train_slots = list(range(a)) + list(range(len(plan) - b, len(plan)))
    for s in train_slots:
        for p in emu.model.decoder.layers[s].parameters():
            p.requires_grad_(True)
    return emu, train_slots


def finetune(emu, tok, rows, args, log):
    """Adapters only; loss on the gold continuation's tokens; AdamW + linear warm-up/decay + clipping 1.0."""
    data = []
    for r in rows:
        ctx, cont = split(tok, r["context"], r["choices"][r["gold"]])
        ids = (ctx + cont)[-args.max_len:]
        data.append((ids, len(cont)))
    rng = random.Random(args.seed)
    order = []
    params = [p for p in emu.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / args.warmup if s < args.warmup else max(0.0, (args.steps - s) / (args.steps - args.warmup)))
    emu.train()
    t0, run = time.time(), 0.0
    for step in range(args.steps):
        if len(order) < args.batch:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:args.batch], order[args.batch:]
        seqs = [data[i] for i in idx]
        ids, mask = batch_tensors(seqs, tok.pad_token_id)
        labels = torch.full_like(ids, -100)
        for i, (s, n) in enumerate(seqs):
            labels[i, len(s) - n:len(s)] = ids[i, len(s) - n:len(s)]
        loss = emu(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        run += loss.item()
        if (step + 1) % 25 == 0:
            log(f"  step {step + 1}/{args.steps} loss {run / 25:.3f} {time.time() - t0:.0f}s")
            run = 0.0
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "model"))
    ap.add_argument("--tasks", default=os.path.join(HERE, "tasks"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--adapters", default="2,2")
    ap.add_argument("--keep", type=int, default=0, help="kept middle layers n (0: M/2)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda s: print(s, flush=True)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    full = OPTForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    test = read_jsonl(os.path.join(args.tasks, "wordnet_test.jsonl"))
    valid = read_jsonl(os.path.join(args.tasks, "wordnet_valid.jsonl"))
    train = read_jsonl(os.path.join(args.tasks, "wordnet_train.jsonl"))
    enc_test = encode_task(tok, test, args.max_len)
    enc_valid = encode_task(tok, valid, args.max_len)
    pad = tok.pad_token_id
    res = {}
    t0 = time.time()
    res["full_zero_shot"] = score(full, enc_test, test, pad)
    log(f"Full zero-shot       acc {res['full_zero_shot'][0]:.3f} acc_norm {res['full_zero_shot'][1]:.3f} ({time.time() - t0:.0f}s)")

    a, b = map(int, args.adapters.split(","))
    L = full.config.num_hidden_layers
    n = args.keep or (L - a - b) // 2
    plan = uniform_plan(L, a, b, n)
    emu, slots = make_emulator(full, plan, a, b)
    log(f"uniform emulator: slots <- layers {plan}, trainable slots {slots}")
    res["emulator_zero_shot"] = score(emu, enc_test, test, pad)
    log(f"Emulator zero-shot   acc {res['emulator_zero_shot'][0]:.3f} acc_norm {res['emulator_zero_shot'][1]:.3f}")
    res["valid_before"] = score(emu, enc_valid, valid, pad)
    secs = finetune(emu, tok, train, args, log)
    res["valid_after"] = score(emu, enc_valid, valid, pad)
    log(f"fine-tuning: {args.steps} steps x {args.batch} in {secs:.0f}s; emulator valid acc "
        f"{res['valid_before'][0]:.3f} -> {res['valid_after'][0]:.3f}")
    res["emulator_fine_tuned"] = score(emu, enc_test, test, pad)
    log(f"Emulator fine-tuned  acc {res['emulator_fine_tuned'][0]:.3f} acc_norm {res['emulator_fine_tuned'][1]:.3f}")

    plug = copy.deepcopy(full)
    for s in slots:
        plug.model.decoder.layers[plan[s]].load_state_dict(emu.model.decoder.layers[s].state_dict())
    res["plug_in"] = score(plug, enc_test, test, pad)
    log(f"Plug-in              acc {res['plug_in'][0]:.3f} acc_norm {res['plug_in'][1]:.3f}")
    res["settings"] = vars(args) | {"plan": plan, "finetune_seconds": round(secs, 1)}
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
