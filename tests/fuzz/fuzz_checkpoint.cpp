// libFuzzer harness: the checkpoint loader (moonwalk/io/checkpoint.hpp) on the
// input as a file. A checkpoint that loads must survive a round trip:
// serialize() of what was loaded, loaded again, gives the same metadata,
// parameters and optimizer state, bit for bit.
//
// Expected: a CheckpointError (a moonwalk::Error). A finding: a crash, a
// sanitizer report, any other exception (std::bad_alloc included: the sizes a
// header claims must be checked against the file before allocating), an
// allocation over -malloc_limit_mb, a hang, or a broken round trip.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <moonwalk/io/checkpoint.hpp>
#include <string>

#include "fuzz_support.hpp"

namespace {

bool same_bits(const moonwalk::Vector<double>& a, const moonwalk::Vector<double>& b) {
  return a.size() == b.size() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(double)) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace moonwalk;
  static const fuzz::ScratchFile file("checkpoint");
  static const fuzz::ScratchFile again("checkpoint_again");
  const std::string& path = file.write(fuzz::as_view(data, size));
  io::Checkpoint c;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint", [&] { c = io::load_checkpoint(path); })) return 0;

  // Loaded: what it holds is a checkpoint save_checkpoint can write and read back.
  std::string bytes;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint", [&] { bytes = io::serialize(c); }))
    fuzz::finding("fuzz_checkpoint", "a loaded checkpoint cannot be serialized");
  io::Checkpoint back;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint",
                                      [&] { back = io::load_checkpoint(again.write(bytes)); }))
    fuzz::finding("fuzz_checkpoint", "a serialized checkpoint does not load");
  if (back.meta != c.meta) fuzz::finding("fuzz_checkpoint", "round trip changed the metadata");
  if (!same_bits(back.parameters, c.parameters))
    fuzz::finding("fuzz_checkpoint", "round trip changed parameters");
  if (!same_bits(back.optimizer_state, c.optimizer_state))
    fuzz::finding("fuzz_checkpoint", "round trip changed the optimizer state");
  return 0;
}
