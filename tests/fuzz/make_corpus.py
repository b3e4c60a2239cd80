#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora under tests/fuzz/corpus/<target>/.

Run from anywhere: python3 tests/fuzz/make_corpus.py. Small files only. The
checkpoint seeds written here follow format version 2 (the crc32 line covers
every other byte of the file); moonwalk_fuzz_checkpoint_seeds writes seeds in
whatever format the current build writes (run_fuzzers.sh adds them to its
working copy of the corpus).
"""
import gzip
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def idx(dims, values=None, type_code=0x08):
    n = 1
    for x in dims:
        n *= x
    if values is None:
        values = bytes((i * 37) & 0xFF for i in range(n))
    return bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", x) for x in dims) + values


def gz(data):
    return gzip.compress(data, compresslevel=6, mtime=0)


# ---- idx: raw and gzip files as they are on disk
idx_seeds = {
    "labels-5": idx([5], bytes([0, 1, 2, 9, 3])),
    "images-2x3x3": idx([2, 3, 3]),
    "images-1x28x28": idx([1, 28, 28]),
    "4d-1x2x2x2": idx([1, 2, 2, 2]),
    "empty-0x28x28": idx([0, 28, 28]),
    "truncated": idx([3, 4, 4])[:-7],
    "trailing": idx([2]) + b"\x00\x01",
    "type-float32": idx([2], b"\x00" * 8, 0x0D),
    "huge-dims": bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 738197507),
}
for name, data in idx_seeds.items():
    put("idx", "raw-" + name, data)
    put("idx", "gz-" + name, gz(data))
put("idx", "gz-concatenated", gz(idx([3])) + gz(b""))
put("idx", "gz-garbage-after", gz(idx([3])) + b"garbage")
put("idx", "gz-truncated", gz(idx([4, 4]))[:-6])

# ---- idx_gzip: control byte, then the IDX file the harness compresses
for name, data in idx_seeds.items():
    put("idx_gzip", name, b"\x00" + data)
put("idx_gzip", "labels-trailing-3", bytes([1 | (3 << 1)]) + idx([4]) + b"abc")

# ---- spec: spec strings
specs = {
    "mlp": "in:64,linear:32,leaky_relu:0.1,linear:16,leaky_relu:0.1,linear:10",
    "every-elementwise": "in:6,linear:5,leaky_relu,leaky_relu:0.2,relu,tanh,sigmoid,softplus,elu,elu:0.5,"
    "identity,linear:9,linear:3",
    "orthogonal-triangular": "in:8,orthogonal,triangular:5,tanh",
    "pad-coupling": "in:10,pad:24,coupling:additive:17:tanh,coupling:affine:9,leaky_relu:0.5,"
    "coupling:additive:31,linear:4",
    "coupling-scale": "in:7,coupling:affine:5:sigmoid:0.5,coupling:additive:3:relu:2",
    "revnet": "in:1x8x8,squeeze,pad_channels:8,coupling:additive_conv:8,coupling:additive_conv:8:relu:0.5,"
    "squeeze,gap,linear:10",
    "conv": "in:3x8x8,conv:4:3:1:1,relu,conv:2:3:2,avgpool,flatten,linear:3",
    "conv-valid": "in:4x6x6,conv_valid:2:3,tanh,gap",
    "spaces": " in : 4 , linear : 3 , tanh ",
    "bad-padding": "in:1x4x4,conv:1:3:1:1e300",
    "big-image": "in:4000000000x4000000000x4000000000,gap",
    "big-linear": "in:100000,linear:100000",
    "bad-token": "in:4,,linear:2",
    "no-layers": "in:4",
}
for name, s in specs.items():
    put("spec", name, s)

# ---- checkpoint: format version 2 files (the crc32 line covers every other byte)


def checkpoint(meta, params, state, crc=None, version=2, end=True):
    payload = b"".join(struct.pack("<d", x) for x in list(params) + list(state))
    h = "moonwalk-checkpoint\nversion %d\n" % version
    for k, v in meta:
        h += "%s %s\n" % (k, v)
    h += "parameters %d\noptimizer_state %d\n" % (len(params), len(state))
    tail = "end\n" if end else ""
    if crc is None:
        crc = zlib.crc32(h.encode() + tail.encode() + payload)
    return (h + "crc32 %08x\n" % crc + tail).encode() + payload


meta = [("epoch", "3"), ("model", "mlp"), ("spec", "in:2,linear:2")]
put("checkpoint", "small", checkpoint(meta, [0.5, -1.0, 1.0 / 3.0, 2.0], [0.0, 1e-8, 3.0]))
put("checkpoint", "empty", checkpoint([], [], []))
put("checkpoint", "no-state", checkpoint(meta, [1.0, 2.0], []))
put("checkpoint", "bad-crc", checkpoint(meta, [1.0, 2.0], [3.0], crc=0x12345678))
put("checkpoint", "version-1", checkpoint(meta, [1.0], [], version=1))
put("checkpoint", "sgd-state", checkpoint(meta, [1.0, 2.0, 3.0], [4.0, 0.1, 0.2, 0.3]))
put("checkpoint", "adam-state", checkpoint(meta, [1.0, 2.0, 3.0], [4.0, 0.1, 0.2, 0.3, 0.01, 0.02, 0.03]))
put("checkpoint", "no-end", checkpoint(meta, [1.0], [], end=False))
put("checkpoint", "huge-count", checkpoint([], [], []).replace(b"parameters 0", b"parameters 2147483648"))
put("checkpoint", "wrapping-count",
    checkpoint([], [], []).replace(b"parameters 0", b"parameters 2305843009213693952"))
put("checkpoint", "truncated", checkpoint(meta, [1.0, 2.0, 3.0], [4.0])[:-5])
put("checkpoint", "trailing", checkpoint(meta, [1.0], [2.0]) + b"x")
