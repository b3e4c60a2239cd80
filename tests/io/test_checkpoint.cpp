// Checkpoints: round trip, atomic replacement, and every malformed file a
// CheckpointError naming the path and the problem.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <moonwalk/io/checkpoint.hpp>
#include <string>

#include "support/temp_dir.hpp"

using Catch::Contains;
using moonwalk::io::Checkpoint;
using moonwalk::io::CheckpointError;
using moonwalk::io::load_checkpoint;
using moonwalk::io::save_checkpoint;
using moonwalk::test::TempDir;

namespace {

Checkpoint sample() {
  Checkpoint c;
  c.meta = {{"model", "mlp"}, {"spec", "in:4,linear:2"}, {"epoch", "3"}};
  c.parameters = moonwalk::Vector<double>::LinSpaced(10, -1.0, 1.0);
  c.parameters[3] = 1.0 / 3.0;  // not representable in decimal: the payload is binary
  c.optimizer_state = moonwalk::Vector<double>::LinSpaced(21, 0.0, 2.0);
  return c;
}

std::string read_all(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_all(const std::string& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

}  // namespace

TEST_CASE("checkpoint: round trip keeps metadata and every bit of the payload", "[io]") {
  TempDir t;
  const auto c = sample();
  save_checkpoint(t / "a.ckpt", c);
  const auto d = load_checkpoint(t / "a.ckpt");
  CHECK(d.meta == c.meta);
  REQUIRE(d.parameters.size() == c.parameters.size());
  CHECK((d.parameters.array() == c.parameters.array()).all());
  CHECK((d.optimizer_state.array() == c.optimizer_state.array()).all());
  CHECK(d.at("epoch", "x") == "3");
  CHECK_THROWS_WITH(d.at("nope", "x"), Contains("x") && Contains("'nope'"));
  // No temporary left behind.
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(t.dir)) ++files;
  CHECK(files == 1);
}

TEST_CASE("checkpoint: the CRC matches zlib's crc32 check value", "[io]") {
  const std::string s = "123456789";
  CHECK(moonwalk::io::detail::crc32(reinterpret_cast<const unsigned char*>(s.data()), s.size()) ==
        0xCBF43926u);
}

TEST_CASE("checkpoint: saving replaces the old file whole, and a failed save leaves it", "[io]") {
  TempDir t;
  auto c = sample();
  save_checkpoint(t / "a.ckpt", c);
  c.meta["epoch"] = "4";
  save_checkpoint(t / "a.ckpt", c);
  CHECK(load_checkpoint(t / "a.ckpt").meta.at("epoch") == "4");
  // A directory that does not exist: the error names the path, nothing is written.
  CHECK_THROWS_WITH(save_checkpoint(t / "missing/b.ckpt", c),
                    Contains("missing/b.ckpt") && Contains("temporary"));
  // Bad metadata is refused before anything is written.
  c.meta["bad key"] = "v";
  CHECK_THROWS_AS(save_checkpoint(t / "a.ckpt", c), CheckpointError);
  CHECK(load_checkpoint(t / "a.ckpt").meta.at("epoch") == "4");
}

TEST_CASE("checkpoint: every malformed file is a CheckpointError naming the path and the problem", "[io]") {
  TempDir t;
  const std::string good_path = t / "good.ckpt";
  save_checkpoint(good_path, sample());
  const std::string good = read_all(good_path);
  const std::string p = t / "bad.ckpt";
  auto fails_with = [&](const std::string& bytes, const std::string& what) {
    write_all(p, bytes);
    CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains(what));
  };
  CHECK_THROWS_WITH(load_checkpoint(t / "absent.ckpt"), Contains("absent.ckpt") && Contains("cannot open"));
  fails_with("", "not a Moonwalk checkpoint");
  fails_with("hello\n", "not a Moonwalk checkpoint");
  {
    std::string v2 = good;
    v2.replace(v2.find("version 1"), 9, "version 2");
    fails_with(v2, "format version 2");
  }
  fails_with(good.substr(0, good.find("crc32")), "truncated checkpoint header");
  fails_with(good.substr(0, good.size() - 5), "truncated checkpoint");
  fails_with(good + "x", "trailing bytes");
  {
    std::string flipped = good;
    flipped[flipped.size() - 9] = static_cast<char>(flipped[flipped.size() - 9] ^ 0x10);
    fails_with(flipped, "corrupt");
  }
  {
    std::string bad_count = good;
    bad_count.replace(bad_count.find("parameters 10"), 13, "parameters -1");
    fails_with(bad_count, "not a count");
  }
}
