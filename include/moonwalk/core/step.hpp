// Moonwalk — the training step and mode that stochastic and stateful layers
// key on, and the batch coupling a schedule must respect.
//
// Dropout draws its mask from a counter-based stream keyed on (seed, step,
// element): every pass of one step — the reverse pass, a Moonwalk sweep, a
// checkpoint's recomputation, an input rebuilt by inversion, a cast to double
// — replays the same mask, and no mask is stored. BatchNorm folds its batch
// statistics into its running statistics in the first training-mode forward
// of a step and never again in that step, however often a schedule
// recomputes the layer.
//
// The step is the optimizer's step count: Sgd and Adam call
// set_step(net, t) after every update (a loop without them calls it itself).
// The mode is training until set_training(net, false): then Dropout is the
// identity and BatchNorm normalises with its running statistics.
//
// Optional layer hooks (a layer without them has neither step nor mode):
//   set_step(std::uint64_t k), set_training(bool)   both, or neither (Stateful)
//   couples_batch() const -> bool    the output of one sample depends on the
//                                    other samples of the batch (BatchNorm in
//                                    training): a schedule never splits its batch
//   buffers() -> std::vector<std::span<double>>
//                                    state the layer updates as it runs but
//                                    does not train (BatchNorm's running
//                                    statistics): saved in checkpoints next to
//                                    the parameters (get_buffers, set_buffers)
// Composite layers (chains, coupling blocks, residual blocks, AnyLayer)
// forward them to the layers they hold; the free functions below walk any
// network.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace moonwalk {

namespace detail {
/// Operator applications of layers' iterative solves on this thread so far
/// (Residual's vijp and inverse add theirs); gradient() reports a step's share
/// as Stats::counts.solver_iterations.
inline thread_local std::uint64_t solver_iterations = 0;
}  // namespace detail

/// The step and mode a stateful layer holds.
struct StepState {
  std::uint64_t step = 0;  ///< the training step the layer is in
  bool training = true;    ///< training (batch statistics, dropout on) or evaluation
};

/// A layer whose forward depends on the training step or mode (header comment).
template <class L>
concept Stateful = requires(L& l, std::uint64_t k, bool t) {
  l.set_step(k);
  l.set_training(t);
};

/// A layer that says whether its samples interact (header comment).
template <class L>
concept HasBatchCoupling = requires(const L& l) {
  { l.couples_batch() } -> std::same_as<bool>;
};

/// A layer with untrained state it updates as it runs (header comment).
template <class L>
concept HasBuffers = requires(L& l) {
  { l.buffers() } -> std::same_as<std::vector<std::span<double>>>;
};

namespace detail {
/// A network walked by `size()` and `visit(i, f)` (Sequential, Network).
template <class N>
concept Walkable = requires(N& n) {
  { n.size() } -> std::convertible_to<std::size_t>;
};
}  // namespace detail

/// Sets the training step of every stateful layer of `l` (a layer or a network).
template <class L>
void set_step(L& l, std::uint64_t k) {
  static_assert(
      Stateful<L> || !requires { &L::set_step; },
      "Moonwalk layer contract: set_step must be `void set_step(std::uint64_t)`, "
      "next to `void set_training(bool)`");
  if constexpr (Stateful<L>)
    l.set_step(k);
  else if constexpr (detail::Walkable<L>)
    for (std::size_t i = 0; i < l.size(); ++i) l.visit(i, [k](auto& c) { moonwalk::set_step(c, k); });
}

/// Puts every stateful layer of `l` in training (true) or evaluation (false) mode.
template <class L>
void set_training(L& l, bool training) {
  static_assert(
      Stateful<L> || !requires { &L::set_training; },
      "Moonwalk layer contract: set_training must be `void set_training(bool)`, "
      "next to `void set_step(std::uint64_t)`");
  if constexpr (Stateful<L>)
    l.set_training(training);
  else if constexpr (detail::Walkable<L>)
    for (std::size_t i = 0; i < l.size(); ++i)
      l.visit(i, [training](auto& c) { moonwalk::set_training(c, training); });
}

/// The output of one sample of `l` depends on the other samples of its batch.
template <class L>
bool couples_batch(const L& l) {
  static_assert(
      HasBatchCoupling<L> || !requires { &L::couples_batch; },
      "Moonwalk layer contract: couples_batch must be `bool couples_batch() const`");
  if constexpr (HasBatchCoupling<L>) {
    return l.couples_batch();
  } else if constexpr (detail::Walkable<L>) {
    bool any = false;
    for (std::size_t i = 0; i < l.size(); ++i)
      l.visit(i, [&any](const auto& c) { any = any || moonwalk::couples_batch(c); });
    return any;
  } else {
    return false;
  }
}

/// Appends the buffers of every layer of `l` (a layer or a network) to `out`,
/// layer by layer.
template <class L>
void append_buffers(L& l, std::vector<std::span<double>>& out) {
  static_assert(
      HasBuffers<L> || !requires { &L::buffers; },
      "Moonwalk layer contract: buffers must be `std::vector<std::span<double>> buffers()`");
  if constexpr (HasBuffers<L>) {
    for (const auto& b : l.buffers()) out.push_back(b);
  } else if constexpr (detail::Walkable<L>) {
    for (std::size_t i = 0; i < l.size(); ++i)
      l.visit(i, [&out](auto& c) { moonwalk::append_buffers(c, out); });
  }
}

/// The buffers of every layer of `l` (a layer or a network), layer by layer.
template <class L>
std::vector<std::span<double>> buffers(L& l) {
  std::vector<std::span<double>> out;
  moonwalk::append_buffers(l, out);
  return out;
}

/// Evaluation mode for a scope: set_training(net, false) now, training again
/// at the scope's end.
template <class N>
class Evaluating {
 public:
  explicit Evaluating(N& net) : net_(net) { moonwalk::set_training(net_, false); }
  ~Evaluating() { moonwalk::set_training(net_, true); }
  Evaluating(const Evaluating&) = delete;
  Evaluating& operator=(const Evaluating&) = delete;

 private:
  N& net_;
};

}  // namespace moonwalk
