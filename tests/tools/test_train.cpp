// moonwalk-train, run as a separate process (its path comes from
// examples/CMakeLists.txt as MOONWALK_TRAIN_PATH): one-epoch smoke runs of
// both models on a slice of Fashion-MNIST (Debian's dataset-fashion-mnist,
// installed by the README's commands), the JSON line, backprop and mixed
// Moonwalk on the same loss curve, checkpoint save/resume, and the errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <moonwalk/data/idx.hpp>
#include <string>
#include <vector>

#include "support/temp_dir.hpp"
#include "support/tool_run.hpp"

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
  CHECK(read_all(t / "a.ckpt").rfind("moonwalk-checkpoint\nversion 1\n", 0) == 0);
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

#endif  // MOONWALK_TRAIN_PATH
