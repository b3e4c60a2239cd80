// libFuzzer harness: the IDX reader (moonwalk/data/idx.hpp) on the input as a
// file, byte for byte — raw IDX files, and gzip streams when the input starts
// with the gzip magic 1f 8b (read_idx detects gzip itself). The seed corpus
// holds both. fuzz_idx_gzip feeds the same reader gzip-compressed inputs.
//
// Expected: a DataError (a moonwalk::Error). A finding: a crash, a sanitizer
// report, any other exception (std::bad_alloc included: size claims must be
// checked before allocating), an allocation over -malloc_limit_mb, a hang, or
// a result whose values do not match its dimensions.
#include <cstddef>
#include <cstdint>
#include <moonwalk/data/idx.hpp>
#include <string>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const moonwalk::fuzz::ScratchFile file("idx");
  const std::string& path = file.write(moonwalk::fuzz::as_view(data, size));
  moonwalk::data::IdxArray a;
  if (!moonwalk::fuzz::expect_documented_errors("fuzz_idx", [&] { a = moonwalk::data::read_idx(path); }))
    return 0;
  // Read successfully: the values must be exactly the product of the dimensions.
  std::size_t n = 1;
  for (const auto d : a.dims) {
    if (d < 0) moonwalk::fuzz::finding("fuzz_idx", "negative dimension");
    n *= static_cast<std::size_t>(d);
  }
  if (a.dims.empty() || a.dims.size() > 4) moonwalk::fuzz::finding("fuzz_idx", "1 to 4 dimensions expected");
  if (a.values.size() != n) moonwalk::fuzz::finding("fuzz_idx", "values.size() != product(dims)");
  if (a.path != path) moonwalk::fuzz::finding("fuzz_idx", "path not kept");
  return 0;
}
