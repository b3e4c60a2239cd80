// libFuzzer harness: the checkpoint loader (moonwalk/io/checkpoint.hpp) on the
// input as a file, twice: as it is, and with its crc32 line recomputed over the
// rest of the file (format version 2), so that mutations get past the CRC to
// the checks behind it. A checkpoint that loads must survive a round trip
// (serialize() of what was loaded, loaded again, gives the same metadata,
// parameters and optimizer state, bit for bit), and its optimizer state is
// restored into SGD and Adam for a small network (io::load_optimizer_state),
// followed by one step when that succeeds.
//
// Expected: a CheckpointError (a moonwalk::Error). A finding: a crash, a
// sanitizer report, any other exception (std::bad_alloc included: the sizes a
// header claims must be checked against the file before allocating), an
// allocation over -malloc_limit_mb, a hang, or a broken round trip.
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <moonwalk/io/checkpoint.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/optim/optimizers.hpp>
#include <string>

#include "fuzz_support.hpp"

namespace {

bool same_bits(const moonwalk::Vector<double>& a, const moonwalk::Vector<double>& b) {
  return a.size() == b.size() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(double)) == 0);
}

/// `bytes` with the value of its first "crc32 " line replaced by the CRC-32
/// of every other byte of the file (what format version 2 checks); "" when
/// there is no such line.
std::string with_fixed_crc(const std::string& bytes) {
  std::size_t at = bytes.rfind("\ncrc32 ", bytes.find("\nend\n"));
  if (at == std::string::npos) return "";
  const std::size_t begin = at + 1, end = bytes.find('\n', begin);
  if (end == std::string::npos) return "";
  uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(begin));
  crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + end + 1),
              static_cast<uInt>(bytes.size() - end - 1));
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08lx", crc);
  return bytes.substr(0, begin) + "crc32 " + hex + bytes.substr(end);
}

/// Loads `bytes` (as a file); when it loads, checks the round trip and restores the optimizer state.
void check(const moonwalk::fuzz::ScratchFile& file, const moonwalk::fuzz::ScratchFile& again,
           const std::string& bytes) {
  using namespace moonwalk;
  const std::string& path = file.write(bytes);
  io::Checkpoint c;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint", [&] { c = io::load_checkpoint(path); })) return;

  // Loaded: what it holds is a checkpoint save_checkpoint can write and read back.
  std::string out;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint", [&] { out = io::serialize(c); }))
    fuzz::finding("fuzz_checkpoint", "a loaded checkpoint cannot be serialized");
  io::Checkpoint back;
  if (!fuzz::expect_documented_errors("fuzz_checkpoint",
                                      [&] { back = io::load_checkpoint(again.write(out)); }))
    fuzz::finding("fuzz_checkpoint", "a serialized checkpoint does not load");
  if (back.meta != c.meta) fuzz::finding("fuzz_checkpoint", "round trip changed the metadata");
  if (!same_bits(back.parameters, c.parameters))
    fuzz::finding("fuzz_checkpoint", "round trip changed parameters");
  if (!same_bits(back.optimizer_state, c.optimizer_state))
    fuzz::finding("fuzz_checkpoint", "round trip changed the optimizer state");

  // Resuming: the optimizer state restored into a 2 -> 1 Linear (3 parameters), then one step.
  Network<float> net;
  net.add(Linear<float>(2, 1, {.seed = 1}));
  Sgd<float> sgd{.lr = 0.1, .momentum = 0.9};
  if (fuzz::expect_documented_errors("fuzz_checkpoint",
                                     [&] { io::load_optimizer_state(path, sgd, net, c.optimizer_state); }))
    fuzz::expect_documented_errors("fuzz_checkpoint", [&] { sgd.step(net); });
  Adam<float> adam;
  if (fuzz::expect_documented_errors("fuzz_checkpoint",
                                     [&] { io::load_optimizer_state(path, adam, net, c.optimizer_state); }))
    fuzz::expect_documented_errors("fuzz_checkpoint", [&] { adam.step(net); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const moonwalk::fuzz::ScratchFile file("checkpoint");
  static const moonwalk::fuzz::ScratchFile again("checkpoint_again");
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  check(file, again, bytes);
  if (const std::string fixed = with_fixed_crc(bytes); !fixed.empty() && fixed != bytes)
    check(file, again, fixed);
  return 0;
}
