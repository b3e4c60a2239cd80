// Smallest downstream program: the umbrella header compiles and links.
#include <moonwalk/moonwalk.hpp>

int main() {
  moonwalk::Matrix<double> m(2, 2);
  m.setIdentity();
  return m.trace() == 2.0 ? 0 : 1;
}
