// libFuzzer harness: the IDX reader (moonwalk/data/idx.hpp) through its gzip
// path. The input's first byte is a control byte; the rest is an IDX file
// that the harness gzip-compresses (zlib, gzip wrapper) before read_idx reads
// it, so the fuzzer mutates the IDX structure while zlib's inflate path runs.
// When the control byte's low bit is set, its upper 7 bits say how many of the
// input's last bytes are appended raw after the gzip stream (trailing garbage)
// instead of being compressed.
//
// Expected: a DataError (a moonwalk::Error). A finding: as in fuzz_idx.
#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <moonwalk/data/idx.hpp>
#include <string>

#include "fuzz_support.hpp"

namespace {

/// `in` as one gzip member (deflate, level 1).
std::string gzip(const std::uint8_t* in, std::size_t n) {
  z_stream z{};
  if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    moonwalk::fuzz::finding("fuzz_idx_gzip", "harness: deflateInit2 failed");
  std::string out(deflateBound(&z, static_cast<uLong>(n)) + 64, '\0');
  z.next_in = const_cast<Bytef*>(in);
  z.avail_in = static_cast<uInt>(n);
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END)
    moonwalk::fuzz::finding("fuzz_idx_gzip", "harness: deflate failed");
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  static const moonwalk::fuzz::ScratchFile file("idx_gzip");
  const unsigned control = data[0];
  const std::uint8_t* idx = data + 1;
  std::size_t n = size - 1, trailing = 0;
  if (control & 1u) {
    trailing = std::min<std::size_t>(control >> 1, n);
    n -= trailing;
  }
  std::string bytes = gzip(idx, n);
  bytes.append(reinterpret_cast<const char*>(idx + n), trailing);
  const std::string& path = file.write(bytes);
  moonwalk::data::IdxArray a;
  if (!moonwalk::fuzz::expect_documented_errors("fuzz_idx_gzip", [&] { a = moonwalk::data::read_idx(path); }))
    return 0;
  std::size_t count = 1;
  for (const auto d : a.dims) count *= static_cast<std::size_t>(d);
  if (a.values.size() != count) moonwalk::fuzz::finding("fuzz_idx_gzip", "values.size() != product(dims)");
  // What was read is what was compressed: the header, then the values.
  if (trailing == 0 && n != 4 + 4 * a.dims.size() + count)
    moonwalk::fuzz::finding("fuzz_idx_gzip", "read a different number of bytes than the file holds");
  if (count > 0 && std::memcmp(a.values.data(), idx + 4 + 4 * a.dims.size(), count) != 0)
    moonwalk::fuzz::finding("fuzz_idx_gzip", "values differ from the file's data");
  return 0;
}
