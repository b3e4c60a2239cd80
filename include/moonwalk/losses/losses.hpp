// Moonwalk — losses ℓ(y, t) averaged over the batch, value and gradient ∂ℓ/∂y.
#pragma once

#include <cmath>
#include <sstream>
#include <utility>
#include <vector>

#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// ℓ = (1/B) Σ_b ½‖y_b − t_b‖²;  ∂ℓ/∂y = (y − t) / B.
template <class S>
struct MSE {
  using scalar_type = S;
  using target_type = Matrix<S>;
  static constexpr const char* name() { return "mse"; }

  [[nodiscard]] std::pair<S, Matrix<S>> value_and_gradient(const CRef<S>& y, const target_type& t) const {
    std::pair<S, Matrix<S>> r;
    r.first = value_and_gradient_into(y, t, r.second);
    return r;
  }
  /// ℓ, with ∂ℓ/∂y written into g
  S value_and_gradient_into(const CRef<S>& y, const target_type& t, Matrix<S>& g) const {
    check(y, t);
    const S inv_b = S(1) / static_cast<S>(y.cols());
    detail::safe_resize(g, y.rows(), y.cols());
    g = y - t;
    const S value = S(0.5) * inv_b * g.squaredNorm();
    g *= inv_b;
    return value;
  }
  [[nodiscard]] S value(const CRef<S>& y, const target_type& t) const {
    return value_and_gradient(y, t).first;
  }
  [[nodiscard]] Matrix<S> gradient(const CRef<S>& y, const target_type& t) const {
    return value_and_gradient(y, t).second;
  }

 private:
  static void check(const CRef<S>& y, const target_type& t) {
    if (y.rows() != t.rows() || y.cols() != t.cols())
      throw ShapeError("mse: output has shape " + detail::shape_str(y.rows(), y.cols()) + " but target has " +
                       detail::shape_str(t.rows(), t.cols()));
    if (y.cols() == 0) throw ShapeError("mse: empty batch");
  }
};

/// Softmax cross-entropy with integer labels (the rows of y are logits):
/// ℓ = (1/B) Σ_b [logsumexp(y_b) − y_b[t_b]] (stable: the column max is
/// subtracted first);  ∂ℓ/∂y_b = (softmax(y_b) − e_{t_b}) / B.
template <class S>
struct SoftmaxCrossEntropy {
  using scalar_type = S;
  using target_type = std::vector<Index>;
  static constexpr const char* name() { return "xent"; }

  [[nodiscard]] std::pair<S, Matrix<S>> value_and_gradient(const CRef<S>& y, const target_type& t) const {
    std::pair<S, Matrix<S>> r;
    r.first = value_and_gradient_into(y, t, r.second);
    return r;
  }
  /// ℓ, with ∂ℓ/∂y written into g
  S value_and_gradient_into(const CRef<S>& y, const target_type& t, Matrix<S>& g) const {
    check(y, t);
    const Index B = y.cols();
    const S inv_b = S(1) / static_cast<S>(B);
    detail::safe_resize(g, y.rows(), B);
    S total = 0;
    for (Index b = 0; b < B; ++b) {
      const S m = y.col(b).maxCoeff();
      g.col(b) = (y.col(b).array() - m).exp().matrix();
      const S z = g.col(b).sum();
      // (m − y_t) first: exact when the label holds the max, so a huge shift costs no accuracy
      total += (m - y(t[static_cast<std::size_t>(b)], b)) + std::log(z);
      g.col(b) /= z;
      g(t[static_cast<std::size_t>(b)], b) -= S(1);
    }
    g *= inv_b;
    return total * inv_b;
  }
  [[nodiscard]] S value(const CRef<S>& y, const target_type& t) const {
    return value_and_gradient(y, t).first;
  }
  [[nodiscard]] Matrix<S> gradient(const CRef<S>& y, const target_type& t) const {
    return value_and_gradient(y, t).second;
  }

 private:
  static void check(const CRef<S>& y, const target_type& t) {
    if (static_cast<Index>(t.size()) != y.cols()) {
      std::ostringstream s;
      s << "xent: output has " << y.cols() << " columns but " << t.size() << " labels were given";
      throw ShapeError(s.str());
    }
    if (y.cols() == 0) throw ShapeError("xent: empty batch");
    for (std::size_t b = 0; b < t.size(); ++b)
      if (t[b] < 0 || t[b] >= y.rows()) {
        std::ostringstream s;
        s << "xent: label " << t[b] << " of sample " << b << " is outside [0, " << y.rows() << ")";
        throw ShapeError(s.str());
      }
  }
};

}  // namespace moonwalk
