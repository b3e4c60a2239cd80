#!/usr/bin/env bash
# LibTorch side by side (issue 8 item 5): LibTorch autograd (moonwalk-bench-torch)
# next to our backprop and mixed Moonwalk (moonwalk-memory) on the same MLPs,
# one process per run, interleaved and rotated per repeat so drift in the
# machine's state hits all three alike (docs/design.md §6: a timing claim is a ratio).
#
#   bench/torch_compare.sh BUILD_DIR OUT_DIR
#
# Configurations: the Fashion MLP (784-256-128-100-10, LeakyReLU 0.1) at batch
# 128, and the width-256 equal-width MLP at depths 16 and 64 at batch 1024
# (and at batch 4096 too when LARGE=1; or the list in $CONFIGS, e.g.
# "fashion-b128 d64-b4096": fashion-bB or dD-bB). $REPEATS repeats (default 3), $STEPS
# steps per run (default 5), $THREADS threads (default 1). Every process runs
# under the same allocator setting (GLIBC_TUNABLES below; moonwalk-memory also
# calls mallopt with the same values); LibTorch is also run once without it on
# the depth-64 configuration, to show the allocator's effect.
#
# Writes OUT_DIR/torch.csv (one row per run), OUT_DIR/torch.md (a table per
# configuration: median seconds per step, ratio to LibTorch, peak RSS above
# baseline, BLAS used) and OUT_DIR/torch-*.jsonl (the raw JSON lines).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR OUT_DIR}
out=${2:?usage: $0 BUILD_DIR OUT_DIR}
mem=$build/bin/moonwalk-memory torch=$build/bin/moonwalk-bench-torch
for b in "$mem" "$torch"; do
  [ -x "$b" ] || { echo "$0: $b not built (-DMOONWALK_BUILD_BENCH=ON, LibTorch installed)" >&2; exit 1; }
done
repeats=${REPEATS:-3} steps=${STEPS:-5} threads=${THREADS:-1}
tunables=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=536870912
fashion=in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10
configs=(fashion-b128 d16-b1024 d64-b1024)
[ "${LARGE:-0}" = 1 ] && configs+=(d16-b4096 d64-b4096)
if [ -n "${CONFIGS:-}" ]; then read -ra configs <<<"$CONFIGS"; fi
programs=(libtorch backprop mixed)
mkdir -p "$out"
csv=$out/torch.csv jsonl=$out/torch-runs.jsonl
echo "config,repeat,program,seconds_per_step,peak_rss_bytes,baseline_rss_bytes,error_estimate" >"$csv"
: >"$jsonl"

field() {  # field JSON KEY: the value of a top-level key of a one-line JSON object
  sed -n "s/.*\"$2\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" <<<"$1" | tr -d '"'
}

run() {  # run CONFIG PROGRAM: one process, its JSON line on stdout
  local config=$1 program=$2 batch=${1#*-b} shape
  if [ "${config%%-*}" = fashion ]; then
    [ "$program" = libtorch ] && shape=(--fashion) || shape=(--net "$fashion")
  else
    local depth=${config%%-*}
    shape=(--depth "${depth#d}" --width 256)
  fi
  if [ "$program" = libtorch ]; then
    "$torch" "${shape[@]}" --batch "$batch" --steps "$steps" --threads "$threads"
  else
    "$mem" --schedule "$program" "${shape[@]}" --batch "$batch" --steps "$steps" --threads "$threads"
  fi
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, --threads $threads, load before the runs:$(cut -d' ' -f1-3 /proc/loadavg)"
export GLIBC_TUNABLES=$tunables
rotate=0
for config in "${configs[@]}"; do
  for ((r = 1; r <= repeats; ++r)); do
    n=${#programs[@]}
    for ((k = 0; k < n; ++k)); do
      program=${programs[$(((k + rotate) % n))]}
      j=$(run "$config" "$program")
      echo "$j" >>"$jsonl"
      echo "$config,$r,$program,$(field "$j" seconds_per_step),$(field "$j" peak_rss_bytes),$(field "$j" baseline_rss_bytes),$(field "$j" error_estimate)" |
        tee -a "$csv"
      [ "$program" = libtorch ] && field "$j" blas >"$out/.torch-blas"
    done
    rotate=$((rotate + 1))
  done
done

# The allocator's effect: LibTorch on $NOTUNE_CONFIG (default d64-b1024) without GLIBC_TUNABLES (glibc's
# defaults: blocks above 128 KiB are mmapped and returned at free).
notune_config=${NOTUNE_CONFIG:-d64-b1024}
notune=$(env -u GLIBC_TUNABLES bash -c "$(declare -f run); torch=$torch steps=$steps threads=$threads; run $notune_config libtorch")
echo "$notune" >"$out/torch-no-tunables.jsonl"
echo "$notune_config,1,libtorch-no-tunables,$(field "$notune" seconds_per_step),$(field "$notune" peak_rss_bytes),$(field "$notune" baseline_rss_bytes),0" |
  tee -a "$csv"

# torch.md: per configuration, medians over repeats.
awk -F, -v blas="$(cat "$out/.torch-blas")" -v threads="$threads" -v steps="$steps" -v repeats="$repeats" '
  function median(s,   a, n, i, j, t) {
    n = split(s, a, " ")
    for (i = 1; i <= n; ++i) for (j = i + 1; j <= n; ++j) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  NR > 1 {
    key = $1 SUBSEP $3
    if (!($1 in seen)) { seen[$1] = 1; cfg[++nc] = $1 }
    present[key] = 1
    t[key] = t[key] " " $4
    above[key] = above[key] " " ($5 - $6)
    peak[key] = peak[key] " " $5
  }
  END {
    print "# LibTorch side by side\n"
    printf "Median over %d interleaved repeats of the median seconds per step (%d steps: forward, backward,\n", repeats, steps
    printf "SGD update), --threads %d (machine load: torch.log). All processes under\n", threads
    print "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=536870912.\n"
    print "BLAS: LibTorch `" blas "`; Moonwalk: Eigen'"'"'s own GEMM kernels, no BLAS.\n"
    print "libtorch-no-tunables: one LibTorch run without GLIBC_TUNABLES (glibc'"'"'s defaults), after the\ninterleaved runs; a single run.\n"
    np = split("libtorch backprop mixed libtorch-no-tunables", progs, " ")
    for (i = 1; i <= nc; ++i) {
      c = cfg[i]; ref = median(t[c SUBSEP "libtorch"])
      printf "\n## %s\n\n| program | s/step | ratio to LibTorch | peak RSS − baseline (MiB) | peak RSS (MiB) |\n|---|---|---|---|---|\n", c
      for (j = 1; j <= np; ++j) {
        k = c SUBSEP progs[j]
        if (!(k in present)) continue
        s = median(t[k])
        printf "| %s | %.4f | %.2f | %.1f | %.1f |\n", progs[j], s, s / ref, median(above[k]) / 1048576, median(peak[k]) / 1048576
      }
    }
  }' "$csv" >"$out/torch.md"
rm -f "$out/.torch-blas"
cat "$out/torch.md"
