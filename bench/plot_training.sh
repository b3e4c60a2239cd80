#!/usr/bin/env bash
# Plots moonwalk-train's CSV logs with gnuplot (Debian: gnuplot-nox).
#
#   bench/plot_training.sh OUT_PREFIX LOG.csv...
#
# Each LOG is either an epoch log (--log: header starts "epoch,") or a step
# log (--step-log: header starts "step,"); the schedule named in the file is
# its legend. Writes
#   OUT_PREFIX-epochs.png  train loss, test loss and test accuracy per epoch,
#                          one curve per epoch log (schedules side by side)
#   OUT_PREFIX-steps.png   training loss per step, one curve per step log,
#                          and |loss − loss of the first step log| / loss
#                          (the "same loss curve to float tolerance" check)
# and the same as .svg.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_PREFIX LOG.csv..." >&2
  exit 2
fi
command -v gnuplot >/dev/null || { echo "$0: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
out=$1
shift
epochs=() steps=()
for f in "$@"; do
  [ -r "$f" ] || { echo "$0: cannot read $f" >&2; exit 1; }
  case "$(head -c 6 "$f")" in
    epoch,) epochs+=("$f") ;;
    step,*) steps+=("$f") ;;
    *) echo "$0: $f is neither an epoch log nor a step log of moonwalk-train" >&2; exit 1 ;;
  esac
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The schedule (column 2 of an epoch log, 3 of a step log) and, when the file
# name says more (e.g. mlp-mixed.csv), the file's stem: the legend.
label() { basename "$1" .csv; }

png_term="png size 1500,450"
if gnuplot -e "set terminal pngcairo" >/dev/null 2>&1; then png_term="pngcairo size 1500,450 font ',10'"; fi
for ext in png svg; do
  if [ $ext = png ]; then term=$png_term; else term="svg size 1500,450 dynamic font ',10'"; fi
  if [ ${#epochs[@]} -gt 0 ]; then
    {
      echo "set terminal $term"
      echo "set output '$out-epochs.$ext'"
      echo "set datafile separator ','"
      echo "set multiplot layout 1,3"
      echo "set grid; set xlabel 'epoch'; set key bottom right"
      for spec in "3:train loss:top right" "4:test loss:top right" "5:test accuracy:bottom right"; do
        col=${spec%%:*}; rest=${spec#*:}; title=${rest%%:*}; key=${rest#*:}
        echo "set title '$title'; set key $key"
        printf "plot "
        sep=""
        for f in "${epochs[@]}"; do
          printf "%s'%s' every ::1 using 1:%s with linespoints title '%s'" "$sep" "$f" "$col" "$(label "$f")"
          sep=", "
        done
        echo
      done
      echo "unset multiplot"
    } >"$tmp/epochs.gp"
    gnuplot "$tmp/epochs.gp"
  fi
  if [ ${#steps[@]} -gt 0 ]; then
    ref=${steps[0]}
    {
      echo "set terminal $term"
      echo "set output '$out-steps.$ext'"
      echo "set datafile separator ','"
      echo "set multiplot layout 1,2"
      echo "set grid; set xlabel 'step'"
      echo "set title 'training loss per step'; set key top right"
      printf "plot "
      sep=""
      for f in "${steps[@]}"; do
        printf "%s'%s' every ::1 using 1:4 with lines title '%s'" "$sep" "$f" "$(label "$f")"
        sep=", "
      done
      echo
      echo "set title 'relative difference to $(label "$ref") (equal: drawn at 1e-12)'; set key bottom right; set logscale y; set format y '10^{%L}'"
      printf "plot "
      sep=""
      i=0
      for f in "${steps[@]:1}"; do
        i=$((i + 1))
        # Join the two logs line by line: the reference's 7 columns, then this one's.
        paste -d, "$ref" "$f" >"$tmp/join$i.csv"
        printf "%s'%s' every ::1 using 1:(abs(\$11-\$4) > 0 ? abs(\$11-\$4)/abs(\$4) : 1e-12) with lines title '%s'" "$sep" "$tmp/join$i.csv" "$(label "$f")"
        sep=", "
      done
      [ $i -gt 0 ] || printf "NaN notitle"
      echo
      echo "unset multiplot"
    } >"$tmp/steps.gp"
    gnuplot "$tmp/steps.gp"
  fi
done
ls "$out"-*.png "$out"-*.svg 2>/dev/null
