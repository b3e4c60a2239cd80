// Moonwalk — a type-erased layer, for networks chosen at run time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/step.hpp"

namespace moonwalk {

/// Any `Layer` with scalar S behind one value type. It models every
/// refinement syntactically and answers `is_submersive()`, `is_fragmental()`
/// and `is_invertible()` from what the wrapped layer offers; residuals and
/// fragments travel as `Erased` (keeping their bytes and kind). It forwards
/// the optional protocols too: `amplification(r)` (unknown when the wrapped
/// layer offers none) and `cast<T>()` (throws ScheduleError when it offers no
/// cast to T).
template <class S>
class AnyLayer {
 public:
  using scalar_type = S;
  using residual_type = Erased;
  using fragment_type = Erased;

  template <class L>
  requires(!std::is_same_v<std::remove_cvref_t<L>, AnyLayer> && Layer<std::remove_cvref_t<L>>)
      AnyLayer(L&& layer)  // NOLINT(google-explicit-constructor): a layer is an AnyLayer
      : self_(std::make_unique<Model<std::remove_cvref_t<L>>>(std::forward<L>(layer))) {
    static_assert(std::is_same_v<typename std::remove_cvref_t<L>::scalar_type, S>,
                  "Moonwalk: a runtime Network<S> holds layers of scalar type S only");
  }
  AnyLayer(const AnyLayer& o) : self_(o.self_->clone()) {}
  AnyLayer& operator=(const AnyLayer& o) {
    if (this != &o) self_ = o.self_->clone();
    return *this;
  }
  AnyLayer(AnyLayer&&) noexcept = default;
  AnyLayer& operator=(AnyLayer&&) noexcept = default;
  ~AnyLayer() = default;

  [[nodiscard]] Index in_features() const { return self_->in_features(); }
  [[nodiscard]] Index out_features() const { return self_->out_features(); }
  [[nodiscard]] std::string name() const { return self_->name(); }
  [[nodiscard]] Index num_params() const { return self_->num_params(); }
  Blocks<std::span<S>> parameter_blocks() { return self_->parameter_blocks(); }
  [[nodiscard]] Blocks<std::span<const S>> parameter_blocks() const {
    return std::as_const(*self_).parameter_blocks();
  }
  Blocks<std::span<S>> gradient_blocks() { return self_->gradient_blocks(); }
  [[nodiscard]] Blocks<std::span<const S>> gradient_blocks() const {
    return std::as_const(*self_).gradient_blocks();
  }

  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const { return self_->forward(x); }
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const { return self_->jvp(x, dx); }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dt) const {
    return self_->jvp_params(x, dt);
  }
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const { return self_->vjp(x, h); }
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const { self_->vjp_params(x, h, g); }
  [[nodiscard]] Erased save_residual(const CRef<S>& x) const { return self_->save_residual(x); }
  [[nodiscard]] Matrix<S> vjp_residual(const Erased& r, const CRef<S>& h) const {
    return self_->vjp_residual(r, h);
  }
  // Output-argument forms (core/ops.hpp): the wrapped layer's, or its fallback.
  void forward_into(const CRef<S>& x, MatRef<S> y) const { self_->forward_into(x, y); }
  void vjp_into(const CRef<S>& x, const CRef<S>& h, MatRef<S> out) const { self_->vjp_into(x, h, out); }
  /// Reuses the residual r holds when it is the wrapped layer's type.
  void save_residual_into(const CRef<S>& x, Erased& r) const { self_->save_residual_into(x, r); }
  void vjp_residual_into(const Erased& r, const CRef<S>& h, MatRef<S> out) const {
    self_->vjp_residual_into(r, h, out);
  }
  void vijp_into(const CRef<S>& x, const CRef<S>& hx, MatRef<S> hy) const { self_->vijp_into(x, hx, hy); }

  [[nodiscard]] bool is_submersive() const { return self_->is_submersive(); }
  [[nodiscard]] bool is_fragmental() const { return self_->is_fragmental(); }
  [[nodiscard]] bool is_invertible() const { return self_->is_invertible(); }
  /// The wrapped layer's residual is a piecewise-linear branch pattern (keeps_branches).
  [[nodiscard]] bool is_branch_residual() const { return self_->is_branch_residual(); }
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const { return self_->vijp(x, hx); }
  [[nodiscard]] Erased save_fragment(const Erased& r, const CRef<S>& hy) const {
    return self_->save_fragment(r, hy);
  }
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx, const Erased& f) const {
    return self_->vijp_with_fragment(x, hx, f);
  }
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const { return self_->inverse(y); }
  void inverse_into(const CRef<S>& y, MatRef<S> x) const { self_->inverse_into(y, x); }

  /// The wrapped layer's amplification from its residual (Amplification::unknown() without one).
  [[nodiscard]] Amplification amplification(const Erased& r) const { return self_->amplification(r); }
  /// The wrapped layer in scalar type T (a copy when T is S).
  template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>) [[nodiscard]] AnyLayer<T> cast() const {
    if constexpr (std::is_same_v<T, S>)
      return *this;
    else if constexpr (std::is_same_v<T, double>)
      return self_->cast_double();
    else
      return self_->cast_float();
  }

  /// dst = cast<T>(), reusing the storage of the layer dst wraps when it is
  /// the wrapped layer's own cast type (moonwalk::cast_into); otherwise dst
  /// wraps a fresh cast.
  template <class T>
  requires(!std::is_same_v<T, S> &&
           (std::is_same_v<T, float> || std::is_same_v<T, double>)) void cast_into(AnyLayer<T>& dst) const {
    if constexpr (std::is_same_v<T, double>)
      self_->cast_double_into(dst);
    else
      self_->cast_float_into(dst);
  }

  /// Frees what the wrapped layer derived from its weights (moonwalk::release_derived).
  void release_derived() const noexcept { self_->release_derived(); }

  // Step, mode and batch coupling (core/step.hpp), forwarded to the wrapped layer.
  void set_step(std::uint64_t k) { self_->set_step(k); }
  /// The wrapped layer's scale_weight (core/ops.hpp): false when it has none.
  bool scale_weight(double s) { return self_->scale_weight(s); }
  void set_training(bool t) { self_->set_training(t); }
  [[nodiscard]] bool couples_batch() const { return self_->couples_batch(); }
  /// The wrapped layer's buffers (core/step.hpp).
  std::vector<std::span<double>> buffers() { return self_->buffers(); }
  /// Whether the wrapped layer offers cast<double>() (here, at run time).
  [[nodiscard]] bool castable_to_double() const { return self_->castable_to_double(); }

  /// The wrapped layer, or nullptr when it is not an L.
  template <class L>
  L* target() {
    auto* m = dynamic_cast<Model<L>*>(self_.get());
    return m ? &m->layer : nullptr;
  }
  template <class L>
  const L* target() const {
    auto* m = dynamic_cast<const Model<L>*>(self_.get());
    return m ? &m->layer : nullptr;
  }

  /// The wrapped layer's address and type: both stay while this AnyLayer
  /// holds the same layer (what a cache keyed on a layer compares, e.g. the
  /// schedules' layer names).
  [[nodiscard]] const void* wrapped_address() const noexcept { return self_.get(); }
  [[nodiscard]] const std::type_info& wrapped_type() const noexcept { return typeid(*self_); }

 private:
  struct Interface {
    virtual ~Interface() = default;
    [[nodiscard]] virtual std::unique_ptr<Interface> clone() const = 0;
    [[nodiscard]] virtual Index in_features() const = 0;
    [[nodiscard]] virtual Index out_features() const = 0;
    [[nodiscard]] virtual std::string name() const = 0;
    [[nodiscard]] virtual Index num_params() const = 0;
    virtual Blocks<std::span<S>> parameter_blocks() = 0;
    [[nodiscard]] virtual Blocks<std::span<const S>> parameter_blocks() const = 0;
    virtual Blocks<std::span<S>> gradient_blocks() = 0;
    [[nodiscard]] virtual Blocks<std::span<const S>> gradient_blocks() const = 0;
    [[nodiscard]] virtual Matrix<S> forward(const CRef<S>&) const = 0;
    [[nodiscard]] virtual Matrix<S> jvp(const CRef<S>&, const CRef<S>&) const = 0;
    [[nodiscard]] virtual Matrix<S> jvp_params(const CRef<S>&, const CVecRef<S>&) const = 0;
    [[nodiscard]] virtual Matrix<S> vjp(const CRef<S>&, const CRef<S>&) const = 0;
    virtual void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const = 0;
    [[nodiscard]] virtual Erased save_residual(const CRef<S>&) const = 0;
    [[nodiscard]] virtual Matrix<S> vjp_residual(const Erased&, const CRef<S>&) const = 0;
    virtual void forward_into(const CRef<S>&, MatRef<S>) const = 0;
    virtual void vjp_into(const CRef<S>&, const CRef<S>&, MatRef<S>) const = 0;
    virtual void save_residual_into(const CRef<S>&, Erased&) const = 0;
    virtual void vjp_residual_into(const Erased&, const CRef<S>&, MatRef<S>) const = 0;
    virtual void vijp_into(const CRef<S>&, const CRef<S>&, MatRef<S>) const = 0;
    [[nodiscard]] virtual bool is_submersive() const = 0;
    [[nodiscard]] virtual bool is_fragmental() const = 0;
    [[nodiscard]] virtual bool is_invertible() const = 0;
    [[nodiscard]] virtual bool is_branch_residual() const = 0;
    [[nodiscard]] virtual Matrix<S> vijp(const CRef<S>&, const CRef<S>&) const = 0;
    [[nodiscard]] virtual Erased save_fragment(const Erased&, const CRef<S>&) const = 0;
    [[nodiscard]] virtual Matrix<S> vijp_with_fragment(const CRef<S>&, const CRef<S>&,
                                                       const Erased&) const = 0;
    [[nodiscard]] virtual Matrix<S> inverse(const CRef<S>&) const = 0;
    virtual void inverse_into(const CRef<S>&, MatRef<S>) const = 0;
    [[nodiscard]] virtual Amplification amplification(const Erased&) const = 0;
    [[nodiscard]] virtual AnyLayer<double> cast_double() const = 0;
    [[nodiscard]] virtual AnyLayer<float> cast_float() const = 0;
    virtual void cast_double_into(AnyLayer<double>& dst) const = 0;
    virtual void release_derived() const noexcept = 0;
    virtual void cast_float_into(AnyLayer<float>& dst) const = 0;
    virtual void set_step(std::uint64_t) = 0;
    virtual bool scale_weight(double) = 0;
    virtual void set_training(bool) = 0;
    [[nodiscard]] virtual bool couples_batch() const = 0;
    virtual std::vector<std::span<double>> buffers() = 0;
    [[nodiscard]] virtual bool castable_to_double() const = 0;
  };

  template <class L>
  struct Model final : Interface {
    L layer;
    explicit Model(L l) : layer(std::move(l)) {}
    [[nodiscard]] std::unique_ptr<Interface> clone() const override { return std::make_unique<Model>(layer); }
    [[nodiscard]] Index in_features() const override { return layer.in_features(); }
    [[nodiscard]] Index out_features() const override { return layer.out_features(); }
    [[nodiscard]] std::string name() const override { return layer.name(); }
    [[nodiscard]] Index num_params() const override { return layer.num_params(); }
    Blocks<std::span<S>> parameter_blocks() override { return moonwalk::parameter_blocks(layer); }
    [[nodiscard]] Blocks<std::span<const S>> parameter_blocks() const override {
      return moonwalk::parameter_blocks(layer);
    }
    Blocks<std::span<S>> gradient_blocks() override { return moonwalk::gradient_blocks(layer); }
    [[nodiscard]] Blocks<std::span<const S>> gradient_blocks() const override {
      return moonwalk::gradient_blocks(layer);
    }
    [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const override { return layer.forward(x); }
    [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const override {
      return layer.jvp(x, dx);
    }
    [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dt) const override {
      return layer.jvp_params(x, dt);
    }
    [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const override { return layer.vjp(x, h); }
    void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const override {
      layer.vjp_params(x, h, g);
    }
    [[nodiscard]] Erased save_residual(const CRef<S>& x) const override {
      return erase(moonwalk::save_residual(layer, x));
    }
    [[nodiscard]] Matrix<S> vjp_residual(const Erased& r, const CRef<S>& h) const override {
      return moonwalk::vjp_residual(layer, std::any_cast<const residual_t<L>&>(r.value), h);
    }
    void forward_into(const CRef<S>& x, MatRef<S> y) const override { moonwalk::forward_into(layer, x, y); }
    void vjp_into(const CRef<S>& x, const CRef<S>& h, MatRef<S> out) const override {
      moonwalk::vjp_into(layer, x, h, out);
    }
    void save_residual_into(const CRef<S>& x, Erased& r) const override {
      if (auto* held = std::any_cast<residual_t<L>>(&r.value)) {
        moonwalk::save_residual_into(layer, x, *held);
        r.size_bytes = nbytes(*held);
        r.kind_name = residual_kind(*held);
      } else {
        r = erase(moonwalk::save_residual(layer, x));
      }
    }
    void vjp_residual_into(const Erased& r, const CRef<S>& h, MatRef<S> out) const override {
      moonwalk::vjp_residual_into(layer, std::any_cast<const residual_t<L>&>(r.value), h, out);
    }
    void vijp_into(const CRef<S>& x, const CRef<S>& hx, MatRef<S> hy) const override {
      if constexpr (Submersive<L>)
        moonwalk::vijp_into(layer, x, hx, hy);
      else
        throw RankError(layer.name() + ": not submersive (no vijp)");
    }
    [[nodiscard]] bool is_submersive() const override { return can_vijp(layer); }
    [[nodiscard]] bool is_fragmental() const override { return can_fragment(layer); }
    [[nodiscard]] bool is_invertible() const override { return can_invert(layer); }
    [[nodiscard]] bool is_branch_residual() const override { return keeps_branches(layer); }
    [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const override {
      if constexpr (Submersive<L>)
        return layer.vijp(x, hx);
      else
        throw RankError(layer.name() + ": not submersive (no vijp)");
    }
    [[nodiscard]] Erased save_fragment(const Erased& r, const CRef<S>& hy) const override {
      if constexpr (Fragmental<L>)
        return erase(layer.save_fragment(std::any_cast<const residual_t<L>&>(r.value), hy));
      else
        throw RankError(layer.name() + ": not fragmental (no save_fragment)");
    }
    [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                               const Erased& f) const override {
      if constexpr (Fragmental<L>)
        return layer.vijp_with_fragment(x, hx, std::any_cast<const typename L::fragment_type&>(f.value));
      else
        throw RankError(layer.name() + ": not fragmental (no vijp_with_fragment)");
    }
    [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const override {
      if constexpr (Invertible<L>)
        return layer.inverse(y);
      else
        throw RankError(layer.name() + ": not invertible (no inverse)");
    }
    void inverse_into(const CRef<S>& y, MatRef<S> x) const override {
      if constexpr (Invertible<L>)
        moonwalk::inverse_into(layer, y, x);
      else
        throw RankError(layer.name() + ": not invertible (no inverse)");
    }
    [[nodiscard]] Amplification amplification(const Erased& r) const override {
      return moonwalk::amplification(layer, std::any_cast<const residual_t<L>&>(r.value));
    }
    [[nodiscard]] AnyLayer<double> cast_double() const override { return cast_to<double>(); }
    [[nodiscard]] AnyLayer<float> cast_float() const override { return cast_to<float>(); }
    void cast_double_into(AnyLayer<double>& dst) const override { cast_into_impl(dst); }
    void release_derived() const noexcept override { moonwalk::release_derived(layer); }
    void cast_float_into(AnyLayer<float>& dst) const override { cast_into_impl(dst); }
    void set_step(std::uint64_t k) override { moonwalk::set_step(layer, k); }
    bool scale_weight(double s) override { return moonwalk::scale_weight(layer, s); }
    void set_training(bool t) override { moonwalk::set_training(layer, t); }
    [[nodiscard]] bool couples_batch() const override { return moonwalk::couples_batch(layer); }
    std::vector<std::span<double>> buffers() override { return moonwalk::buffers(layer); }
    [[nodiscard]] bool castable_to_double() const override { return moonwalk::castable_to_double(layer); }
    template <class T>
    void cast_into_impl(AnyLayer<T>& dst) const {
      if constexpr (!std::is_same_v<T, S> && CastableTo<L, T>) {
        if (auto* held = dst.template target<cast_t<T, L>>()) {
          moonwalk::cast_into<T>(layer, *held);
          return;
        }
      }
      dst = cast_to<T>();
    }
    template <class T>
    AnyLayer<T> cast_to() const {
      if constexpr (std::is_same_v<T, S>)
        return AnyLayer<T>(layer);
      else if constexpr (CastableTo<L, T>)
        return AnyLayer<T>(layer.template cast<T>());
      else
        throw ScheduleError(detail::cat(
            layer.name(), ": offers no cast<", std::is_same_v<T, double> ? "double" : "float",
            ">(), so it cannot carry ", std::is_same_v<T, double> ? "double" : "float", " cotangents"));
    }
  };

  std::unique_ptr<Interface> self_;
};

}  // namespace moonwalk
