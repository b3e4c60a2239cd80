// Moonwalk — who hears, during a step, that a layer's parameter gradient is
// complete: the hook that lets data-parallel training start reducing the
// first finished gradients while the rest are still being computed
// (distributed/mpi.hpp).
//
//   struct Printer final : moonwalk::GradientObserver {
//     void layer_ready(std::size_t i) override { std::printf("layer %zu done\n", i); }
//   } p;
//   {
//     moonwalk::ObserveGradients watch(p);   // this thread, this scope
//     moonwalk::gradient_into(schedule, net, x, loss, y, r);
//   }
//
// A schedule calls layer_ready(i) when the attempt it is running has
// finished g_i = Σ J_{θ,i}ᵀ h_i, the gradient in layer i's storage: backprop
// and the plans of checkpointing in reverse layer order, Moonwalk's forward
// sweep in layer order. It is a hint, not a promise of finality: a step that
// falls back recomputes gradients, and announces them again, after they were
// first announced; a schedule that computes all gradients at once announces
// none. An observer that acts on the hint must check the gradient it used
// is still the one the step returned (distributed/mpi.hpp hashes it).
#pragma once

#include <cstddef>

namespace moonwalk {

/// Told, on the thread running a step, that layer i's parameter gradient is complete.
class GradientObserver {
 public:
  virtual void layer_ready(std::size_t layer) = 0;

 protected:
  GradientObserver() = default;
  GradientObserver(const GradientObserver&) = default;
  GradientObserver& operator=(const GradientObserver&) = default;
  ~GradientObserver() = default;
};

namespace detail {
/// The observer of steps run on this thread (nullptr: none).
inline thread_local GradientObserver* gradient_observer = nullptr;

/// A schedule's announcement that layer i's gradient is complete.
inline void gradient_ready(std::size_t layer) {
  if (gradient_observer != nullptr) gradient_observer->layer_ready(layer);
}
}  // namespace detail

/// Installs `o` as this thread's observer for the scope's lifetime (the
/// previous one is restored at its end).
class ObserveGradients {
 public:
  explicit ObserveGradients(GradientObserver& o) : previous_(detail::gradient_observer) {
    detail::gradient_observer = &o;
  }
  ~ObserveGradients() { detail::gradient_observer = previous_; }
  ObserveGradients(const ObserveGradients&) = delete;
  ObserveGradients& operator=(const ObserveGradients&) = delete;

 private:
  GradientObserver* previous_;
};

}  // namespace moonwalk
