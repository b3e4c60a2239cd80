#!/usr/bin/env bash
# Training figures for BENCHMARKS.md ("Training"): accuracy, seconds per epoch
# per schedule, and the equal-loss-curve plot of backprop vs mixed Moonwalk.
#
#   bench/train.sh BUILD_DIR OUT_DIR [mlp|revnet|resnet|speed]...   (default: all four)
#
#   mlp     the MLP with backprop and with mixed Moonwalk, same seed, full
#           data, $MLP_EPOCHS epochs (default 10): epoch and step logs, plots
#   revnet  the conv RevNet with each of $REVNET_SCHEDULES (default
#           "mixed backprop"), $REVNET_EPOCHS epochs (default 10), same seed
#   resnet  the conv ResNet with BatchNorm with each of $RESNET_SCHEDULES
#           (default "backprop"), $RESNET_EPOCHS epochs (default 10)
#   speed   samples/s of every schedule on a slice ($SPEED_SAMPLES training
#           samples, default 4096; pure and forward on far fewer) for both
#           models in $SPEED_MODELS (default "mlp revnet resnet"), one
#           schedule after another in one run, so the ratios
#           share the machine's state
#
# Threads: $THREADS (default 2). Everything goes to OUT_DIR (CSV, JSON lines,
# PNG/SVG via bench/plot_training.sh).
set -euo pipefail
build=${1:?usage: $0 BUILD_DIR OUT_DIR [mlp|revnet|resnet|speed]...}
out=${2:?usage: $0 BUILD_DIR OUT_DIR [mlp|revnet|resnet|speed]...}
shift 2
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(mlp revnet resnet speed)
train=$build/bin/moonwalk-train
here=$(cd "$(dirname "$0")" && pwd)
threads=${THREADS:-2}
mkdir -p "$out"

run() {  # run NAME ARGS...: JSON line to OUT/NAME.json, stderr summary to OUT/NAME.err
  local name=$1
  shift
  echo "== $name: moonwalk-train $*" >&2
  "$train" --threads "$threads" --quiet "$@" >"$out/$name.json" 2>"$out/$name.err"
  cat "$out/$name.json"
}

for part in "${parts[@]}"; do
  case $part in
    mlp)
      for s in backprop mixed; do
        run "mlp-$s" --model mlp --schedule "$s" --epochs "${MLP_EPOCHS:-10}" --seed 1 \
          --log "$out/mlp-$s.csv" --step-log "$out/mlp-$s-steps.csv"
      done
      "$here/plot_training.sh" "$out/mlp" "$out/mlp-backprop.csv" "$out/mlp-mixed.csv" \
        "$out/mlp-backprop-steps.csv" "$out/mlp-mixed-steps.csv"
      ;;
    revnet)
      for s in ${REVNET_SCHEDULES:-mixed backprop}; do
        run "revnet-$s" --model revnet --schedule "$s" --epochs "${REVNET_EPOCHS:-10}" --seed 1 \
          --log "$out/revnet-$s.csv" --step-log "$out/revnet-$s-steps.csv" --save "$out/revnet-$s.ckpt"
      done
      logs=()
      for s in backprop mixed; do [ -r "$out/revnet-$s.csv" ] && logs+=("$out/revnet-$s.csv"); done
      for s in backprop mixed; do [ -r "$out/revnet-$s-steps.csv" ] && logs+=("$out/revnet-$s-steps.csv"); done
      "$here/plot_training.sh" "$out/revnet" "${logs[@]}"
      ;;
    resnet)
      for s in ${RESNET_SCHEDULES:-backprop}; do
        run "resnet-$s" --model resnet --schedule "$s" --epochs "${RESNET_EPOCHS:-10}" --seed 1 \
          --log "$out/resnet-$s.csv" --step-log "$out/resnet-$s-steps.csv"
      done
      ;;
    speed)
      n=${SPEED_SAMPLES:-4096}
      for model in ${SPEED_MODELS:-mlp revnet resnet}; do
        for s in backprop mixed checkpoint binomial revbackprop projforward pure forward; do
          case $s in
            pure) limit=$((n / 16)) ;;
            forward) limit=128 ;;
            *) limit=$n ;;
          esac
          [ "$model" != mlp ] && [ "$s" = forward ] && continue  # 47k-167k jvp passes per step
          args=(--model "$model" --schedule "$s" --epochs 1 --train-limit "$limit" --test-limit 1000 --seed 1)
          run "speed-$model-$s" "${args[@]}" --log "$out/speed-$model-$s.csv" || echo "{\"model\":\"$model\",\"schedule\":\"$s\",\"error\":true}"
          if [ "$model" = revnet ] && [ "$s" = mixed ]; then
            run "speed-$model-mixed-rebuild" "${args[@]}" --rebuild-inputs --log "$out/speed-$model-mixed-rebuild.csv"
          fi
        done
      done
      ;;
    *) echo "$0: unknown part '$part' (mlp, revnet, resnet, speed)" >&2; exit 2 ;;
  esac
done
