#!/usr/bin/env bash
# RevBackprop's reconstruction drift next to Moonwalk's sweep error, on the
# same additive-coupling RevNets (issue: reversible networks, item 7).
# Usage: bench/revnet_drift.sh [path/to/moonwalk-gradcheck] > table.md
# Each row: float network, batch 8, seed 0; "true" errors are against
# central finite differences in double (gradcheck's max_rel_err_vs_fd).
set -euo pipefail
gc=${1:-build/bin/moonwalk-gradcheck}
echo "| depth (blocks) | branch scale | tanh between blocks | revbackprop true err | revbackprop estimate | mixed true err | mixed estimate | mixed bytes / backprop bytes |"
echo "|---|---|---|---|---|---|---|---|"
for depth in 4 16 64; do
  for scale in 0.3 1 2; do
    for between in no yes; do
      spec="in:16"
      for ((i = 0; i < depth; i++)); do
        spec+=",coupling:additive:16:tanh:${scale}"
        [ "$between" = yes ] && spec+=",tanh"
      done
      spec+=",linear:4"
      "$gc" --net "$spec" --dtype float --batch 8 --schedules backprop,mixed,revbackprop 2>/dev/null |
        python3 -c '
import json, sys
d = json.load(sys.stdin)
r = {x["schedule"]: x for x in d["results"]}
f = lambda v: "n/a" if v is None else "%.1e" % v
print("| %s | %s | %s | %s | %s | %s | %s | %d / %d |" % (sys.argv[1], sys.argv[2], sys.argv[3],
  f(r["revbackprop"]["max_rel_err_vs_fd"]), f(r["revbackprop"]["error_estimate"]),
  f(r["mixed"]["max_rel_err_vs_fd"]), f(r["mixed"]["error_estimate"]),
  r["mixed"]["residual_bytes"], r["backprop"]["residual_bytes"]))' "$depth" "$scale" "$between" || true
    done
  done
done
