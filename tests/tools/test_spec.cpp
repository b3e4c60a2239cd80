// Spec-string parser: every token parses, widths chain, seeds are
// deterministic, and every kind of bad spec throws SpecError quoting the token.
#include <Eigen/SVD>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/spec.hpp>
#include <moonwalk/testing/numerics.hpp>
#include <new>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "io/memory_limit.hpp"

namespace {

using moonwalk::Index;

/// The message of the SpecError `spec` throws ("" when it throws nothing, and
/// the test fails if it throws anything else).
template <class S>
std::string spec_error(const std::string& spec) {
  try {
    (void)moonwalk::parse_network<S>(spec, 0);
  } catch (const moonwalk::SpecError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

static_assert(std::is_base_of_v<moonwalk::Error, moonwalk::SpecError>, "SpecError is a moonwalk::Error");

TEMPLATE_TEST_CASE("spec: every token parses and widths chain", "[tools][spec]", float, double) {
  using S = TestType;
  const std::string spec =
      "in:6,linear:5,leaky_relu,leaky_relu:0.2,relu,tanh,sigmoid,softplus,elu,elu:0.5,identity,linear:9,"
      "linear:3";
  const moonwalk::Network<S> net = moonwalk::parse_network<S>(spec, 7);
  REQUIRE(net.size() == 12);
  CHECK(net.in_features() == 6);
  CHECK(net.out_features() == 3);
  for (std::size_t i = 1; i < net.size(); ++i) CHECK(net[i - 1].out_features() == net[i].in_features());

  const auto* lin = net[0].template target<moonwalk::Linear<S>>();
  REQUIRE(lin != nullptr);
  CHECK(lin->in_features() == 6);
  CHECK(lin->out_features() == 5);
  const auto* leaky_default = net[1].template target<moonwalk::LeakyReLU<S>>();
  REQUIRE(leaky_default != nullptr);
  CHECK(leaky_default->rule().slope == S(0.01));
  const auto* leaky = net[2].template target<moonwalk::LeakyReLU<S>>();
  REQUIRE(leaky != nullptr);
  CHECK(leaky->rule().slope == S(0.2));
  CHECK(net[3].template target<moonwalk::ReLU<S>>() != nullptr);
  CHECK(net[4].template target<moonwalk::Tanh<S>>() != nullptr);
  CHECK(net[5].template target<moonwalk::Sigmoid<S>>() != nullptr);
  CHECK(net[6].template target<moonwalk::Softplus<S>>() != nullptr);
  const auto* elu_default = net[7].template target<moonwalk::ELU<S>>();
  REQUIRE(elu_default != nullptr);
  CHECK(elu_default->rule().alpha == S(1));
  const auto* elu = net[8].template target<moonwalk::ELU<S>>();
  REQUIRE(elu != nullptr);
  CHECK(elu->rule().alpha == S(0.5));
  CHECK(net[9].template target<moonwalk::Identity<S>>() != nullptr);
  const auto* expanding = net[10].template target<moonwalk::Linear<S>>();
  REQUIRE(expanding != nullptr);
  CHECK(expanding->in_features() == 5);
  CHECK(expanding->out_features() == 9);
  CHECK(net[11].template target<moonwalk::Linear<S>>() != nullptr);

  // Activations keep the width; parameters are exactly the three Linears'.
  for (std::size_t i = 1; i < 10; ++i) CHECK(net[i].in_features() == 5);
  CHECK(moonwalk::num_parameters(net) == (6 * 5 + 5) + (5 * 9 + 9) + (9 * 3 + 3));

  // The network runs.
  const moonwalk::Matrix<S> y = net.forward(moonwalk::gaussian<S>(6, 4, 1));
  CHECK(y.rows() == 3);
  CHECK(y.cols() == 4);
  CHECK(y.allFinite());
}

TEST_CASE("spec: every grammar entry names itself and builds something", "[tools][spec]") {
  // (tests/tools/test_grammar_docs.cpp checks the docs against the same table.)
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    CHECK(rule.syntax.rfind(name, 0) == 0);  // the syntax starts with the name
    CHECK((static_cast<bool>(rule.build) || static_cast<bool>(rule.build_image)));
    if (rule.activation) CHECK(static_cast<bool>(rule.build));
  }
}

TEST_CASE("spec: every grammar entry's examples build in float and double and use the token",
          "[tools][spec]") {
  // tests/tools/test_gradcheck.cpp runs each example under every schedule.
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    INFO(rule.syntax);
    REQUIRE_FALSE(rule.examples.empty());
    bool with_arguments = false;  // some example gives the token an argument
    for (const std::string& example : rule.examples) {
      INFO(example);
      CHECK_NOTHROW(moonwalk::parse_network<float>(example, 1));
      CHECK_NOTHROW(moonwalk::parse_network<double>(example, 1));
      bool uses = false;
      for (const auto& token : moonwalk::spec::tokenize(example)) {
        uses = uses || token.name() == name;
        with_arguments = with_arguments || (token.name() == name && !token.args().empty());
      }
      CHECK(uses);
    }
    if (rule.syntax.find(':') != std::string::npos) CHECK(with_arguments);
  }
}

TEST_CASE("spec: whitespace around tokens and arguments is ignored", "[tools][spec]") {
  const auto a = moonwalk::parse_network<double>("in:4,linear:3,leaky_relu:0.5,linear:2", 11);
  const auto b = moonwalk::parse_network<double>(" in : 4 ,\tlinear: 3 , leaky_relu :0.5, linear:2 ", 11);
  REQUIRE(a.size() == b.size());
  CHECK(moonwalk::get_parameters(a) == moonwalk::get_parameters(b));
}

TEMPLATE_TEST_CASE("spec: seeds are deterministic, seed * 1000003 + token index", "[tools][spec]", float,
                   double) {
  using S = TestType;
  const std::string spec = "in:5,linear:4,tanh,linear:4,linear:2";
  const std::uint64_t seed = 42;
  const auto a = moonwalk::parse_network<S>(spec, seed);
  const auto b = moonwalk::parse_network<S>(spec, seed);
  CHECK(moonwalk::get_parameters(a) == moonwalk::get_parameters(b));
  const auto c = moonwalk::parse_network<S>(spec, seed + 1);
  CHECK(moonwalk::get_parameters(a) != moonwalk::get_parameters(c));

  // Token k (in:N is token 0) gets seed * 1000003 + k.
  const struct {
    std::size_t layer, token;
    Index in, out;
  } linears[] = {{0, 1, 5, 4}, {2, 3, 4, 4}, {3, 4, 4, 2}};
  for (const auto& l : linears) {
    typename moonwalk::Linear<S>::Options opt;
    opt.seed = seed * 1000003 + l.token;
    const moonwalk::Linear<S> expected(l.in, l.out, opt);
    const auto* got = a[l.layer].template target<moonwalk::Linear<S>>();
    REQUIRE(got != nullptr);
    CHECK(got->W() == expected.W());
    CHECK(got->b() == expected.b());
  }
  CHECK(moonwalk::spec::layer_seed(seed, 3) == seed * 1000003 + 3);

  // Two Linears of equal shape in one network differ (distinct token seeds).
  const auto same = moonwalk::parse_network<S>("in:4,linear:4,linear:4", seed);
  CHECK(same[0].template target<moonwalk::Linear<S>>()->W() !=
        same[1].template target<moonwalk::Linear<S>>()->W());
}

TEMPLATE_TEST_CASE("spec: every kind of bad spec throws SpecError quoting the token", "[tools][spec]", float,
                   double) {
  using S = TestType;
  const struct {
    const char* spec;
    const char* token;  // quoted in the message
    const char* what;   // says what is wrong
  } cases[] = {
      {"in:8,linaer:4", "'linaer:4'", "unknown layer 'linaer'"},
      {"in:8,Linear:4", "'Linear:4'", "unknown layer"},
      {"linear:4,relu", "'linear:4'", "missing in:N"},
      {"in:8", "'in:8'", "no layers"},
      {"in:8,linear:4,in:4", "'in:4'", "first token"},
      {"in", "'in'", "wrong number of arguments"},
      {"in:8,linear", "'linear'", "wrong number of arguments"},
      {"in:8,linear:3:4", "'linear:3:4'", "wrong number of arguments"},
      {"in:8,relu:3", "'relu:3'", "wrong number of arguments"},
      {"in:8,tanh:1", "'tanh:1'", "wrong number of arguments"},
      {"in:8,identity:2", "'identity:2'", "wrong number of arguments"},
      {"in:8,leaky_relu:0.1:2", "'leaky_relu:0.1:2'", "wrong number of arguments"},
      {"in:8,elu:1:2", "'elu:1:2'", "wrong number of arguments"},
      {"in:8,orthogonal:3", "'orthogonal:3'", "wrong number of arguments"},
      {"in:8,coupling:additive:4:orthogonal", "'coupling:additive:4:orthogonal'",
       "unknown branch activation 'orthogonal'"},
      {"in:x,linear:4", "'in:x'", "bad number 'x'"},
      {"in:8,linear:2.5", "'linear:2.5'", "bad number '2.5'"},
      {"in:8,linear:4x", "'linear:4x'", "bad number '4x'"},
      {"in:8,linear:", "'linear:'", "bad number ''"},
      {"in:8,linear:99999999999999999999", "'linear:99999999999999999999'", "bad number"},
      {"in:8,leaky_relu:abc", "'leaky_relu:abc'", "bad number 'abc'"},
      {"in:8,leaky_relu:inf", "'leaky_relu:inf'", "bad number 'inf'"},
      {"in:8,elu:nan", "'elu:nan'", "bad number 'nan'"},
      {"in:0,linear:4", "'in:0'", "non-positive input width"},
      {"in:8,linear:0", "'linear:0'", "non-positive width"},
      {"in:8,linear:-2", "'linear:-2'", "non-positive width"},
      {"in:8,leaky_relu:0", "'leaky_relu:0'", "slope must be > 0"},
      {"in:8,leaky_relu:-0.1", "'leaky_relu:-0.1'", "slope must be > 0"},
      {"in:8,elu:0", "'elu:0'", "alpha must be > 0"},
      {"in:8,elu:-1", "'elu:-1'", "alpha must be > 0"},
      {"in:8,,linear:4", "token 1 ''", "empty token"},
      {"in:8,linear:4,", "token 2 ''", "empty token"},
      {"in:8,:4", "':4'", "missing layer name"},
      {"", "", "empty spec"},
  };
  for (const auto& c : cases) {
    INFO("spec \"" << c.spec << "\"");
    const std::string msg = spec_error<S>(c.spec);
    INFO("message: " << msg);
    REQUIRE(!msg.empty());
    CHECK(msg.find(c.token) != std::string::npos);
    CHECK(msg.find(c.what) != std::string::npos);
  }
}

TEST_CASE("spec: a slope that is positive in double but 0 in float is a spec error", "[tools][spec]") {
  CHECK_NOTHROW(moonwalk::parse_network<double>("in:4,leaky_relu:1e-50,linear:2", 0));
  const std::string msg = spec_error<float>("in:4,leaky_relu:1e-50,linear:2");
  CHECK(msg.find("'leaky_relu:1e-50'") != std::string::npos);
  CHECK(msg.find("finite in float") != std::string::npos);
  CHECK(spec_error<float>("in:4,elu:1e300,linear:2").find("'elu:1e300'") != std::string::npos);
}

TEMPLATE_TEST_CASE("spec: orthogonal is a square OrthogonalLinear seeded like any token", "[tools][spec]",
                   float, double) {
  using S = TestType;
  const std::uint64_t seed = 5;
  const auto net = moonwalk::parse_network<S>("in:6,orthogonal,tanh,orthogonal,linear:2", seed);
  REQUIRE(net.size() == 4);
  const auto* q = net[0].template target<moonwalk::OrthogonalLinear<S>>();
  REQUIRE(q != nullptr);
  CHECK(q->in_features() == 6);
  CHECK(q->out_features() == 6);
  CHECK(net[3].in_features() == 6);
  CHECK(moonwalk::num_parameters(net) == 2 * (15 + 6) + (6 * 2 + 2));
  const moonwalk::OrthogonalLinear<S> expected(6, {.seed = moonwalk::spec::layer_seed(seed, 1)});
  CHECK(q->Q() == expected.Q());
  CHECK(q->b() == expected.b());
  const auto* q2 = net[2].template target<moonwalk::OrthogonalLinear<S>>();
  REQUIRE(q2 != nullptr);
  CHECK(q2->Q() != q->Q());  // distinct token seeds
  const moonwalk::Matrix<double> qd = q->Q().template cast<double>();
  CHECK((qd.transpose() * qd - moonwalk::Matrix<double>::Identity(6, 6)).norm() <
        100 * std::numeric_limits<S>::epsilon());
  CHECK(moonwalk::can_vijp(net[0]));
  CHECK(moonwalk::can_invert(net[0]));
}

namespace {
/// ‖W Wᵀ − I‖_F (rows ≤ cols) or ‖Wᵀ W − I‖_F, in double.
template <class S>
double gram_error(const moonwalk::Matrix<S>& w) {
  const moonwalk::Matrix<double> d = w.template cast<double>();
  const moonwalk::Matrix<double> g = d.rows() <= d.cols() ? moonwalk::Matrix<double>(d * d.transpose())
                                                          : moonwalk::Matrix<double>(d.transpose() * d);
  return (g - moonwalk::Matrix<double>::Identity(g.rows(), g.cols())).norm();
}
}  // namespace

TEMPLATE_TEST_CASE("spec: SpecOptions::init chooses orthogonal (default) or gaussian Linear weights",
                   "[tools][spec]", float, double) {
  using S = TestType;
  using moonwalk::Init;
  using moonwalk::Linear;
  const std::string spec = "in:64,linear:48,tanh,linear:64";
  const std::uint64_t seed = 9;
  const auto dflt = moonwalk::parse_network<S>(spec, seed);
  const auto orth = moonwalk::parse_network<S>(spec, seed, moonwalk::SpecOptions{});
  const auto gauss = moonwalk::parse_network<S>(spec, seed, moonwalk::SpecOptions{.init = Init::gaussian});
  CHECK(moonwalk::SpecOptions{}.init == Init::orthogonal);
  // the two-argument form is the default options
  CHECK(moonwalk::get_parameters(dflt) == moonwalk::get_parameters(orth));

  for (const std::size_t k : {std::size_t{0}, std::size_t{2}}) {
    INFO("layer " << k);
    const auto* o = orth[k].template target<Linear<S>>();
    const auto* g = gauss[k].template target<Linear<S>>();
    REQUIRE(o != nullptr);
    REQUIRE(g != nullptr);
    const moonwalk::Matrix<S> wo = o->W(), wg = g->W();
    // default: (semi-)orthogonal
    CHECK(gram_error<S>(wo) < 1e-4);
    // gaussian: clearly not orthogonal, entries N(0, 1/in)
    CHECK(gram_error<S>(wg) > 1.0);
    const double in = static_cast<double>(g->in_features());
    const moonwalk::Matrix<double> wd = wg.template cast<double>();
    const double mean = wd.mean();
    const double sd = std::sqrt((wd.array() - mean).square().sum() / static_cast<double>(wd.size() - 1));
    CHECK(std::abs(mean) * std::sqrt(in) < 0.08);      // sampling error ≈ 0.018
    CHECK(std::abs(sd * std::sqrt(in) - 1.0) < 0.05);  // ≥ 3000 entries: sampling error ≈ 0.013
    // exactly the Linear the option names, with the token's seed
    typename Linear<S>::Options lo;
    lo.seed = moonwalk::spec::layer_seed(seed, k + 1);
    lo.init = Init::gaussian;
    CHECK(wg == Linear<S>(g->in_features(), g->out_features(), lo).W());
    CHECK(g->b().isZero(0));
  }
}

TEST_CASE("spec: coupling branch Linears follow SpecOptions::init; orthogonal ignores it", "[tools][spec]") {
  using moonwalk::Init;
  const std::string spec = "in:6,coupling:additive:5,orthogonal";
  const auto orth = moonwalk::parse_network<double>(spec, 3);
  const auto gauss = moonwalk::parse_network<double>(spec, 3, {.init = Init::gaussian});
  // the coupling's parameters differ, the orthogonal layer's do not
  const moonwalk::Vector<double> to = moonwalk::get_parameters(orth), tg = moonwalk::get_parameters(gauss);
  REQUIRE(to.size() == tg.size());
  const Index split = orth[0].num_params();
  CHECK(to.head(split) != tg.head(split));
  CHECK(to.tail(to.size() - split) == tg.tail(tg.size() - split));
}

TEST_CASE("spec: images — in:CxHxW carries a shape through image tokens", "[tools][spec][conv]") {
  const auto net = moonwalk::parse_network<double>(
      "in:3x8x8,pad_channels:8,coupling:additive_conv:16,squeeze,coupling:additive_conv:32,gap,linear:10", 1);
  REQUIRE(net.size() == 6);
  CHECK(net.in_features() == 3 * 8 * 8);
  CHECK(net[0].out_features() == 8 * 8 * 8);
  CHECK(net[2].out_features() == 32 * 4 * 4);  // squeeze: 4C × H/2 × W/2
  CHECK(net[4].out_features() == 32);          // gap
  CHECK(net.out_features() == 10);
  CHECK(net[2].target<moonwalk::SpaceToDepth<double>>() != nullptr);
  CHECK(net[4].target<moonwalk::GlobalAvgPool<double>>() != nullptr);
  const auto conv = moonwalk::parse_network<float>("in:2x7x7,conv:5:3:2:1,relu,conv_valid:3:1,avgpool", 2);
  const auto* c = conv[0].target<moonwalk::Conv2d<float>>();
  REQUIRE(c != nullptr);
  CHECK(c->out_shape() == moonwalk::ImageShape{5, 4, 4});  // (7 + 2·1 − 3)/2 + 1 = 4
  CHECK(conv[2].out_features() == 3 * 4 * 4);              // a 1×1 valid conv: 5 → 3 channels
  CHECK(conv.out_features() == 3 * 2 * 2);                 // avgpool
}

TEST_CASE("spec: image errors quote the token", "[tools][spec][conv]") {
  const struct {
    const char* spec;
    const char* quoted;
    const char* says;
  } cases[] = {
      {"in:48,squeeze,linear:2", "'squeeze'", "needs an image input"},
      {"in:3x8x8,linear:10,gap", "'gap'", "needs an image input"},
      {"in:3x8,linear:2", "'in:3x8'", "bad image shape"},
      {"in:3x0x8,linear:2", "'in:3x0x8'", "bad image shape"},
      {"in:3x5x5,squeeze,linear:2", "'squeeze'", "space_to_depth"},
      {"in:3x4x4,conv:4:7,linear:2", "'conv:4:7'", "does not fit"},
      {"in:3x4x4,conv_valid:4:2,linear:2", "'conv_valid:4:2'", "conv_valid"},
      {"in:3x4x4,pad_channels:2,linear:2", "'pad_channels:2'", "pad_channels"},
      {"in:1x4x4,coupling:additive_conv:4,linear:2", "'coupling:additive_conv:4'", "at least 2 channels"},
      {"in:16,coupling:additive_conv:4,linear:2", "'coupling:additive_conv:4'", "needs an image input"},
      {"in:3x4x4,conv:4:3:1:-1,linear:2", "'conv:4:3:1:-1'", "padding"},
  };
  for (const auto& k : cases) {
    INFO(k.spec);
    const std::string msg = spec_error<double>(k.spec);
    INFO(msg);
    CHECK(msg.find(k.quoted) != std::string::npos);
    CHECK(msg.find(k.says) != std::string::npos);
  }
}

TEST_CASE("spec: numbers are range-checked before conversion, sizes multiplied with overflow checks",
          "[tools][spec]") {
  const moonwalk::SpecOptions unlimited{.max_memory_bytes = std::numeric_limits<std::uint64_t>::max()};
  auto error = [&](const std::string& spec) {
    try {
      (void)moonwalk::parse_network<float>(spec, 0, unlimited);
    } catch (const moonwalk::SpecError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const struct {
    const char* spec;
    const char* quoted;
    const char* says;
  } cases[] = {
      // Padding 1e300 was cast to Index (float-cast-overflow).
      {"in:3x8x8,conv:4:3:1:1e300,linear:2", "'conv:4:3:1:1e300'", "padding must be an integer in [0, "},
      {"in:3x8x8,conv:4:3:1:9007199254740994,linear:2", "'conv:4:3:1:9007199254740994'", "padding"},
      {"in:3x8x8,conv:4:3:1:1.5,linear:2", "'conv:4:3:1:1.5'", "padding must be an integer"},
      {"in:3x8x8,conv:4:3:1:nan,linear:2", "'conv:4:3:1:nan'", "padding"},
      // C·H·W overflowed.
      {"in:4000000000x4000000000x4000000000,linear:2", "'in:4000000000x4000000000x4000000000'", "overflows"},
      {"in:2x3037000500x3037000500,linear:2", "'in:2x3037000500x3037000500'", "overflows"},
      {"in:99999999999999999999x1x1,linear:2", "'in:99999999999999999999x1x1'", "bad image shape"},
      // Parameter counts and output shapes.
      {"in:4000000000,linear:4000000000", "'linear:4000000000'", "the parameter count overflows"},
      {"in:4000000000,triangular:4000000000", "'triangular:4000000000'", "the parameter count overflows"},
      {"in:8000000000,triangular:4000000000", "'triangular:4000000000'", "the parameter count overflows"},
      {"in:4000000000,orthogonal", "'orthogonal'", "the parameter count overflows"},
      {"in:4000000000,coupling:additive:4000000000", "'coupling:additive:4000000000'", "overflows"},
      {"in:1x1x1,conv:1:1:1:4000000000000000", "'conv:1:1:1:4000000000000000'", "the output size overflows"},
      {"in:4000000000x1x1,conv:4000000000:1", "'conv:4000000000:1'", "overflows"},
      {"in:1x3037000499x3037000499,conv_valid:4000000000:1", "'conv_valid:4000000000:1'",
       "the output size overflows"},
      {"in:1x3037000499x3037000499,pad_channels:3", "'pad_channels:3'", "the output size overflows"},
      {"in:2x3037000499x1,coupling:additive_conv:4000000000", "'coupling:additive_conv:4000000000'",
       "the hidden image size overflows"},
  };
  for (const auto& c : cases) {
    INFO(c.spec);
    const std::string msg = error(c.spec);
    INFO(msg);
    CHECK(msg.find(c.quoted) != std::string::npos);
    CHECK(msg.find(c.says) != std::string::npos);
  }
  // An integral real number is still a padding.
  const auto net = moonwalk::parse_network<float>("in:2x5x5,conv:3:3:1:1e0,linear:2", 0);
  const auto* conv = net[0].template target<moonwalk::Conv2d<float>>();
  REQUIRE(conv != nullptr);
  CHECK(conv->padding() == 1);
  CHECK(conv->out_shape() == moonwalk::ImageShape{3, 5, 5});
}

TEST_CASE("spec: ImageShape's size never wraps", "[tools][spec]") {
  const moonwalk::ImageShape big{4000000000, 4000000000, 4000000000};
  CHECK_FALSE(big.valid());
  CHECK_FALSE(big.checked_size().has_value());
  CHECK_THROWS_AS(big.size(), moonwalk::ShapeError);
  CHECK_THROWS_WITH(big.size(),
                    Catch::Contains("4000000000x4000000000x4000000000") && Catch::Contains("overflows"));
  const moonwalk::ImageShape fits{1, 3037000499, 3037000499};
  CHECK(fits.valid());
  CHECK(fits.size() == Index{3037000499} * Index{3037000499});
  CHECK(moonwalk::ImageShape{3, 4, 5}.size() == 60);
  CHECK_FALSE(moonwalk::ImageShape{0, 4, 5}.valid());
}

TEST_CASE("spec: a network that needs more memory than allowed is refused, saying how much",
          "[tools][spec]") {
  auto error = [](const std::string& spec, std::uint64_t limit, bool as_double = false) {
    try {
      if (as_double)
        (void)moonwalk::parse_network<double>(spec, 0, {.max_memory_bytes = limit});
      else
        (void)moonwalk::parse_network<float>(spec, 0, {.max_memory_bytes = limit});
    } catch (const moonwalk::SpecError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const std::uint64_t gib = std::uint64_t{1} << 30;
  // 100000 x 100000 + 100000 parameters, each with its gradient: 74.5 GiB in float, 149 GiB in double.
  const std::string f = error("in:100000,linear:100000", 16 * gib);
  INFO(f);
  CHECK_THAT(f, Catch::Contains("'linear:100000'") && Catch::Contains("74.5 GiB") &&
                    Catch::Contains("10000100000 parameters") && Catch::Contains("float") &&
                    Catch::Contains("limit of 16.0 GiB") && Catch::Contains("max_memory_bytes"));
  CHECK_THAT(error("in:100000,linear:100000", 16 * gib, true), Catch::Contains("149.0 GiB"));
  // The default limit is the machine's physical memory; 8 TB exceeds any.
  const std::string d = spec_error<float>("in:1000000,linear:1000000");
  INFO(d);
  CHECK_THAT(d, Catch::Contains("'linear:1000000'") && Catch::Contains("physical memory"));
  CHECK(moonwalk::spec::physical_memory_bytes() > 0);
  // Refused before allocating: under 64 MiB of address-space headroom, a SpecError, not bad_alloc.
  const auto status = moonwalk::test::run_with_memory_headroom(std::size_t{64} << 20, [] {
    try {
      (void)moonwalk::parse_network<float>("in:100000,linear:100000", 0, {.max_memory_bytes = 16 * gib});
    } catch (const moonwalk::SpecError&) {
      return 0;
    } catch (const std::bad_alloc&) {
      return 1;
    }
    return 3;
  });
  if (status)
    CHECK(*status == 0);
  else
    WARN("memory-limited run skipped (sanitizer build)");
  // Widths alone count too: one sample through pad:10^15 is 3.6 PiB.
  CHECK_THAT(error("in:4,pad:1000000000000000,linear:2", 0),
             Catch::Contains("'pad:1000000000000000'") && Catch::Contains("PiB"));
  CHECK_THAT(error("in:100000,orthogonal", gib), Catch::Contains("'orthogonal'"));
  CHECK_THAT(error("in:64,coupling:additive:100000000", gib),
             Catch::Contains("'coupling:additive:100000000'"));

  // The rule is exact: sizeof(S) · (2 · parameters + activations per sample), checked at its boundary.
  const struct {
    const char* spec;
    Index activations;  // the input, every layer's output, coupling branches' hidden widths
  } exact[] = {
      {"in:10,linear:10", 10 + 10},
      {"in:6,coupling:additive:5,tanh", 6 + 4 * 5 + 6 + 6},
      {"in:6,orthogonal", 6 + 6},
      {"in:2x5x5,conv:3:3:1:1,conv_valid:2:2", 50 + 75 + 32},
      {"in:4x3x3,coupling:additive_conv:2", 36 + 4 * (2 * 9) + 36},
      {"in:1x4x4,pad_channels:3,triangular:40", 16 + 48 + 40},
  };
  for (const auto& e : exact) {
    INFO(e.spec);
    const auto net = moonwalk::parse_network<double>(e.spec, 0);
    const Index params = moonwalk::num_parameters(net);
    const auto need = static_cast<std::uint64_t>(8 * (2 * params + e.activations));
    CHECK(error(e.spec, need, true).empty());
    CHECK_THAT(error(e.spec, need - 1, true),
               Catch::Contains("needs ") && Catch::Contains("more than the limit"));
  }
}

namespace {
/// ‖W‖₂ of the Linear behind an AnyLayer (0 for another layer).
double spectral_norm_of(const moonwalk::AnyLayer<double>& l) {
  const auto* lin = l.target<moonwalk::Linear<double>>();
  return lin ? Eigen::JacobiSVD<moonwalk::Matrix<double>>(moonwalk::Matrix<double>(lin->W()))
                   .singularValues()(0)
             : 0.0;
}
}  // namespace

TEST_CASE("residual spec token with LIP: every Linear of F within the limit after each optimizer step",
          "[layers][residual]") {
  auto net = moonwalk::parse_network<double>("in:6,residual:10:leaky_relu:4:0.8,linear:3", 2);
  const auto* block = net[0].target<moonwalk::Residual<moonwalk::Network<double>>>();
  REQUIRE(block != nullptr);
  auto norms = [&] {
    std::vector<double> v;
    for (std::size_t i = 0; i < block->inner().size(); ++i)
      block->inner().visit(i, [&](const auto& l) {
        if (const double s = spectral_norm_of(l); s > 0) v.push_back(s);
      });
    return v;
  };
  REQUIRE(norms().size() == 2);
  for (const double s : norms()) CHECK(s <= 0.8 * (1 + 1e-6));
  moonwalk::Sgd<double> sgd{.lr = 5};
  const moonwalk::Matrix<double> x = moonwalk::gaussian<double>(6, 16, 1),
                                 t = moonwalk::gaussian<double>(3, 16, 2);
  for (int step = 0; step < 3; ++step) {
    (void)moonwalk::gradient(moonwalk::Backprop{}, net, x, moonwalk::MSE<double>{}, t);
    sgd.step(net);
    for (const double s : norms()) CHECK(s <= 0.8 * (1 + 1e-3));
  }
  // Mixed Moonwalk's vijp through the block holds the tolerance against backprop.
  const auto ref = moonwalk::gradient(moonwalk::Backprop{}, net, x, moonwalk::MSE<double>{}, t);
  const auto mixed = moonwalk::gradient(moonwalk::MixedMoonwalk{}, net, x, moonwalk::MSE<double>{}, t);
  CHECK(moonwalk::testing::rel_err(mixed.gradient, ref.gradient) < 1e-9);
  CHECK_THROWS_WITH(moonwalk::parse_network<double>("in:6,residual:10:tanh:0.5:1.5", 1),
                    Catch::Contains("LIP") && Catch::Contains("1.5"));
}
