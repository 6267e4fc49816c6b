#!/usr/bin/env bash
# Every error a user can cause: one clear line on stderr naming the file and the problem,
# exit code 2, and no output file left behind.
set -u
bin=$1
fixtures=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
passed=0

printf '{"tokens": [5, 6, 7]}\n{"tokens": [8, 9]}\n' > "$work/in.jsonl"

# expect NAME "substring|substring" -- command...
expect() {
  local name=$1 want=$2
  shift 2
  rm -f "$work/out.h5" "$work/out.h5.tmp"
  "$@" > "$work/stdout" 2> "$work/stderr"
  local rc=$? ok=1
  local lines
  lines=$(grep -c . "$work/stderr")
  [ "$rc" -eq 2 ] || { echo "FAIL $name: exit code $rc, expected 2"; ok=0; }
  [ "$lines" -eq 1 ] || { echo "FAIL $name: $lines lines on stderr, expected 1"; ok=0; }
  IFS='|' read -ra parts <<< "$want"
  for p in "${parts[@]}"; do
    grep -qF -- "$p" "$work/stderr" || { echo "FAIL $name: '$p' not in message"; ok=0; }
  done
  if [ -e "$work/out.h5" ] || [ -e "$work/out.h5.tmp" ]; then echo "FAIL $name: output file left behind"; ok=0; fi
  if [ $ok -eq 1 ]; then passed=$((passed + 1)); echo "ok   $name: $(cat "$work/stderr")"; else failures=$((failures + 1)); cat "$work/stderr"; fi
}

model() {  # model NAME SRC: a copy of a fixture model to break
  rm -rf "$work/$1"
  cp -r "$fixtures/models/$2" "$work/$1"
  echo "$work/$1"
}

edit_config() {  # edit_config DIR PYTHON-EXPR-ON-c
  python3 - "$1/config.json" "$2" <<'PY'
import json, sys
path, expr = sys.argv[1], sys.argv[2]
c = json.load(open(path))
exec(expr)
json.dump(c, open(path, "w"))
PY
}

# rewrite_header FILE PYTHON-EXPR-ON-h: edits the JSON header of a safetensors file in place
rewrite_header() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
path, expr = sys.argv[1], sys.argv[2]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
data = raw[8 + n:]
exec(expr)
text = json.dumps(h).encode()
open(path, "wb").write(struct.pack("<Q", len(text)) + text + data)
PY
}

run() { "$bin" forward --input "$work/in.jsonl" --out "$work/out.h5" "$@"; }

expect unknown-job "unknown job 'frobnicate'" "$bin" frobnicate
expect unknown-option "unrecognised option '--modle'" "$bin" forward --modle x
expect missing-option "model" "$bin" forward --input x --out y
expect no-model-folder "not a model folder" run --model "$work/absent"

m=$(model missing-field llama_gqa); edit_config "$m" 'del c["hidden_size"]'
expect config-missing-field "config.json|missing field 'hidden_size'" run --model "$m"

m=$(model wrong-type llama_gqa); edit_config "$m" 'c["num_hidden_layers"] = "three"'
expect config-wrong-type "config.json|num_hidden_layers|integer" run --model "$m"

m=$(model model-type llama_gqa); edit_config "$m" 'c["model_type"] = "mamba"'
expect unsupported-model-type "config.json|model_type 'mamba' is not supported" run --model "$m"

# Fields that would change the computation but are not implemented (issue 20): named, exit 2.
m=$(model sliding-window qwen2_bias); edit_config "$m" 'c["layer_types"] = ["sliding_attention"] * 4'
expect qwen-sliding-without-window "config.json|layer_types|no window applies" run --model "$m"
m=$(model rope-yarn qwen3_kv1); edit_config "$m" 'c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}'
expect qwen-rope-yarn "config.json|rope_parameters|rope type 'yarn'" run --model "$m"

m=$(model truncated llama_gqa); truncate -s 20000 "$m/model.safetensors"
expect truncated-safetensors "model.safetensors|truncated" run --model "$m"

m=$(model out-of-range llama_gqa)
rewrite_header "$m/model.safetensors" 'k = "model.norm.weight"; h[k]["data_offsets"][1] += 4096'
expect offsets-out-of-range "model.safetensors|model.norm.weight|out of range" run --model "$m"

m=$(model overlap llama_gqa)
rewrite_header "$m/model.safetensors" 'a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]; h[b]["data_offsets"] = [x - 4 for x in h[b]["data_offsets"]]'
expect offsets-overlap "model.safetensors|overlap" run --model "$m"

m=$(model shape llama_gqa); edit_config "$m" 'c["intermediate_size"] = 100'
expect shape-disagrees-with-config "model.safetensors|shape|config.json" run --model "$m"

m=$(model shard opt_preln); rm "$m/model-00002-of-00007.safetensors"
expect missing-shard "model.safetensors.index.json|model-00002-of-00007.safetensors|missing" run --model "$m"

printf '{"tokens": [5, 6]}\n{"tokens": [5, \n' > "$work/bad.jsonl"
expect malformed-jsonl "bad.jsonl:2|not valid JSON" "$bin" forward --model "$fixtures/models/llama_gqa" --input "$work/bad.jsonl" --out "$work/out.h5"

printf '{"tokens": [5, 6, 9999]}\n' > "$work/range.jsonl"
expect token-out-of-vocabulary "range.jsonl:1|9999|vocabulary" "$bin" forward --model "$fixtures/models/llama_gqa" --input "$work/range.jsonl" --out "$work/out.h5"

python3 -c 'print("{\"tokens\": [%s]}" % ",".join(["5"] * 65))' > "$work/long.jsonl"
expect too-long "long.jsonl:1|65 tokens exceed the model's context of 64" "$bin" forward --model "$fixtures/models/opt_preln" --input "$work/long.jsonl" --out "$work/out.h5"

expect bad-dtype "--dtype|float8" run --model "$fixtures/models/llama_gqa" --dtype float8

# pipeline --study pruning: its options are checked before any stage runs.
printf '{"context": "a", "choices": [" b", " c"], "gold": 0}\n' > "$work/mc.jsonl"
study() {
  "$bin" pipeline --study pruning --model "$fixtures/eval/model" --train-task "$work/mc.jsonl" --eval-task \
    "$work/mc.jsonl" --work "$work/study" --adapters 1,1 "$@"
}
expect study-unknown "--study|unknown study 'prune'" "$bin" pipeline --study prune --model "$fixtures/eval/model" \
  --train-task "$work/mc.jsonl" --eval-task "$work/mc.jsonl" --work "$work/study"
expect study-ratio "--ratio|fractions in (0, 1)|1.5" study --ratio 0.25,1.5
expect study-ratio-twice "--ratio|0.25 is given twice" study --ratio 0.25,0.25
expect study-method "--pruning-methods|unknown method 'slab'" study --pruning-methods shortgpt,slab
expect study-healing "--healing|unknown choice 'partial'" study --healing partial
expect study-heal-layers "--heal-layers 4|2 layers" study --ratio 0.5 --heal-layers 4 --pruning-methods shortgpt
expect study-no-middle "--ratio 0.5|removes 2 of 4 layers|middle layer" study --ratio 0.5
expect study-tuning "--tuning|unknown choice 'qlora'" study --tuning qlora
[ -e "$work/study/activations.h5" ] && { failures=$((failures + 1)); echo "FAIL study: a stage ran before the check"; }

# An existing output is kept as it was without --overwrite.
echo "keep me" > "$work/existing.h5"
"$bin" forward --model "$fixtures/models/llama_gqa" --input "$work/in.jsonl" --out "$work/existing.h5" 2> "$work/stderr"
rc=$?
if [ $rc -eq 2 ] && grep -q "exists" "$work/stderr" && [ "$(cat "$work/existing.h5")" = "keep me" ]; then
  passed=$((passed + 1)); echo "ok   existing-output: $(cat "$work/stderr")"
else
  failures=$((failures + 1)); echo "FAIL existing-output: rc=$rc $(cat "$work/stderr")"
fi

echo "$passed passed, $failures failed"
[ $failures -eq 0 ]
