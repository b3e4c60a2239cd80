// Compile-fail test (tests/CMakeLists.txt, CTest `compile_fail.wrong_hook_signature`):
// an optional hook with the contract's name and another signature must be a
// compile error naming the hook, not a silent fallback to the value form.
//
// Built with -DMOONWALK_CONTROL (test `compile_fail.wrong_hook_signature.control`)
// the hook has the right signature and the file must compile.
#include <moonwalk/core/concepts.hpp>
#include <span>
#include <string>

namespace {

// y = a x with one scalar parameter a.
struct WrongHook {
  using scalar_type = double;
  using M = moonwalk::Matrix<double>;

  double a = 2.0;
  double grad_a = 0.0;

  [[nodiscard]] moonwalk::Index in_features() const { return 3; }
  [[nodiscard]] moonwalk::Index out_features() const { return 3; }
  [[nodiscard]] std::string name() const { return "WrongHook"; }

  [[nodiscard]] M forward(const M& x) const { return a * x; }
#ifdef MOONWALK_CONTROL
  void forward_into(const moonwalk::CRef<double>& x, moonwalk::MatRef<double> out) const { out = a * x; }
#else
  // The output taken by value: a copy the layer would write in vain.
  void forward_into(const M& x, M out) const { out = a * x; }
#endif
  [[nodiscard]] M jvp(const M& /*x*/, const M& dx) const { return a * dx; }
  [[nodiscard]] M jvp_params(const M& x, moonwalk::CVecRef<double> dtheta) const { return dtheta(0) * x; }
  [[nodiscard]] M vjp(const M& /*x*/, const M& h) const { return a * h; }
  void vjp_params(const M& x, const M& h, moonwalk::VecRef<double> g) const {
    g(0) += x.cwiseProduct(h).sum();
  }

  [[nodiscard]] moonwalk::Index num_params() const { return 1; }
  std::span<double> parameters() { return {&a, 1}; }
  [[nodiscard]] std::span<const double> parameters() const { return {&a, 1}; }
  std::span<double> gradients() { return {&grad_a, 1}; }
  [[nodiscard]] std::span<const double> gradients() const { return {&grad_a, 1}; }
};

}  // namespace

static_assert(moonwalk::check_layer<WrongHook>());
