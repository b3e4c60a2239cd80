#!/usr/bin/env bash
# Compile time of a user's program (issue 22): the README's first snippet
# wrapped in main(), compiled as a user would (one translation unit including
# <moonwalk/moonwalk.hpp>), timed with GNU time: seconds of CPU (user + sys)
# and peak memory of the compiler.
#
#   bench/compile_time.sh [CXX] [FLAGS...]      (default: g++ -O2)
#
# Prints one line: "cpu_s=… wall_s=… max_rss_kb=… cxx=… flags=…".
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cxx=${1:-g++}
shift || true
flags=("$@")
[ ${#flags[@]} -eq 0 ] && flags=(-O2)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The first ```cpp block of README.md: its #include and using lines at file
# scope, the rest inside main().
awk '/^```cpp/{f=1;n++;next} /^```/{if(f&&n==1)exit; f=0} f&&n==1' "$here/README.md" > "$tmp/snippet"
[ -s "$tmp/snippet" ] || { echo "compile_time.sh: README.md has no \`\`\`cpp block" >&2; exit 1; }
{
  grep -E '^(#include|using )' "$tmp/snippet"
  echo 'int main() {'
  grep -vE '^(#include|using )' "$tmp/snippet"
  echo 'return 0;'
  echo '}'
} > "$tmp/main.cpp"
/usr/bin/time -f "%U %S %e %M" -o "$tmp/time" "$cxx" -std=c++20 "${flags[@]}" -I"$here/include" \
  -I/usr/include/eigen3 -c "$tmp/main.cpp" -o "$tmp/main.o"
read -r user sys wall rss < "$tmp/time"
echo "cpu_s=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }') wall_s=$wall max_rss_kb=$rss cxx=$cxx flags=${flags[*]}"
