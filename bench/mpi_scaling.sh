#!/usr/bin/env bash
# bench/mpi_scaling.sh BUILD OUT — data-parallel training over MPI on this
# machine (N = 1 and 2 ranks, one thread each, the same batch per rank: weak
# scaling, as data parallelism is used), and a model of 8–64 ranks on 10 and
# 100 Gb/s networks (BENCHMARKS.md "Data parallelism"). BUILD must hold bin/moonwalk-train and bin/moonwalk-mpi-allreduce
# built with MOONWALK_MPI.
#
#   bench/mpi_scaling.sh build-mpi bench/results/mpi     # REPEATS (2), NETWORKS (fashion mlp64)
#
# Writes OUT/runs.csv (one row per run), OUT/allreduce.txt (loopback latency
# and bandwidth) and OUT/scaling.md (the measured table and the model's).
#
# The model, per step of a rank with batch b (b fixed as N grows):
#   t_1      a step of one process on b samples (measured)
#   t_2      a step at N = 2 on 2b samples (measured: the step, the reduction's
#            packing and waiting, the optimizer; E = t_1 / t_2 is the measured efficiency)
#   x_2      of which spent in finish() (exposed communication and waiting for the other rank)
#   W        the step's computation after the first bucket started (communication_window_seconds / steps)
#   C(N)     Σ over buckets of a ring all-reduce of m bytes, 2(N−1)·α + 2(N−1)/N · m/β
#   x(N)     max(C − W, the last bucket's all-reduce)   (what overlap cannot hide)
#   efficiency(N) = t_1 / (t_2 − x_2 + x(N))           (no overlap: x(N) = C)
# with α, β of the network: 10 Gb/s Ethernet (TCP) α = 25 µs, β = 1.25 GB/s;
# 100 Gb/s (RDMA) α = 3 µs, β = 12.5 GB/s.
set -euo pipefail
build=$1 out=$2
repeats=${REPEATS:-2}
networks=${NETWORKS:-"fashion mlp64"}
train=$build/bin/moonwalk-train
mpirun_=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && mpirun_+=(--allow-run-as-root)
mkdir -p "$out"

"${mpirun_[@]}" -n 2 "$build/bin/moonwalk-mpi-allreduce" --repeats 20 | tee "$out/allreduce.txt"

deep="in:784"
for _ in $(seq 64); do deep="$deep,linear:256,leaky_relu:0.1"; done
deep="$deep,linear:10"
# Per rank: the batch and the steps of one epoch.
args_for() {
  local n=$2
  case $1 in
  fashion) echo "--model mlp --batch $((128 * n)) --train-limit $((128 * 50 * n)) --test-limit 1000" ;;
  mlp64) echo "--net $deep --batch $((512 * n)) --train-limit $((512 * 6 * n)) --test-limit 1000" ;;
  esac
}
json() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<< "$1"; }

echo "network,schedule,ranks,repeat,steps,train_seconds,step_compute_seconds,exposed_communication_seconds,communication_window_seconds,buckets,buckets_started_early,parameters,test_accuracy" > "$out/runs.csv"
for r in $(seq "$repeats"); do
  for net in $networks; do
    for schedule in backprop mixed; do
      for n in 1 2; do
        # shellcheck disable=SC2046
        line=$("${mpirun_[@]}" -n $n "$train" $(args_for $net $n) --schedule $schedule --epochs 1 --threads 1 --quiet --seed 1)
        echo "$net,$schedule,$n,$r,$(json "$line" steps),$(json "$line" train_seconds),$(json "$line" step_compute_seconds),$(json "$line" exposed_communication_seconds),$(json "$line" communication_window_seconds),$(json "$line" allreduce_buckets),$(json "$line" buckets_started_early),$(json "$line" parameters),$(json "$line" test_accuracy)" |
          tee -a "$out/runs.csv"
      done
    done
  done
done

# Minimum over repeats per (network, schedule, ranks); then the table and the model.
awk -F, '
  NR == 1 { next }
  { k = $1 "," $2 "," $3; t = $6 / $5
    if (!(k in best) || t < best[k]) { best[k] = t; exp_[k] = $8 / $5; win[k] = $9 / $5;
                                       nb[k] = $10; early[k] = $11; P[k] = $12 }
    nets[$1] = 1; scheds[$2] = 1 }
  END {
    print "| network | schedule | s/step, 1 rank | s/step, 2 ranks (2× the samples) | efficiency t_1/t_2 | buckets (started during the step) | in finish() / step | window / step |"
    print "|---|---|---|---|---|---|---|---|"
    for (n in nets) for (s in scheds) {
      k1 = n "," s ",1"; k2 = n "," s ",2"
      if (!(k1 in best) || !(k2 in best)) continue
      printf "| %s | %s | %.4f | %.4f | %.2f | %d (%.0f%%) | %.1f ms | %.1f ms |\n", n, s, best[k1], best[k2],
             best[k1] / best[k2], nb[k2], 100 * early[k2], 1000 * exp_[k2], 1000 * win[k2]
    }
    print ""
    print "Model: efficiency t_1 / t_N with the same batch per rank, with overlap (without):"
    print ""
    print "| network | schedule | fabric | N = 8 | N = 16 | N = 32 | N = 64 |"
    print "|---|---|---|---|---|---|---|"
    for (n in nets) for (s in scheds) {
      k = n "," s ",2"; k1 = n "," s ",1"
      if (!(k in best) || !(k1 in best)) continue
      m = P[k] * 4 / nb[k]; base = best[k] - exp_[k]
      for (fab = 1; fab <= 2; ++fab) {
        alpha = fab == 1 ? 25e-6 : 3e-6; beta = fab == 1 ? 1.25e9 : 12.5e9
        row = sprintf("| %s | %s | %s |", n, s, fab == 1 ? "10 Gb/s" : "100 Gb/s")
        for (N = 8; N <= 64; N *= 2) {
          t1 = 2 * (N - 1) * alpha + 2 * (N - 1) / N * m / beta
          C = nb[k] * t1
          x = C - win[k]; if (x < t1) x = t1
          row = row sprintf(" %.2f (%.2f) |", best[k1] / (base + x), best[k1] / (base + C))
        }
        print row
      }
    }
  }' "$out/runs.csv" | tee "$out/scaling.md"
