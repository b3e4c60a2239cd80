#!/usr/bin/env bash
# The fidelity grid (issue 5, item 8): gradient error and memory of Moonwalk's
# fidelity policies against double backprop. See bench/fidelity.cpp for the
# networks, the columns and the error definition; BENCHMARKS.md "Fidelity"
# for the figures.
#
# Usage: bench/fidelity.sh BUILD_DIR [moonwalk-fidelity flags...]
#   BUILD_DIR  configured with -DMOONWALK_BUILD_BENCH=ON (needs bin/moonwalk-fidelity)
#   flags      restrict the grid, e.g. --depths 4,16 --dtypes float (default: full grid)
#
# Writes (atomically: temp file, then mv)
#   bench/results/fidelity.csv                      the rows
#   bench/results/fidelity.log                      stderr: progress, failures, tolerance misses
#   bench/results/fidelity_memory_vs_error.png      (gnuplot; .svg if FIDELITY_PLOT=svg)
# and prints markdown tables and a summary on stdout.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
build=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
bin=$build/bin/moonwalk-fidelity
[ -x "$bin" ] || { echo "fidelity.sh: $bin not found (configure with -DMOONWALK_BUILD_BENCH=ON and build moonwalk-fidelity)" >&2; exit 2; }
results=$here/results
mkdir -p "$results"
csv=$results/fidelity.csv
log=$results/fidelity.log
plot=$results/fidelity_memory_vs_error.${FIDELITY_PLOT:-png}

tmp_csv=$(mktemp "$results/.fidelity.csv.XXXXXX")
tmp_log=$(mktemp "$results/.fidelity.log.XXXXXX")
tmp_plot=$(mktemp "$results/.fidelity_plot.XXXXXX")
trap 'rm -f "$tmp_csv" "$tmp_log" "$tmp_plot" "$tmp_plot.${FIDELITY_PLOT:-png}"' EXIT

start=$(date +%s)
"$bin" "$@" >"$tmp_csv" 2> >(tee "$tmp_log" >&2)
wait  # for tee
echo "fidelity.sh: grid took $(($(date +%s) - start)) s" | tee -a "$tmp_log" >&2
chmod 644 "$tmp_csv" "$tmp_log"
mv "$tmp_csv" "$csv"
mv "$tmp_log" "$log"

if command -v gnuplot >/dev/null; then
  gnuplot -e "csv='$csv'; out='$tmp_plot.${FIDELITY_PLOT:-png}'" "$here/plot_fidelity.gp"
  chmod 644 "$tmp_plot.${FIDELITY_PLOT:-png}"
  mv "$tmp_plot.${FIDELITY_PLOT:-png}" "$plot"
  echo "fidelity.sh: wrote $plot" >&2
else
  echo "fidelity.sh: gnuplot not found, no plot" >&2
fi
echo "fidelity.sh: wrote $csv and $log" >&2

python3 - "$csv" "$log" <<'PY'
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
misses = [l.rstrip("\n") for l in open(sys.argv[2]) if l.startswith("tolerance-miss")]
fails = [l.rstrip("\n") for l in open(sys.argv[2]) if " failed on " in l]

def f(v):
    v = float(v)
    return "n/a" if not math.isfinite(v) else "%.0e" % v if v != 0 else "0"

def ratio(r):
    b, bp = int(r["residual_bytes"]), int(r["backprop_bytes"])
    return "%.2f" % (b / bp) if bp else "n/a"

key = lambda r: (r["family"], r["init"], r["act"], r["scale"], r["between"], r["dtype"])
by = {}
for r in rows:
    by.setdefault(key(r) + (int(r["depth"]),), {})[r["policy"]] = r

for dtype, tol in (("float", 1e-4), ("double", 1e-10)):
    groups = sorted({k for k in by if k[5] == dtype}, key=lambda k: (k[0] != "mlp", k[1], k[2], k[3], k[4], k[6]))
    if not groups:
        continue
    print("\n### %s networks (tolerance %g)\n" % (dtype, tol))
    print("| family | init | act | scale | between | depth | backprop err | none err | none est "
          "| tolerance err | est | bytes / bp | anchors | cotangents | fallbacks | double err | bytes / bp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in groups:
        p = by[k]
        g = lambda pol, col: p[pol][col] if pol in p else "n/a"
        cell = lambda pol: f(g(pol, "true_error")) if pol in p else "–"
        t = p.get("tolerance")
        mark = ""
        if t and not float(t["true_error"]) <= tol:
            mark = " **✗**"
        print("| %s | %s | %s | %s | %s | %d | %s | %s | %s | %s%s | %s | %s | %s | %s | %s | %s | %s |" % (
            k[0], k[1], k[2], k[3], k[4], k[6], cell("backprop"), cell("none"),
            f(g("none", "error_estimate")) if "none" in p else "–",
            cell("tolerance"), mark, f(g("tolerance", "error_estimate")) if t else "–",
            ratio(t) if t else "–", g("tolerance", "anchors"), g("tolerance", "precision"),
            g("tolerance", "fallbacks"), cell("double"), ratio(p["double"]) if "double" in p else "–"))

print("\n### RevNets: RevBackprop next to policy `tolerance`\n")
print("| dtype | scale | between | depth | backprop err | revbackprop err | revbackprop est | tolerance err | tolerance est |")
print("|---|---|---|---|---|---|---|---|---|")
for k in sorted((k for k in by if k[0] == "revnet"), key=lambda k: (k[5] != "float", k[3], k[4], k[6])):
    p = by[k]
    c = lambda pol, col: f(p[pol][col]) if pol in p else "–"
    print("| %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (k[5], k[3], k[4], k[6], c("backprop", "true_error"),
          c("revbackprop", "true_error"), c("revbackprop", "error_estimate"), c("tolerance", "true_error"),
          c("tolerance", "error_estimate")))

print("\n### Calibration\n")
print("Ratios over rows with finite, non-zero true error and estimate (count in brackets); "
      "'sweep-dominated': true error > 10x the backprop floor of the same row. "
      "time / bp: median of seconds / backprop_seconds.\n")
print("| dtype | policy | est / true (all) | est / true (sweep-dominated) | predicted / true (sweep-dominated) | time / bp | rows |")
print("|---|---|---|---|---|---|---|")
for dtype in ("float", "double"):
    for pol in ("none", "every:4", "every:16", "tolerance", "double", "revbackprop"):
        e, es, pr, tr, n = [], [], [], [], 0
        for r in rows:
            if r["dtype"] != dtype or r["policy"] != pol:
                continue
            n += 1
            te, est, pe = float(r["true_error"]), float(r["error_estimate"]), float(r["predicted_error"])
            bp = by[key(r) + (int(r["depth"]),)].get("backprop")
            floor = float(bp["true_error"]) if bp else 0.0
            sweep = math.isfinite(te) and te > 10 * floor
            if math.isfinite(te) and te > 0 and math.isfinite(est) and est > 0:
                e.append(est / te)
                if sweep:
                    es.append(est / te)
            if sweep and te > 0 and math.isfinite(pe) and pe > 0:
                pr.append(pe / te)
            s, b = float(r["seconds"]), float(r["backprop_seconds"])
            if math.isfinite(s) and b > 0:
                tr.append(s / b)
        if n == 0:
            continue
        rng = lambda v: "%.1e – %.1e (%d)" % (min(v), max(v), len(v)) if v else "–"
        med = "%.1f" % sorted(tr)[len(tr) // 2] if tr else "–"
        print("| %s | %s | %s | %s | %s | %s | %d |" % (dtype, pol, rng(e), rng(es), rng(pr), med, n))

print("\n### Policy `tolerance` rows whose true error exceeds the tolerance (worst seed)\n")
bad = [r for r in rows if r["policy"] == "tolerance" and
       not float(r["true_error"]) <= (1e-4 if r["dtype"] == "float" else 1e-10)]
if not bad:
    print("none")
for r in bad:
    bp = by[key(r) + (int(r["depth"]),)].get("backprop")
    print("- %s %s init=%s act=%s scale=%s between=%s depth=%s: true %s, estimate %s, predicted %s, "
          "cotangents %s, anchors %s, fallbacks %s, backprop floor %s" % (
              r["dtype"], r["family"], r["init"], r["act"], r["scale"], r["between"], r["depth"],
              f(r["true_error"]), f(r["error_estimate"]), f(r["predicted_error"]), r["precision"],
              r["anchors"], r["fallbacks"], f(bp["true_error"]) if bp else "n/a"))
if misses:
    print("\nPer seed (from the log):\n")
    for m in misses:
        print("    " + m)
if fails:
    print("\nFailed runs (from the log):\n")
    for m in fails:
        print("    " + m)
PY
