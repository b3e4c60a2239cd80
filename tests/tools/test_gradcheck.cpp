// moonwalk-gradcheck, run as a separate process (its path comes from
// tools/CMakeLists.txt as MOONWALK_GRADCHECK_PATH): exit codes, stderr naming
// the bad token or option, and its one JSON object on stdout. Also the
// error-model rule it shares with the property tests (fidelity/tolerance.hpp).
#include <catch2/catch.hpp>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <moonwalk/fidelity/tolerance.hpp>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/spec.hpp>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/tool_run.hpp"
#ifndef _WIN32
#include <sys/wait.h>
#endif

namespace {

using moonwalk::test::Json;
using moonwalk::test::JsonReader;
using moonwalk::test::Run;

#ifdef MOONWALK_GRADCHECK_PATH
/// Runs moonwalk-gradcheck with `args`, capturing stdout, stderr and the exit status.
Run gradcheck(const std::vector<std::string>& args) {
  return moonwalk::test::run_tool(MOONWALK_GRADCHECK_PATH, args);
}
#endif

const std::string kIssueNet = "in:64,linear:48,leaky_relu:0.1,linear:32,relu,linear:10";

/// Schedule name -> result object.
std::map<std::string, Json> results_by_schedule(const Json& doc) {
  std::map<std::string, Json> out;
  for (const Json& r : doc["results"].array) out[r["schedule"].string] = r;
  return out;
}

/// The structure every successful run prints (issue spec, field by field).
void check_document(const Json& doc, const std::string& net, const std::string& dtype, double batch) {
  REQUIRE(doc.type == Json::Type::object);
  CHECK(doc.keys() ==
        std::vector<std::string>{"net", "dtype", "batch", "params", "fd_error_estimate", "results"});
  CHECK(doc["net"].string == net);
  CHECK(doc["dtype"].string == dtype);
  CHECK(doc["batch"].number == batch);
  CHECK(doc["params"].number ==
        static_cast<double>(moonwalk::num_parameters(moonwalk::parse_network<double>(net, 0))));
  REQUIRE(doc["results"].type == Json::Type::array);
  for (const Json& r : doc["results"].array) {
    // Moonwalk rows add their fidelity figures (docs/gradcheck.md, Output).
    const bool moonwalk = r["schedule"].string == "mixed" || r["schedule"].string == "pure";
    CHECK(r.keys() ==
          (moonwalk ? std::vector<std::string>{"schedule", "max_rel_err_vs_backprop", "max_rel_err_vs_fd",
                                               "error_estimate", "residual_bytes", "seconds", "tolerance",
                                               "cosine_vs_backprop", "solver_iterations", "anchors",
                                               "precision", "fallbacks", "predicted_error",
                                               "within_tolerance", "verdict", "inconclusive_layers", "pass"}
                    : std::vector<std::string>{"schedule", "max_rel_err_vs_backprop", "max_rel_err_vs_fd",
                                               "error_estimate", "residual_bytes", "seconds", "tolerance",
                                               "cosine_vs_backprop", "solver_iterations", "verdict",
                                               "inconclusive_layers", "pass"}));
    if (moonwalk) {
      CHECK(r["within_tolerance"].type == Json::Type::boolean);
      CHECK((r["precision"].string == "float" || r["precision"].string == "double" ||
             r["precision"].string == "backprop"));
    }
    CHECK(r["pass"].type == Json::Type::boolean);
    // The verdict says the same as "pass", and only an inconclusive one lists layers.
    CHECK((r["verdict"].string == "pass" || r["verdict"].string == "fail" ||
           r["verdict"].string == "inconclusive"));
    CHECK(r["pass"].boolean == (r["verdict"].string == "pass"));
    REQUIRE(r["inconclusive_layers"].type == Json::Type::array);
    CHECK(r["inconclusive_layers"].array.empty() == (r["verdict"].string != "inconclusive"));
    CHECK(r["residual_bytes"].type == Json::Type::number);
    CHECK(r["seconds"].number >= 0);
  }
}

}  // namespace

// ---- the error-model rule (shared with the property tests) ---------------------

TEST_CASE("tolerance: default targets and unit roundoff", "[tools][gradcheck][tolerance]") {
  STATIC_REQUIRE(moonwalk::default_target<float>() == 1e-4);
  STATIC_REQUIRE(moonwalk::default_target<double>() == 1e-10);
  STATIC_REQUIRE(moonwalk::unit_roundoff<float>() == 0x1p-24);
  STATIC_REQUIRE(moonwalk::unit_roundoff<double>() == 0x1p-53);
}

TEST_CASE("tolerance: within_error_model is max(8uL, 10 estimate) and estimate <= target",
          "[tools][gradcheck][tolerance]") {
  const double uf = 0x1p-24, ud = 0x1p-53;
  // Rounding floor when the estimate is tiny: 8 u L.
  CHECK(moonwalk::error_model_bound<float>(0.0, 5) == 8 * uf * 5);
  CHECK(moonwalk::within_error_model<float>(8 * uf * 5, 0.0, 5));
  CHECK_FALSE(moonwalk::within_error_model<float>(8 * uf * 5 * 1.01, 0.0, 5));
  CHECK(moonwalk::within_error_model<double>(8 * ud * 100, 0.0, 100));
  CHECK_FALSE(moonwalk::within_error_model<double>(8 * ud * 100 * 1.01, 0.0, 100));
  // The true error may be up to 10x the estimate, no more.
  CHECK(moonwalk::error_model_bound<double>(1e-12, 3) == Approx(1e-11).epsilon(1e-12));
  CHECK(moonwalk::within_error_model<double>(0.99e-11, 1e-12, 3));
  CHECK_FALSE(moonwalk::within_error_model<double>(1.01e-11, 1e-12, 3));
  CHECK(moonwalk::within_error_model<float>(9e-6, 1e-6, 3));
  CHECK_FALSE(moonwalk::within_error_model<float>(2e-5, 1e-6, 3));
  // An estimate above the target fails even when the gradient happens to be exact.
  CHECK(moonwalk::within_error_model<float>(0.0, 1e-4, 3));
  CHECK_FALSE(moonwalk::within_error_model<float>(0.0, 1.01e-4, 3));
  CHECK(moonwalk::within_error_model<double>(0.0, 1e-10, 3));
  CHECK_FALSE(moonwalk::within_error_model<double>(0.0, 2e-10, 3));
  // NaN or infinity never passes.
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  CHECK_FALSE(moonwalk::within_error_model<double>(nan, 0.0, 3));
  CHECK_FALSE(moonwalk::within_error_model<double>(0.0, nan, 3));
  CHECK_FALSE(moonwalk::within_error_model<double>(inf, 0.0, 3));
  CHECK_FALSE(moonwalk::within_error_model<float>(1.0, inf, 3));
}

#ifdef MOONWALK_GRADCHECK_PATH

// ---- the issue's example -----------------------------------------------------------

TEST_CASE("gradcheck: the issue example passes every schedule, double and float", "[tools][gradcheck]") {
  for (const std::string dtype : {"double", "float"}) {
    INFO("dtype " << dtype);
    const Run r =
        gradcheck({"--net", kIssueNet, "--loss", "xent", "--batch", "16", "--seed", "3", "--dtype", dtype});
    INFO("stderr: " << r.err);
    INFO("stdout: " << r.out);
    CHECK(r.exit_code == 0);
    const Json doc = r.json();
    check_document(doc, kIssueNet, dtype, 16);
    CHECK(doc["params"].number == 64 * 48 + 48 + 48 * 32 + 32 + 32 * 10 + 10);
    const auto res = results_by_schedule(doc);
    REQUIRE(doc["results"].array.size() == 9);
    for (const std::string s : {"backprop", "mixed", "pure", "checkpoint", "binomial", "revbackprop",
                                "planned", "forward", "projforward"}) {
      INFO("schedule " << s);
      REQUIRE(res.count(s) == 1);
      CHECK(res.at(s)["pass"].boolean);
      // ProjForward is an estimate, judged by cosine similarity instead.
      if (s != "projforward")
        CHECK(res.at(s)["max_rel_err_vs_fd"].number <= res.at("backprop")["tolerance"].number);
    }
    CHECK(res.at("projforward")["cosine_vs_backprop"].number >= res.at("projforward")["tolerance"].number);
    // Backprop is the reference: exact against itself, judged against finite differences.
    CHECK(res.at("backprop")["max_rel_err_vs_backprop"].number == 0);
    CHECK(res.at("backprop")["error_estimate"].number == 0);
    CHECK(res.at("backprop")["max_rel_err_vs_fd"].number <= res.at("backprop")["tolerance"].number);
    // Moonwalk keeps far less than backprop's activations.
    CHECK(res.at("mixed")["residual_bytes"].number < res.at("backprop")["residual_bytes"].number);
    CHECK(res.at("mixed")["error_estimate"].number > 0);
  }
}

TEST_CASE("gradcheck: the same command gives the same numbers", "[tools][gradcheck]") {
  const std::vector<std::string> args = {"--net", "in:5,linear:4,relu,linear:3", "--seed", "9"};
  const Json a = gradcheck(args).json(), b = gradcheck(args).json();
  REQUIRE(a["results"].array.size() == b["results"].array.size());
  for (std::size_t i = 0; i < a["results"].array.size(); ++i)
    for (const std::string k : {"max_rel_err_vs_backprop", "max_rel_err_vs_fd", "error_estimate"})
      CHECK(a["results"].array[i][k].number == b["results"].array[i][k].number);
}

// ---- every grammar token in passing runs ----------------------------------------------

namespace {
/// Runs gradcheck with `args` (--net first) and checks that every schedule
/// passes: pure is left out only where it does not apply (a general
/// convolution is neither submersive nor fragmental, and BatchNorm in
/// training couples the batch's samples), and only a residual block iterates
/// (its vijp under mixed and pure, its inverse under revbackprop, planned).
void check_all_pass(const std::vector<std::string>& args) {
  const Run r = gradcheck(args);
  std::string command;
  for (const auto& a : args) command += a + " ";
  INFO("moonwalk-gradcheck " << command);
  INFO("stderr: " << r.err);
  INFO("stdout: " << r.out);
  REQUIRE(r.exit_code == 0);
  const auto res = results_by_schedule(r.json());
  const std::string& net = args[1];
  const bool no_pure = net.find(",conv:") != std::string::npos || net.find(",batchnorm") != std::string::npos;
  CHECK(res.size() == (no_pure ? 8u : 9u));
  const bool residual = net.find("residual") != std::string::npos;
  for (const auto& [name, result] : res) {
    INFO("schedule " << name);
    CHECK(result["pass"].boolean);
    if (!residual || name == "backprop") CHECK(result["solver_iterations"].number == 0);
    if (residual && (name == "mixed" || name == "pure")) CHECK(result["solver_iterations"].number > 0);
  }
}
}  // namespace

TEST_CASE("gradcheck: every grammar entry's examples pass every schedule, float and double",
          "[tools][gradcheck]") {
  // The examples come with the table entry (Rule::examples), so a new token is
  // checked here without a line in this file.
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    for (const std::string& example : rule.examples) {
      check_all_pass({"--net", example, "--loss", "xent", "--dtype", "double", "--batch", "3"});
      check_all_pass({"--net", example, "--loss", "mse", "--dtype", "float", "--batch", "4", "--seed", "1"});
    }
  }
}

TEST_CASE("gradcheck: networks mixing the grammar's tokens pass every schedule", "[tools][gradcheck]") {
  const std::vector<std::vector<std::string>> runs = {
      {"--net",
       "in:6,linear:5,tanh,linear:5,sigmoid,linear:4,softplus,elu,elu:0.5,identity,relu,leaky_relu,"
       "leaky_relu:0.2,linear:3",
       "--loss", "mse", "--dtype", "double"},
      {"--net",
       "in:6,linear:5,tanh,linear:5,sigmoid,linear:4,softplus,elu,elu:0.5,identity,relu,leaky_relu,"
       "leaky_relu:0.2,linear:3",
       "--loss", "xent", "--dtype", "float", "--seed", "1"},
      {"--net", "in:5,pad:8,coupling:affine:6:softplus:0.3,tanh,coupling:additive:6,linear:3", "--loss",
       "mse", "--dtype", "float"},
      // Images: a conv RevNet with every image token (a general conv: pure does not apply).
      {"--net",
       "in:3x8x8,pad_channels:4,coupling:additive_conv:6,conv:8:3:1:1,tanh,squeeze,coupling:additive_conv:4,"
       "avgpool,conv_valid:6:2,gap,flatten,linear:3",
       "--loss", "xent", "--dtype", "double"},
      {"--net",
       "in:2x6x4,pad_channels:4,coupling:additive_conv:4:softplus:0.5,squeeze,conv_valid:5:2,gap,linear:2",
       "--loss", "mse", "--dtype", "float", "--batch", "3"},
      // Normalisation and dropout, mixed with the other tokens (BatchNorm per feature and per channel).
      {"--net", "in:6,linear:8,batchnorm,leaky_relu:0.3,dropout:0.25,linear:6,layernorm,tanh,linear:3",
       "--loss", "xent", "--dtype", "double", "--batch", "6"},
      {"--net", "in:2x4x4,conv:3:3:1:1,batchnorm,tanh,dropout:0.2,flatten,layernorm,linear:3", "--loss",
       "mse", "--dtype", "float", "--batch", "4"},
      {"--net", "in:6,linear:8,layernorm,leaky_relu:0.5,dropout:0.3,coupling:additive:6,linear:3", "--loss",
       "mse", "--dtype", "float", "--batch", "5"},
      // Residual blocks (GMRES vijp, Newton inverse), flat and convolutional.
      {"--net", "in:6,linear:6,residual:8,leaky_relu:0.5,residual:5:elu:0.3,layernorm,linear:3", "--loss",
       "xent", "--dtype", "double", "--batch", "4"},
      {"--net", "in:2x4x4,residual_conv:3,batchnorm,tanh,residual_conv:2:softplus,flatten,linear:3", "--loss",
       "mse", "--dtype", "float", "--batch", "3"},
  };
  for (const auto& args : runs) check_all_pass(args);
}

// ---- finite differences at a kink ----------------------------------------------------------

TEST_CASE("gradcheck: parameters sitting exactly on a kink are no finite-difference reference",
          "[tools][gradcheck]") {
  // With two ReLU units, a sample has both dead with probability 1/4, so with
  // 32 samples almost surely (1 − 0.75³²) one feeds zeros to the zero-bias
  // expanding Linear: ELU(α = 3) then sees exactly 0, where the loss is not
  // differentiable in that Linear's bias (left slope 3, right slope 1). The
  // central difference there is the average of both sides, matching no
  // gradient: gradcheck must exclude it (and say so), not fail backprop.
  const Run r = gradcheck({"--net", "in:4,linear:2,relu,linear:3,elu:3,linear:2", "--batch", "32"});
  INFO("stderr: " << r.err);
  INFO("stdout: " << r.out);
  CHECK(r.exit_code == 0);
  CHECK(r.err.find("sit on a kink") != std::string::npos);
  const auto res = results_by_schedule(r.json());
  REQUIRE(res.count("backprop") == 1);
  CHECK(res.at("backprop")["pass"].boolean);
  CHECK(res.at("backprop")["max_rel_err_vs_fd"].number < 1e-8);
}

// ---- options ---------------------------------------------------------------------------

TEST_CASE("gradcheck: --anchors, --schedules, --help, --grammar", "[tools][gradcheck]") {
  SECTION("--anchors 2 runs mixed with anchors") {
    const Run r = gradcheck({"--net", kIssueNet, "--anchors", "2", "--schedules", "mixed"});
    INFO("stderr: " << r.err);
    CHECK(r.exit_code == 0);
    const Json doc = r.json();
    check_document(doc, kIssueNet, "double", 8);
    REQUIRE(doc["results"].array.size() == 1);
    CHECK(doc["results"].array[0]["schedule"].string == "mixed");
    CHECK(doc["results"].array[0]["pass"].boolean);
  }
  SECTION("--schedules keeps the order asked for and drops duplicates") {
    const Run r = gradcheck({"--net=in:4,linear:3", "--schedules=pure,backprop,pure"});
    CHECK(r.exit_code == 0);
    const Json doc = r.json();
    REQUIRE(doc["results"].array.size() == 2);
    CHECK(doc["results"].array[0]["schedule"].string == "pure");
    CHECK(doc["results"].array[1]["schedule"].string == "backprop");
  }
  SECTION("--help") {
    const Run r = gradcheck({"--help"});
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("--net SPEC") != std::string::npos);
    for (const auto& [name, rule] : moonwalk::spec_layers<double>())
      CHECK(r.out.find("  " + rule.syntax + "\n") != std::string::npos);
  }
  SECTION("--grammar prints the grammar table's docs, without --net") {
    const Run markdown = gradcheck({"--grammar", "markdown"}), list = gradcheck({"--grammar=list"});
    CHECK(markdown.exit_code == 0);
    CHECK(markdown.out == moonwalk::spec::grammar_markdown());
    CHECK(list.exit_code == 0);
    CHECK(list.out == moonwalk::spec::grammar_list());
    const Run bad = gradcheck({"--grammar", "html"});
    CHECK(bad.exit_code == 2);
    CHECK(bad.err.find("--grammar: unknown format 'html'") != std::string::npos);
  }
}

// ---- exit 1: an honest failure ----------------------------------------------------------

TEST_CASE("gradcheck: an ill-conditioned float network fails the error model unguarded (exit 1)",
          "[tools][gradcheck]") {
  // Six Linear + LeakyReLU(0.01) pairs: the reverse pass shrinks the negative
  // side by 100 per layer and the sweep stretches the float rounding back by
  // as much (docs/design.md §5). Backprop is still fine; with --policy none Moonwalk's
  // own estimate is far above the float target, and gradcheck must say so.
  std::string net = "in:8";
  for (int i = 0; i < 6; ++i) net += ",linear:8,leaky_relu:0.01";
  const Run r = gradcheck({"--net", net, "--dtype", "float", "--policy", "none"});
  INFO("stdout: " << r.out);
  CHECK(r.exit_code == 1);
  const auto res = results_by_schedule(r.json());
  REQUIRE(res.size() == 9);
  CHECK(res.at("backprop")["pass"].boolean);
  for (const std::string s : {"mixed", "pure"}) {
    INFO("schedule " << s);
    CHECK_FALSE(res.at(s)["pass"].boolean);
    CHECK_FALSE(res.at(s)["within_tolerance"].boolean);
    CHECK(res.at(s)["precision"].string == "float");
    // Non-finite numbers print as null; finite ones show the estimate is over target.
    if (res.at(s)["error_estimate"].type == Json::Type::number)
      CHECK(res.at(s)["error_estimate"].number > moonwalk::default_target<float>());
  }

  // Anchors every 2 layers restart the sweep before the error grows: mixed passes.
  const Run anchored =
      gradcheck({"--net", net, "--dtype", "float", "--policy", "every:2", "--schedules", "backprop,mixed"});
  INFO("anchored stdout: " << anchored.out);
  CHECK(anchored.exit_code == 0);
  for (const auto& [name, result] : results_by_schedule(anchored.json())) CHECK(result["pass"].boolean);
  CHECK(results_by_schedule(anchored.json()).at("mixed")["anchors"].number == 5);

  // The default policy holds the tolerance by itself, and says what it cost.
  const Run held = gradcheck({"--net", net, "--dtype", "float", "--schedules", "backprop,mixed,pure"});
  INFO("default-policy stdout: " << held.out);
  const auto hr = results_by_schedule(held.json());
  CHECK(hr.at("mixed")["pass"].boolean);
  CHECK(hr.at("mixed")["within_tolerance"].boolean);
  CHECK((hr.at("mixed")["anchors"].number > 0 || hr.at("mixed")["precision"].string != "float"));
  // Pure has no reverse pass to anchor from: it escalates to double and its
  // verdict matches its flag.
  CHECK(hr.at("pure")["precision"].string == "double");
  CHECK(hr.at("pure")["pass"].boolean == hr.at("pure")["within_tolerance"].boolean);
  CHECK(held.exit_code == (hr.at("pure")["pass"].boolean ? 0 : 1));
}

TEST_CASE("gradcheck: --init, --policy, --tolerance and --fd", "[tools][gradcheck]") {
  const std::string net = "in:6,linear:6,leaky_relu:0.2,linear:6,leaky_relu:0.2,linear:3";
  SECTION("--fd off judges nothing against finite differences") {
    const Run r = gradcheck({"--net", net, "--fd", "off", "--schedules", "backprop,mixed"});
    INFO(r.out);
    CHECK(r.exit_code == 0);
    for (const auto& [name, result] : results_by_schedule(r.json()))
      CHECK(result["max_rel_err_vs_fd"].type == Json::Type::null);
  }
  SECTION("--tolerance tightens rule (2): an unreachable target fails") {
    const Run r = gradcheck({"--net", net, "--dtype", "float", "--tolerance", "1e-30", "--policy", "none",
                             "--schedules", "mixed"});
    INFO(r.out);
    CHECK(r.exit_code == 1);
  }
  SECTION("--policy double carries cotangents in double") {
    const Run r = gradcheck({"--net", net, "--dtype", "float", "--policy", "double", "--schedules", "mixed"});
    INFO(r.out);
    CHECK(r.exit_code == 0);
    CHECK(results_by_schedule(r.json()).at("mixed")["precision"].string == "double");
  }
  SECTION("--init gaussian is accepted and checked like any network") {
    const Run b = gradcheck({"--net", net, "--init", "gaussian", "--schedules", "backprop,mixed"});
    INFO(b.out << b.err);
    CHECK(b.exit_code == 0);
  }
  SECTION("bad values exit 2 naming the option") {
    for (const std::vector<std::string>& args :
         {std::vector<std::string>{"--net", net, "--policy", "sometimes"},
          std::vector<std::string>{"--net", net, "--policy", "every:0"},
          std::vector<std::string>{"--net", net, "--tolerance", "-1"},
          std::vector<std::string>{"--net", net, "--init", "uniform"},
          std::vector<std::string>{"--net", net, "--fd", "maybe"}}) {
      const Run r = gradcheck(args);
      INFO(args[2] << " " << args[3] << ": " << r.err);
      CHECK(r.exit_code == 2);
      CHECK(r.err.find(args[2]) != std::string::npos);
    }
  }
}

// ---- exit 2: bad spec or option ------------------------------------------------------------

TEST_CASE("gradcheck: a bad spec or option exits 2 naming it", "[tools][gradcheck]") {
  const struct {
    std::vector<std::string> args;
    const char* named;  // must appear on stderr
  } cases[] = {
      {{"--net", "in:8,linaer:4"}, "linaer"},
      {{"--net", "in:8,linear:0"}, "linear:0"},
      {{"--net", "linear:4"}, "in:N"},
      {{"--net", "in:8,linear:4", "--dtype", "half"}, "half"},
      {{"--net", "in:8,linear:4", "--batch", "0"}, "--batch"},
      {{"--net", "in:8,linear:4", "--batch", "-2"}, "--batch"},
      {{"--net", "in:8,linear:4", "--batch", "eight"}, "eight"},
      {{"--net", "in:8,linear:4", "--seed", "1.5"}, "--seed"},
      {{"--net", "in:8,linear:4", "--anchors", "x"}, "--anchors"},
      {{"--net", "in:8,linear:4", "--loss", "hinge"}, "hinge"},
      {{"--net", "in:8,linear:4", "--schedules", "mixed,bogus"}, "bogus"},
      {{"--net", "in:8,linear:4", "--frobnicate"}, "--frobnicate"},
      {{"--net", "in:8,linear:4", "--batch"}, "--batch"},
      {{"--net"}, "--net"},
      {{}, "--net"},
      {{"--net", "in:8,linear:4", "stray"}, "stray"},
  };
  for (const auto& c : cases) {
    std::string joined;
    for (const auto& a : c.args) joined += a + " ";
    INFO("args: " << joined);
    const Run r = gradcheck(c.args);
    INFO("stderr: " << r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find(c.named) != std::string::npos);
  }
}

// ---- the finite differences' own error (issue 24) ---------------------------------------

namespace {

/// in:24, then 64 x (linear:24, leaky_relu:0.05), then linear:10: gradients of
/// the early layers far below what a finite difference can resolve.
std::string deep_leaky_net() {
  std::string net = "in:24";
  for (int i = 0; i < 64; ++i) net += ",linear:24,leaky_relu:0.05";
  return net + ",linear:10";
}

}  // namespace

TEST_CASE("gradcheck: a gradient finite differences cannot resolve is inconclusive, not failed (exit 4)",
          "[tools][gradcheck]") {
  // The issue's reproducer: backprop "failed" finite differences with a
  // relative error of 1.2 while mixed Moonwalk agreed with it to 5e-12.
  const std::string net = deep_leaky_net();
  const std::vector<std::string> args = {"--net",  net, "--loss",  "xent",   "--batch",     "8",
                                         "--seed", "2", "--dtype", "double", "--schedules", "backprop,mixed"};
  const Run r = gradcheck(args);
  INFO("stderr: " << r.err);
  INFO("stdout: " << r.out);
  CHECK(r.exit_code == 4);
  const Json doc = r.json();
  check_document(doc, net, "double", 8);
  const auto res = results_by_schedule(doc);
  const Json& bp = res.at("backprop");
  // Against finite differences it is off by far more than the tolerance...
  CHECK(bp["max_rel_err_vs_fd"].number > 100 * bp["tolerance"].number);
  // ...but the reference says it cannot resolve those layers to the tolerance.
  CHECK(doc["fd_error_estimate"].number > bp["tolerance"].number);
  CHECK(bp["verdict"].string == "inconclusive");
  CHECK_FALSE(bp["pass"].boolean);
  REQUIRE_FALSE(bp["inconclusive_layers"].array.empty());
  CHECK(bp["inconclusive_layers"].array[0].number == 0);  // the first Linear
  // The last Linear (layer 128) is resolved: it is not among them.
  for (const Json& l : bp["inconclusive_layers"].array) CHECK(l.number < 128);
  // An independent schedule agrees with backprop: the gradient was right.
  CHECK(res.at("mixed")["pass"].boolean);
  CHECK(res.at("mixed")["max_rel_err_vs_backprop"].number < 1e-9);

  // A wrong gradient in the layer finite differences do resolve still fails,
  // on the same network.
  std::vector<std::string> wrong = args;
  wrong.insert(wrong.end(), {"--inject-error", "-1:1e-3"});
  const Run w = gradcheck(wrong);
  INFO("stdout (injected): " << w.out);
  CHECK(w.exit_code == 1);
  const auto wres = results_by_schedule(w.json());
  CHECK(wres.at("backprop")["verdict"].string == "fail");
  CHECK(wres.at("mixed")["pass"].boolean);  // only backprop's reported gradient was perturbed
}

TEST_CASE("gradcheck: a wrong gradient fails where finite differences resolve it", "[tools][gradcheck]") {
  const std::string net = "in:6,linear:5,tanh,linear:5,leaky_relu:0.2,linear:3";
  SECTION("the reference resolves every layer far below the tolerance") {
    const Run r = gradcheck({"--net", net, "--schedules", "backprop"});
    INFO("stdout: " << r.out);
    CHECK(r.exit_code == 0);
    const Json doc = r.json();
    check_document(doc, net, "double", 8);
    CHECK(doc["fd_error_estimate"].number <
          1e-3 * results_by_schedule(doc).at("backprop")["tolerance"].number);
    CHECK(doc["fd_error_estimate"].number > 0);
  }
  for (const std::string layer : {"0", "2", "4", "-1"}) {
    SECTION("an error of 1e-4 injected into layer " + layer + " fails (exit 1)") {
      const Run r =
          gradcheck({"--net", net, "--schedules", "backprop,checkpoint", "--inject-error", layer + ":1e-4"});
      INFO("stdout: " << r.out);
      CHECK(r.exit_code == 1);
      const auto res = results_by_schedule(r.json());
      CHECK(res.at("backprop")["verdict"].string == "fail");
      CHECK(res.at("backprop")["inconclusive_layers"].array.empty());
      CHECK(res.at("backprop")["max_rel_err_vs_fd"].number == Approx(1e-4).epsilon(0.01));
      CHECK(res.at("checkpoint")["pass"].boolean);
    }
  }
  SECTION("an error below the tolerance still passes") {
    const Run r = gradcheck({"--net", net, "--schedules", "backprop", "--inject-error", "0:1e-8"});
    INFO("stdout: " << r.out);
    CHECK(r.exit_code == 0);
  }
  SECTION("--fd off: nothing is inconclusive, and no reference error is claimed") {
    const Run r = gradcheck({"--net", net, "--schedules", "backprop", "--fd", "off"});
    CHECK(r.exit_code == 0);
    CHECK(r.json()["fd_error_estimate"].type == Json::Type::null);
  }
  SECTION("bad --inject-error values exit 2 naming the option") {
    for (const std::string v : {"2", "x:1e-3", "0:0", "0:nan", "0:", "6:1e-3", "-7:1e-3", "1:1e-3"}) {
      const Run r = gradcheck({"--net", net, "--inject-error", v});
      INFO("--inject-error " << v << ": " << r.err);
      CHECK(r.exit_code == 2);
      CHECK(r.out.empty());
      CHECK(r.err.find("--inject-error") != std::string::npos);
    }
  }
  SECTION("--help documents the exit codes") {
    const Run r = gradcheck({"--help"});
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("4 none fails but") != std::string::npos);
    CHECK(r.out.find("--inject-error") != std::string::npos);
  }
}

#ifndef _WIN32
TEST_CASE("gradcheck: a result that cannot be written exits 3", "[tools][gradcheck]") {
  if (!std::filesystem::exists("/dev/full")) {
    WARN("skipped: /dev/full does not exist on this system");
    return;
  }
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--net", "in:4,linear:3", "--schedules", "backprop"},
        std::vector<std::string>{"--help"}}) {
    std::string cmd = moonwalk::test::quote(MOONWALK_GRADCHECK_PATH);
    for (const auto& a : args) cmd.append(" ").append(moonwalk::test::quote(a));
    const auto err_path = std::filesystem::temp_directory_path() / "moonwalk-gradcheck-dev-full.err";
    cmd.append(" >/dev/full 2>").append(moonwalk::test::quote(err_path.string()));
    const int status = std::system(cmd.c_str());
    const std::string err = moonwalk::test::slurp(err_path);
    std::filesystem::remove(err_path);
    INFO(args[0] << ": stderr: " << err);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 3);
    CHECK(err.find("standard output") != std::string::npos);
  }
}
#endif

#else

TEST_CASE("gradcheck: binary location", "[tools][gradcheck]") {
  FAIL("MOONWALK_GRADCHECK_PATH is not defined: tools/CMakeLists.txt sets it on moonwalk_tests");
}

#endif
