// Moonwalk — flat views of a network's parameters and gradients, so
// optimizers, finite differences and serialization need no per-layer code.
#pragma once

#include <algorithm>
#include <cmath>
#include <sstream>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/nets/network.hpp"

namespace moonwalk {

/// Total parameter count P.
template <Net N>
Index num_parameters(const N& net) {
  Index p = 0;
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](const auto& l) { p += l.num_params(); });
  return p;
}

/// θ as one vector of length P, layer by layer.
template <Net N>
Vector<typename N::scalar_type> get_parameters(const N& net) {
  Vector<typename N::scalar_type> v(num_parameters(net));
  Index o = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      for (auto s : parameter_blocks(l)) {
        std::copy(s.begin(), s.end(), v.data() + o);
        o += static_cast<Index>(s.size());
      }
    });
  return v;
}

/// Every parameter of `net` is finite (no NaN, no infinity).
template <Net N>
bool parameters_finite(const N& net) {
  bool finite = true;
  for (std::size_t i = 0; i < net.size() && finite; ++i)
    net.visit(i, [&](const auto& l) {
      for (auto s : parameter_blocks(l))
        finite = finite && std::all_of(s.begin(), s.end(), [](auto v) { return std::isfinite(v); });
    });
  return finite;
}

/// Whether every layer's stored ∂ℓ/∂θ is finite.
template <Net N>
bool gradients_finite(const N& net) {
  bool finite = true;
  for (std::size_t i = 0; i < net.size() && finite; ++i)
    net.visit(i, [&](const auto& l) {
      for (auto s : gradient_blocks(l))
        finite = finite && std::all_of(s.begin(), s.end(), [](auto v) { return std::isfinite(v); });
    });
  return finite;
}

/// Writes θ from one vector of length P (throws ShapeError otherwise).
template <Net N>
void set_parameters(N& net, const CVecRef<typename N::scalar_type>& v) {
  if (v.size() != num_parameters(net)) {
    std::ostringstream s;
    s << "set_parameters: vector has " << v.size() << " entries, network has " << num_parameters(net)
      << " parameters";
    throw ShapeError(s.str());
  }
  Index o = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto s : parameter_blocks(l)) {
        std::copy(v.data() + o, v.data() + o + static_cast<Index>(s.size()), s.begin());
        o += static_cast<Index>(s.size());
      }
    });
}

/// The layers' buffers (core/step.hpp: BatchNorm's running statistics) as one
/// vector, layer by layer: what a checkpoint saves next to θ.
template <Net N>
Vector<double> get_buffers(N& net) {
  const auto spans = moonwalk::buffers(net);
  Index n = 0;
  for (const auto& s : spans) n += static_cast<Index>(s.size());
  Vector<double> v(n);
  Index o = 0;
  for (const auto& s : spans) {
    std::copy(s.begin(), s.end(), v.data() + o);
    o += static_cast<Index>(s.size());
  }
  return v;
}

/// Writes the layers' buffers from one vector laid out as get_buffers'
/// (throws ShapeError naming both lengths otherwise).
template <Net N>
void set_buffers(N& net, const CVecRef<double>& v) {
  const auto spans = moonwalk::buffers(net);
  Index n = 0;
  for (const auto& s : spans) n += static_cast<Index>(s.size());
  if (v.size() != n) {
    std::ostringstream m;
    m << "set_buffers: vector has " << v.size() << " entries, the network's layers hold " << n
      << " buffer values";
    throw ShapeError(m.str());
  }
  Index o = 0;
  for (const auto& s : spans) {
    std::copy(v.data() + o, v.data() + o + static_cast<Index>(s.size()), s.begin());
    o += static_cast<Index>(s.size());
  }
}

/// ∂ℓ/∂θ written into v, resized to length P (no allocation when it has that length).
template <Net N>
void gradients_into(const N& net, Vector<typename N::scalar_type>& v) {
  const Index p = num_parameters(net);
  if (v.size() != p) v.resize(p);
  Index o = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      for (auto s : gradient_blocks(l)) {
        std::copy(s.begin(), s.end(), v.data() + o);
        o += static_cast<Index>(s.size());
      }
    });
}

/// ∂ℓ/∂θ as one vector of length P.
template <Net N>
Vector<typename N::scalar_type> get_gradients(const N& net) {
  Vector<typename N::scalar_type> v;
  gradients_into(net, v);
  return v;
}

/// Sets every layer's gradient storage to zero.
template <Net N>
void zero_gradients(N& net) {
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto s : gradient_blocks(l)) std::fill(s.begin(), s.end(), typename N::scalar_type(0));
    });
}

/// Offsets of each layer's block in the flat vector (size L + 1).
template <Net N>
std::vector<Index> parameter_offsets(const N& net) {
  std::vector<Index> o{0};
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) { o.push_back(o.back() + l.num_params()); });
  return o;
}

}  // namespace moonwalk
