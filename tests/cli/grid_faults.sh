#!/usr/bin/env bash
# Grids that cannot work are refused before any weight is read (one clear line, exit 2), and a
# rank that fails mid-run ends every rank promptly with its message printed once.
set -u
bin=$1
fixtures=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mpirun=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
passed=0
failures=0
printf '{"tokens": [5, 6, 7]}\n{"tokens": [8, 9]}\n' > "$work/in.jsonl"

check() {  # check NAME OK-CONDITION-RESULT DETAILS
  if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "ok   $1: $3"; else failures=$((failures + 1)); echo "FAIL $1: $3"; fi
}

# refused NAME NP "substring" model-dir -- extra args
refused() {
  local name=$1 np=$2 want=$3 model=$4
  shift 4
  rm -f "$work/out.h5"
  "${mpirun[@]}" -np "$np" "$bin" forward --model "$model" --input "$work/in.jsonl" --out "$work/out.h5" "$@" \
    > "$work/log" 2>&1
  local rc=$? n
  n=$(grep -c "crash-hpc: " "$work/log")
  local ok=0
  [ $rc -eq 2 ] || ok=1
  [ "$n" -eq 1 ] || ok=1
  grep -qF -- "$want" "$work/log" || ok=1
  [ ! -e "$work/out.h5" ] || ok=1
  check "$name" $ok "exit $rc, $n message(s): $(grep "crash-hpc: " "$work/log" | head -1)"
}

variant() {  # variant NAME SRC PYTHON: a fixture model with an edited config.json
  rm -rf "$work/$1"
  cp -r "$fixtures/models/$2" "$work/$1"
  python3 - "$work/$1/config.json" "$3" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
exec(sys.argv[2])
json.dump(c, open(sys.argv[1], "w"))
PY
  echo "$work/$1"
}

refused world-not-divisible 3 "world size 3 is not divisible by tp x pp = 2 x 1" "$fixtures/models/opt_preln" --tp 2
refused heads-not-divisible 3 "4 attention heads do not split over --tp 3" "$fixtures/models/opt_preln" --tp 3
# The edited configs no longer match the weights: loading first would fail differently.
m=$(variant kv llama_gqa 'c.update(num_attention_heads=6, num_key_value_heads=3, head_dim=8)')
refused kv-heads-neither-split-nor-replicate 2 "3 key/value heads neither split over --tp 2" "$m" --tp 2
m=$(variant layers opt_preln 'c.update(num_hidden_layers=1)')
refused fewer-layers-than-stages 2 "1 layers, fewer than the 2 pipeline stages" "$m" --pp 2
refused pp-layers-sum 2 "--pp-layers adds up to 5 layers but the model has 4" "$fixtures/models/opt_preln" --pp 2 --pp-layers 2,3

# A rank that throws after the model is loaded and the ranks talk to each other.
for grid in "--pp 2" "--tp 2"; do
  start=$(date +%s)
  CRASH_TEST_FAIL_RANK=1 timeout 60 "${mpirun[@]}" -np 2 "$bin" forward --model "$fixtures/models/opt_preln" \
    --input "$work/in.jsonl" --out "$work/out.h5" --overwrite $grid > "$work/log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  n=$(grep -c "failure injected" "$work/log")
  ok=0
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || ok=1
  [ "$took" -le 30 ] || ok=1
  [ "$n" -eq 1 ] || ok=1
  [ ! -e "$work/out.h5" ] || ok=1
  check "rank-fails-mid-run ($grid)" $ok "exit $rc after ${took}s, message printed $n time(s)"
done

echo "$passed passed, $failures failed"
[ $failures -eq 0 ]
