#!/usr/bin/env bash
# Depth sweep (issue 8 item 3): peak memory and time per step of each
# schedule against depth, in two regimes, with moonwalk-memory (one process
# per configuration, so peaks never mix).
#
#   bench/sweep.sh BUILD_DIR OUT_DIR [mlp] [revnet] [tiny]   (default: all three)
#
#   mlp     equal-width LeakyReLU(0.1) MLP, width $WIDTH (256), batch $BATCH
#           (4096: activations dominate): backprop, checkpoint, mixed, and
#           pure-forward Moonwalk where it is affordable (depth ≤ $PURE_MAX_DEPTH,
#           default 8: it needs one jvp pass per input feature, 256 here)
#   revnet  additive-coupling RevNet (tanh branches, width $WIDTH): backprop,
#           checkpoint, revbackprop, mixed, mixed with --rebuild-inputs
#   tiny    the same MLP at width $TINY_WIDTH (16), batch $TINY_BATCH (64): every
#           schedule that runs it, including pure-forward Moonwalk at every depth
#           (16 jvp passes) and naive forward mode (one jvp pass per parameter)
#           up to depth $FORWARD_MAX_DEPTH (default 32)
#
# Depths: $DEPTHS (default "4 8 16 32 64 128 256"); $SCHEDULES (default: all
# of the regime's) restricts the schedules; $STEPS steps per run
# (default 3), $THREADS threads (default 2). Schedules are interleaved: for
# each depth every schedule runs once before the next depth, in a rotated
# order, so drift in the machine's state hits them alike.
#
# Writes OUT_DIR/sweep.csv (one row per run), sweep-memory.png (peak RSS
# above baseline vs depth), sweep-time.png (seconds per step vs depth) and
# sweep-ratio.png (time relative to backprop at the same depth), per regime.
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR OUT_DIR [mlp] [revnet]}
out=${2:?usage: $0 BUILD_DIR OUT_DIR [mlp] [revnet]}
shift 2
regimes=("$@")
[ ${#regimes[@]} -gt 0 ] || regimes=(mlp revnet tiny)
mem=$build/bin/moonwalk-memory
[ -x "$mem" ] || { echo "$0: $mem not built (configure with -DMOONWALK_BUILD_BENCH=ON)" >&2; exit 1; }
width=${WIDTH:-256} batch=${BATCH:-4096} steps=${STEPS:-3} threads=${THREADS:-2}
depths=${DEPTHS:-"4 8 16 32 64 128 256"}
pure_max=${PURE_MAX_DEPTH:-8}
tiny_width=${TINY_WIDTH:-16} tiny_batch=${TINY_BATCH:-64} forward_max=${FORWARD_MAX_DEPTH:-32}
regime_width() { if [ "$1" = tiny ]; then echo "$tiny_width"; else echo "$width"; fi; }
regime_batch() { if [ "$1" = tiny ]; then echo "$tiny_batch"; else echo "$batch"; fi; }
mkdir -p "$out"
csv=$out/sweep.csv
echo "regime,depth,schedule,seconds_per_step,peak_rss_bytes,baseline_rss_bytes,residual_bytes,error_estimate,within_tolerance,fallbacks" >"$csv"

field() {  # field JSON KEY: the value of a top-level key of a one-line JSON object
  sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1" | tr -d '"'
}

revnet_spec() {  # revnet_spec DEPTH
  local s="in:$width" i
  for ((i = 0; i < $1; ++i)); do s+=",coupling:additive:$width"; done
  echo "$s,linear:10"
}

rotate=0
for regime in "${regimes[@]}"; do
  case $regime in
    mlp) schedules=(backprop checkpoint mixed pure) ;;
    revnet) schedules=(backprop checkpoint revbackprop mixed mixed-rebuild) ;;
    tiny) schedules=(backprop checkpoint mixed pure forward) ;;
    *) echo "$0: unknown regime '$regime' (mlp, revnet, tiny)" >&2; exit 2 ;;
  esac
  # SCHEDULES="a b ...": only these of the regime's schedules (e.g. to re-run some columns).
  if [ -n "${SCHEDULES:-}" ]; then
    keep=()
    for s in "${schedules[@]}"; do [[ " $SCHEDULES " == *" $s "* ]] && keep+=("$s"); done
    schedules=("${keep[@]}")
  fi
  for d in $depths; do
    n=${#schedules[@]}
    for ((k = 0; k < n; ++k)); do
      s=${schedules[$(((k + rotate) % n))]}
      [ "$s" = pure ] && [ "$regime" = mlp ] && [ "$d" -gt "$pure_max" ] && continue
      [ "$s" = forward ] && [ "$d" -gt "$forward_max" ] && continue
      args=(--batch "$(regime_batch "$regime")" --steps "$steps" --threads "$threads")
      case $regime in
        mlp) args+=(--depth "$d" --width "$width") ;;
        tiny) args+=(--depth "$d" --width "$tiny_width") ;;
        revnet) args+=(--net "$(revnet_spec "$d")") ;;
      esac
      if [ "$s" = mixed-rebuild ]; then args+=(--schedule mixed --rebuild-inputs); else args+=(--schedule "$s"); fi
      echo "== $regime depth $d $s" >&2
      if line=$("$mem" "${args[@]}"); then
        echo "$regime,$d,$s,$(field "$line" seconds_per_step),$(field "$line" peak_rss_bytes),$(field "$line" baseline_rss_bytes),$(field "$line" residual_bytes),$(field "$line" error_estimate),$(field "$line" within_tolerance),$(field "$line" fallbacks)" >>"$csv"
      else
        echo "$0: $regime depth $d $s failed" >&2
      fi
    done
    rotate=$((rotate + 1))
  done
done

command -v gnuplot >/dev/null || { echo "$0: gnuplot not found: CSV only ($csv)" >&2; exit 0; }
png_w=$((600 * ${#regimes[@]}))
png_term="png size $png_w,500"
if gnuplot -e "set terminal pngcairo" >/dev/null 2>&1; then png_term="pngcairo size $png_w,500 font ',10'"; fi
for kind in memory time ratio; do
  {
    echo "set terminal $png_term"
    echo "set output '$out/sweep-$kind.png'"
    echo "set datafile separator ','"
    echo "set grid; set logscale x 2; set xlabel 'depth'; set key top left"
    case $kind in
      memory) echo "set logscale y; set ylabel 'peak RSS above baseline (MiB)'" ;;
      time) echo "set logscale y; set ylabel 'seconds per step'" ;;
      ratio) echo "set ylabel 'time per step / backprop'" ;;
    esac
    echo "set multiplot layout 1,${#regimes[@]}"
    for regime in "${regimes[@]}"; do
      echo "set title '$regime (width $(regime_width "$regime"), batch $(regime_batch "$regime"))'"
      printf "plot "
      sep=""
      for s in $(awk -F, -v r="$regime" 'NR > 1 && $1 == r {print $3}' "$csv" | awk '!seen[$0]++'); do
        awk -F, -v r="$regime" -v s="$s" 'NR > 1 && $1 == r && $3 == s' "$csv" >"$out/.sweep-$regime-$s.dat"
        case $kind in
          memory) using='2:(($5 - $6) / 1048576)' ;;
          time) using='2:4' ;;
          ratio)
            awk -F, -v r="$regime" 'NR > 1 && $1 == r && $3 == "backprop" {print $2 "," $4}' "$csv" >"$out/.sweep-$regime-bp.dat"
            join -t, <(sort -t, -k1,1 "$out/.sweep-$regime-bp.dat") \
              <(awk -F, '{print $2 "," $4}' "$out/.sweep-$regime-$s.dat" | sort -t, -k1,1) |
              sort -t, -k1,1n >"$out/.sweep-$regime-$s.ratio"
            using='1:($3 / $2)' ;;
        esac
        data=$out/.sweep-$regime-$s.dat
        [ "$kind" = ratio ] && data=$out/.sweep-$regime-$s.ratio
        printf "%s'%s' using %s with linespoints title '%s'" "$sep" "$data" "$using" "$s"
        sep=", "
      done
      echo
    done
    echo "unset multiplot"
  } >"$out/.sweep-$kind.gp"
  gnuplot "$out/.sweep-$kind.gp"
done
rm -f "$out"/.sweep-*
ls "$out"/sweep*
