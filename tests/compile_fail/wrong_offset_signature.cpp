// Compile-fail test (tests/CMakeLists.txt, CTest `compile_fail.wrong_offset_signature`):
// a LinearInX hook with its name and another signature must be a compile
// error naming the hook, not a layer that silently drops its offset.
//
// Built with -DMOONWALK_CONTROL (test `compile_fail.wrong_offset_signature.control`)
// the hook has the right signature and the file must compile.
#include <moonwalk/layers/linear_in_x.hpp>
#include <string>

namespace {

using moonwalk::CRef;
using moonwalk::MatRef;

// y = 2 x + 1 on 3 features.
struct Shifted : moonwalk::NoParameters<double>, moonwalk::LinearInX<Shifted, double> {
  using scalar_type = double;
  [[nodiscard]] moonwalk::Index in_features() const { return 3; }
  [[nodiscard]] moonwalk::Index out_features() const { return 3; }
  [[nodiscard]] std::string name() const { return "shifted(3)"; }

  void apply_into(const CRef<double>& a, MatRef<double> out) const { out = 2.0 * a; }
  void apply_transpose_into(const CRef<double>& h, MatRef<double> out) const { out = 2.0 * h; }
#ifdef MOONWALK_CONTROL
  void add_offset(MatRef<double> y, double s) const { y.array() += s; }
#else
  // The scale forgotten: the base would never add the offset.
  void add_offset(MatRef<double> y) const { y.array() += 1.0; }
#endif
};

}  // namespace

moonwalk::Matrix<double> use(const moonwalk::Matrix<double>& x) { return Shifted{}.forward(x); }
