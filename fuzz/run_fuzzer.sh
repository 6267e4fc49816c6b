#!/usr/bin/env bash
# run_fuzzer.sh TARGET CORPUS SEEDS [libFuzzer options...]: one bounded run of a fuzz target,
# the corpus kept between runs, crash inputs written next to the corpus. Prints the exec
# count and fails on any crash (libFuzzer's exit code).
set -uo pipefail
target=$1 corpus=$2 seeds=$3
shift 3
mkdir -p "$corpus" "$corpus.crashes"
log=$(mktemp)
"$target" "$corpus" "$seeds" -artifact_prefix="$corpus.crashes/" -print_final_stats=1 "$@" 2>&1 | tee "$log" | tail -40
rc=${PIPESTATUS[0]}
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
echo "$(basename "$target"): ${runs:-?} executions, exit code $rc"
rm -f "$log"
exit "$rc"
