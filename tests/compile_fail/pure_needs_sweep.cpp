// Compile-fail test (CTest `compile_fail.pure_needs_sweep`): pure-forward
// Moonwalk on a static network with a layer that is neither submersive nor
// fragmental is rejected at compile time with a sentence. With
// -DMOONWALK_CONTROL the same network under mixed Moonwalk (which anchors
// that layer) must compile.
#include <moonwalk/moonwalk.hpp>

#include "../support/user_layers.hpp"

int main() {
  using S = double;
  moonwalk::Sequential net(moonwalk::Linear<S>(4, 3), moonwalk_test::CubicVjpOnly<S>{3});
  moonwalk::Matrix<S> x = moonwalk::Matrix<S>::Random(4, 2), t = moonwalk::Matrix<S>::Random(3, 2);
#ifdef MOONWALK_CONTROL
  auto r = moonwalk::gradient(moonwalk::MixedMoonwalk{}, net, x, moonwalk::MSE<S>{}, t);
#else
  auto r = moonwalk::gradient(moonwalk::PureMoonwalk{}, net, x, moonwalk::MSE<S>{}, t);
#endif
  return r.loss > 0 ? 0 : 1;
}
