#!/usr/bin/env bash
# Formats the C++ sources (tracked *.h, *.cpp, *.cu outside tests/fixtures) with .clang-format.
#   env/format.sh           format them in place
#   env/format.sh --check   change nothing; list the files that differ and exit 1 (CI)
# CLANG_FORMAT names the program (default clang-format; the style is tuned on Debian 12's 14).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cf=${CLANG_FORMAT:-clang-format}
case "${1:-}" in
  "") check=0 ;;
  --check) check=1 ;;
  *) echo "usage: env/format.sh [--check]" >&2; exit 2 ;;
esac
command -v "$cf" >/dev/null || { echo "env/format.sh: $cf not found (env/setup.sh installs clang-format)" >&2; exit 2; }

mapfile -d '' files < <(git ls-files -z -- '*.h' '*.cpp' '*.cu' ':!:tests/fixtures/**')
if [ "$check" = 0 ]; then
  [ "${#files[@]}" -eq 0 ] || "$cf" -i --style=file "${files[@]}"
  exit 0
fi
bad=()
for f in "${files[@]}"; do
  "$cf" --style=file "$f" | cmp -s - "$f" || bad+=("$f")
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "env/format.sh: ${#bad[@]} files are not formatted (run env/format.sh to format them):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "env/format.sh: ${#files[@]} files formatted"
