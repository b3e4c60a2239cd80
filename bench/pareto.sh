#!/usr/bin/env bash
# Pareto report (issue 20): time per step against peak memory of every
# schedule on a few fixed networks, with moonwalk-memory (one process per
# run, so peaks never mix), and which schedules are on the time–memory front.
#
#   bench/pareto.sh BUILD_DIR OUT_DIR [network ...]      (default: all networks)
#
# Networks:
#   fashion     the Fashion-MNIST MLP 784-256-128-100-10, LeakyReLU(0.1), batch 128
#   mlp16       equal-width LeakyReLU(0.1) MLP, width 256, depth 16, batch 1024
#   mlp40       the same at depth 40
#   mlp64       the same at depth 64
#   mlp16-0.5   the same with LeakyReLU(0.5), depth 16
#   mlp64-0.5   LeakyReLU(0.5), depth 64
#   revnet40    additive RevNet: in:256, 40 × coupling:additive:256, linear:10, batch 1024
#   revnet64    the same with 64 blocks
# Schedules per network: backprop, checkpoint (every round(√L), L = the
# network's layers), binomial:2, binomial:4, binomial:8, binomial:16 (binomial
# checkpointing holding that many layer inputs: --slots), mixed, and the
# planner's curve: planned:BYTES (--schedule planned --plan-budget BYTES, the
# working set it plans for) at budgets from backprop's working set down to
# near the smallest feasible one (4200K at width 256, batch 1024: the two
# cotangent buffers and two values; planned rebuilds by inversion where layers
# have inverses); the RevNets also revbackprop, mixed-rebuild (mixed
# --rebuild-inputs) and planned-exact:BYTES (planned --no-invert: store and
# recompute only, the planner without its inversion move).
#
# Environment:
#   REPEATS   interleaved repeats (default 3): each repeat runs every network's
#             schedules once, in an order rotated by one per repeat, so drift in
#             the machine's state hits the schedules alike
#   STEPS     gradient steps per run (default 4; a run reports the median step)
#   THREADS   Eigen threads (default 1); every run is pinned with
#             taskset -c $CPU (default 1)
#   BATCH     batch size for every network (default: 128 fashion, 1024 others;
#             e.g. BATCH=16 for a smoke run)
#   NETWORKS  networks to run when none are given as arguments (space separated)
#   SCHEDULES only these schedule labels (e.g. "backprop binomial:4")
#   REPORT_ONLY=1  rewrite the summary, table and plots from an existing
#             OUT_DIR/pareto.csv without running anything
#
# A run that fails (exit status ≠ 0: e.g. a schedule that cannot run the
# network, exit 1) is recorded with its status and no figures; it is not fatal.
#
# Writes
#   OUT_DIR/pareto-meta.txt     date, git commit, CPU model, settings
#   OUT_DIR/pareto.log          moonwalk-memory's stderr, per run
#   OUT_DIR/pareto.csv          one row per run: network, schedule, repeat,
#                               seconds_per_step (median over the steps), seconds_min,
#                               peak_above_baseline_bytes (peak RSS − baseline RSS),
#                               residual_bytes, error_estimate, within_tolerance,
#                               fallbacks, then status (ok, error, usage, oom,
#                               crash-RC), peak_rss_bytes, baseline_rss_bytes, every, slots
#   OUT_DIR/pareto-summary.csv  one row per network × schedule (columns: see "summary" below)
#   OUT_DIR/pareto.md           per network: the table, Pareto front marked
#   OUT_DIR/pareto-NETWORK.png  per network (gnuplot, bench/plot_pareto.gp; without gnuplot: a warning, no PNGs): peak
#                               above baseline against seconds per step, log–log
set -euo pipefail
usage="usage: $0 BUILD_DIR OUT_DIR [network ...]"
build=${1:?$usage}
out=${2:?$usage}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
all_networks=(fashion mlp16 mlp40 mlp64 mlp16-0.5 mlp64-0.5 revnet40 revnet64)
networks=("$@")
if [ ${#networks[@]} -eq 0 ]; then
  if [ -n "${NETWORKS:-}" ]; then read -r -a networks <<<"$NETWORKS"; else networks=("${all_networks[@]}"); fi
fi
for n in "${networks[@]}"; do
  [[ " ${all_networks[*]} " == *" $n "* ]] || { echo "$0: unknown network '$n' (${all_networks[*]})" >&2; exit 2; }
done
repeats=${REPEATS:-3} steps=${STEPS:-4} threads=${THREADS:-1} cpu=${CPU:-1}
report_only=${REPORT_ONLY:-0}
mem=$build/bin/moonwalk-memory
mkdir -p "$out"
csv=$out/pareto.csv summary=$out/pareto-summary.csv md=$out/pareto.md meta=$out/pareto-meta.txt log=$out/pareto.log

fashion=in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10

net_batch() {  # net_batch NETWORK
  if [ -n "${BATCH:-}" ]; then echo "$BATCH"; elif [ "$1" = fashion ]; then echo 128; else echo 1024; fi
}

net_args() {  # net_args NETWORK: moonwalk-memory's network options, one per line
  local s i
  case $1 in
    fashion) printf '%s\n' --net "$fashion" ;;
    mlp16) printf '%s\n' --depth 16 --width 256 ;;
    mlp40) printf '%s\n' --depth 40 --width 256 ;;
    mlp64) printf '%s\n' --depth 64 --width 256 ;;
    mlp16-0.5 | mlp64-0.5)
      s=in:256
      for ((i = 0; i < ${1:3:2}; ++i)); do s+=,linear:256,leaky_relu:0.5; done
      printf '%s\n' --net "$s,linear:10" ;;
    revnet40 | revnet64)
      s=in:256
      for ((i = 0; i < ${1#revnet}; ++i)); do s+=,coupling:additive:256; done
      printf '%s\n' --net "$s,linear:10" ;;
  esac
}

net_schedules() {  # net_schedules NETWORK: the schedule labels, in the report's order
  local s=(backprop checkpoint binomial:2 binomial:4 binomial:8 binomial:16 mixed) keep=() x
  case $1 in  # (values of 1 MiB at width 256, batch 1024; 128 KiB for the Fashion MLP's widest)
    fashion) s+=(planned:1M planned:768K planned:600K) ;;
    mlp16 | mlp16-0.5) s+=(planned:24M planned:16M planned:8M planned:6M) ;;
    *) s+=(planned:64M planned:32M planned:16M planned:8M planned:6M planned:5M planned:4200K) ;;
  esac
  [[ $1 == revnet* ]] && s+=(revbackprop mixed-rebuild planned-exact:16M planned-exact:8M planned-exact:6M)
  if [ -n "${SCHEDULES:-}" ]; then
    for x in "${s[@]}"; do [[ " $SCHEDULES " == *" $x "* ]] && keep+=("$x"); done
    s=("${keep[@]}")
  fi
  echo "${s[@]}"
}

schedule_args() {  # schedule_args LABEL: moonwalk-memory's schedule options, one per line
  case $1 in
    binomial:*) printf '%s\n' --schedule binomial --slots "${1#binomial:}" ;;
    mixed-rebuild) printf '%s\n' --schedule mixed --rebuild-inputs ;;
    planned:*) printf '%s\n' --schedule planned --plan-budget "${1#planned:}" ;;
    planned-exact:*) printf '%s\n' --schedule planned --no-invert --plan-budget "${1#planned-exact:}" ;;
    *) printf '%s\n' --schedule "$1" ;;
  esac
}

field() {  # field JSON KEY: the value of a top-level key of a one-line JSON object
  sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1" | tr -d '"'
}

# ---- runs ------------------------------------------------------------------------------
if [ "$report_only" != 1 ]; then
  [ -x "$mem" ] || { echo "$0: $mem not built (configure with -DMOONWALK_BUILD_BENCH=ON)" >&2; exit 1; }
  command -v taskset >/dev/null || { echo "$0: taskset not found (util-linux)" >&2; exit 1; }
  commit=$(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$commit" != unknown ] && [ -n "$(git -C "$here/.." status --porcelain -- include bench 2>/dev/null)" ]; then
    commit+=" (include/ or bench/ modified: the binary may not match the commit)"
  fi
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $commit"
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
    echo "cores: $(nproc)"
    echo "binary: $mem"
    echo "networks: ${networks[*]}"
    echo "repeats: $repeats"
    echo "steps: $steps"
    echo "threads: $threads"
    echo "pinned: taskset -c $cpu"
    for n in "${networks[@]}"; do echo "batch $n: $(net_batch "$n")"; done
    [ -n "${SCHEDULES:-}" ] && echo "schedules: $SCHEDULES"
  } >"$meta"
  : >"$log"
  echo "network,schedule,repeat,seconds_per_step,seconds_min,peak_above_baseline_bytes,residual_bytes,error_estimate,within_tolerance,fallbacks,status,peak_rss_bytes,baseline_rss_bytes,every,slots,working_bytes" >"$csv"
  for ((r = 1; r <= repeats; ++r)); do
    for net in "${networks[@]}"; do
      read -r -a labels <<<"$(net_schedules "$net")"
      n=${#labels[@]}
      mapfile -t nargs < <(net_args "$net")
      for ((k = 0; k < n; ++k)); do
        label=${labels[$(((k + r - 1) % n))]}
        mapfile -t sargs < <(schedule_args "$label")
        echo "== repeat $r/$repeats $net $label" >&2
        echo "== repeat $r $net $label" >>"$log"
        rc=0
        line=$(taskset -c "$cpu" "$mem" "${nargs[@]}" "${sargs[@]}" --batch "$(net_batch "$net")" \
          --steps "$steps" --threads "$threads" 2>>"$log") || rc=$?
        case $rc in
          0) status=ok ;;
          1) status=error ;;
          2) status=usage ;;
          3) status=oom ;;
          *) status=crash-$rc ;;
        esac
        if [ $rc -ne 0 ]; then
          msg=$(tail -1 "$log")
          [[ $msg == "== "* ]] && msg="(nothing on stderr)"
          echo "$0: $net $label failed (exit $rc, recorded as $status): $msg" >&2
          line=""  # (a partial line is not a measurement)
        fi
        peak=$(field "$line" peak_rss_bytes) base=$(field "$line" baseline_rss_bytes) above=""
        [ -n "$peak" ] && [ -n "$base" ] && above=$((peak - base))
        echo "$net,$label,$r,$(field "$line" seconds_per_step),$(field "$line" seconds_min),$above,$(field "$line" residual_bytes),$(field "$line" error_estimate),$(field "$line" within_tolerance),$(field "$line" fallbacks),$status,$peak,$base,$(field "$line" every),$(field "$line" slots),$(field "$line" working_bytes)" >>"$csv"
      done
    done
  done
fi
[ -s "$csv" ] || { echo "$0: no $csv" >&2; exit 1; }

# ---- summary ----------------------------------------------------------------------------
# Per network × schedule, over its successful repeats:
#   runs, failed (repeats that exited ≠ 0), status (ok, or the failures' statuses),
#   time_median (median of seconds_per_step), time_min (min of seconds_min),
#   peak_median, peak_min (peak above baseline, bytes),
#   time_x_backprop (time_median / backprop's time_median), time_min_x_backprop
#   (time_min / backprop's time_min), peak_x_backprop (peak_median / backprop's
#   peak_median), residual_bytes (max), error_estimate_max, within_tolerance (every
#   run), fallbacks (max per run), every, slots, on_front (yes / no),
#   dominated_by (the schedules with ≤ time_median and ≤ peak_median, one strictly,
#   separated by spaces).
# Rows in the order of the schedules' first runs (repeat 1 runs the listed order).
awk -F, -v OFS=, '
  function isort(a, n,   i, j, t) {
    for (i = 2; i <= n; ++i) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; --j) a[j + 1] = a[j]; a[j + 1] = t }
  }
  function med(list,   a, n, i) {
    n = split(list, a, " ")
    if (n == 0) return ""
    for (i in a) a[i] += 0
    isort(a, n)
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function lo(list,   a, n, i, m) {
    n = split(list, a, " ")
    if (n == 0) return ""
    m = a[1] + 0
    for (i = 2; i <= n; ++i) if (a[i] + 0 < m) m = a[i] + 0
    return m
  }
  function ratio(x, y) { return (x == "" || y == "" || y + 0 == 0) ? "" : sprintf("%.4g", x / y) }
  NR == 1 { next }
  {
    k = $1 SUBSEP $2
    if (!(k in seen)) { seen[k] = 1; order[++nk] = k; if (!($1 in nseen)) { nseen[$1] = 1; nets[++nn] = $1 } }
    if ($11 != "ok") { failed[k]++; if (index(" " bad[k] " ", " " $11 " ") == 0) bad[k] = bad[k] (bad[k] == "" ? "" : " ") $11; next }
    runs[k]++
    t[k] = t[k] " " $4; tmin[k] = tmin[k] " " $5; p[k] = p[k] " " $6
    if (!(k in res) || $7 + 0 > res[k] + 0) res[k] = $7
    # (error_estimate: "null" is a non-finite estimate: keep it as inf)
    e = ($8 == "null" || $8 == "") ? "inf" : $8
    if (!(k in err) || e == "inf" || (err[k] != "inf" && e + 0 > err[k] + 0)) err[k] = e
    if ($9 != "true") overtol[k] = 1
    if (!(k in fb) || $10 + 0 > fb[k] + 0) fb[k] = $10
    every[k] = $14; slots[k] = $15
    if (!(k in wk) || $16 + 0 > wk[k] + 0) wk[k] = $16
  }
  END {
    print "network,schedule,runs,failed,status,time_median,time_min,peak_median,peak_min,time_x_backprop,time_min_x_backprop,peak_x_backprop,residual_bytes,error_estimate_max,within_tolerance,fallbacks,every,slots,on_front,dominated_by,working_bytes"
    for (i = 1; i <= nk; ++i) {
      k = order[i]
      if (runs[k] > 0) { tm[k] = med(t[k]); tl[k] = lo(tmin[k]); pm[k] = med(p[k]); pl[k] = lo(p[k]) }
    }
    for (i = 1; i <= nk; ++i) {
      k = order[i]; split(k, kk, SUBSEP); net = kk[1]; s = kk[2]
      b = net SUBSEP "backprop"
      front = ""; dom = ""
      if (runs[k] > 0) {
        front = "yes"
        for (j = 1; j <= nk; ++j) {
          o = order[j]; split(o, oo, SUBSEP)
          if (o == k || oo[1] != net || runs[o] == 0) continue
          if (tm[o] <= tm[k] && pm[o] <= pm[k] && (tm[o] < tm[k] || pm[o] < pm[k])) {
            front = "no"; dom = dom (dom == "" ? "" : " ") oo[2]
          }
        }
      }
      st = runs[k] > 0 ? "ok" : ""
      if (failed[k] > 0) st = st (st == "" ? "" : " ") bad[k]
      bt = runs[b] > 0 ? tm[b] : ""; btl = runs[b] > 0 ? tl[b] : ""; bp = runs[b] > 0 ? pm[b] : ""
      print net, s, runs[k] + 0, failed[k] + 0, st, tm[k], tl[k], pm[k], pl[k], \
            (runs[k] > 0 ? ratio(tm[k], bt) : ""), (runs[k] > 0 ? ratio(tl[k], btl) : ""), \
            (runs[k] > 0 ? ratio(pm[k], bp) : ""), res[k], err[k], (runs[k] > 0 ? ((k in overtol) ? "false" : "true") : ""), fb[k], every[k], slots[k], front, dom, wk[k]
    }
  }' "$csv" >"$summary"

# ---- markdown ----------------------------------------------------------------------------
{
  echo "# Pareto report: time per step against peak memory"
  echo
  if [ -s "$meta" ]; then sed 's/^/    /' "$meta"; echo; fi
  cat <<'EOF'
Time: seconds per gradient step and SGD update (each run's median over its
steps; the table's median is over the repeats, min is the fastest step of any
repeat). Peak: peak RSS above the run's baseline (parameters, optimizer state
and batch resident), median over the repeats. "× backprop": against backprop
on the same network (median against median, min against min). Bytes kept: the
schedule's accounted residuals between the passes. Working set: the
engine-accounted peak of a step (Stats::working_bytes: buffers, residuals,
anchors, casts, product scratch; – where a schedule does not account it).
Error estimate: the largest
of any step. A schedule is on the front when no other schedule of the same
network is at most as slow and at most as large (median time and median
peak), one of them strictly.
EOF
  awk -F, '
    function mib(b) { return b == "" ? "" : sprintf("%.1f MiB", b / 1048576) }
    function kept(b) { return b == "" ? "" : b + 0 >= 1048576 ? sprintf("%.1f MiB", b / 1048576) : b + 0 >= 1024 ? sprintf("%.1f KiB", b / 1024) : b " B" }
    function x(r) { return r == "" ? "–" : sprintf("%.2f", r) }
    NR == 1 { next }
    $1 != net {
      net = $1
      printf "\n## %s\n\n", net
      print "| schedule | time × backprop (median, min) | peak × backprop | seconds per step (median) | peak above baseline (median) | bytes kept | working set (engine) | error estimate | on the front? |"
      print "|---|---|---|---|---|---|---|---|---|"
    }
    {
      label = $2
      if ($2 == "checkpoint" && $17 != "") label = label " (every " $17 ")"
      if ($3 == 0) { printf "| %s | failed (%s) | | | | | | | |\n", label, $5; next }
      note = $4 > 0 ? sprintf(" (%d of %d runs failed: %s)", $4, $3 + $4, $5) : ""
      tol = $15 == "true" ? "" : " (over tolerance)"
      d = $20; gsub(/ /, ", ", d)
      fr = $19 == "yes" ? "**yes**" : "dominated by " d
      w = ($21 == "" || $21 + 0 == 0) ? "–" : kept($21)
      printf "| %s%s | %s, %s | %s | %.4g s | %s | %s | %s | %s%s | %s |\n", label, note, x($10), x($11), x($12), $6, mib($8), kept($13), w, $14, tol, fr
    }' "$summary"
  # The planner against the fixed schedules (issue 21's target): per planned
  # run, the fastest schedule that is not planned whose median peak is at
  # most the planned run's, and the ratio of their median times.
  awk -F, '
    function mib(b) { return sprintf("%.1f MiB", b / 1048576) }
    NR == 1 { next }
    $3 == 0 { next }
    { n[$1]++; net[$1, n[$1]] = $2; tm[$1, n[$1]] = $6; pk[$1, n[$1]] = $8; tx[$1, n[$1]] = $10; fb[$1, n[$1]] = $16
      if (!($1 in seen)) { seen[$1] = 1; order[++nn] = $1 } }
    END {
      any = 0
      for (i = 1; i <= nn; ++i) { w = order[i]; for (j = 1; j <= n[w]; ++j) if (net[w, j] ~ /^planned/) any = 1 }
      if (!any) exit
      print "\n## The planner against the fastest fixed schedule that fits\n"
      print "Per planned run: the fastest schedule that is not planned whose median peak is at most the"
      print "planned run'"'"'s (\"none\": every fixed schedule peaks higher), and planned'"'"'s median time over its.\n"
      print "| network | planned at | time × backprop | peak | fallbacks | fastest fixed that fits (time × backprop, peak) | ratio |"
      print "|---|---|---|---|---|---|---|"
      for (i = 1; i <= nn; ++i) {
        w = order[i]
        for (j = 1; j <= n[w]; ++j) {
          if (net[w, j] !~ /^planned/) continue
          best = 0
          for (k = 1; k <= n[w]; ++k)
            if (net[w, k] !~ /^planned/ && pk[w, k] + 0 <= pk[w, j] + 0 && (best == 0 || tm[w, k] + 0 < tm[w, best] + 0)) best = k
          fit = best ? sprintf("%s %.2f (%s)", net[w, best], tx[w, best], mib(pk[w, best])) : "none"
          r = best ? sprintf("%.2f", tm[w, j] / tm[w, best]) : "–"
          printf "| %s | %s | %.2f | %s | %s | %s | %s |\n", w, substr(net[w, j], index(net[w, j], ":") + 1) (net[w, j] ~ /^planned-exact/ ? " (no inversion)" : ""), tx[w, j], mib(pk[w, j]), fb[w, j], fit, r
        }
      }
    }' "$summary"
} >"$md"

# ---- plots --------------------------------------------------------------------------------
if ! command -v gnuplot >/dev/null; then
  echo "$0: warning: gnuplot not found: no PNGs (apt-get install gnuplot-nox); CSV and table written" >&2
else
  awk -F, 'NR > 1 && !seen[$1]++ {print $1}' "$summary" | while read -r net; do
    if awk -F, -v n="$net" 'NR > 1 && $1 == n && $3 > 0 {found = 1} END {exit !found}' "$summary"; then
      batch=$(sed -n "s/^batch $net: //p" "$meta" 2>/dev/null)
      gnuplot -e "csv='$summary'; net='$net'; out='$out/pareto-$net.png'; batch='${batch:-?}'" \
        "$here/plot_pareto.gp" || echo "$0: warning: gnuplot failed for $net" >&2
    else
      echo "$0: warning: $net: no successful run to plot" >&2
    fi
  done
fi
ls "$out"/pareto*
