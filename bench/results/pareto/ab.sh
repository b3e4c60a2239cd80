#!/bin/bash
# A/B: 030edef binary vs 7e324ef binary, backprop and mixed, 3 interleaved repeats
set -u
out=$1
old=${OLD:?moonwalk-memory built at 030edef} new=${NEW:-build-pareto/bin/moonwalk-memory}
fashion="in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10"
mlp05="in:256$(for i in $(seq 64); do printf ',linear:256,leaky_relu:0.5'; done),linear:10"
: > "$out"
for r in 1 2 3; do
  for net in fashion mlp64 mlp64-0.5; do
    case $net in
      fashion) args=(--net "$fashion" --batch 128 --steps 20) ;;
      mlp64) args=(--depth 64 --width 256 --batch 1024 --steps 4) ;;
      mlp64-0.5) args=(--net "$mlp05" --batch 1024 --steps 4) ;;
    esac
    for bin in old new; do
      for s in backprop mixed; do
        b=$old; [ $bin = new ] && b=$new
        line=$(taskset -c 1 "$b" "${args[@]}" --schedule $s --threads 1)
        echo "$r $net $bin $s $(sed -n 's/.*"seconds_per_step":\([^,]*\).*"peak_rss_bytes":\([^,]*\),"baseline_rss_bytes":\([^,]*\),.*"error_estimate":\([^,]*\).*"fallbacks":\([^,]*\).*/\1 \2 \3 \4 \5/p' <<<"$line")" >> "$out"
      done
    done
  done
done
