// Spec-string parser: every token parses, widths chain, seeds are
// deterministic, and every kind of bad spec throws SpecError quoting the token.
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/spec.hpp>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

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

TEST_CASE("spec: the grammar table holds exactly the documented layers", "[tools][spec]") {
  std::set<std::string> names;
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    names.insert(name);
    CHECK(rule.syntax.rfind(name, 0) == 0);  // the syntax starts with the name
    CHECK(static_cast<bool>(rule.build));
  }
  CHECK(names == std::set<std::string>{"linear", "leaky_relu", "relu", "tanh", "sigmoid", "softplus", "elu",
                                       "pad", "coupling", "identity"});
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
