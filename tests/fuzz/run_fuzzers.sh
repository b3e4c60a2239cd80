#!/usr/bin/env bash
# Runs each libFuzzer harness for a bounded time on a scratch copy of its seed
# corpus; exits 1 on any finding (crash, sanitizer report, leak, an allocation
# over the limit, a timeout), printing the input that caused it in hex.
#
#   tests/fuzz/run_fuzzers.sh BUILD_DIR [SECONDS] [TARGET...]
#
# BUILD_DIR was configured with -DMOONWALK_FUZZ=ON (clang); SECONDS per target
# (default 60); TARGETs among idx idx_gzip spec checkpoint (default: all).
# Prints one summary line per target: executions, executions per second.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(cd "${1:?usage: run_fuzzers.sh BUILD_DIR [SECONDS] [TARGET...]}" && pwd)"
seconds="${2:-60}"
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx idx_gzip spec checkpoint)

work="$(mktemp -d "${TMPDIR:-/tmp}/moonwalk-fuzz.XXXXXX")"
failed=()
for t in "${targets[@]}"; do
  exe="$build/bin/moonwalk_fuzz_$t"
  [ -x "$exe" ] || { echo "run_fuzzers: $exe not built (configure with -DMOONWALK_FUZZ=ON)"; exit 2; }
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  cp "$here/corpus/$t/"* "$work/$t/corpus/"
  if [ -d "$here/regressions/$t" ]; then cp "$here/regressions/$t/"* "$work/$t/corpus/"; fi
  if [ "$t" = checkpoint ]; then "$build/bin/moonwalk_fuzz_checkpoint_seeds" "$work/$t/corpus" >/dev/null; fi
  dict=()
  if [ "$t" = spec ]; then dict=(-dict="$here/spec.dict"); fi
  log="$work/$t/log.txt"
  rc=0
  (cd "$work/$t" && "$exe" -max_total_time="$seconds" -malloc_limit_mb=2048 -rss_limit_mb=4096 -timeout=10 \
      -print_final_stats=1 -artifact_prefix="$work/$t/artifacts/" "${dict[@]}" "$work/$t/corpus") \
      >"$log" 2>&1 || rc=$?
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  printf 'fuzz %-10s %4ss  %9s executions  %6s exec/s  rc %d\n' "$t" "$seconds" "${runs:-?}" "${rate:-?}" "$rc"
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "---- $t: finding (exit $rc); the fuzzer's report:"
    grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse|INITED)' "$log" | tail -60
    for a in "$work/$t/artifacts/"*; do
      [ -f "$a" ] || continue
      echo "---- $t: input $(basename "$a") ($(stat -c %s "$a") bytes), hex:"
      od -An -v -tx1 "$a" | head -40
    done
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_fuzzers: findings in: ${failed[*]} (inputs and logs kept in $work)"
  exit 1
fi
rm -rf "$work"
echo "run_fuzzers: no findings (${targets[*]}, ${seconds} s each)"
