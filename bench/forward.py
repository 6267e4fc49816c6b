#!/usr/bin/env python3
"""Forward throughput: crash-hpc's forward (bench_forward) vs HF transformers, side by side.

Same random OPT-125m-shaped model (written once by transformers; its config's dropout is
--dropout, which inference does not apply on either side), the same batch of --batch x --seq
random token ids, logits of every position on both sides (OPTForCausalLM: the LM head is part of
the work), torch.inference_mode() on the HF side, the same threads, the same compute type
(--dtypes) and the same allocator (--allocators: tcmalloc preloaded on both sides, and/or glibc's
malloc on both: bench_forward_glibc). Each side runs in its own process: a warm-up pass, then
--iters timed passes; the median counts.

Printed: both sides' configuration, the machine's GEMM rate in this run, each side's tokens/s,
its rate on the forward's FLOPs (decoder and LM head) and its fraction of the GEMM rate, and the
ratio. Goal: >= 1.0x HF.
  python bench/forward.py [--batch 8] [--seq 128] [--iters 5] [--allocators tcmalloc,glibc] [--dtypes float32,bfloat16]
"""
import json
import statistics
import time

from common import (arguments, cpu_name, decoder_flops, gemm_rates, head_flops, libtorch_description, make_model,
                    model_path, parse_lists, print_gemm, process_allocator, program, rate_line, reference_description,
                    run_json, side_env, worker_cmd)


def hf_worker(a):
    import torch
    from transformers import OPTForCausalLM
    torch.set_num_threads(a.threads)
    model = OPTForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtypes[0])).eval()
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=False)  # warm-up
        for _ in range(a.iters):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "allocator": process_allocator(),
                      "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
                      "dropout": model.config.dropout}))


def main():
    ap = arguments(batch=8, seq=128, allocators="tcmalloc,glibc", dtypes="float32,bfloat16", doc=__doc__)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dropout", type=float, default=0.0, help="the random model's config dropout (both sides)")
    ap.add_argument("--gemm-rows", type=int, default=1024)
    ap.add_argument("--model")
    a = parse_lists(ap.parse_args())
    if a.worker == "hf":
        return hf_worker(a)
    model = model_path(a.dir, a.dropout)
    make_model(model, a.dropout)
    tokens = a.batch * a.seq
    flops = decoder_flops([a.seq] * a.batch) + head_flops(tokens)

    first = a.allocators[0]
    rates, ours_gemm, hf_gemm = gemm_rates(a, first, a.dtypes, a.gemm_rows)
    print(f"CPU: {cpu_name()}; {a.threads} threads on both sides")
    print(f"crash-hpc: {libtorch_description(program(a, first, 'bench_forward'), ours_gemm)}")
    print(f"reference: {reference_description(hf_gemm)}")
    print(f"model: random OPT-125m shape (12 layers, d 768, ffn 3072, vocab 50272), config dropout {a.dropout:g}; "
          f"batch {a.batch} x {a.seq} tokens, logits of every position; {flops / 1e12:.3f} TFLOP a pass "
          f"(decoder and LM head)\n")
    best = print_gemm(rates, a.gemm_rows, a.threads)
    summary = []
    for dtype in a.dtypes:
        for alloc in a.allocators:
            env = side_env(alloc, a.threads)
            ours, _ = run_json([program(a, alloc, "bench_forward"), "--model", model, "--batch", str(a.batch), "--seq",
                                str(a.seq), "--threads", str(a.threads), "--iters", str(a.iters), "--dtype", dtype],
                               env, "bench_forward")
            hf, _ = run_json(worker_cmd("forward.py", a, "--worker", "hf", "--model", model, "--batch", a.batch, "--seq",
                                        a.seq, "--iters", a.iters, "--dtypes", dtype), env, "HF side")
            o, h = ours["median_s"], hf["median_s"]
            g = best[dtype]
            print(f"\nforward, {dtype}, allocator: crash-hpc {alloc}, HF {hf['allocator']}; HF attention "
                  f"'{hf['attention']}'; GEMM rate {g:.1f} GFLOP/s; median of {a.iters} passes")
            print(rate_line("crash-hpc (bench_forward)", tokens, o, flops, g))
            print(rate_line("HF OPTForCausalLM", tokens, h, flops, g))
            print(f"  ratio crash-hpc / HF: {h / o:.2f} (goal >= 1.0)")
            summary.append((dtype, alloc, h / o, flops / o / 1e9 / g, flops / h / 1e9 / g))
    print("\nsummary:")
    for dtype, alloc, r, fo, fh in summary:
        print(f"  {dtype:9s} {alloc:9s} ratio {r:5.2f}   of the GEMM rate: crash-hpc {fo:.2f}, HF {fh:.2f}")


if __name__ == "__main__":
    main()
