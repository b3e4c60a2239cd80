// moonwalk-train, run as a separate process (its path comes from
// examples/CMakeLists.txt as MOONWALK_TRAIN_PATH): one-epoch smoke runs of
// both models on a slice of Fashion-MNIST (Debian's dataset-fashion-mnist,
// installed by the README's commands), the JSON line, backprop and mixed
// Moonwalk on the same loss curve, checkpoint save/resume, and the errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <moonwalk/data/idx.hpp>
#include <moonwalk/fidelity/tolerance.hpp>
#include <moonwalk/io/checkpoint.hpp>
#include <string>
#include <vector>

#include "support/temp_dir.hpp"
#include "support/tool_run.hpp"
#ifndef _WIN32
#include <sys/wait.h>
#endif

#ifdef MOONWALK_TRAIN_PATH

using Catch::Contains;
using moonwalk::test::Json;
using moonwalk::test::Run;
using moonwalk::test::TempDir;

namespace {

Run train(std::vector<std::string> args) {
  args.insert(args.end(), {"--threads", "1", "--quiet"});
  return moonwalk::test::run_tool(MOONWALK_TRAIN_PATH, args);
}

/// The slice every smoke run uses: small enough for CI, real data.
const std::vector<std::string> kSlice = {"--epochs", "1", "--train-limit", "512", "--test-limit", "500"};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void require_data() {
  if (!std::filesystem::exists(moonwalk::data::default_fashion_mnist_dir))
    FAIL("Fashion-MNIST not found at " << moonwalk::data::default_fashion_mnist_dir
                                       << ": apt-get install dataset-fashion-mnist (the README commands do)");
}

/// Exit 0 and the JSON fields, with sane values.
Json check_success(const Run& r) {
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  const Json j = r.json();
  for (const char* k : {"model", "schedule", "epochs", "test_accuracy", "train_loss", "seconds",
                        "peak_rss_bytes", "residual_bytes", "max_error_estimate", "fallbacks"})
    CHECK(j.has(k));
  CHECK(j["test_accuracy"].number >= 0.0);
  CHECK(j["test_accuracy"].number <= 1.0);
  CHECK(std::isfinite(j["train_loss"].number));
  CHECK(j["peak_rss_bytes"].number > 0);
  return j;
}

std::string read_all(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A raw IDX file of unsigned bytes: the header of `dims` (any values, even
/// absurd ones) and then `values`.
void write_idx(const std::string& path, const std::vector<std::uint32_t>& dims,
               const std::vector<std::uint8_t>& values) {
  std::string b = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (const std::uint32_t d : dims)
    for (int shift = 24; shift >= 0; shift -= 8) b += static_cast<char>((d >> shift) & 0xffu);
  b.append(values.begin(), values.end());
  std::ofstream(path, std::ios::binary) << b;
}

/// A Fashion-MNIST-shaped data directory in `dir`: `train` and `test` images
/// of rows x cols pixels (pseudo-random bytes) with labels 0..9 in turn.
void write_dataset(const std::string& dir, std::uint32_t train, std::uint32_t test, std::uint32_t rows = 28,
                   std::uint32_t cols = 28) {
  std::filesystem::create_directories(dir);
  std::uint32_t state = 12345;
  const auto set = [&](const std::string& stem, std::uint32_t n) {
    // No pixel data when the header's sizes are absurd (only n = 0 is written then).
    std::vector<std::uint8_t> pixels(n == 0 ? 0 : std::size_t{n} * rows * cols), labels(n);
    for (auto& p : pixels) p = static_cast<std::uint8_t>((state = state * 1103515245u + 12345u) >> 24);
    for (std::uint32_t i = 0; i < n; ++i) labels[i] = static_cast<std::uint8_t>(i % 10);
    write_idx(dir + "/" + stem + "-images-idx3-ubyte", {n, rows, cols}, pixels);
    write_idx(dir + "/" + stem + "-labels-idx1-ubyte", {n}, labels);
  };
  set("train", train);
  set("t10k", test);
}

/// The number of lines of a file.
long lines_of(const std::string& path) {
  const std::string s = read_all(path);
  return static_cast<long>(std::count(s.begin(), s.end(), '\n'));
}

}  // namespace

TEST_CASE(
    "train: one epoch of the MLP under mixed Moonwalk on a slice learns, within tolerance, in little memory",
    "[tools][train]") {
  require_data();
  const Json j =
      check_success(train(with(kSlice, {"--model", "mlp", "--schedule", "mixed", "--batch", "64"})));
  CHECK(j["model"].string == "mlp");
  CHECK(j["schedule"].string == "mixed");
  CHECK(j["epochs"].number == 1);
  CHECK(j["test_accuracy"].number > 0.4);  // 8 Adam steps: chance is 0.1
  CHECK(j["untrusted_steps"].number == 0);
  CHECK(j["max_error_estimate"].number <= 1e-4);  // the default float tolerance
  CHECK(j["residual_bytes"].number > 0);
  CHECK(j["residual_bytes"].number * 16 <= j["backprop_residual_bytes"].number);
}

TEST_CASE("train: one epoch of the conv RevNet on a slice", "[tools][train]") {
  require_data();
  const Json j = check_success(train({"--model", "revnet", "--schedule", "mixed", "--epochs", "1",
                                      "--train-limit", "128", "--test-limit", "200", "--batch", "32"}));
  CHECK(j["model"].string == "revnet");
  CHECK(j["augment"].string == "flip");  // the RevNet recipe's default
  CHECK(j["untrusted_steps"].number == 0);
  CHECK(j["test_accuracy"].number > 0.1);
}

TEST_CASE("train: backprop and mixed Moonwalk follow the same loss curve from the same seed",
          "[tools][train]") {
  require_data();
  TempDir t;
  const auto a = check_success(
      train(with(kSlice, {"--schedule", "backprop", "--epochs", "2", "--step-log", t / "bp.csv"})));
  const auto b = check_success(
      train(with(kSlice, {"--schedule", "mixed", "--epochs", "2", "--step-log", t / "mw.csv"})));
  // Per step: the losses agree to float tolerance (gradients within 1e-4 relative).
  std::ifstream fa(t / "bp.csv"), fb(t / "mw.csv");
  std::string la, lb;
  std::getline(fa, la);
  std::getline(fb, lb);
  int steps = 0;
  double worst = 0;
  while (std::getline(fa, la) && std::getline(fb, lb)) {
    auto loss_of = [](const std::string& l) {
      std::size_t p = 0;
      for (int k = 0; k < 3; ++k) p = l.find(',', p) + 1;
      return std::stod(l.substr(p));
    };
    worst = std::max(worst, std::abs(loss_of(la) - loss_of(lb)) / loss_of(la));
    ++steps;
  }
  CHECK(steps == 8);  // 2 epochs × 512/128 batches
  CHECK(worst < 1e-3);
  CHECK(std::abs(a["test_accuracy"].number - b["test_accuracy"].number) <= 0.01);
}

TEST_CASE("train: a resumed run continues exactly where the checkpoint left off", "[tools][train]") {
  require_data();
  TempDir t;
  // With random flips, whose draws must also continue where they left off.
  const auto straight =
      check_success(train(with(kSlice, {"--epochs", "2", "--schedule", "backprop", "--lr-schedule",
                                        "constant", "--augment", "flip"})));
  check_success(train(with(kSlice, {"--epochs", "1", "--schedule", "backprop", "--lr-schedule", "constant",
                                    "--augment", "flip", "--save", t / "a.ckpt", "--log", t / "log.csv"})));
  CHECK(read_all(t / "a.ckpt")
            .rfind(moonwalk::detail::cat("moonwalk-checkpoint\nversion ",
                                         moonwalk::io::Checkpoint::format_version, "\n"),
                   0) == 0);
  const auto resumed = check_success(train(
      with(kSlice, {"--epochs", "2", "--schedule", "backprop", "--lr-schedule", "constant", "--resume",
                    t / "a.ckpt", "--save", t / "a.ckpt", "--log", t / "log.csv", "--augment", "flip"})));
  CHECK(resumed["test_loss"].number == straight["test_loss"].number);
  CHECK(resumed["test_accuracy"].number == straight["test_accuracy"].number);
  // The log kept epoch 1 and added epoch 2.
  const std::string log = read_all(t / "log.csv");
  CHECK(log.rfind("epoch,schedule,train_loss,test_loss,test_accuracy,seconds", 0) == 0);
  CHECK(std::count(log.begin(), log.end(), '\n') == 3);
  CHECK(log.find("\n1,backprop,") != std::string::npos);
  CHECK(log.find("\n2,backprop,") != std::string::npos);

  // BatchNorm's running statistics travel in the checkpoint: the resumed run
  // evaluates (with them) exactly as the straight one.
  const std::vector<std::string> bn = {
      "--net",         "in:784,linear:32,batchnorm,relu,dropout:0.2,linear:10",
      "--schedule",    "backprop",
      "--lr-schedule", "constant"};
  const auto bn_straight = check_success(train(with(with(kSlice, bn), {"--epochs", "2"})));
  check_success(train(with(with(kSlice, bn), {"--epochs", "1", "--save", t / "bn.ckpt"})));
  const auto bn_resumed =
      check_success(train(with(with(kSlice, bn), {"--epochs", "2", "--resume", t / "bn.ckpt"})));
  CHECK(bn_resumed["test_loss"].number == bn_straight["test_loss"].number);
  CHECK(bn_resumed["test_accuracy"].number == bn_straight["test_accuracy"].number);

  // Another model, or a damaged file: exit 1 naming the file and the problem.
  const Run other = train(with(kSlice, {"--model", "revnet", "--resume", t / "a.ckpt"}));
  CHECK(other.exit_code == 1);
  CHECK_THAT(other.err, Contains(t / "a.ckpt") && Contains("spec"));
  const Run unflipped = train(with(kSlice, {"--epochs", "2", "--resume", t / "a.ckpt"}));
  CHECK(unflipped.exit_code == 1);
  CHECK_THAT(unflipped.err, Contains(t / "a.ckpt") && Contains("augment"));
  std::string bytes = read_all(t / "a.ckpt");
  bytes[bytes.size() - 3] = static_cast<char>(bytes[bytes.size() - 3] ^ 1);
  std::ofstream(t / "b.ckpt", std::ios::binary) << bytes;
  const Run corrupt = train(with(kSlice, {"--resume", t / "b.ckpt"}));
  CHECK(corrupt.exit_code == 1);
  CHECK_THAT(corrupt.err, Contains(t / "b.ckpt") && Contains("corrupt"));
}

TEST_CASE("train: the planned schedule within --budget prints its predicted and measured working set",
          "[tools][train][planned]") {
  require_data();
  const Json j = check_success(
      train(with(kSlice, {"--model", "mlp", "--schedule", "planned", "--budget", "1M", "--batch", "64"})));
  CHECK(j["schedule"].string == "planned");
  CHECK(j["budget_bytes"].number == 1 << 20);
  CHECK(j["predicted_working_bytes"].number > 0);
  CHECK(j["predicted_working_bytes"].number <= 1 << 20);
  CHECK(j["working_bytes"].number >= j["predicted_working_bytes"].number);  // (+ the product scratch)
  // --budget belongs to planned; a malformed one names the option.
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"--budget", "1M"}, {"--schedule", "planned", "--budget", "12Q"}}) {
    const Run r = train(args);
    INFO("stderr: " << r.err);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Contains("--budget"));
  }
}

TEST_CASE("train: bad command lines exit 2 naming the option; missing data exits 1 naming the path",
          "[tools][train]") {
  for (const auto& args : std::vector<std::vector<std::string>>{{"--schedule", "nope"},
                                                                {"--epochs", "x"},
                                                                {"--model", "cnn"},
                                                                {"--augment", "rotate"},
                                                                {"--frobnicate", "1"},
                                                                {"--net", "in:784,linear:"}}) {
    const Run r = train(args);
    INFO(args[0] << " " << args[1] << "\nstderr: " << r.err);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Contains(args[0] == "--net" ? "linear" : args[0]));
  }
  TempDir t;
  const Run r = train({"--data", t / "nowhere"});
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.err, Contains(t / "nowhere"));
  CHECK(r.out.empty());
}

// ---- hardening (issue 24): bad numbers, bad files, failed writes --------------------------

TEST_CASE("train: out-of-range --threads, --seed and --weight-decay exit 2 naming the option and the limit",
          "[tools][train]") {
  const Run threads = train({"--threads", "100000"});
  INFO("stderr: " << threads.err);
  CHECK(threads.exit_code == 2);
  CHECK_THAT(threads.err, Contains("--threads") && Contains("limit"));
  // "-1" read as unsigned would be 2^64 - 1.
  const Run seed = train({"--seed", "-1"});
  INFO("stderr: " << seed.err);
  CHECK(seed.exit_code == 2);
  CHECK_THAT(seed.err, Contains("--seed") && Contains("non-negative"));
  for (const char* wd : {"-0.1", "nan", "inf"}) {
    const Run r = train({"--weight-decay", wd});
    INFO("--weight-decay " << wd << ": " << r.err);
    CHECK(r.exit_code == 2);
    CHECK_THAT(r.err, Contains("--weight-decay"));
  }
  CHECK(train({"--lr", "inf"}).exit_code == 2);
}

TEST_CASE("train: image sizes whose rows x cols overflow, and empty sets, are refused naming the file",
          "[tools][train]") {
  TempDir t;
  // 0 images of 4294967295 x 4294967295 pixels: a valid (empty) IDX file
  // whose rows x cols overflows a signed 64-bit product.
  write_dataset(t / "huge", 0, 0, 4294967295u, 4294967295u);
  const Run huge = train({"--data", t / "huge"});
  INFO("stderr: " << huge.err);
  CHECK(huge.exit_code == 1);
  CHECK_THAT(huge.err, Contains(t / "huge/train-images-idx3-ubyte"));
  CHECK(huge.out.empty());

  write_dataset(t / "no-train", 0, 20);
  const Run no_train = train({"--data", t / "no-train"});
  INFO("stderr: " << no_train.err);
  CHECK(no_train.exit_code == 1);
  CHECK_THAT(no_train.err, Contains(t / "no-train/train-images-idx3-ubyte") && Contains("empty"));
  CHECK(no_train.out.empty());

  write_dataset(t / "no-test", 20, 0);
  const Run no_test = train({"--data", t / "no-test"});
  INFO("stderr: " << no_test.err);
  CHECK(no_test.exit_code == 1);
  CHECK_THAT(no_test.err, Contains(t / "no-test/t10k-images-idx3-ubyte") && Contains("empty"));
  CHECK(no_test.out.empty());
}

TEST_CASE("train: a batch larger than the training set trains on the whole set, one step per epoch",
          "[tools][train]") {
  TempDir t;
  write_dataset(t / "data", 24, 10);
  for (const char* batch : {"9223372036854775807", "25"}) {
    INFO("--batch " << batch);
    const Json j = check_success(train({"--data", t / "data", "--batch", batch, "--epochs", "2", "--schedule",
                                        "backprop", "--step-log", t / "steps.csv"}));
    CHECK(j["batch"].number == 24);
    CHECK(j["train_samples"].number == 24);
    CHECK(j["train_loss"].number > 0);
    CHECK(lines_of(t / "steps.csv") == 1 + 2);  // header and one step per epoch
  }
}

TEST_CASE("train: a run that diverges stops with exit 1 naming the step, even on the last step",
          "[tools][train]") {
  TempDir t;
  write_dataset(t / "data", 16, 10);
  const std::vector<std::string> one_step = {"--data",     t / "data", "--batch",    "16",
                                             "--epochs",   "1",        "--step-log", t / "steps.csv",
                                             "--schedule", "backprop"};
  // One SGD step, the only and so the last one, with an absurd learning rate:
  // the update overflows the parameters.
  const Run last = train(with(one_step, {"--optimizer", "sgd", "--lr", "1e39", "--dtype", "float"}));
  INFO("stderr: " << last.err);
  CHECK(last.exit_code == 1);
  CHECK_THAT(last.err, Contains("diverged") && Contains("epoch 1"));
  CHECK(last.out.empty());

  // A network whose forward pass overflows float: the loss is not finite at
  // the first step, which is named, and no update is made.
  const Run loss = train(with(one_step, {"--net", "in:784,coupling:additive:16:tanh:1e38,linear:10"}));
  INFO("stderr: " << loss.err);
  CHECK(loss.exit_code == 1);
  CHECK_THAT(loss.err, Contains("diverged") && Contains("epoch 1, step 1 of 1"));
  CHECK(loss.out.empty());
}

TEST_CASE("train: unwritable --save and --log paths are refused before any training", "[tools][train]") {
  TempDir t;
  write_dataset(t / "data", 16, 10);
  const std::vector<std::string> base = {"--data",   t / "data", "--batch",    "8",
                                         "--epochs", "1",        "--step-log", t / "steps.csv"};
  for (const auto& [option, path] :
       std::vector<std::pair<std::string, std::string>>{{"--save", t / "missing-dir/a.ckpt"},
                                                        {"--save", t / "data"},  // a directory
                                                        {"--log", t / "missing-dir/log.csv"}}) {
    INFO(option << " " << path);
    const Run r = train(with(base, {option, path}));
    INFO("stderr: " << r.err);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.err, Contains(option) && Contains(path));
    CHECK(r.out.empty());
    // Refused at the start: no step was trained (the step log was never opened).
    CHECK_FALSE(std::filesystem::exists(t / "steps.csv"));
  }
  // Writable: the checkpoint is written, and the probe left nothing behind.
  check_success(train(with(base, {"--save", t / "ok.ckpt"})));
  std::size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(t.dir)) files += e.is_regular_file() ? 1 : 0;
  CHECK(files == 2);  // ok.ckpt and steps.csv
}

#ifndef _WIN32
TEST_CASE("train: a step log or a result line on a full disk fails with exit 1 naming the file",
          "[tools][train]") {
  if (!std::filesystem::exists("/dev/full")) {
    WARN("skipped: /dev/full does not exist on this system");
    return;
  }
  TempDir t;
  write_dataset(t / "data", 16, 10);
  const std::vector<std::string> base = {"--data", t / "data", "--batch", "8", "--epochs", "1"};
  const Run step_log = train(with(base, {"--step-log", "/dev/full"}));
  INFO("stderr: " << step_log.err);
  CHECK(step_log.exit_code == 1);
  CHECK_THAT(step_log.err, Contains("/dev/full") && Contains("write failed"));

  // The JSON line itself to a full disk: stdout redirected to /dev/full.
  std::string cmd = moonwalk::test::quote(MOONWALK_TRAIN_PATH);
  for (const auto& a : with(base, {"--threads", "1", "--quiet"}))
    cmd.append(" ").append(moonwalk::test::quote(a));
  cmd.append(" >/dev/full 2>").append(moonwalk::test::quote(t / "err.txt"));
  const int status = std::system(cmd.c_str());
  const std::string err = read_all(t / "err.txt");
  INFO("stderr: " << err);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK_THAT(err, Contains("standard output") && Contains("write failed"));
}
#endif

TEST_CASE("train: a step whose estimate misses the tolerance is counted as untrusted", "[tools][train]") {
  // RevBackprop through six additive couplings each followed by
  // LeakyReLU(0.05): rebuilding each input divides its negative side by 0.05,
  // so float rounding grows ~20x per block and the schedule's own estimate is
  // far above the float target. Such a step is untrusted, and must be counted
  // (a NaN estimate too: it is never within tolerance).
  TempDir t;
  write_dataset(t / "data", 16, 10);
  std::string net = "in:784";
  for (int i = 0; i < 6; ++i) net += ",coupling:additive:32,leaky_relu:0.05";
  net += ",linear:10";
  const Json j = check_success(train({"--data", t / "data", "--batch", "8", "--epochs", "1", "--schedule",
                                      "revbackprop", "--net", net, "--step-log", t / "steps.csv"}));
  INFO("max_error_estimate: " << (j["max_error_estimate"].type == Json::Type::null
                                      ? std::string("null")
                                      : std::to_string(j["max_error_estimate"].number)));
  CHECK((j["max_error_estimate"].type == Json::Type::null ||
         j["max_error_estimate"].number > moonwalk::default_target<float>()));
  CHECK(j["untrusted_steps"].number == 2);  // both steps of the epoch
}

#endif  // MOONWALK_TRAIN_PATH
