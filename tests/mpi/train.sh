#!/usr/bin/env bash
# moonwalk-train under mpirun -n 2 against one process (tests/mpi/CMakeLists.txt).
#
#   train.sh CASE TRAINER WORKDIR MPIEXEC [MPIEXEC FLAGS...]
#
#   equivalence    the same seed and global batch give the same loss curve and
#                  test accuracy with 2 ranks as with one process (float
#                  tolerance), for backprop and mixed Moonwalk
#   deterministic  --deterministic: two runs, identical step logs
#   resume         a checkpoint written by one process resumes under 2 ranks
#                  and continues the single process's curve
#   failure        a rank with missing data, a rank with damaged data, a batch
#                  that does not divide, a rank that is killed: the job ends
#                  (never hangs) with a message naming the rank (the killed
#                  one: mpirun's message, which names it but for a race)
set -euo pipefail
case_name=$1 train=$2 work=$3 mpiexec=$4
shift 4
flags=("$@")
data=${MOONWALK_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
rm -rf "$work" && mkdir -p "$work" && cd "$work"

common=(--train-limit 1024 --test-limit 400 --batch 128 --threads 1 --quiet --seed 3)
fail() { echo "FAIL: $*" >&2; exit 1; }
two() { timeout 300 "$mpiexec" "${flags[@]}" -n 2 "$@"; }
json() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" "$1"; }

# Losses of two step logs agree to a relative tolerance, step by step (same steps).
same_curve() {
  local a=$1 b=$2 tol=$3
  [ "$(wc -l < "$a")" -eq "$(wc -l < "$b")" ] || fail "$a and $b have different numbers of steps"
  [ "$(wc -l < "$a")" -gt 2 ] || fail "$a has no steps"
  paste -d, "$a" "$b" | awk -F, -v tol="$tol" 'NR > 1 {
      d = $4 - $11; if (d < 0) d = -d; m = ($4 < 0 ? -$4 : $4);
      if (d > tol * (m > 1 ? m : 1)) { printf "step %s: loss %s vs %s\n", $1, $4, $11; bad = 1 }
      if (d > worst) worst = d }
    END { printf "largest loss difference %g over %d steps\n", worst, NR - 1; exit bad }' ||
    fail "loss curves $a and $b differ by more than $tol"
}

case "$case_name" in
equivalence)
  for schedule in backprop mixed; do
    "$train" "${common[@]}" --epochs 2 --schedule $schedule --step-log one-$schedule.csv > one-$schedule.json
    two "$train" "${common[@]}" --epochs 2 --schedule $schedule --step-log two-$schedule.csv > two-$schedule.json
    [ "$(json two-$schedule.json ranks)" = 2 ] || fail "the 2-rank run does not say ranks 2"
    [ "$(json one-$schedule.json ranks)" = 1 ] || fail "the single process does not say ranks 1"
    [ "$(json two-$schedule.json untrusted_steps)" = 0 ] || fail "$schedule: untrusted steps under 2 ranks"
    same_curve one-$schedule.csv two-$schedule.csv 1e-4
    awk -v a="$(json one-$schedule.json test_accuracy)" -v b="$(json two-$schedule.json test_accuracy)" \
      'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 0.01) }' || fail "$schedule: test accuracy differs"
  done
  ;;
deterministic)
  for run in 1 2; do
    two "$train" "${common[@]}" --epochs 1 --schedule mixed --deterministic --bucket 64K \
      --step-log det-$run.csv > det-$run.json 2> det-$run.err
  done
  cmp det-1.csv det-2.csv || fail "two deterministic runs differ"
  [ "$(json det-1.json test_loss)" = "$(json det-2.json test_loss)" ] || fail "test losses differ"
  [ "$(json det-1.json deterministic)" = true ] || fail "the JSON does not say deterministic"
  [ "$(json det-1.json allreduce_buckets)" -gt 1 ] || fail "64K buckets: expected several"
  ! grep -q "parameters differed" det-1.err || fail "ranks drifted apart in deterministic mode"
  ;;
resume)
  # (a constant learning rate: a cosine schedule depends on --epochs)
  common+=(--lr-schedule constant)
  "$train" "${common[@]}" --epochs 2 --schedule backprop --step-log straight.csv > straight.json
  "$train" "${common[@]}" --epochs 1 --schedule backprop --save ck.bin > first.json
  two "$train" "${common[@]}" --epochs 2 --schedule backprop --resume ck.bin --save ck2.bin \
    --step-log resumed.csv > resumed.json
  [ -s ck2.bin ] || fail "rank 0 wrote no checkpoint"
  # (a resumed step log continues a file: no header of its own)
  { head -1 straight.csv; grep ',2,backprop,' straight.csv; } > s.csv
  { head -1 straight.csv; cat resumed.csv; } > r.csv
  same_curve s.csv r.csv 1e-4
  ;;
failure)
  # A rank whose data is missing: the job ends, naming rank 1 and the path.
  set +e
  timeout 120 "$mpiexec" "${flags[@]}" -n 1 "$train" "${common[@]}" --epochs 1 : \
    -n 1 "$train" "${common[@]}" --epochs 1 --data "$work/missing" > /dev/null 2> missing.err
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "missing data: exit $rc (124: it hung)"
  grep -q "rank 1 of 2: error:.*$work/missing" missing.err || { cat missing.err; fail "missing data: rank 1 not named"; }

  # A rank whose copy of the data is damaged (one training label changed).
  mkdir damaged
  cp "$data"/*.gz damaged/
  gzip -dc "$data/train-labels-idx1-ubyte.gz" > labels
  printf '\x09' | dd of=labels bs=1 seek=20 conv=notrunc status=none
  gzip -c labels > damaged/train-labels-idx1-ubyte.gz
  set +e
  timeout 120 "$mpiexec" "${flags[@]}" -n 1 "$train" "${common[@]}" --epochs 1 --data "$data" : \
    -n 1 "$train" "${common[@]}" --epochs 1 --data "$work/damaged" > /dev/null 2> damaged.err
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "damaged data: exit $rc"
  grep -q "rank 1's training data differs from rank 0's (rank 1 read $work/damaged" damaged.err || { cat damaged.err; fail "damaged data: not named"; }

  # A global batch that does not divide among the ranks.
  set +e
  two "$train" "${common[@]}" --epochs 1 --batch 127 > /dev/null 2> batch.err
  rc=$?
  set -e
  [ $rc -eq 2 ] || fail "--batch 127 over 2 ranks: exit $rc, expected 2"
  grep -q "does not divide among 2 ranks" batch.err || { cat batch.err; fail "--batch 127: no message"; }

  # A rank that dies: mpirun ends the job and reports it. Open MPI names the
  # rank ("process rank 1 ... exited on signal 9") unless its abort races the
  # other rank's end: then it reports only that "1 process returned a non-zero
  # exit code" (2 of 8 runs with both cores busy, Open MPI 4.1 on Debian 12).
  set +e
  timeout 120 "$mpiexec" "${flags[@]}" -n 1 "$train" "${common[@]}" --epochs 1 : \
    -n 1 bash -c 'kill -9 $$' > /dev/null 2> killed.err
  rc=$?
  set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "killed rank: exit $rc"
  grep -qiE "process rank 1 |but 1 process returned" killed.err ||
    { cat killed.err; fail "killed rank: not reported"; }
  ;;
*)
  fail "unknown case $case_name"
  ;;
esac
echo "mpi.train.$case_name: passed"
