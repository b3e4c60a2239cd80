// Moonwalk — spec strings: a runtime Network<S> from one line of text.
//
// Grammar (whitespace around tokens and arguments is ignored):
//
//   spec    := "in:" N ( "," layer )+
//   layer   := NAME ( ":" ARG )*
//
// N and every width are positive integers (at most 2^63 − 1); every product
// of widths (C·H·W, a layer's parameter count, an output shape) is computed
// with overflow checks, and every other number is range-checked before it is
// converted (padding: an integer in [0, 2^53]).
//
// The layer tokens are the entries of `spec_layers<S>()` (spec::layers, the
// only place that knows them): each gives its syntax, what it builds, example
// specs and its builder. `moonwalk-gradcheck --help` lists them, and the
// token table of docs/gradcheck.md and the README's token list are generated
// from it (`spec::grammar_markdown`, `spec::grammar_list`;
// tools/update_grammar_docs.sh BUILD_DIR rewrites them, a test checks them).
//
// Images (core/image.hpp: one column per sample, channel-major C×H×W). A spec
// that starts with `in:CxHxW` carries an image shape from token to token;
// activations keep it, an image layer needs it (a SpecError otherwise) and
// sets the next one, and a token that changes the width otherwise ends it.
//
// Options (`parse_network<S>(spec, seed, SpecOptions{...})`; the two-argument
// form uses the defaults):
//
//   init = Init::orthogonal | Init::gaussian   how every Linear's W starts,
//          including coupling branches (Linear<S>::Options::init). The
//          `orthogonal` token ignores it: its Q is orthogonal by construction.
//   max_memory_bytes = 0     the memory a network may need (0: the machine's
//          physical memory, sysconf(_SC_PHYS_PAGES) · _SC_PAGE_SIZE, or no
//          limit where that is unknown; UINT64_MAX: no limit). See Memory below.
//
// Memory: a network is refused with a SpecError, before its layer is
// allocated, when sizeof(S) · (2 · P + A) exceeds the limit, P being the
// parameters up to and including the token (each stored with its gradient)
// and A the numbers one sample's activations take (the input and every
// layer's output, coupling branches' hidden widths included). The message
// quotes the token and says how much memory the network needs, e.g.
// `in:100000,linear:100000` in float: 10000100000 parameters, 74.5 GiB. (A
// batch of B samples needs B · A · sizeof(S) more while it runs.)
//
// Seeds (deterministic): the tokens are numbered from 0 in the order they
// appear, `in:N` being token 0, so the first layer is token 1. The layer
// built from token k gets the seed `seed * 1000003 + k` (unsigned 64-bit,
// wrapping), so the same spec and seed always give the same parameters, and
// two layers of one network never share a seed.
//
// Adding a layer: one `{name, {syntax, doc, examples, builder}}` entry in
// `spec_layers<S>()`; the builder gets the current width (or image shape),
// the token's arguments (with checked accessors that throw SpecError quoting
// the token), the token's seed and the SpecOptions.
//
// Every malformed spec throws SpecError; its message quotes the offending
// token and says what is wrong (unknown layer, bad number, missing in:N,
// wrong number of arguments, non-positive width, slope or alpha ≤ 0 or not
// representable in S, empty token, a size that overflows, a network that
// needs more memory than allowed). A moonwalk::Error thrown by a layer's
// constructor is re-thrown as a SpecError quoting the token.
#pragma once

#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/image.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/activations.hpp"
#include "moonwalk/layers/conv.hpp"
#include "moonwalk/layers/conv_valid.hpp"
#include "moonwalk/layers/coupling.hpp"
#include "moonwalk/layers/dropout.hpp"
#include "moonwalk/layers/image.hpp"
#include "moonwalk/layers/linear.hpp"
#include "moonwalk/layers/normalization.hpp"
#include "moonwalk/layers/orthogonal.hpp"
#include "moonwalk/layers/pad.hpp"
#include "moonwalk/layers/residual.hpp"
#include "moonwalk/layers/triangular.hpp"
#include "moonwalk/nets/any_layer.hpp"
#include "moonwalk/nets/network.hpp"

namespace moonwalk {

/// A malformed network spec string; the message quotes the bad token.
class SpecError : public Error {
 public:
  using Error::Error;
};

/// Network-wide choices of a spec (see spec.hpp's header comment).
struct SpecOptions {
  /// How every Linear's W starts (coupling branches included).
  Init init = Init::orthogonal;
  /// Largest memory a network may need, in bytes (rule: spec.hpp's header
  /// comment); 0 = the machine's physical memory, the largest uint64 = no limit.
  std::uint64_t max_memory_bytes = 0;
};

namespace spec {

/// The machine's physical memory in bytes, or the largest uint64 where unknown.
inline std::uint64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  std::uint64_t r = 0;
  if (pages > 0 && page > 0 &&
      !__builtin_mul_overflow(static_cast<std::uint64_t>(pages), static_cast<std::uint64_t>(page), &r))
    return r;
#endif
  return std::numeric_limits<std::uint64_t>::max();
}

/// "74.5 GiB" (or "512 bytes", "3.2 KiB", …).
inline std::string human_bytes(long double b) {
  const char* unit[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"};
  int u = 0;
  while (b >= 1024 && u < 8) b /= 1024, ++u;
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(u == 0 ? 0 : 1);
  s << b << " " << unit[u];
  return s.str();
}

/// What a network parsed so far needs (see the Memory rule in the header
/// comment), in numbers of S; checked against a limit in bytes.
struct Budget {
  std::size_t scalar_bytes = sizeof(double);
  const char* scalar_name = "double";
  std::uint64_t limit = std::numeric_limits<std::uint64_t>::max();
  bool limit_is_physical = true;
  long double parameters = 0, activations = 0;  // exact far beyond any limit (64-bit mantissa)

  [[nodiscard]] long double bytes() const {
    return static_cast<long double>(scalar_bytes) * (2 * parameters + activations);
  }
};

/// One comma-separated token, split at ':' (name first), with checked
/// accessors for its arguments. Every error it raises quotes the token.
class Token {
 public:
  Token(const std::string& text, std::size_t index) : text_(trim(text)), index_(index) {
    std::size_t start = 0;
    while (true) {
      const std::size_t colon = text_.find(':', start);
      std::string part = trim(text_.substr(start, colon == std::string::npos ? colon : colon - start));
      if (start == 0)
        name_ = std::move(part);
      else
        args_.push_back(std::move(part));
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
  }

  [[nodiscard]] const std::string& text() const { return text_; }
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] std::size_t index() const { return index_; }
  [[nodiscard]] const std::vector<std::string>& args() const { return args_; }
  [[nodiscard]] std::size_t arity() const { return args_.size(); }

  /// Throws SpecError `token k 'text': what`.
  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream s;
    s << "bad network spec: token " << index_ << " '" << text_ << "': " << what;
    throw SpecError(s.str());
  }

  /// Requires between `lo` and `hi` arguments; `syntax` is shown in the message.
  void expect_arity(std::size_t lo, std::size_t hi, const std::string& syntax) const {
    if (args_.size() >= lo && args_.size() <= hi) return;
    std::ostringstream s;
    s << "wrong number of arguments for '" << name_ << "' (got " << args_.size() << ", expected ";
    if (lo == hi)
      s << lo;
    else
      s << lo << " to " << hi;
    s << "; syntax " << syntax << ")";
    fail(s.str());
  }

  /// Argument k as a positive integer width.
  [[nodiscard]] Index width(std::size_t k, const char* what) const {
    const std::string& a = arg(k);
    Index v = 0;
    const char* first = a.data();
    const char* last = a.data() + a.size();
    const auto [p, ec] = std::from_chars(first, last, v);
    if (a.empty() || ec != std::errc() || p != last) fail(bad_number(a, what, "an integer"));
    if (v <= 0) {
      std::ostringstream s;
      s << "non-positive " << what << " " << v << " (must be a positive integer)";
      fail(s.str());
    }
    return v;
  }

  /// Argument k as a finite real number, or `fallback` when the token has
  /// fewer than k + 1 arguments.
  [[nodiscard]] double number(std::size_t k, const char* what, double fallback) const {
    if (k >= args_.size()) return fallback;
    const std::string& a = arg(k);
    double v = 0;
    const char* first = a.data();
    const char* last = a.data() + a.size();
    const auto [p, ec] = std::from_chars(first, last, v);
    if (a.empty() || ec != std::errc() || p != last || !std::isfinite(v))
      fail(bad_number(a, what, "a finite real number"));
    return v;
  }

  /// Argument k (or `fallback`) as an integer in [lo, hi] (written as an
  /// integer or an integral real number, e.g. 1 or 1e2); range-checked before
  /// it is converted, so 1e300 is an error, not an overflow.
  [[nodiscard]] Index integer(std::size_t k, const char* what, Index fallback, Index lo, Index hi) const {
    if (k >= args_.size()) return fallback;
    const double v = number(k, what, static_cast<double>(fallback));
    if (!(v >= static_cast<double>(lo) && v <= static_cast<double>(hi)) || v != std::floor(v))
      fail(detail::cat(what, " must be an integer in [", lo, ", ", hi, "], got ", args_[k]));
    return static_cast<Index>(v);
  }

  /// a · b (a product of sizes); SpecError naming `what` when it overflows.
  [[nodiscard]] Index mul(Index a, Index b, const char* what = "a size") const {
    const auto r = detail::checked_mul(a, b);
    if (!r) fail(detail::cat(what, " overflows: ", a, " x ", b, " is more than 2^63 - 1"));
    return *r;
  }
  /// a + b; SpecError naming `what` when it overflows.
  [[nodiscard]] Index add(Index a, Index b, const char* what = "a size") const {
    const auto r = detail::checked_add(a, b);
    if (!r) fail(detail::cat(what, " overflows: ", a, " + ", b, " is more than 2^63 - 1"));
    return *r;
  }
  /// The product of `factors`, checked (see mul).
  [[nodiscard]] Index product(std::initializer_list<Index> factors, const char* what = "a size") const {
    Index r = 1;
    for (Index f : factors) r = mul(r, f, what);
    return r;
  }

  /// Counts `params` parameters and `activations` numbers per sample against
  /// the memory budget (when the token has one: the tokens of a spec do), and
  /// throws SpecError saying how much memory the network needs when it is
  /// over the limit. Builders call it before they allocate.
  void charge(Index params, Index activations = 0) const {
    if (!budget_) return;
    budget_->parameters += static_cast<long double>(params);
    budget_->activations += static_cast<long double>(activations);
    const long double need = budget_->bytes();
    if (budget_->limit == std::numeric_limits<std::uint64_t>::max() ||
        need <= static_cast<long double>(budget_->limit))
      return;
    std::ostringstream s;
    s.precision(20);
    s << "the network needs " << human_bytes(need) << " up to here (" << budget_->parameters
      << " parameters with their gradients, and " << budget_->activations << " activations per sample, in "
      << budget_->scalar_name << ", " << budget_->scalar_bytes << " bytes each), more than the limit of "
      << human_bytes(static_cast<long double>(budget_->limit))
      << (budget_->limit_is_physical ? " (physical memory; SpecOptions::max_memory_bytes sets another)"
                                     : " (SpecOptions::max_memory_bytes)");
    fail(s.str());
  }
  /// Makes charge() count against `b` (parse_network gives every token the network's budget).
  void set_budget(Budget* b) { budget_ = b; }

  /// Argument k (or `fallback`) as a value of type S that must be finite and
  /// > 0 once rounded to S (`what` names it in the message).
  template <class S>
  [[nodiscard]] S positive(std::size_t k, const char* what, double fallback) const {
    const double v = number(k, what, fallback);
    // Range-checked before the conversion (a double beyond S's range does not convert).
    const bool fits = std::abs(v) <= static_cast<double>(std::numeric_limits<S>::max());
    const S r = fits ? static_cast<S>(v) : std::numeric_limits<S>::infinity();
    if (!(v > 0) || !(r > S(0)) || !std::isfinite(r)) {
      std::ostringstream s;
      s << what << " must be > 0";
      if (v > 0) s << " and finite in " << (sizeof(S) == sizeof(float) ? "float" : "double");
      s << ", got " << (k < args_.size() ? args_[k] : std::to_string(fallback));
      fail(s.str());
    }
    return r;
  }

 private:
  static std::string trim(const std::string& s) {
    const auto b = s.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return {};
    const auto e = s.find_last_not_of(" \t\r\n");
    return s.substr(b, e - b + 1);
  }
  [[nodiscard]] const std::string& arg(std::size_t k) const {
    if (k >= args_.size()) fail("missing argument " + std::to_string(k + 1));
    return args_[k];
  }
  static std::string bad_number(const std::string& a, const char* what, const char* expected) {
    return std::string("bad number '") + a + "' for " + what + " (expected " + expected + ")";
  }

  std::string text_, name_;
  std::size_t index_;
  std::vector<std::string> args_;
  Budget* budget_ = nullptr;
};

/// Builds the layer of one token: (current width, token, token seed, options) -> layer.
template <class S>
using Builder = std::function<AnyLayer<S>(Index width, const Token& token, std::uint64_t seed,
                                          const SpecOptions& options)>;

/// An image layer and the image shape it gives.
template <class S>
struct BuiltImage {
  AnyLayer<S> layer;
  ImageShape out;
};

/// Builds the layer of an image token: (current image shape, token, token
/// seed, options) -> layer and its output shape.
template <class S>
using ImageBuilder = std::function<BuiltImage<S>(ImageShape in, const Token& token, std::uint64_t seed,
                                                 const SpecOptions& options)>;

/// One grammar entry, the single source of a token's parser, messages, docs
/// and tests:
/// - `syntax`: the token's form, e.g. `linear:OUT` (messages, `--help`, docs);
/// - `doc`: what it builds, one Markdown paragraph (docs/gradcheck.md's token
///   table is generated from it: `spec::grammar_markdown`);
/// - `examples`: whole specs using the token, which the tests run under every
///   schedule against finite differences (the docs show the first);
/// - `build` for a layer on features, `build_image` for one that needs an
///   image (an entry with both uses `build_image` while the features are an
///   image);
/// - `activation`: an elementwise activation without required arguments,
///   which coupling and residual blocks accept as their branches' ACT.
template <class S>
struct Rule {
  std::string syntax;
  std::string doc;
  std::vector<std::string> examples;
  Builder<S> build;
  ImageBuilder<S> build_image = {};
  bool activation = false;
};

/// An activation's entry (Rule::activation).
template <class S, class F>
Rule<S> activation_rule(std::string syntax, std::string doc, std::vector<std::string> examples, F&& f) {
  return Rule<S>{
      std::move(syntax), std::move(doc), std::move(examples), Builder<S>(std::forward<F>(f)), {}, true};
}

/// An image layer's entry: the builder gets the current image shape.
template <class S, class F>
Rule<S> image_rule(std::string syntax, std::string doc, std::vector<std::string> examples, F&& f) {
  return Rule<S>{std::move(syntax), std::move(doc), std::move(examples), nullptr,
                 ImageBuilder<S>(std::forward<F>(f))};
}

/// The entry of an argument-free image layer built as `L(in)`.
template <class S, class L>
Rule<S> shaped_rule(const std::string& name, std::string doc, std::vector<std::string> examples) {
  return image_rule<S>(name, std::move(doc), std::move(examples),
                       [name](ImageShape in, const Token& t, std::uint64_t, const SpecOptions&) {
                         t.expect_arity(0, 0, name);
                         L l(in);
                         const ImageShape out = l.out_shape();
                         return BuiltImage<S>{AnyLayer<S>(std::move(l)), out};
                       });
}

/// "CxHxW" as an image shape (every part a positive integer), or nullopt
/// when `text` does not look like one (no 'x' after a leading digit).
inline std::optional<ImageShape> parse_image_shape(const Token& t, const std::string& text) {
  if (text.empty() || text[0] < '0' || text[0] > '9' || text.find('x') == std::string::npos)
    return std::nullopt;
  Index part[3] = {0, 0, 0};
  std::size_t start = 0;
  for (int k = 0; k < 3; ++k) {
    const std::size_t x = text.find('x', start);
    if ((k < 2) != (x != std::string::npos)) t.fail("bad image shape '" + text + "' (expected CxHxW)");
    const std::string piece = text.substr(start, k < 2 ? x - start : std::string::npos);
    const char* last = piece.data() + piece.size();
    const auto r = std::from_chars(piece.data(), last, part[k]);
    if (piece.empty() || r.ec != std::errc() || r.ptr != last || part[k] <= 0)
      t.fail("bad image shape '" + text + "' (expected CxHxW, each a positive integer)");
    start = x + 1;
  }
  const ImageShape shape{part[0], part[1], part[2]};
  if (!shape.checked_size())
    t.fail("image shape '" + text + "' has more than 2^63 - 1 numbers (C x H x W overflows)");
  return shape;
}

template <class S>
std::string activations();

/// The rule of a block's branch activation: argument k of `t` (default tanh),
/// which must name an activation (Rule::activation).
template <class S>
const Rule<S>& branch_activation(const Token& t, std::size_t k);

/// A residual block's Lipschitz limit: argument k of `t` in [0, 1) (default 0: off).
inline double lipschitz_arg(const Token& t, std::size_t k) {
  const double c = t.number(k, "Lipschitz limit", 0);
  if (!(c >= 0 && c < 1))
    t.fail(detail::cat("the Lipschitz limit LIP must lie in [0, 1) (0: off), got ", t.args()[k]));
  return c;
}

/// The grammar: every layer a spec can name. Add a layer here, nowhere else.
template <class S>
const std::map<std::string, Rule<S>>& layers() {
  static const std::map<std::string, Rule<S>> table{
      {"linear",
       {"linear:OUT",
        "`Linear` (N → OUT), y = W x + b, b = 0; W (semi-)orthogonal by default, or N(0, 1/N) entries with "
        "`SpecOptions{.init = Init::gaussian}`. Submersive when OUT ≤ N, fragmental otherwise",
        {"in:4,linear:8,relu,linear:8,tanh,linear:3"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions& o) -> AnyLayer<S> {
          t.expect_arity(1, 1, "linear:OUT");
          typename Linear<S>::Options options;
          options.seed = seed;
          options.init = o.init;
          const Index out = t.width(0, "width");
          t.charge(t.add(t.mul(w, out, "the parameter count"), out, "the parameter count"));
          return Linear<S>(w, out, options);
        }}},
      {"orthogonal",
       {"orthogonal",
        "`OrthogonalLinear` (N → N): y = Q x + b with Q = (I + A)⁻¹(I − A), A = U − Uᵀ (Cayley), orthogonal "
        "for any parameters; b = 0. Submersive (vijp = Q h) and invertible",
        {"in:6,orthogonal,leaky_relu:0.2,orthogonal,tanh,linear:3"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(0, 0, "orthogonal");
          t.charge(t.add(t.mul(w, w - 1, "the parameter count") / 2, w));  // U packed, and b
          typename OrthogonalLinear<S>::Options options;
          options.seed = seed;
          return OrthogonalLinear<S>(w, options);
        }}},
      {"triangular",
       {"triangular:OUT",
        "`TriangularLinear` (N → OUT, OUT ≤ N): y = [U \\| V] x + b with U unit upper triangular (free "
        "strictly-upper part) and V free; vijp is one triangular solve, h_y = U⁻ᵀ h_x[0:OUT] (no "
        "factorisation). Submersive; invertible when square",
        {"in:8,triangular:6,tanh,triangular:6,leaky_relu:0.1,triangular:3"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(1, 1, "triangular:OUT");
          const Index out = t.width(0, "width");
          if (out > w)
            t.fail(detail::cat("triangular:OUT needs OUT <= the current width ", w, ", got ", out));
          // U packed (OUT(OUT − 1)/2), V (OUT x (width − OUT)) and b.
          t.charge(t.add(t.add(t.mul(out, out - 1, "the parameter count") / 2,
                               t.mul(out, w - out, "the parameter count")),
                         out));
          typename TriangularLinear<S>::Options options;
          options.seed = seed;
          return TriangularLinear<S>(w, out, options);
        }}},
      {"leaky_relu",
       activation_rule<S>("leaky_relu[:SLOPE]", "`LeakyReLU`, SLOPE finite and > 0 (default 0.01)",
                          {"in:6,linear:5,leaky_relu,linear:4,leaky_relu:0.2,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 1, "leaky_relu[:SLOPE]");
                            return LeakyReLU<S>(w, t.positive<S>(0, "leaky_relu slope", 0.01));
                          })},
      {"relu",
       activation_rule<S>("relu", "`ReLU` (fragmental: the cotangent of a dead unit is erased)",
                          {"in:6,linear:5,relu,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 0, "relu");
                            return ReLU<S>(w);
                          })},
      {"tanh",
       activation_rule<S>("tanh", "`Tanh`", {"in:6,linear:5,tanh,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 0, "tanh");
                            return Tanh<S>(w);
                          })},
      {"sigmoid",
       activation_rule<S>("sigmoid", "`Sigmoid`", {"in:6,linear:5,sigmoid,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 0, "sigmoid");
                            return Sigmoid<S>(w);
                          })},
      {"softplus",
       activation_rule<S>("softplus", "`Softplus`, log(1 + eˣ)", {"in:6,linear:5,softplus,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 0, "softplus");
                            return Softplus<S>(w);
                          })},
      {"elu",
       activation_rule<S>("elu[:ALPHA]", "`ELU`, ALPHA finite and > 0 (default 1)",
                          {"in:6,linear:5,elu,linear:4,elu:0.5,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 1, "elu[:ALPHA]");
                            return ELU<S>(w, rules::ELU<S>{t.positive<S>(0, "elu alpha", 1.0)});
                          })},
      {"identity",
       activation_rule<S>("identity", "`Identity`", {"in:6,linear:5,identity,linear:3"},
                          [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
                            t.expect_arity(0, 0, "identity");
                            return Identity<S>(w);
                          })},
      {"pad",
       {"pad:N",
        "`ZeroPad` (width → N ≥ width): zero rows appended; fragmental, invertible on its range",
        {"in:5,pad:8,coupling:additive:6,linear:3"},
        [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(1, 1, "pad:N");
          const Index n = t.width(0, "padded width");
          if (n < w) t.fail(detail::cat("pad:N must not shrink the width (", w, " -> ", n, ")"));
          return ZeroPad<S>(w, n);
        }}},
      {"batchnorm",
       {"batchnorm",
        "`BatchNorm` (`<moonwalk/layers/normalization.hpp>`): y = γ x̂ + β per feature, x̂ normalised over the "
        "batch (on an image: per channel over the batch and H·W, the image kept). Training mode uses the "
        "batch's statistics and folds them into the running ones once per training step; evaluation mode "
        "(`set_training(net, false)`) uses the running ones. Fragmental in training (two numbers per "
        "channel), submersive in evaluation",
        {"in:6,linear:8,batchnorm,leaky_relu:0.3,linear:3",
         "in:2x4x4,conv:3:3:1:1,batchnorm,tanh,flatten,linear:3"},
        [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(0, 0, "batchnorm");
          t.charge(t.mul(w, 2, "the parameter count"));
          return BatchNorm<S>(w);
        },
        // On an image: per channel, over the batch and the channel's H·W pixels.
        [](ImageShape in, const Token& t, std::uint64_t, const SpecOptions&) -> BuiltImage<S> {
          t.expect_arity(0, 0, "batchnorm");
          t.charge(t.mul(in.c, 2, "the parameter count"));
          return {AnyLayer<S>(BatchNorm<S>(in.c, t.mul(in.h, in.w))), in};
        }}},
      {"layernorm",
       {"layernorm",
        "`LayerNorm`: y = γ ⊙ x̂ + β, x̂ normalised per sample over its features; fragmental (two numbers per "
        "sample)",
        {"in:6,linear:8,layernorm,tanh,linear:3"},
        [](Index w, const Token& t, std::uint64_t, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(0, 0, "layernorm");
          if (w < 2) t.fail("layernorm needs at least 2 features");
          t.charge(t.mul(w, 2, "the parameter count"));
          return LayerNorm<S>(w);
        }}},
      {"dropout",
       {"dropout:P",
        "`Dropout` (`<moonwalk/layers/dropout.hpp>`), 0 ≤ P < 1: inverted dropout whose mask is replayed "
        "from "
        "(token seed, training step) in every pass, never stored; fragmental in training (the dropped "
        "coordinates), the identity in evaluation",
        {"in:6,linear:8,dropout:0.25,tanh,linear:3"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions&) -> AnyLayer<S> {
          t.expect_arity(1, 1, "dropout:P");
          const double p = t.number(0, "drop probability", 0);
          if (!(p >= 0 && p < 1)) t.fail(detail::cat("dropout:P needs 0 <= P < 1, got ", t.args()[0]));
          return Dropout<S>(w, p, seed);
        }}},
      {"coupling",
       {"coupling:KIND:HIDDEN[:ACT[:SCALE]]",
        "`AdditiveCoupling` (KIND `additive`) or `AffineCoupling` (KIND `affine`) over halves n1 = width/2, "
        "n2 = width − n1; F: n2 → n1 and G: n1 → n2 are `linear:HIDDEN, ACT, linear:half` (ACT an activation "
        "token, default `tanh`; SCALE the gain of each branch's last Linear, default 1; the branch Linears "
        "follow `SpecOptions::init`); on an image it acts on the C·H·W features and keeps the shape. KIND "
        "`additive_conv` (images only) couples channel halves (the first C/2 channels are x1): F and G are "
        "`conv:HIDDEN:3:1:1, ACT, conv:half:3:1:1`, SCALE the gain of the last conv",
        {"in:5,pad:8,coupling:additive:6,leaky_relu:0.3,coupling:affine:6:elu,coupling:additive:4:tanh:0.5,"
         "linear:3",
         "in:2x6x4,pad_channels:4,coupling:additive_conv:4:softplus:0.5,squeeze,coupling:affine:5,flatten,"
         "linear:2"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions& o) -> AnyLayer<S> {
          t.expect_arity(2, 4, "coupling:KIND:HIDDEN[:ACT[:SCALE]]");
          const std::string& kind = t.args()[0];
          if (kind == "additive_conv")
            t.fail("coupling:additive_conv needs an image input (start the spec with in:CxHxW)");
          if (kind != "additive" && kind != "affine")
            t.fail("unknown coupling kind '" + kind + "' (expected additive, affine or additive_conv)");
          if (w < 2) t.fail("a coupling block needs at least 2 features");
          const Index hidden = t.width(1, "hidden width");
          const std::string act = t.args().size() > 2 ? t.args()[2] : std::string("tanh");
          const S scale = t.positive<S>(3, "branch scale", 1.0);
          const auto& table = layers<S>();
          const auto it = table.find(act);
          if (it == table.end() || !it->second.activation)
            t.fail("unknown branch activation '" + act + "' (known: " + activations<S>() + ")");
          const Index n1 = w / 2, n2 = w - n1;
          // F: n2 -> HIDDEN -> n1 and G: n1 -> HIDDEN -> n2, each Linear with its bias:
          // 2·HIDDEN·width + 2·HIDDEN + width parameters; 2·HIDDEN activations per branch.
          const Index h2 = t.mul(hidden, 2, "the parameter count");
          t.charge(t.add(t.add(t.mul(h2, w, "the parameter count"), h2), w), t.mul(h2, 2));
          auto branch = [&](Index in, Index out, std::uint64_t s) {
            Network<S> b;
            b.add(Linear<S>(in, hidden, {.seed = s, .init = o.init}));
            b.add(it->second.build(hidden, Token(act, t.index()), s, o));
            b.add(Linear<S>(hidden, out, {.seed = s + 1, .gain = scale, .init = o.init}));
            return b;
          };
          Network<S> f = branch(n2, n1, seed * 4 + 1), g = branch(n1, n2, seed * 4 + 3);
          if (kind == "additive") return AdditiveCoupling<Network<S>, Network<S>>(std::move(f), std::move(g));
          return AffineCoupling<Network<S>, Network<S>>(std::move(f), std::move(g));
        },
        // On an image: additive_conv splits channels; the other kinds act on
        // the C·H·W features and keep the image shape.
        [](ImageShape in, const Token& t, std::uint64_t seed, const SpecOptions& o) -> BuiltImage<S> {
          t.expect_arity(2, 4, "coupling:KIND:HIDDEN[:ACT[:SCALE]]");
          if (t.args()[0] != "additive_conv")
            return {layers<S>().at("coupling").build(in.size(), t, seed, o), in};
          if (in.c < 2)
            t.fail(detail::cat("coupling:additive_conv needs at least 2 channels, got ", in.str()));
          const Index hidden = t.width(1, "hidden channels");
          const std::string act = t.args().size() > 2 ? t.args()[2] : std::string("tanh");
          const S scale = t.positive<S>(3, "branch scale", 1.0);
          const auto& table = layers<S>();
          const auto it = table.find(act);
          if (it == table.end() || !it->second.activation)
            t.fail("unknown branch activation '" + act + "' (known: " + activations<S>() + ")");
          const Index c1 = in.c / 2, c2 = in.c - c1;
          // Per branch 9·HIDDEN·C + HIDDEN + c_to parameters (C = c1 + c2), two HIDDEN x H x W activations.
          const Index h9c = t.product({hidden, 9, in.c}, "the parameter count");
          const Index mid = t.product({hidden, in.h, in.w}, "the hidden image size");
          t.charge(t.add(t.add(t.mul(h9c, 2), t.mul(hidden, 2)), in.c), t.mul(mid, 4));
          // conv(c_from → HIDDEN, 3×3, pad 1), ACT, conv(HIDDEN → c_to, 3×3, pad 1, gain SCALE)
          auto branch = [&](Index c_from, Index c_to, std::uint64_t s) {
            Network<S> b;
            Conv2d<S> first(ImageShape{c_from, in.h, in.w}, hidden, 3,
                            {.stride = 1,
                             .pad = 1,
                             .dilation = 1,
                             .bias = true,
                             .seed = s,
                             .gain = S(1),
                             .init = o.init});
            b.add(std::move(first));
            b.add(it->second.build(mid, Token(act, t.index()), s, o));
            b.add(Conv2d<S>(ImageShape{hidden, in.h, in.w}, c_to, 3,
                            {.stride = 1,
                             .pad = 1,
                             .dilation = 1,
                             .bias = true,
                             .seed = s + 1,
                             .gain = scale,
                             .init = o.init}));
            return b;
          };
          Network<S> f = branch(c2, c1, seed * 4 + 1), g = branch(c1, c2, seed * 4 + 3);
          return {AdditiveCoupling<Network<S>, Network<S>>(std::move(f), std::move(g)), in};
        }}},
      {"residual",
       {"residual:HIDDEN[:ACT[:SCALE[:LIP]]]",
        "`Residual` (`<moonwalk/layers/residual.hpp>`): y = x + F(x), F = `linear:HIDDEN, ACT, linear:width` "
        "with gain SCALE on the last Linear (default 0.5, so F starts a contraction). vjp h + J_Fᵀ h; vijp "
        "solves (I + J_Fᵀ) h_y = h_x by GMRES, inverse x + F(x) = y by Newton–GMRES (iterations in "
        "`stats.counts.solver_iterations`). Submersive and invertible while I + J_F is; on an image it acts "
        "on the C·H·W features. LIP in (0, 1): spectral normalisation, each Linear of F scaled back to "
        "‖W‖₂ ≤ LIP (power iteration) at construction and after every optimizer step, so F is a contraction "
        "and the vijp's amplification is bounded by (1 + c)/(1 − c) (default 0: off)",
        {"in:6,linear:6,residual:8,leaky_relu:0.5,residual:5:elu:0.3:0.5,layernorm,linear:3"},
        [](Index w, const Token& t, std::uint64_t seed, const SpecOptions& o) -> AnyLayer<S> {
          t.expect_arity(1, 4, "residual:HIDDEN[:ACT[:SCALE[:LIP]]]");
          const Index hidden = t.width(0, "hidden width");
          const auto& act = branch_activation<S>(t, 1);
          const S scale = t.positive<S>(2, "branch scale", 0.5);
          // F: linear:HIDDEN, ACT, linear:width with gain SCALE; 2·HIDDEN·width + HIDDEN + width parameters.
          t.charge(t.add(t.add(t.mul(t.mul(hidden, w, "the parameter count"), 2), hidden), w),
                   t.mul(hidden, 2));
          Network<S> f;
          f.add(Linear<S>(w, hidden, {.seed = seed * 4 + 1, .init = o.init}));
          f.add(act.build(hidden, Token(t.args().size() > 1 ? t.args()[1] : "tanh", t.index()), seed, o));
          f.add(Linear<S>(hidden, w, {.seed = seed * 4 + 2, .gain = scale, .init = o.init}));
          return Residual<Network<S>>(std::move(f), {.lipschitz = lipschitz_arg(t, 3)});
        },
        // On an image: acts on the C·H·W features and keeps the image shape.
        [](ImageShape in, const Token& t, std::uint64_t seed, const SpecOptions& o) -> BuiltImage<S> {
          return {layers<S>().at("residual").build(in.size(), t, seed, o), in};
        }}},
      {"residual_conv",
       image_rule<S>(
           "residual_conv:HIDDEN[:ACT[:SCALE[:LIP]]]",
           "`Residual` over F = `conv:HIDDEN:3:1:1, ACT, conv:C:3:1:1` (gain SCALE on the last conv, default "
           "0.5; LIP as for `residual`, on the convolutions); the image shape kept",
           {"in:2x4x4,residual_conv:3,tanh,residual_conv:2:softplus:0.5:0.5,flatten,linear:3"},
           [](ImageShape in, const Token& t, std::uint64_t seed, const SpecOptions& o) -> BuiltImage<S> {
             t.expect_arity(1, 4, "residual_conv:HIDDEN[:ACT[:SCALE[:LIP]]]");
             const Index hidden = t.width(0, "hidden channels");
             const auto& act = branch_activation<S>(t, 1);
             const S scale = t.positive<S>(2, "branch scale", 0.5);
             // F: conv(C → HIDDEN, 3×3, pad 1), ACT, conv(HIDDEN → C, 3×3, pad 1, gain SCALE).
             const Index h9c = t.product({hidden, 9, in.c}, "the parameter count");
             const Index mid = t.product({hidden, in.h, in.w}, "the hidden image size");
             t.charge(t.add(t.add(t.mul(h9c, 2), hidden), in.c), t.mul(mid, 2));
             Network<S> f;
             f.add(Conv2d<S>(in, hidden, 3,
                             {.stride = 1,
                              .pad = 1,
                              .dilation = 1,
                              .bias = true,
                              .seed = seed * 4 + 1,
                              .gain = S(1),
                              .init = o.init}));
             f.add(act.build(mid, Token(t.args().size() > 1 ? t.args()[1] : "tanh", t.index()), seed, o));
             f.add(Conv2d<S>(ImageShape{hidden, in.h, in.w}, in.c, 3,
                             {.stride = 1,
                              .pad = 1,
                              .dilation = 1,
                              .bias = true,
                              .seed = seed * 4 + 2,
                              .gain = scale,
                              .init = o.init}));
             return {AnyLayer<S>(Residual<Network<S>>(std::move(f), {.lipschitz = lipschitz_arg(t, 3)})), in};
           })},
      // ---- image layers (need an image shape: in:CxHxW)
      {"conv",
       image_rule<S>(
           "conv:COUT:K[:STRIDE[:PAD]]",
           "`Conv2d`: K×K kernels, stride (default 1), zero padding on every side (default 0), bias; im2col "
           "+ "
           "GEMM. Neither submersive nor fragmental (mixed Moonwalk anchors it; pure does not apply)",
           {"in:2x6x6,conv:3:3:1:1,tanh,conv:4:2:2,flatten,linear:3"},
           [](ImageShape in, const Token& t, std::uint64_t seed, const SpecOptions& o) -> BuiltImage<S> {
             t.expect_arity(2, 4, "conv:COUT:K[:STRIDE[:PAD]]");
             typename Conv2d<S>::Options opt;
             opt.seed = seed;
             opt.init = o.init;
             if (t.arity() > 2) opt.stride = t.width(2, "stride");
             opt.pad = t.integer(3, "padding", 0, 0, Index{1} << 53);
             const Index cout = t.width(0, "output channels"), k = t.width(1, "kernel size");
             // Conv2d's own size arithmetic, checked first.
             const Index ph = t.add(in.h, t.mul(2, opt.pad)), pw = t.add(in.w, t.mul(2, opt.pad));
             if (ph >= k && pw >= k)
               (void)t.product({cout, (ph - k) / opt.stride + 1, (pw - k) / opt.stride + 1},
                               "the output size");
             t.charge(t.add(t.product({cout, in.c, k, k}, "the parameter count"), cout));
             Conv2d<S> c(in, cout, k, opt);
             const ImageShape out = c.out_shape();
             return {AnyLayer<S>(std::move(c)), out};
           })},
      {"conv_valid",
       image_rule<S>(
           "conv_valid:COUT:K",
           "`ConvValid2d`: stride 1, no padding, COUT ≤ C and fewer numbers out than in; submersive (vijp by "
           "substitution over output positions), `RankError` when its first tap's C_out × C_in matrix is "
           "rank "
           "deficient",
           {"in:4x5x5,conv_valid:3:2,tanh,flatten,linear:3"},
           [](ImageShape in, const Token& t, std::uint64_t seed, const SpecOptions&) -> BuiltImage<S> {
             t.expect_arity(2, 2, "conv_valid:COUT:K");
             typename ConvValid2d<S>::Options opt;
             opt.seed = seed;
             const Index cout = t.width(0, "output channels"), k = t.width(1, "kernel size");
             if (in.h >= k && in.w >= k)
               (void)t.product({cout, in.h - k + 1, in.w - k + 1}, "the output size");
             t.charge(t.add(t.product({cout, in.c, k, k}, "the parameter count"), cout));
             ConvValid2d<S> c(in, cout, k, opt);
             const ImageShape out = c.out_shape();
             return {AnyLayer<S>(std::move(c)), out};
           })},
      {"squeeze", shaped_rule<S, SpaceToDepth<S>>(
                      "squeeze", "`SpaceToDepth` (factor 2): C×H×W → 4C×H/2×W/2, a permutation (invertible)",
                      {"in:2x4x4,squeeze,tanh,flatten,linear:3"})},
      {"avgpool", shaped_rule<S, AvgPool2d<S>>("avgpool", "`AvgPool2d`: 2×2 disjoint windows, submersive",
                                               {"in:2x4x4,avgpool,tanh,flatten,linear:3"})},
      {"gap", shaped_rule<S, GlobalAvgPool<S>>("gap", "`GlobalAvgPool`: C×H×W → C, submersive",
                                               {"in:3x4x4,gap,linear:2"})},
      {"flatten",
       shaped_rule<S, Flatten<S>>("flatten", "`Flatten`: the identity on the layout (C·H·W × 1 × 1)",
                                  {"in:2x2x2,flatten,linear:3"})},
      {"pad_channels",
       image_rule<S>("pad_channels:C",
                     "`PadChannels`: zero channels appended up to C; fragmental, invertible on its range",
                     {"in:2x4x4,pad_channels:4,coupling:additive_conv:4,gap,linear:3"},
                     [](ImageShape in, const Token& t, std::uint64_t, const SpecOptions&) -> BuiltImage<S> {
                       t.expect_arity(1, 1, "pad_channels:C");
                       const Index c = t.width(0, "channels");
                       (void)t.product({c, in.h, in.w}, "the output size");
                       PadChannels<S> l(in, c);
                       const ImageShape out = l.out_shape();
                       return {AnyLayer<S>(std::move(l)), out};
                     })},
  };
  return table;
}

/// "elu, identity, …" — the known layer names, for messages.
template <class S>
std::string known_layers() {
  std::string s;
  for (const auto& [name, rule] : layers<S>()) s += (s.empty() ? "" : ", ") + rule.syntax;
  return s;
}

/// The token table of docs/gradcheck.md, in Markdown: one row per grammar
/// entry (its syntax, its doc, whether it needs an image, its first example).
template <class S = double>
std::string grammar_markdown() {
  std::string s =
      "| token | layer | input | example |\n"
      "|---|---|---|---|\n"
      "| `in:N`, `in:CxHxW` | the input: N features, or a C×H×W image (channel-major); the first token, "
      "exactly once | | |\n";
  for (const auto& [name, rule] : layers<S>()) {
    const char* input = rule.build ? "any" : "image";
    s += "| `" + rule.syntax + "` | " + rule.doc + " | " + input + " | `" + rule.examples.front() + "` |\n";
  }
  return s;
}

/// The README's token list: "`avgpool`, `batchnorm`, …" (every entry's syntax).
template <class S = double>
std::string grammar_list() {
  std::string s;
  for (const auto& [name, rule] : layers<S>()) s += (s.empty() ? "`" : ", `") + rule.syntax + "`";
  return s + "\n";
}

/// "elu, identity, …" — the names a coupling branch accepts as ACT.
template <class S>
std::string activations() {
  std::string s;
  for (const auto& [name, rule] : layers<S>())
    if (rule.activation) s += (s.empty() ? "" : ", ") + name;
  return s;
}

/// (declared above the table)
template <class S>
const Rule<S>& branch_activation(const Token& t, std::size_t k) {
  const std::string act = t.args().size() > k ? t.args()[k] : std::string("tanh");
  const auto& table = layers<S>();
  const auto it = table.find(act);
  if (it == table.end() || !it->second.activation)
    t.fail("unknown branch activation '" + act + "' (known: " + activations<S>() + ")");
  return it->second;
}

/// The seed of the layer built from token `token_index` (see header comment).
inline std::uint64_t layer_seed(std::uint64_t seed, std::size_t token_index) {
  return seed * std::uint64_t{1000003} + static_cast<std::uint64_t>(token_index);
}

/// Splits a spec at ',' into tokens (numbered from 0); an empty token is an error.
inline std::vector<Token> tokenize(const std::string& spec) {
  std::vector<Token> tokens;
  std::size_t start = 0, index = 0;
  while (true) {
    const std::size_t comma = spec.find(',', start);
    const std::string text = spec.substr(start, comma == std::string::npos ? comma : comma - start);
    Token t(text, index);
    if (t.text().empty()) {
      if (spec.find_first_not_of(" \t\r\n") == std::string::npos)
        throw SpecError("bad network spec: empty spec (expected in:N,LAYER,...)");
      t.fail("empty token (two commas in a row, or a leading or trailing comma)");
    }
    if (t.name().empty()) t.fail("missing layer name before ':'");
    tokens.push_back(std::move(t));
    if (comma == std::string::npos) break;
    start = comma + 1;
    ++index;
  }
  return tokens;
}

}  // namespace spec

/// The grammar table (see spec.hpp's header comment).
template <class S>
const std::map<std::string, spec::Rule<S>>& spec_layers() {
  return spec::layers<S>();
}

/// Builds a runtime network from a spec string such as
/// `in:64,linear:48,leaky_relu:0.1,linear:10`; the layer from token k is
/// seeded with `seed * 1000003 + k` (token 0 is `in:N`), and `options`
/// applies network-wide (e.g. `{.init = Init::gaussian}`). Throws SpecError,
/// quoting the bad token, for any malformed spec.
template <class S>
Network<S> parse_network(const std::string& spec_string, std::uint64_t seed, const SpecOptions& options) {
  std::vector<spec::Token> tokens = spec::tokenize(spec_string);
  spec::Budget budget;
  budget.scalar_bytes = sizeof(S);
  budget.scalar_name = std::is_same_v<S, float> ? "float" : std::is_same_v<S, double> ? "double" : "S";
  budget.limit_is_physical = options.max_memory_bytes == 0;
  budget.limit = budget.limit_is_physical ? spec::physical_memory_bytes() : options.max_memory_bytes;
  for (spec::Token& t : tokens) t.set_budget(&budget);
  const spec::Token& head = tokens.front();
  if (head.name() != "in")
    head.fail("missing in:N (a spec starts with the input width, e.g. in:64,linear:10)");
  head.expect_arity(1, 1, "in:N");
  ImageShape image{};  // valid while the features are an image
  Index width = 0;
  if (const auto shape = spec::parse_image_shape(head, head.args()[0])) {
    image = *shape;
    width = image.size();
  } else {
    width = head.width(0, "input width");
  }
  if (tokens.size() == 1) head.fail("no layers after the input width");
  head.charge(0, width);

  Network<S> net;
  const auto& table = spec_layers<S>();
  for (std::size_t k = 1; k < tokens.size(); ++k) {
    const spec::Token& t = tokens[k];
    if (t.name() == "in") t.fail("in:N may only appear as the first token");
    const auto it = table.find(t.name());
    if (it == table.end())
      t.fail("unknown layer '" + t.name() + "' (known: in:N first, then " + spec::known_layers<S>() + ")");
    std::optional<AnyLayer<S>> layer;
    const std::uint64_t layer_seed = spec::layer_seed(seed, t.index());
    try {
      if (it->second.build_image && (image.valid() || !it->second.build)) {
        if (!image.valid())
          t.fail(detail::cat("'", t.name(), "' needs an image input (start the spec with in:CxHxW), but the ",
                             width, " features here are not an image"));
        spec::BuiltImage<S> b = it->second.build_image(image, t, layer_seed, options);
        image = b.out;
        layer.emplace(std::move(b.layer));
      } else {
        layer.emplace(it->second.build(width, t, layer_seed, options));
        // Elementwise layers keep the image; anything that changes the width ends it.
        if (layer->out_features() != width) image = ImageShape{};
      }
    } catch (const SpecError&) {
      throw;
    } catch (const Error& e) {  // a layer constructor refused its arguments
      t.fail(e.what());
    }
    width = layer->out_features();
    t.charge(0, width);
    net.add(std::move(*layer));
  }
  return net;
}

/// parse_network with the default SpecOptions (orthogonal Linear init).
template <class S>
Network<S> parse_network(const std::string& spec_string, std::uint64_t seed) {
  return parse_network<S>(spec_string, seed, SpecOptions{});
}

}  // namespace moonwalk
