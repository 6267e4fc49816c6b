#!/usr/bin/env bash
# Loads a random OPT-6.7B-shaped checkpoint (bf16, 5 GB shards as HF writes them) with
# TP2 x PP2 on 4 ranks and runs a forward pass of a short batch; prints each rank's peak RSS
# against a quarter of the model's bytes, and the load time. Then the forward throughput of
# TP1 vs TP2 on an OPT-125m shape, same total cores. Not part of CI (about 15 GB of disk).
#   bash bench/shard_memory.sh [checkpoint-folder]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/build"
model=${1:-/tmp/crash-bench/opt-6.7b-random}
mpirun=(mpirun --allow-run-as-root --oversubscribe --bind-to none)

if [ ! -f "$model/model.safetensors.index.json" ]; then
  "$bin/bench/make_random_checkpoint" --config "$root/examples/models/opt-6.7b/config.json" --out "$model" --dtype bfloat16
fi
bytes=$(cat "$model"/*.safetensors | wc -c)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c 'import json; [print(json.dumps({"tokens": [2] + [100 + 7 * i + j for j in range(15)]})) for i in range(2)]' > "$work/in.jsonl"

start=$(date +%s.%N)
"${mpirun[@]}" -np 4 "$bin/crash-hpc" forward --model "$model" --input "$work/in.jsonl" --out "$work/out.h5" \
  --tp 2 --pp 2 --dtype bfloat16 --no-hidden-states --threads 1 --log-all-ranks 2>&1 | tee "$work/log" | grep -E "loaded|peak RSS|error"
end=$(date +%s.%N)
python3 - "$work/log" "$bytes" "$start" "$end" <<'PY'
import re, sys
log, total, start, end = open(sys.argv[1]).read(), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
peaks = [float(x) for x in re.findall(r"\] info: peak RSS ([0-9.]+) GiB", log)]
loads = [float(x) for x in re.findall(r"loaded in ([0-9.]+) s", log)]
quarter = total / 4 / 2**30
goal = 1.15 * quarter + 1
print(f"model bytes {total / 2**30:.2f} GiB; a quarter {quarter:.2f} GiB; goal per rank <= {goal:.2f} GiB")
print(f"per-rank peak RSS (GiB): {', '.join(f'{p:.2f}' for p in peaks)}; max/quarter = {max(peaks) / quarter:.2f}")
print(f"load time per rank (s): {', '.join(f'{t:.1f}' for t in loads)}; whole run {end - start:.1f} s")
print("goal met" if max(peaks) <= goal else "goal NOT met")
PY

small=/tmp/crash-bench/opt-125m-random
if [ ! -f "$small/config.json" ] && [ ! -f "$small/model.safetensors.index.json" ]; then
  "$bin/bench/make_random_checkpoint" --config "$root/examples/models/opt-125m/config.json" --out "$small" --dtype float32
fi
tp1=$("$bin/bench/bench_forward" --model "$small" --batch 8 --seq 128 --threads 2 --iters 3 | tail -1)
tp2=$("${mpirun[@]}" -np 2 "$bin/bench/bench_forward" --model "$small" --batch 8 --seq 128 --threads 1 --iters 3 --tp 2 | tail -1)
python3 - "$tp1" "$tp2" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1])["tokens_per_s"], json.loads(sys.argv[2])["tokens_per_s"]
print(f"OPT-125m shape, 8 x 128 tokens, 2 cores: TP1 {a:.1f} tokens/s, TP2 {b:.1f} tokens/s, TP2/TP1 = {b / a:.2f}")
PY
