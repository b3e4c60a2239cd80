// Placeholder quick-start program; the README's demo command runs it.
#include <iostream>
#include <moonwalk/moonwalk.hpp>

int main() {
  moonwalk::Matrix<double> x(2, 3);
  x.setZero();
  std::cout << "moonwalk demo: batch of " << x.cols() << " samples with " << x.rows() << " features\n";
  return 0;
}
