// libFuzzer harness: the spec parser (moonwalk/nets/spec.hpp). The input is
// a spec string; parse_network<float> builds it with a memory limit of 8 MiB
// (SpecOptions::max_memory_bytes: a bigger network is a SpecError saying how
// much it needs, before anything is allocated; with the default limit, the
// machine's memory, a valid network could take minutes to initialise and the
// fuzzer would report it as a hang). When it parses and is
// small (at most 2^20 parameters, every layer at most 2^16 features wide) the
// network runs one forward pass, layer by layer, on a batch of three columns:
// Gaussian, zeros, and one holding NaN, ±Inf and ±FLT_MAX (a forward pass
// must carry non-finite numbers through, not crash or hit UB on them). Each
// layer's output must have the layer's width and the batch's columns.
//
// Expected: a SpecError (or another moonwalk::Error). A finding: a crash, a
// sanitizer report (signed overflow in C·H·W, float-to-int casts out of
// range, ...), any other exception (std::bad_alloc included: a network too
// big for memory is a SpecError saying so), an allocation over
// -malloc_limit_mb, a hang, or a layer whose output has the wrong shape.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/spec.hpp>
#include <string>

#include "fuzz_support.hpp"

namespace {

constexpr moonwalk::Index max_params = moonwalk::Index{1} << 20;
constexpr moonwalk::Index max_width = moonwalk::Index{1} << 16;
constexpr auto forward_budget = std::chrono::milliseconds(1000);
constexpr std::uint64_t memory_limit = std::uint64_t{8} << 20;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace moonwalk;
  const std::string spec(reinterpret_cast<const char*>(data), size);
  Network<float> net;
  if (!fuzz::expect_documented_errors(
          "fuzz_spec", [&] { net = parse_network<float>(spec, 1, {.max_memory_bytes = memory_limit}); }))
    return 0;
  if (net.empty()) fuzz::finding("fuzz_spec", "a spec parsed into an empty network");

  Index params = 0;
  for (std::size_t i = 0; i < net.size(); ++i) {
    const auto& l = net[i];
    if (l.in_features() <= 0 || l.out_features() <= 0 || l.num_params() < 0)
      fuzz::finding("fuzz_spec", "a layer with a non-positive width or negative parameter count");
    if (i > 0 && net[i - 1].out_features() != l.in_features())
      fuzz::finding("fuzz_spec", "layer widths do not chain");
    if (l.in_features() > max_width || l.out_features() > max_width) return 0;
    params += l.num_params();
    if (params > max_params) return 0;
  }

  const Index batch = 3;
  Matrix<float> x = gaussian<float>(net.in_features(), batch, 5);
  x.col(1).setZero();
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max()};
  for (Index r = 0; r < x.rows(); ++r) x(r, 2) = specials[r % 5];

  const auto start = std::chrono::steady_clock::now();
  fuzz::expect_documented_errors("fuzz_spec", [&] {
    for (std::size_t i = 0; i < net.size(); ++i) {
      Matrix<float> y = net[i].forward(x);
      if (y.rows() != net[i].out_features() || y.cols() != batch)
        fuzz::finding("fuzz_spec", "a layer's output has the wrong shape");
      x = std::move(y);
      if (std::chrono::steady_clock::now() - start > forward_budget) break;  // deep but valid: enough
    }
  });
  return 0;
}
