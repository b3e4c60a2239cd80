#!/usr/bin/env bash
# Moonwalk-friendly networks (issue 20, item 3): Fashion-MNIST test accuracy of
# the MLP 784-256-128-100-10 trained with mixed Moonwalk, varying
#   (a) the LeakyReLU slope a in $SLOPES (default 0.1 0.3 0.5), and
#   (b) the Linear kind in $KINDS (default general triangular orthogonal):
#       general     in:784,linear:256,lr,linear:128,lr,linear:100,lr,linear:10
#       triangular  in:784,triangular:256,lr,triangular:128,lr,triangular:100,lr,triangular:10
#                   (same widths: triangular:OUT only needs OUT <= width)
#       orthogonal  in:784,linear:256,lr,orthogonal,lr,orthogonal,lr,linear:10
#                   (orthogonal is square, N -> N: the two interior layers become
#                   256 -> 256 rotations, so the widths are 784-256-256-256-10;
#                   the input projection and the head must change the width and
#                   stay general Linear)
#   with lr = leaky_relu:a; plus backprop on the slope-0.1 general network as
#   the accuracy reference. Seed 0, batch 128, adam, cosine lr, float,
#   --threads 1, one run at a time.
#
#   bench/friendly.sh [grid] [reference] [noise] [wide]     (default: all four)
#
#   grid       the 9 mixed runs (and the gradcheck probes, below)
#   reference  backprop on the slope-0.1 general network, seed 0
#   noise      the same backprop run with the seeds in $NOISE_SEEDS (default
#              "1 2"): how much test accuracy moves with the seed alone
#   wide       the other orthogonal spelling, every hidden layer a 784 -> 784
#              rotation and only the head general (kind orthogonal784:
#              in:784,orthogonal,lr,orthogonal,lr,orthogonal,lr,linear:10,
#              widths 784-784-784-784-10, 931k parameters, ~7x the step time of
#              the general network), for the slopes in $WIDE_SLOPES (default 0.1)
#   The table is rebuilt at the end from every run found in the output directory.
#
# Knobs (environment):
#   EPOCHS     epochs per run (default 10)
#   CPU        the one CPU every run is pinned to with taskset (default 0)
#   NICE       niceness of every run (default 10)
#   BUILD      build directory holding bin/moonwalk-train and bin/moonwalk-gradcheck
#              (default <repo>/build); both are copied to a temporary directory
#              first, so a rebuild during the grid does not change the binary
#   OUT        output directory (default <repo>/bench/results/moonwalk-friendly)
#   SLOPES, KINDS  subsets of the grid (defaults above)
#   TRAIN_LIMIT  train on the first N samples only (a smoke test; default: all 60000)
#   PROBE      1 (default): also run moonwalk-gradcheck once per network at
#              initialisation (batch 128, float, random data, backprop vs mixed)
#              for the fields the trainer's JSON does not report (the precision
#              the cotangents were carried in, anchors); 0 skips it
#
# Per run NAME (mixed-KIND-a, backprop-general-0.1[-seedS]): NAME.json (the trainer's
# JSON line), NAME.csv (--log, one row per epoch), NAME-steps.csv.gz (--step-log),
# NAME.err (stderr); gradcheck-KIND-a.json for the probe; meta.txt (commit,
# binary hashes, machine, load; one block per invocation); table.md (the summary table, from those files).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
epochs=${EPOCHS:-10}
cpu=${CPU:-0}
niceness=${NICE:-10}
build=${BUILD:-$root/build}
out=${OUT:-$here/results/moonwalk-friendly}
slopes=${SLOPES:-0.1 0.3 0.5}
kinds=${KINDS:-general triangular orthogonal}
probe=${PROBE:-1}
noise_seeds=${NOISE_SEEDS:-1 2}
wide_slopes=${WIDE_SLOPES:-0.1}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(grid reference noise wide)
mixed_run() {  # mixed_run KIND SLOPE: the gradcheck probe (when asked), then the mixed training
  local s
  s=$(spec "$1" "$2")
  if [ "$probe" = 1 ]; then
    "${pin[@]}" "$bin/moonwalk-gradcheck" --net "$s" --loss xent --batch 128 --dtype float --fd off \
      --seed 0 --schedules backprop,mixed >"$out/gradcheck-$1-$2.json" || true
  fi
  run "mixed-$1-$2" 0 --net "$s" --schedule mixed
}

for part in "${parts[@]}"; do
  case $part in
    grid | reference | noise | wide) ;;
    *) echo "$0: unknown part '$part' (grid, reference, noise, wide)" >&2; exit 2 ;;
  esac
done
limit=()
[ -z "${TRAIN_LIMIT:-}" ] || limit=(--train-limit "$TRAIN_LIMIT")
mkdir -p "$out"

# Private copies of the binaries: other people may rebuild build/ meanwhile.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
cp "$build/bin/moonwalk-train" "$build/bin/moonwalk-gradcheck" "$bin/"
pin=(taskset -c "$cpu" nice -n "$niceness")

spec() {  # spec KIND SLOPE
  local k=$1 a=$2 lr="leaky_relu:$2"
  case $k in
    general) echo "in:784,linear:256,$lr,linear:128,$lr,linear:100,$lr,linear:10" ;;
    triangular) echo "in:784,triangular:256,$lr,triangular:128,$lr,triangular:100,$lr,triangular:10" ;;
    orthogonal) echo "in:784,linear:256,$lr,orthogonal,$lr,orthogonal,$lr,linear:10" ;;
    orthogonal784) echo "in:784,orthogonal,$lr,orthogonal,$lr,orthogonal,$lr,linear:10" ;;
    *) echo "$0: unknown kind '$k' (general, triangular, orthogonal, orthogonal784)" >&2; exit 2 ;;
  esac
}

{
  echo "== bench/friendly.sh ${parts[*]}"
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD -- include examples tools 2>/dev/null || echo ' (the working tree differs from it under include/examples/tools)')"
  echo "binaries (built $(date -u -r "$build/bin/moonwalk-train" +%FT%TZ)):"
  (cd "$bin" && sha256sum moonwalk-train moonwalk-gradcheck)
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores; runs pinned to CPU $cpu, nice $niceness, --threads 1"
  echo "epochs: $epochs; slopes: $slopes; kinds: $kinds; noise seeds: $noise_seeds; wide slopes: $wide_slopes${TRAIN_LIMIT:+; train limit $TRAIN_LIMIT}"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$out/meta.txt"

run() {  # run NAME SEED ARGS...
  local name=$1 seed=$2
  shift 2
  echo "== $name: moonwalk-train --seed $seed $*" >&2
  "${pin[@]}" "$bin/moonwalk-train" --threads 1 --quiet --seed "$seed" --batch 128 --epochs "$epochs" \
    --log "$out/$name.csv" --step-log "$out/$name-steps.csv" "${limit[@]}" "$@" >"$out/$name.json" 2>"$out/$name.err"
  gzip -9f "$out/$name-steps.csv"
  cat "$out/$name.json"
}

for part in "${parts[@]}"; do
  case $part in
    grid)
      for a in $slopes; do
        for k in $kinds; do
          mixed_run "$k" "$a"
        done
      done
      ;;
    reference) run backprop-general-0.1 0 --net "$(spec general 0.1)" --schedule backprop ;;
    noise)
      for seed in $noise_seeds; do
        run "backprop-general-0.1-seed$seed" "$seed" --net "$(spec general 0.1)" --schedule backprop
      done
      ;;
    wide)
      for a in $wide_slopes; do
        mixed_run orthogonal784 "$a"
      done
      ;;
  esac
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/meta.txt"

# The table: one row per run, from its JSON line, epoch log, step log and probe.
python3 - "$out" <<'EOF'
import csv, glob, gzip, json, math, os, sys
out = sys.argv[1]
rows = []
for jf in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(jf)[:-5]
    if name.startswith("gradcheck-"):
        continue
    sched, kind, slope, *rest = name.split("-")
    seed = rest[0][4:] if rest else "0"
    with open(jf) as f:
        j = json.loads(f.readline())
    with open(os.path.join(out, name + ".csv")) as f:
        epochs = list(csv.DictReader(f))
    steps_per_epoch = math.ceil(j["train_samples"] / j["batch"])
    train_s = sum(float(e["seconds"]) for e in epochs)
    ms_per_step = 1000 * train_s / (steps_per_epoch * len(epochs))
    # Steps with a recomputation; steps whose error estimate is below 1e-10,
    # which float cotangents cannot reach (u = 6e-8): those ran in double.
    steps_with_fb = steps_double = 0
    sf = os.path.join(out, name + "-steps.csv.gz")
    if os.path.exists(sf):
        with gzip.open(sf, "rt") as f:
            for r in csv.DictReader(f):
                steps_with_fb += int(r["fallbacks"]) > 0
                steps_double += sched == "mixed" and r["error_estimate"] != "null" and float(r["error_estimate"]) < 1e-10
    probe = "-"
    gf = os.path.join(out, f"gradcheck-{kind}-{slope}.json")
    if sched == "mixed" and os.path.exists(gf):
        with open(gf) as f:
            g = json.load(f)
        m = [r for r in g["results"] if r["schedule"] == "mixed"][0]
        probe = f'{m["precision"]}, {m["anchors"]} anchors, {m["fallbacks"]} fallback(s)'
    steps = steps_per_epoch * len(epochs)
    rows.append((["general", "triangular", "orthogonal", "orthogonal784"].index(kind), float(slope), sched != "mixed", int(seed),
                 f'| {sched} | {kind} | {slope} | {seed} | {j["parameters"]} | {j["test_accuracy"]:.4f} | '
                 f'{j["train_loss"]:.4f} | {ms_per_step:.1f} | {j["peak_rss_bytes"] / 2**20:.1f} | '
                 f'{j["residual_bytes"]} / {j["backprop_residual_bytes"]} | {j["max_error_estimate"]:.2g} | '
                 f'{j["fallbacks"]} ({steps_with_fb} of {steps} steps) | '
                 f'{f"{steps_double} of {steps}" if sched == "mixed" else "-"} | '
                 f'{j["untrusted_steps"]} | {probe} |'))
rows.sort()
with open(os.path.join(out, "table.md"), "w") as f:
    f.write("| schedule | linear kind | slope | seed | params | test acc | train loss | ms/step | peak RSS MiB | "
            "kept bytes (schedule / backprop) | max err est | fallbacks (steps with one) | "
            "steps in double (estimate < 1e-10) | untrusted steps | probe at init: precision, anchors |\n")
    f.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(r[-1] + "\n")
print(open(os.path.join(out, "table.md")).read())
EOF
