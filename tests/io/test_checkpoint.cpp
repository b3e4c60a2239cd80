// Checkpoints: round trip, atomic replacement, and every malformed file a
// CheckpointError naming the path and the problem.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moonwalk/io/checkpoint.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/optim/optimizers.hpp>
#include <new>
#include <string>
#include <vector>

#include "io/memory_limit.hpp"
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

TEST_CASE("checkpoint: layer buffers round trip between parameters and optimizer state", "[io]") {
  TempDir t;
  auto c = sample();
  c.buffers = moonwalk::Vector<double>::LinSpaced(6, 0.5, 3.0);
  c.buffers[2] = 1.0 / 7.0;
  save_checkpoint(t / "b.ckpt", c);
  const std::string bytes = read_all(t / "b.ckpt");
  CHECK(bytes.find("\nparameters 10\nbuffers 6\noptimizer_state 21\n") != std::string::npos);
  const auto d = load_checkpoint(t / "b.ckpt");
  CHECK((d.parameters.array() == c.parameters.array()).all());
  REQUIRE(d.buffers.size() == 6);
  CHECK((d.buffers.array() == c.buffers.array()).all());
  CHECK((d.optimizer_state.array() == c.optimizer_state.array()).all());
  // A flipped bit in the buffers is caught by the CRC.
  std::string flipped = bytes;
  const std::size_t at = bytes.size() - 21 * sizeof(double) - 3 * sizeof(double);
  flipped[at] = static_cast<char>(flipped[at] ^ 0x04);
  write_all(t / "c.ckpt", flipped);
  CHECK_THROWS_WITH(load_checkpoint(t / "c.ckpt"), Contains("corrupt"));
  // A non-finite buffer is refused before anything is written.
  c.buffers[4] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(save_checkpoint(t / "d.ckpt", c), Contains("non-finite layer buffer (entry 4"));
  CHECK_FALSE(std::filesystem::exists(t / "d.ckpt"));
  // 'buffers' is reserved, not metadata.
  c.buffers[4] = 0.0;
  c.meta["buffers"] = "2";
  CHECK_THROWS_WITH(save_checkpoint(t / "d.ckpt", c), Contains("'buffers' is reserved"));
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
    std::string v4 = good;
    v4.replace(v4.find("version 3"), 9, "version 4");
    fails_with(v4, "format version 4");
    // Version 1's CRC did not cover the header: refused, saying so.
    std::string v1 = good;
    v1.replace(v1.find("version 3"), 9, "version 1");
    fails_with(v1, "version 1 is no longer read");
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

namespace {

/// A version-2 checkpoint built from its parts by the format's own rule (the
/// CRC covers every byte but the crc32 line), independently of serialize():
/// for files with valid CRCs but bad contents. `crc` overrides the CRC.
std::string craft(const std::string& meta_lines, const std::string& params, const std::string& state,
                  const std::string& payload, const std::string& crc = "") {
  const std::string head = "moonwalk-checkpoint\nversion 2\n" + meta_lines + "parameters " + params +
                           "\noptimizer_state " + state + "\n";
  const std::string tail = "end\n" + payload;
  std::uint32_t c = moonwalk::io::detail::crc32(head);
  c = moonwalk::io::detail::crc32(tail, c);
  return head + "crc32 " + (crc.empty() ? moonwalk::io::detail::hex8(c) : crc) + "\n" + tail;
}

std::string doubles(std::initializer_list<double> v) {
  std::string s(v.size() * sizeof(double), '\0');
  std::size_t i = 0;
  for (double x : v) std::memcpy(s.data() + sizeof(double) * i++, &x, sizeof(double));
  return s;
}

/// What load_checkpoint(path) throws: 0 a CheckpointError whose message holds
/// `path` and `what`, 1 std::bad_alloc, 2 anything else, 3 nothing.
int load_status(const std::string& path, const std::string& what) {
  try {
    (void)load_checkpoint(path);
  } catch (const CheckpointError& e) {
    const std::string m = e.what();
    return m.find(path) != std::string::npos && m.find(what) != std::string::npos ? 0 : 2;
  } catch (const std::bad_alloc&) {
    return 1;
  } catch (...) {
    return 2;
  }
  return 3;
}

}  // namespace

TEST_CASE("checkpoint: the CRC covers the header, so a flipped bit anywhere in it is refused", "[io]") {
  TempDir t;
  const std::string good_path = t / "good.ckpt";
  save_checkpoint(good_path, sample());
  const std::string good = read_all(good_path);
  const std::string p = t / "bad.ckpt";
  // The epoch: '3' -> '2' is one bit, and resuming would then redo an epoch.
  {
    std::string e = good;
    const std::size_t at = e.find("epoch 3") + 6;
    e[at] = static_cast<char>(e[at] ^ 0x01);
    REQUIRE(e.find("epoch 2") != std::string::npos);
    write_all(p, e);
    CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("corrupt") && Contains("crc32"));
  }
  // Every bit of every header byte (up to and including "end\n").
  const std::size_t header_end = good.find("\nend\n") + 5;
  std::size_t refused = 0, tried = 0;
  for (std::size_t i = 0; i < header_end; ++i)
    for (int b = 0; b < 8; ++b) {
      std::string f = good;
      f[i] = static_cast<char>(f[i] ^ (1 << b));
      write_all(p, f);
      ++tried;
      try {
        (void)load_checkpoint(p);
        FAIL_CHECK("flipping bit " << b << " of header byte " << i << " was accepted");
      } catch (const CheckpointError& e) {
        if (std::string(e.what()).find(p) != std::string::npos) ++refused;
      }
    }
  CHECK(refused == tried);
  CHECK(tried == 8 * header_end);
}

TEST_CASE("checkpoint: what loads can be saved again: a reserved key is no metadata", "[io]") {
  TempDir t;
  const std::string p = t / "reserved.ckpt";
  // Found by the checkpoint fuzzer: an 'end' line with a value loaded as the
  // metadata entry 'end', which save_checkpoint refuses as reserved.
  write_all(p, craft("end 7e5971d3\n", "1", "0", doubles({1.0})));
  CHECK(load_status(p, "reserved") == 0);
  write_all(p, craft("epoch 3\n", "1", "0", doubles({1.0})));
  CHECK(load_status(p, "") == 3);  // (the control: the same file without it loads)
}

TEST_CASE("checkpoint: sizes in the header are checked against the file before anything is allocated",
          "[io]") {
  TempDir t;
  const std::string p = t / "claims.ckpt";
  // 96 bytes claiming 2^31 parameters (16 GiB).
  std::string f = craft("", "2147483648", "0", "");
  f.resize(96, '\0');
  write_all(p, f);
  CHECK(read_all(p).size() == 96);
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("truncated") &&
                                            Contains("expected 17179869184 bytes") &&
                                            Contains("2147483648 parameters"));
  // The same refusal with 64 MiB of address space to spare: no 16 GiB allocation was tried.
  if (const auto status = moonwalk::test::run_with_memory_headroom(
          std::size_t{64} << 20, [&] { return load_status(p, "expected 17179869184 bytes"); }))
    CHECK(*status == 0);
  else
    WARN("memory-limited run skipped (sanitizer build)");

  // (P + K) * 8 would wrap to 0 (2^61 + 0) or 8 (2^61 − 1 + 2): the CRC of an
  // empty payload would pass. Refused as impossible sizes, no allocation.
  write_all(p, craft("", "2305843009213693952", "0", ""));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("more than any file holds"));
  write_all(p, craft("", "2305843009213693951", "2", doubles({1.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("more than any file holds"));
  // P + K would overflow a signed 64-bit sum.
  write_all(p, craft("", "9223372036854775807", "9223372036854775807", ""));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("more than any file holds"));
  // Beyond 64 bits, signs and junk: not counts.
  write_all(p, craft("", "9223372036854775808", "0", ""));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("not a count"));
  write_all(p, craft("", "+1", "0", doubles({1.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("not a count"));
  write_all(p, craft("", "1x", "0", doubles({1.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("not a count"));
  // Fewer and more bytes than claimed.
  write_all(p, craft("", "2", "1", doubles({1.0, 2.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("expected 24 bytes") && Contains("after 16"));
  write_all(p, craft("", "1", "0", doubles({1.0, 2.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("8 trailing bytes"));
  // Version 2 has no buffers: it loads with none, and a 'buffers' line in it is refused.
  write_all(p, craft("buffers 1\n", "1", "0", doubles({1.0, 2.0})));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("version 2 has no 'buffers' line"));
  // The crafted format itself is right: the same parts with the right sizes load.
  write_all(p, craft("epoch 7\n", "2", "1", doubles({1.0, 2.0, 3.0})));
  const Checkpoint c = load_checkpoint(p);
  CHECK(c.meta.at("epoch") == "7");
  REQUIRE(c.parameters.size() == 2);
  CHECK(c.parameters[1] == 2.0);
  REQUIRE(c.optimizer_state.size() == 1);
  CHECK(c.optimizer_state[0] == 3.0);
  CHECK(c.buffers.size() == 0);
}

TEST_CASE("checkpoint: empty parameters and state round trip", "[io]") {
  TempDir t;
  Checkpoint c;
  c.meta = {{"epoch", "0"}};
  save_checkpoint(t / "empty.ckpt", c);
  const Checkpoint d = load_checkpoint(t / "empty.ckpt");
  CHECK(d.parameters.size() == 0);
  CHECK(d.optimizer_state.size() == 0);
  CHECK(d.meta == c.meta);
  c.optimizer_state = moonwalk::Vector<double>::Constant(3, 0.5);
  save_checkpoint(t / "state-only.ckpt", c);
  const Checkpoint e = load_checkpoint(t / "state-only.ckpt");
  CHECK(e.parameters.size() == 0);
  CHECK(e.optimizer_state == c.optimizer_state);
}

TEST_CASE("checkpoint: non-finite values are refused at save and, with a valid CRC, at load", "[io]") {
  TempDir t;
  const std::string p = t / "a.ckpt";
  save_checkpoint(p, sample());
  const std::string before = read_all(p);
  for (double bad :
       {std::nan(""), std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()}) {
    auto c = sample();
    c.parameters[4] = bad;
    CHECK_THROWS_WITH(save_checkpoint(p, c),
                      Contains(p) && Contains("non-finite parameter") && Contains("entry 4"));
    c = sample();
    c.optimizer_state[20] = bad;
    CHECK_THROWS_WITH(save_checkpoint(p, c),
                      Contains(p) && Contains("non-finite optimizer state") && Contains("entry 20"));
    CHECK(read_all(p) == before);  // the previous checkpoint is kept

    const std::string q = t / "crafted.ckpt";
    write_all(q, craft("", "2", "1", doubles({1.0, bad, 0.0})));
    CHECK_THROWS_WITH(load_checkpoint(q), Contains(q) && Contains("parameter 1 is"));
    write_all(q, craft("", "2", "1", doubles({1.0, 2.0, bad})));
    CHECK_THROWS_WITH(load_checkpoint(q), Contains(q) && Contains("optimizer state entry 0 is"));
  }
}

TEST_CASE("checkpoint: the header is read with length limits, and only from regular files", "[io]") {
  TempDir t;
  const std::string p = t / "long.ckpt";
  // A first line of 4 MiB without a newline.
  write_all(p, "moonwalk-checkpoint\n" + std::string(std::size_t{4} << 20, 'a'));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("header line longer than"));
  write_all(p, std::string(std::size_t{4} << 20, '\0'));
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("not a Moonwalk checkpoint"));
  // Short lines, but no "end" within the header limit.
  std::string many = "moonwalk-checkpoint\nversion 2\n";
  for (int i = 0; many.size() <= moonwalk::io::checkpoint_max_header_bytes; ++i)
    many += moonwalk::detail::cat("k", i, " v\n");
  write_all(p, many);
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("header longer than"));
  // A device that never ends: refused at once, nothing read.
  if (std::filesystem::exists("/dev/zero"))
    CHECK_THROWS_WITH(load_checkpoint("/dev/zero"), Contains("/dev/zero") && Contains("not a regular file"));
  CHECK_THROWS_WITH(load_checkpoint(t.dir.string()), Contains(t.dir.string()) && Contains("directory"));
  // Repeated or misplaced header keys.
  const std::string good = read_all([&] {
    save_checkpoint(t / "good.ckpt", sample());
    return t / "good.ckpt";
  }());
  std::string twice = good;
  twice.insert(twice.find("parameters "), "epoch 4\n");
  write_all(p, twice);
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("two 'epoch' lines"));
  std::string no_version = good;
  no_version.erase(no_version.find("version 3\n"), 10);
  write_all(p, no_version);
  CHECK_THROWS_WITH(load_checkpoint(p), Contains(p) && Contains("no version"));
}

TEST_CASE("checkpoint: integer metadata is parsed with its range, naming the file", "[io]") {
  Checkpoint c;
  c.meta = {{"epoch", "12"}, {"neg", "-3"}, {"junk", "3x"}, {"huge", "99999999999999999999"}};
  CHECK(c.integer("epoch", "f.ckpt") == 12);
  CHECK(c.integer("neg", "f.ckpt", -5, 5) == -3);
  CHECK_THROWS_WITH(c.integer("neg", "f.ckpt"), Contains("f.ckpt") && Contains("'-3'"));
  CHECK_THROWS_WITH(c.integer("junk", "f.ckpt"), Contains("f.ckpt") && Contains("'3x'"));
  CHECK_THROWS_WITH(c.integer("huge", "f.ckpt"), Contains("f.ckpt") && Contains("not an integer"));
  CHECK_THROWS_WITH(c.integer("epoch", "f.ckpt", 0, 10), Contains("[0, 10]"));
  CHECK_THROWS_WITH(c.integer("absent", "f.ckpt"), Contains("f.ckpt") && Contains("'absent'"));
}

TEST_CASE("checkpoint: a save removes the stale temporaries of its own target and nothing else", "[io]") {
  namespace fs = std::filesystem;
  TempDir t;
  const std::string target = t / "run.ckpt";
  const std::vector<std::string> stale = {"run.ckpt.tmp.AbC123", "run.ckpt.tmp.zzzzzz",
                                          "run.ckpt.tmp.000000"};
  const std::vector<std::string> kept = {"run.ckpt.tmp.AbC12",     // five characters
                                         "run.ckpt.tmp.AbC1234",   // seven
                                         "run.ckpt.tmp.AbC-23",    // not mkstemp's alphabet
                                         "other.ckpt.tmp.AbC123",  // another target
                                         "xrun.ckpt.tmp.AbC123",   // a longer name ending like it
                                         "run.ckpt.tmpAAbC123",    // no dot
                                         "run.ckpt",               // written below
                                         "notes.txt"};
  for (const auto& n : stale) write_all(t / n, std::string(1000, 'x'));
  for (const auto& n : kept) write_all(t / n, "keep");
  fs::create_directory(t / "run.ckpt.tmp.Dir123");                 // a directory of that name is no temporary
  fs::create_symlink(t / "notes.txt", t / "run.ckpt.tmp.Lnk123");  // nor a symlink
  // A temporary a live writer holds locked is not stale.
  const std::string busy = t / "run.ckpt.tmp.Busy12";
  write_all(busy, "in progress");
  const int fd = ::open(busy.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);

  save_checkpoint(target, sample());
  for (const auto& n : stale) CHECK_FALSE(fs::exists(t / n));
  for (const auto& n : kept) CHECK(fs::exists(t / n));
  CHECK(fs::is_directory(t / "run.ckpt.tmp.Dir123"));
  CHECK(fs::is_symlink(t / "run.ckpt.tmp.Lnk123"));
  CHECK(read_all(t / "notes.txt") == "keep");
  CHECK(read_all(busy) == "in progress");
  ::close(fd);  // the writer is gone: now it is stale
  CHECK(moonwalk::io::remove_stale_temporaries(target) == 1);
  CHECK_FALSE(fs::exists(busy));
  CHECK(moonwalk::io::remove_stale_temporaries(target) == 0);
  CHECK(load_checkpoint(target).meta.at("epoch") == "3");
  // A target in the current directory (no parent path) works too.
  CHECK(moonwalk::io::remove_stale_temporaries("no-such-moonwalk-target.ckpt") == 0);
}

TEST_CASE("checkpoint: optimizer state is validated on restore, errors naming the file", "[io]") {
  using moonwalk::Adam;
  using moonwalk::Sgd;
  using moonwalk::io::load_optimizer_state;
  moonwalk::Network<double> net;
  net.add(moonwalk::Linear<double>(3, 2));
  const moonwalk::Index p = moonwalk::num_parameters(net);
  REQUIRE(p == 8);
  const std::string path = "run.ckpt";

  Adam<double> adam;
  moonwalk::Vector<double> s = moonwalk::Vector<double>::Constant(1 + 2 * p, 0.25);
  s[0] = 5;
  load_optimizer_state(path, adam, net, s);
  CHECK(adam.steps() == 5);
  CHECK(adam.second_moment()[3] == 0.25);
  const moonwalk::Vector<double> kept_v = adam.second_moment();

  auto refused = [&](auto& opt, const moonwalk::Vector<double>& bad, const std::string& what) {
    const std::size_t steps = opt.steps();
    CHECK_THROWS_WITH(load_optimizer_state(path, opt, net, bad), Contains(path) && Contains(what));
    CHECK_THROWS_AS(load_optimizer_state(path, opt, net, bad), CheckpointError);
    CHECK(opt.steps() == steps);  // nothing restored
  };
  {
    auto bad = s;
    bad[1 + p + 3] = -1e-3;  // a negative second moment
    refused(adam, bad, "must be >= 0");
    CHECK(adam.second_moment() == kept_v);
    bad = s;
    bad[1 + 3] = -1e-3;  // a negative first moment is fine
    load_optimizer_state(path, adam, net, bad);
    CHECK(adam.first_moment()[3] == -1e-3);
  }
  for (double t : {1e300, -1.0, 2.5, 18446744073709551616.0, std::nan("")}) {
    auto bad = s;
    bad[0] = t;
    refused(adam, bad, "step counter");
  }
  {
    auto bad = s;
    bad[0] = 18446744073709549568.0;  // the largest double below 2^64 fits size_t
    load_optimizer_state(path, adam, net, bad);
    CHECK(adam.steps() == std::size_t{18446744073709549568u});
  }
  {
    auto bad = s;
    bad[7] = std::numeric_limits<double>::infinity();
    refused(adam, bad, "not finite");
  }
  refused(adam, s.head(2 * p), "entries");  // a short state
  Sgd<double> sgd;
  refused(sgd, s, "entries");
  moonwalk::Vector<double> v = moonwalk::Vector<double>::Constant(1 + p, -2.0);
  v[0] = 3;
  load_optimizer_state(path, sgd, net, v);  // a negative velocity is fine
  CHECK(sgd.steps() == 3);
  v[2] = std::nan("");
  refused(sgd, v, "not finite");
  // A value finite in double but not in float.
  Adam<float> adam_f;
  moonwalk::Network<float> net_f;
  net_f.add(moonwalk::Linear<float>(3, 2));
  auto big = s;
  big[2] = 1e300;
  CHECK_THROWS_WITH(load_optimizer_state(path, adam_f, net_f, big), Contains(path) && Contains("overflows"));
}
