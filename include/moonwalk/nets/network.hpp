// Moonwalk — runtime composition: a chain of type-erased layers.
#pragma once

#include <sstream>
#include <utility>
#include <vector>

#include "moonwalk/nets/any_layer.hpp"
#include "moonwalk/nets/chain.hpp"

namespace moonwalk {

/// x_i = f_i(x_{i−1}) with layers chosen at run time (e.g. from a spec
/// string). Same walking interface as `Sequential`, and likewise a Layer.
template <class S>
class Network : public ChainLayer<Network<S>, S> {
 public:
  using scalar_type = S;
  static constexpr bool is_static = false;

  Network() = default;

  /// Appends a layer; throws ShapeError naming both layers when widths do not chain.
  Network& add(AnyLayer<S> layer) {
    if (!layers_.empty() && layers_.back().out_features() != layer.in_features()) {
      std::ostringstream s;
      s << "Network: layer " << layers_.size() - 1 << " " << layers_.back().name() << " outputs "
        << layers_.back().out_features() << " features but layer " << layers_.size() << " " << layer.name()
        << " expects " << layer.in_features();
      throw ShapeError(s.str());
    }
    layers_.push_back(std::move(layer));
    return *this;
  }

  [[nodiscard]] std::size_t size() const { return layers_.size(); }
  [[nodiscard]] bool empty() const { return layers_.empty(); }
  [[nodiscard]] Index in_features() const { return nonempty().front().in_features(); }
  [[nodiscard]] Index out_features() const { return nonempty().back().out_features(); }
  AnyLayer<S>& operator[](std::size_t i) { return layers_[i]; }
  const AnyLayer<S>& operator[](std::size_t i) const { return layers_[i]; }

  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) {
    return std::forward<F>(f)(layers_[i]);
  }
  template <class F>
  decltype(auto) visit(std::size_t i, F&& f) const {
    return std::forward<F>(f)(layers_[i]);
  }

  static constexpr const char* chain_kind = "network";

  /// The same network in scalar type T, layer by layer (AnyLayer::cast;
  /// throws ScheduleError naming a layer that offers no cast).
  template <class T>
  [[nodiscard]] Network<T> cast() const {
    Network<T> out;
    for (const auto& l : layers_) out.add(l.template cast<T>());
    return out;
  }

 private:
  const std::vector<AnyLayer<S>>& nonempty() const {
    if (layers_.empty()) throw ShapeError("Network: empty network has no input or output width");
    return layers_;
  }
  std::vector<AnyLayer<S>> layers_;
};

/// A network walkable by schedules: Sequential or Network.
template <class N>
concept Net = requires(N& n, const N& cn) {
  typename N::scalar_type;
  { cn.size() } -> std::convertible_to<std::size_t>;
  { cn.in_features() } -> std::convertible_to<Index>;
  { N::is_static } -> std::convertible_to<bool>;
};

}  // namespace moonwalk
