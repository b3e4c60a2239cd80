// Moonwalk — what the Moonwalk schedules share: anchors, sweep modes, casts to double.
#pragma once

#include <algorithm>
#include <any>
#include <cstdint>
#include <sstream>
#include <type_traits>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Which layers keep their output cotangent h_i as an anchor in the reverse
/// pass: every k-th layer and/or an explicit list (0-based layer indices).
/// Layers that are neither submersive nor fragmental are anchored whatever
/// this says. The tolerance-driven policy builds on this mechanism.
struct Anchors {
  std::size_t every = 0;          ///< 0: none; k: layers k−1, 2k−1, … (not the last)
  std::vector<std::size_t> at{};  ///< explicit layer indices

  [[nodiscard]] std::vector<bool> mask(std::size_t layers) const {
    std::vector<bool> m;
    mask_into(layers, m);
    return m;
  }
  /// mask(), written into m (no allocation when m has held `layers` entries).
  void mask_into(std::size_t layers, std::vector<bool>& m) const {
    m.assign(layers, false);
    if (every > 0)
      for (std::size_t i = every - 1; i + 1 < layers; i += every) m[i] = true;
    for (std::size_t i : at) {
      if (i >= layers) {
        std::ostringstream s;
        s << "Anchors: layer " << i << " does not exist (network has " << layers << " layers)";
        throw ScheduleError(s.str());
      }
      m[i] = true;
    }
  }
};

namespace detail {

/// How each layer is crossed by the sweep (vijp, fragment or anchor), written into m.
template <Net N>
void sweep_modes_into(const N& net, std::vector<SweepMode>& m) {
  m.resize(net.size());
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](const auto& l) { m[i] = sweep_mode(l); });
}
template <Net N>
std::vector<SweepMode> sweep_modes(const N& net) {
  std::vector<SweepMode> m;
  sweep_modes_into(net, m);
  return m;
}

template <class L>
struct castable_double : std::bool_constant<CastableTo<L, double>> {};

/// A float network whose layers can all be cast to double (statically; type-
/// erased layers answer at run time, castable_to_double).
template <Net N>
inline constexpr bool double_possible = [] {
  if constexpr (!std::is_same_v<typename N::scalar_type, float>)
    return false;
  else if constexpr (N::is_static)
    return N::template all_layers<castable_double>;
  else
    return true;
}();

/// Whether every layer of `net` can be carried in double right now.
template <Net N>
bool castable_to_double(N& net) {
  if constexpr (!double_possible<N>) {
    return false;
  } else {
    bool ok = true;
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        using Lyr = std::remove_cvref_t<decltype(l)>;
        if constexpr (!CastableTo<Lyr, double>)
          ok = false;
        else
          ok = ok && moonwalk::castable_to_double(l);
      });
    return ok;
  }
}

/// `x` in scalar type C: x itself when C is its scalar type, else a converted copy.
template <class C, class S>
decltype(auto) in_scalar(const Matrix<S>& x) {
  if constexpr (std::is_same_v<C, S>)
    return (x);
  else
    return Matrix<C>(x.template cast<C>());
}

/// `x` in scalar type C: a view of x itself when C is its scalar type, else
/// of `buf` holding its conversion.
template <class C, class D>
CRef<C> in_scalar(const Eigen::MatrixBase<D>& x, Buffer<C>& buf) {
  if constexpr (std::is_same_v<C, typename D::Scalar>) {
    return CRef<C>(x);
  } else {
    auto v = buf.view(x.rows(), x.cols());
    v = x.template cast<C>();
    return CRef<C>(v);
  }
}

/// Columns of h converted to S at a time for the sweep's weight-vjp.
inline constexpr Index kConvertColumns = 1024;

/// A network's layers carried in scalar type C, each cast once and kept for a
/// whole gradient: the reverse pass, the sweep and every attempt of a schedule
/// use the same copy, so what a cast layer derives from its weights (Linear's
/// QR of the cast W, its condition estimate) is computed once per step rather
/// than once per pass. The network's weights must not change within a step.
///
/// Kept across steps (`restart`, a schedule's workspace), a held cast is
/// refreshed from its layer on its first use in the step, into its own
/// storage (moonwalk::cast_into): it equals a fresh cast, and rebuilding its
/// factorisation for the new weights reuses the previous one's buffers.
template <class C>
class CastLayers {
 public:
  explicit CastLayers(std::size_t layers = 0) : cast_(layers), fresh_(layers, false), bytes_(layers, 0) {}

  /// Starts a step on a network of `layers` layers: every held cast is stale
  /// until its first use. With `persistent`, release() keeps the casts (the
  /// buffers outlive the step).
  void restart(std::size_t layers, bool persistent) {
    cast_.resize(layers);
    bytes_.resize(layers, 0);
    fresh_.assign(layers, false);
    persistent_ = persistent;
  }

  /// Drops every cast; the list keeps its capacity.
  void clear() {
    cast_.clear();
    fresh_.clear();
    bytes_.clear();
  }

  /// Drops layer i's cast (and what it derived from its weights); the next
  /// use makes it again. Not while the casts are kept across steps.
  void release(std::size_t i) {
    if (!persistent_ && i < cast_.size()) {
      cast_[i].reset();
      bytes_[i] = 0;
    }
  }

  /// Bytes the held casts' parameters and gradients take (their
  /// factorisations not counted: Stats::working_bytes).
  [[nodiscard]] std::size_t storage_bytes() const {
    std::size_t b = 0;
    for (const std::size_t x : bytes_) b += x;
    return b;
  }

  /// Layer i (`l`) in C: `l` itself when C is its scalar type, else its
  /// cast<C>(), made (or refreshed) on first use in the step.
  template <Layer L>
  decltype(auto) operator()(std::size_t i, const L& l) {
    if constexpr (std::is_same_v<C, typename L::scalar_type>) {
      return (l);
    } else {
      using Lc = cast_t<C, L>;
      Lc* held = std::any_cast<Lc>(&cast_.at(i));
      if (!held) {
        held = &cast_[i].template emplace<Lc>(moonwalk::cast<C>(l));
        bytes_[i] = 2 * static_cast<std::size_t>(l.num_params()) * sizeof(C);  // θ and its gradient
      } else if (!fresh_[i]) {
        moonwalk::cast_into<C>(l, *held);
      }
      fresh_[i] = true;
      return std::as_const(*held);
    }
  }

  /// Layer i's cast as held (nullptr before its first use).
  [[nodiscard]] const std::any* held(std::size_t i) const {
    return i < cast_.size() && cast_[i].has_value() ? &cast_[i] : nullptr;
  }

 private:
  std::vector<std::any> cast_;
  std::vector<bool> fresh_;         // cast_[i] was made or refreshed in this step
  std::vector<std::size_t> bytes_;  // storage of cast_[i]
  bool persistent_ = false;
};

/// Frees what every layer of `net` derived from its weights (factorisations:
/// moonwalk::release_derived), for a step whose buffers do not outlive it.
template <Net N>
void release_derived(N& net) {
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [](const auto& l) { moonwalk::release_derived(l); });
}

/// A fingerprint of a network's shape and a batch width (PrecisionMemory's
/// key): FNV-1a over the layer count, every layer's widths, the batch and
/// `variant`. Never 0.
template <Net N>
std::uint64_t shape_key(N& net, Index batch, std::uint64_t variant) {
  std::uint64_t h = 14695981039346656037ull;
  auto mix = [&](std::uint64_t v) {
    for (int b = 0; b < 8; ++b, v >>= 8) h = (h ^ (v & 0xff)) * 1099511628211ull;
  };
  mix(net.size());
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      mix(static_cast<std::uint64_t>(l.in_features()));
      mix(static_cast<std::uint64_t>(l.out_features()));
    });
  mix(static_cast<std::uint64_t>(batch));
  mix(variant);
  return h == 0 ? 1 : h;
}

/// Name of a scalar type, for the stats.
template <class C>
const char* scalar_name() {
  return std::is_same_v<C, float> ? "float" : "double";
}

}  // namespace detail
}  // namespace moonwalk
