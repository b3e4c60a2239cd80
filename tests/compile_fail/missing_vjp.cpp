// Compile-fail test (tests/CMakeLists.txt, CTest `compile_fail.missing_vjp`):
// a layer that forgets the cotangent operations must be rejected by
// check_layer with the contract's sentence for the input/parameter vjp.
//
// Built with -DMOONWALK_CONTROL (test `compile_fail.missing_vjp.control`) the
// layer is complete and the file must compile, so the failure above cannot
// come from a mistake elsewhere in this file.
#include <moonwalk/core/concepts.hpp>
#include <span>
#include <string>

namespace {

// y = a x with one scalar parameter a.
struct NoVjp {
  using scalar_type = double;
  using M = moonwalk::Matrix<double>;

  double a = 2.0;
  double grad_a = 0.0;

  [[nodiscard]] moonwalk::Index in_features() const { return 3; }
  [[nodiscard]] moonwalk::Index out_features() const { return 3; }
  [[nodiscard]] std::string name() const { return "NoVjp"; }

  [[nodiscard]] M forward(const M& x) const { return a * x; }
  [[nodiscard]] M jvp(const M& /*x*/, const M& dx) const { return a * dx; }
  [[nodiscard]] M jvp_params(const M& x, moonwalk::CVecRef<double> dtheta) const { return dtheta(0) * x; }

#ifdef MOONWALK_CONTROL
  [[nodiscard]] M vjp(const M& /*x*/, const M& h) const { return a * h; }
  void vjp_params(const M& x, const M& h, moonwalk::VecRef<double> g) const {
    g(0) += x.cwiseProduct(h).sum();
  }
#endif

  [[nodiscard]] moonwalk::Index num_params() const { return 1; }
  std::span<double> parameters() { return {&a, 1}; }
  [[nodiscard]] std::span<const double> parameters() const { return {&a, 1}; }
  std::span<double> gradients() { return {&grad_a, 1}; }
  [[nodiscard]] std::span<const double> gradients() const { return {&grad_a, 1}; }
};

}  // namespace

static_assert(moonwalk::check_layer<NoVjp>());
