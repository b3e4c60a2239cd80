#!/usr/bin/env bash
# Where a gradient step's heap allocations come from: every call of glibc's
# malloc during a `moonwalk-memory` run, with its size and call stack, summed
# by the innermost moonwalk:: frame that made it.
#
#   bench/alloc_trace.sh BUILD_DIR OUT_FILE -- <moonwalk-memory arguments>
#   e.g. bench/alloc_trace.sh build bench/results/alloc/fashion-mixed.txt -- \
#          --net in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10 \
#          --batch 128 --schedule mixed --steps 6 --threads 1
#
# Needs Linux `perf` with uprobes (root, or perf_event_paranoid <= 1). valgrind
# cannot run the AVX-512 build, and heaptrack is shadowed by moonwalk-memory's
# own malloc interposition (bench/alloc_count.hpp), hence a probe on glibc's
# __libc_malloc, the function that interposition forwards to. The totals
# cover the whole run (setup included): compare runs with different --steps
# to isolate what one step adds, or read the per-step figures in the JSON
# line (`allocations_per_step`, `allocated_bytes_per_step`).
set -euo pipefail
[ $# -ge 3 ] && [ "$3" = "--" ] || {
  echo "usage: $0 BUILD_DIR OUT_FILE -- <moonwalk-memory arguments>" >&2
  exit 2
}
build=$1 out=$2
shift 3
bin="$build/bin/moonwalk-memory"
libc=$(ldd "$bin" | awk '/libc\.so/ {print $3}')
tmp=$(mktemp -d)
trap 'perf probe -q -d "probe_libc:*" 2>/dev/null || true; rm -rf "$tmp"' EXIT
perf probe -q -x "$libc" -a '__libc_malloc bytes=%di:u64'
perf record -q -o "$tmp/perf.data" -e 'probe_libc:__libc_malloc' --call-graph dwarf,16384 \
  "$bin" "$@" >"$tmp/run.json"
perf script -i "$tmp/perf.data" -F event,trace,ip,sym >"$tmp/stacks.txt" 2>/dev/null
mkdir -p "$(dirname "$out")"
python3 - "$tmp/stacks.txt" "$tmp/run.json" "$*" >"$out.tmp" <<'EOF'
import collections, json, re, sys
stacks, run, args = sys.argv[1], sys.argv[2], sys.argv[3]
by_bytes, by_count = collections.Counter(), collections.Counter()
total = calls = 0
skip = ("operator new", "aligned_malloc", "conditional_aligned", "DenseStorage", "PlainObjectBase")
for block in open(stacks).read().split("\n\n"):
    lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
    if not lines or "bytes=" not in lines[0]:
        continue
    size = int(re.search(r"bytes=(\d+)", lines[0]).group(1))
    frames = [l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "" for l in lines[1:]]
    site = next((f for f in frames if "moonwalk::" in f and not any(s in f for s in skip)),
                "(outside moonwalk::, or a stack deeper than the 16 KiB unwound)")
    site = re.sub(r"\(.*", "", site)[:150]
    by_bytes[site] += size
    by_count[site] += 1
    total += size
    calls += 1
print(f"# moonwalk-memory {args}")
print(f"# {json.load(open(run)) if open(run).read().strip() else '(no JSON line)'}")
print(f"# {calls} calls of __libc_malloc, {total} bytes, over the whole run")
print("bytes\tcalls\tinnermost moonwalk:: frame")
for site, b in by_bytes.most_common(40):
    print(f"{b}\t{by_count[site]}\t{site}")
EOF
mv "$out.tmp" "$out"
echo "wrote $out" >&2
