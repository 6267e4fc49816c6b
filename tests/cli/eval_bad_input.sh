#!/usr/bin/env bash
# `crash-hpc eval` on bad input: one clear line on stderr naming the file or option, exit code 2,
# no results file written (or an existing one left untouched).
set -u
bin=$1
fixtures=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
passed=0
model=$fixtures/eval/model

# expect NAME "substring|substring" -- command...
expect() {
  local name=$1 want=$2
  shift 2
  rm -f "$work/out.json" "$work/out.json.tmp"
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
  if [ -e "$work/out.json" ] || [ -e "$work/out.json.tmp" ]; then echo "FAIL $name: output file left behind"; ok=0; fi
  if [ $ok -eq 1 ]; then passed=$((passed + 1)); echo "ok   $name: $(cat "$work/stderr")"; else failures=$((failures + 1)); cat "$work/stderr"; fi
}

"$bin" prepare --task "$fixtures/eval/mc.jsonl" --tokenizer "$model" --out "$work/mc" --log-level warn || exit 1
"$bin" prepare --task "$fixtures/eval/gen.jsonl" --tokenizer "$model" --out "$work/gen" --log-level warn || exit 1
# The same task prepared with another tokenizer: ids beyond the model's vocabulary ...
"$bin" prepare --task "$fixtures/eval/mc.jsonl" --tokenizer "$fixtures/tokenizers/llama3" --out "$work/mc_llama3" \
  --log-level warn || exit 1
# ... and one whose ids fit the vocabulary but come from a different tokenizer.json.
"$bin" prepare --task "$fixtures/eval/mc.jsonl" --tokenizer "$fixtures/tokenizers/misc_bytelevel" --out "$work/mc_other" \
  --log-level warn || exit 1

expect missing_data "$work/nothing|not a prepared folder" \
  "$bin" eval --model "$model" --data "$work/nothing" --out "$work/out.json"
expect no_data "--data" "$bin" eval --model "$model" --out "$work/out.json"
expect wrong_vocabulary "$work/mc_llama3|outside the vocabulary" \
  "$bin" eval --model "$model" --data "$work/mc_llama3" --out "$work/out.json"
expect other_tokenizer "$work/mc_other|differs from the model" \
  "$bin" eval --model "$model" --data "$work/mc_other" --out "$work/out.json"
expect batch_size_zero "--batch-size must be positive" \
  "$bin" eval --model "$model" --data "$work/mc" --out "$work/out.json" --batch-size 0
expect max_new_tokens_too_many "--max-new-tokens 64|no room" \
  "$bin" eval --model "$model" --data "$work/gen" --out "$work/out.json" --max-new-tokens 64
expect missing_model "$work/nomodel" \
  "$bin" eval --model "$work/nomodel" --data "$work/mc" --out "$work/out.json"
expect bad_grid "tp x pp = 3 x 1" "$bin" eval --model "$model" --data "$work/mc" --out "$work/out.json" --tp 3

# An existing output is kept unless --overwrite.
echo '{"keep": true}' > "$work/existing.json"
"$bin" eval --model "$model" --data "$work/mc" --out "$work/existing.json" > "$work/stdout" 2> "$work/stderr"
rc=$?
if [ $rc -eq 2 ] && grep -qF "output exists" "$work/stderr" && grep -qF '"keep"' "$work/existing.json"; then
  passed=$((passed + 1)); echo "ok   existing_output: $(cat "$work/stderr")"
else
  failures=$((failures + 1)); echo "FAIL existing_output: exit code $rc"; cat "$work/stderr"
fi
if "$bin" eval --model "$model" --data "$work/mc" --out "$work/existing.json" --overwrite --threads 1 --log-level warn > /dev/null &&
  grep -qF '"acc_norm"' "$work/existing.json"; then
  passed=$((passed + 1)); echo "ok   overwrite"
else
  failures=$((failures + 1)); echo "FAIL overwrite"
fi

echo "$passed passed, $failures failed"
[ $failures -eq 0 ]
