#!/usr/bin/env bash
# Deeper under the same budget (issue 8 item 4): for one enforced memory
# budget, the largest depth each schedule trains for $STEPS steps on the
# equal-width LeakyReLU(0.1) MLP, with moonwalk-memory --budget (RLIMIT_AS on
# the address space the steps add above the baseline; exit 3 = out of memory).
#
#   bench/budget.sh BUILD_DIR OUT_DIR
#
# Environment: BUDGET (default 64M: backprop keeps ~2 MiB per layer at width
# 256, batch 1024, so it fits ~30 layers), WIDTH (256), BATCH (1024), STEPS
# (10), THREADS (1), MAX_DEPTH (1024: a schedule that reaches it is reported
# as capped, not as limited by the budget), SCHEDULES (default "backprop
# checkpoint binomial mixed revbackprop"; a schedule that cannot run the
# network, exit 1, is skipped with a note). Mixed runs with its default
# fidelity policy (error held under tolerance, anchors paid in memory).
#
# Search per schedule: depth 4, 8, 16, … until a run runs out of memory (or
# the cap), then bisection between the last depth that fit and the first that
# did not, to within ~10% of the depth.
#
# Writes OUT_DIR/budget.csv (every run) and OUT_DIR/budget.md (the table,
# computed from the CSV alone; REPORT_ONLY=1 rewrites it from an existing
# budget.csv without running anything).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR OUT_DIR}
out=${2:?usage: $0 BUILD_DIR OUT_DIR}
mem=$build/bin/moonwalk-memory
[ -x "$mem" ] || { echo "$0: $mem not built (configure with -DMOONWALK_BUILD_BENCH=ON)" >&2; exit 1; }
budget=${BUDGET:-64M} width=${WIDTH:-256} batch=${BATCH:-1024} steps=${STEPS:-10} threads=${THREADS:-1}
max_depth=${MAX_DEPTH:-1024}
schedules=${SCHEDULES:-"backprop checkpoint binomial mixed revbackprop"}
mkdir -p "$out"
csv=$out/budget.csv
report_only=${REPORT_ONLY:-0}
if [ "$report_only" != 1 ]; then
  echo "schedule,depth,status,seconds_per_step,peak_rss_bytes,baseline_rss_bytes,residual_bytes,error_estimate,within_tolerance" >"$csv"
fi

field() {  # field JSON KEY: the value of a top-level key of a one-line JSON object
  sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1" | tr -d '"'
}

# try SCHEDULE DEPTH: runs once, appends a CSV row, sets $status (ok, oom,
# error, or crash-RC) and $line; returns 0 when the run completed its steps.
try() {
  local rc=0
  echo "== $1 depth $2" >&2
  line=$("$mem" --schedule "$1" --depth "$2" --width "$width" --batch "$batch" --steps "$steps" \
    --threads "$threads" --budget "$budget") || rc=$?
  case $rc in
    0) status=ok ;;
    3) status=oom ;;
    1) status=error ;;
    *) status=crash-$rc ;;
  esac
  echo "$1,$2,$status,$(field "$line" seconds_per_step),$(field "$line" peak_rss_bytes),$(field "$line" baseline_rss_bytes),$(field "$line" residual_bytes),$(field "$line" error_estimate),$(field "$line" within_tolerance)" >>"$csv"
  [ $rc -eq 0 ]
}

search() {  # search SCHEDULE: doubling, then bisection; every run goes to the CSV
  local s=$1 lo=0 hi=0 d=4
  while :; do
    if try "$s" "$d"; then
      lo=$d
      [ "$d" -ge "$max_depth" ] && return
      d=$((2 * d > max_depth ? max_depth : 2 * d))
    else
      hi=$d
      break
    fi
  done
  [ "$lo" -eq 0 ] && return
  # bisection to within ~10% of the depth
  while [ $((hi - lo)) -gt $(((lo + 9) / 10 > 1 ? (lo + 9) / 10 : 1)) ]; do
    mid=$(((lo + hi) / 2))
    if try "$s" "$mid"; then lo=$mid; else hi=$mid; fi
  done
}
if [ "$report_only" != 1 ]; then
  for s in $schedules; do search "$s"; done
fi

# ---- the table, from the CSV -------------------------------------------------------
# max depth: the deepest run that completed; what stopped the search: the
# status of the shallowest failed run above it (oom: the budget), or the cap.
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
max_ok() { awk -F, -v s="$1" 'NR > 1 && $1 == s && $3 == "ok" && $2 > m {m = $2} END {print m + 0}' "$csv"; }
bp=$(max_ok backprop)
notes=()
{
  echo "# Deeper under the same budget"
  echo
  echo "Budget **$budget** of address space above the baseline (RLIMIT_AS = virtual size once parameters,"
  echo "optimizer state and batch exist + budget; glibc held to one arena). Equal-width LeakyReLU(0.1) MLP,"
  echo "width $width, batch $batch, float, $steps SGD steps per run, $threads thread(s). Max depth: the largest"
  echo "depth that completed all steps (doubling from 4, then bisection to ~10%; cap $max_depth)."
  echo
  echo "| schedule | max depth | × backprop | stopped by | first failed depth | peak RSS at max depth (above baseline) | residual bytes | error estimate | within tolerance | s/step |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for s in $schedules; do
    d=$(max_ok "$s")
    fail=$(awk -F, -v s="$s" -v d="$d" 'NR > 1 && $1 == s && $3 != "ok" && $2 > d {print $2 "," $3}' "$csv" | sort -t, -k1,1n | head -1)
    fd=${fail%%,*} fs=${fail#*,}
    if [ "$d" -eq 0 ]; then
      [ "$fs" = error ] && notes+=("$s: cannot run this network (moonwalk-memory exit 1 at depth $fd): skipped.")
      echo "| $s | — | — | ${fs:-not run} | ${fd:-—} | | | | | |"
      continue
    fi
    case $fs in
      "") stop="cap ($max_depth)" fd=— ;;
      oom) stop=budget ;;
      error) stop="run-time error (not memory)"
        notes+=("$s: the search stopped at depth $fd on a run-time error (moonwalk-memory exit 1), not on the budget: see its stderr.") ;;
      *) stop="$fs (not memory)" ;;
    esac
    r=$(awk -F, -v s="$s" -v d="$d" '$1 == s && $2 == d && $3 == "ok"' "$csv" | tail -1)
    IFS=, read -r _ _ _ sps peak base resid err tol <<<"$r"
    ratio=—
    [ "$bp" -gt 0 ] && ratio=$(awk -v a="$d" -v b="$bp" 'BEGIN { printf "%.1f×", a / b }')
    echo "| $s | $d | $ratio | $stop | $fd | $(mib "$peak") ($(mib $((peak - base)))) | $(mib "$resid") | ${err:-null} | $tol | $sps |"
  done
  for n in "${notes[@]}"; do echo && echo "Note: $n"; done
  echo
  echo "Command: \`BUDGET=$budget WIDTH=$width BATCH=$batch STEPS=$steps THREADS=$threads MAX_DEPTH=$max_depth bench/budget.sh $build $out\`"
  echo "(every run: \`budget.csv\`; status oom = moonwalk-memory exit 3 under the budget, error = exit 1)."
} >"$out/budget.md"
cat "$out/budget.md"
