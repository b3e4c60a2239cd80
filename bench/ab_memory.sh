#!/usr/bin/env bash
# Two or more moonwalk-memory binaries (e.g. built at two commits) side by
# side on the targets' shapes: the Fashion-MNIST MLP at batch 128 (40 steps)
# and the width-256 LeakyReLU MLP at depth 64, batch 4096 (5 steps), backprop
# and mixed Moonwalk, 3 interleaved repeats; one JSON line per run, tagged
# with the binary and the configuration.
#
#   bench/ab_memory.sh OUT.jsonl BIN_A BIN_B [...]
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT.jsonl BIN..." >&2; exit 2; }
out=$1; shift
FASHION="in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10"
: > "$out"
for rep in 1 2 3; do
  for bin in "$@"; do
    for s in backprop mixed; do
      "$bin" --net $FASHION --batch 128 --schedule $s --steps 40 --threads 1 | sed "s|^{|{\"binary\":\"$bin\",\"config\":\"fashion-b128\",|" >> "$out"
      "$bin" --depth 64 --width 256 --batch 4096 --schedule $s --steps 5 --threads 1 | sed "s|^{|{\"binary\":\"$bin\",\"config\":\"d64-b4096\",|" >> "$out"
    done
  done
done
