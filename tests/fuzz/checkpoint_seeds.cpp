// Writes seed checkpoints for moonwalk_fuzz_checkpoint in the format this
// build writes (io::serialize) into DIR: small checkpoints with and without
// metadata, parameters and optimizer state, and with non-finite numbers
// where this build writes them. Usage: moonwalk_fuzz_checkpoint_seeds DIR
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moonwalk/io/checkpoint.hpp>
#include <string>

int main(int argc, char** argv) {
  namespace io = moonwalk::io;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  // A checkpoint this build refuses to write (e.g. non-finite numbers) is no seed: skipped.
  auto write = [&](const std::string& name, const io::Checkpoint& c) {
    try {
      const std::string bytes = io::serialize(c);
      std::ofstream(dir / ("serialized-" + name), std::ios::binary) << bytes;
    } catch (const moonwalk::Error& e) {
      std::printf("seed %s not written: %s\n", name.c_str(), e.what());
    }
  };
  io::Checkpoint c;
  write("empty", c);
  c.parameters = moonwalk::Vector<double>::LinSpaced(4, -1.0, 1.0);
  write("params", c);
  c.optimizer_state = moonwalk::Vector<double>::LinSpaced(9, 0.0, 2.0);
  c.meta = {{"model", "mlp"}, {"spec", "in:2,linear:2"}, {"epoch", "3"}, {"optimizer", "adam"}};
  write("adam", c);
  c.meta["step"] = "12";
  c.parameters[1] = std::numeric_limits<double>::quiet_NaN();
  c.optimizer_state[2] = -std::numeric_limits<double>::infinity();
  write("nonfinite", c);
  c.parameters.resize(0);
  write("state-only", c);
  return 0;
}
