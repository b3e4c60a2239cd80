// Moonwalk — static composition: a variadic chain of layers known at compile time.
#pragma once

#include <cstddef>
#include <sstream>
#include <tuple>
#include <utility>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/nets/chain.hpp"

namespace moonwalk {

/// x_i = f_i(x_{i−1}), i = 1..L, with the layer types fixed at compile time.
/// Schedules walk it through `visit(i, f)`, which calls `f` with the i-th
/// layer's concrete type (no virtual calls, no type erasure). A Sequential
/// is itself a Layer (e.g. a coupling block's branch).
namespace detail {
template <class... Ls>
using first_scalar = typename std::tuple_element_t<0, std::tuple<Ls...>>::scalar_type;
}  // namespace detail

template <Layer... Ls>
class Sequential : public ChainLayer<Sequential<Ls...>, detail::first_scalar<Ls...>> {
  static_assert(sizeof...(Ls) > 0, "Moonwalk: a Sequential needs at least one layer");

 public:
  using scalar_type = typename std::tuple_element_t<0, std::tuple<Ls...>>::scalar_type;
  static_assert((std::is_same_v<typename Ls::scalar_type, scalar_type> && ...),
                "Moonwalk: every layer of a Sequential must have the same scalar type");
  static constexpr bool is_static = true;

  explicit Sequential(Ls... layers) : layers_(std::move(layers)...) { check_chain(); }

  [[nodiscard]] static constexpr std::size_t size() { return sizeof...(Ls); }
  [[nodiscard]] Index in_features() const { return std::get<0>(layers_).in_features(); }
  [[nodiscard]] Index out_features() const { return std::get<sizeof...(Ls) - 1>(layers_).out_features(); }

  template <std::size_t I>
  auto& layer() {
    return std::get<I>(layers_);
  }
  template <std::size_t I>
  const auto& layer() const {
    return std::get<I>(layers_);
  }

  /// Calls f(layer_i) with the layer's concrete type.
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) {
    return visit_impl(*this, i, std::forward<F>(f), std::index_sequence_for<Ls...>{});
  }
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) const {
    return visit_impl(*this, i, std::forward<F>(f), std::index_sequence_for<Ls...>{});
  }

  /// True when every layer type satisfies the predicate concept.
  template <template <class> class Pred>
  static constexpr bool all_layers = (Pred<Ls>::value && ...);

  static constexpr const char* chain_kind = "sequential";

  /// The same chain in scalar type T: every layer cast (a copy when T is the scalar type).
  template <class T>
  requires(std::is_same_v<T, scalar_type> || (CastableTo<Ls, T> && ...)) [[nodiscard]] auto cast() const {
    if constexpr (std::is_same_v<T, scalar_type>) {
      return *this;
    } else {
      return std::apply(
          [](const auto&... l) {
            return Sequential<decltype(l.template cast<T>())...>(l.template cast<T>()...);
          },
          layers_);
    }
  }

 private:
  template <class Self, class F, std::size_t... I>
  static decltype(auto) visit_impl(Self& self, std::size_t i, F&& f, std::index_sequence<I...>) {
    using R = decltype(f(std::get<0>(self.layers_)));
    if constexpr (std::is_void_v<R>) {
      ((i == I ? (void)f(std::get<I>(self.layers_)) : (void)0), ...);
    } else {
      R out{};
      ((i == I ? (void)(out = f(std::get<I>(self.layers_))) : (void)0), ...);
      return out;
    }
  }

  void check_chain() const {
    for (std::size_t i = 1; i < size(); ++i) {
      Index prev_out = 0, in = 0;
      std::string prev_name, name;
      visit(i - 1, [&](const auto& l) {
        prev_out = l.out_features();
        prev_name = l.name();
      });
      visit(i, [&](const auto& l) {
        in = l.in_features();
        name = l.name();
      });
      if (prev_out != in) {
        std::ostringstream s;
        s << "Sequential: layer " << i - 1 << " " << prev_name << " outputs " << prev_out
          << " features but layer " << i << " " << name << " expects " << in;
        throw ShapeError(s.str());
      }
    }
  }

  std::tuple<Ls...> layers_;
};

}  // namespace moonwalk
