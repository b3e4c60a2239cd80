// core/dense.hpp: products, triangular solves and the blocked Householder QR
// over this thread's scratch, against references that share none of their
// code (products summed coefficient by coefficient in long double, solves
// checked by their residual, the QR by reconstruction and orthogonality).
// That they allocate nothing once warm is tests/alloc/.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <moonwalk/core/dense.hpp>
#include <moonwalk/core/mapped.hpp>
#include <utility>

#include "support/check_util.hpp"

namespace {

using moonwalk::Index;
using moonwalk::detail::Op;
template <class S>
using Mat = moonwalk::Matrix<S>;

/// op(A) op(B) summed in long double, one coefficient at a time.
template <class S>
Mat<long double> reference_product(const Mat<S>& A, Op opa, const Mat<S>& B, Op opb) {
  const Index m = opa == Op::N ? A.rows() : A.cols(), k = opa == Op::N ? A.cols() : A.rows();
  const Index n = opb == Op::N ? B.cols() : B.rows();
  Mat<long double> C(m, n);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      long double s = 0;
      for (Index l = 0; l < k; ++l)
        s += static_cast<long double>(opa == Op::N ? A(i, l) : A(l, i)) *
             static_cast<long double>(opb == Op::N ? B(l, j) : B(j, l));
      C(i, j) = s;
    }
  return C;
}

template <class S>
Mat<S> rand(Index rows, Index cols, std::uint64_t seed) {
  return mwtest::randn(rows, cols, seed).cast<S>();
}

}  // namespace

TEMPLATE_TEST_CASE("gemm: every transposition, overwrite and accumulate, blocks with strides",
                   "[core][dense]", float, double) {
  using S = TestType;
  const S eps = std::numeric_limits<S>::epsilon();
  // (m, n, k): blocked GEMM sizes, a vector-shaped and a tiny product.
  for (auto [m, n, k] : {std::array<Index, 3>{70, 45, 130}, {200, 1, 33}, {1, 37, 64}, {3, 4, 5}}) {
    for (Op opa : {Op::N, Op::T})
      for (Op opb : {Op::N, Op::T}) {
        CAPTURE(m, n, k, opa == Op::T, opb == Op::T);
        // Operands inside larger matrices, so their outer stride is not their height.
        const Mat<S> Abig = rand<S>((opa == Op::N ? m : k) + 3, (opa == Op::N ? k : m) + 2, 1);
        const Mat<S> Bbig = rand<S>((opb == Op::N ? k : n) + 5, (opb == Op::N ? n : k) + 1, 2);
        const Mat<S> A = Abig.block(2, 1, opa == Op::N ? m : k, opa == Op::N ? k : m);
        const Mat<S> B = Bbig.block(1, 0, opb == Op::N ? k : n, opb == Op::N ? n : k);
        const Mat<long double> ref = reference_product(A, opa, B, opb);
        const long double scale = ref.cwiseAbs().maxCoeff() * static_cast<long double>(k);

        Mat<S> Cbig = rand<S>(m + 4, n + 2, 3);
        auto C = Cbig.block(1, 1, m, n);
        moonwalk::detail::gemm<S>(C, Abig.block(2, 1, A.rows(), A.cols()), opa,
                                  Bbig.block(1, 0, B.rows(), B.cols()), opb);
        CHECK(static_cast<long double>((C.template cast<long double>() - ref).cwiseAbs().maxCoeff()) <=
              4 * eps * scale);

        const Mat<S> before = C;
        moonwalk::detail::gemm<S>(C, A, opa, B, opb, S(-0.5), /*accumulate=*/true);
        const Mat<long double> want = before.template cast<long double>() - 0.5L * ref;
        CHECK(static_cast<long double>((C.template cast<long double>() - want).cwiseAbs().maxCoeff()) <=
              4 * eps * scale);
        // The rest of Cbig is untouched.
        CHECK(Cbig.row(0).isApprox(rand<S>(m + 4, n + 2, 3).row(0)));
        CHECK(Cbig.col(n + 1).isApprox(rand<S>(m + 4, n + 2, 3).col(n + 1)));
      }
  }
}

TEMPLATE_TEST_CASE("trsm_upper: U X = B and Uᵀ X = B by their residuals", "[core][dense]", float, double) {
  using S = TestType;
  const S eps = std::numeric_limits<S>::epsilon();
  const Index k = 90;
  // Well-conditioned upper triangle; the strictly lower part is garbage that must not be read.
  Mat<S> U = rand<S>(k, k, 4) * S(0.1);
  U.diagonal().array() += S(3);
  Mat<S> Ugarbage = U;
  Ugarbage.template triangularView<Eigen::StrictlyLower>().setConstant(S(1e3));
  for (Index n : {Index(1), Index(57)})
    for (Op op : {Op::N, Op::T}) {
      CAPTURE(n, op == Op::T);
      const Mat<S> B = rand<S>(k, n, 5);
      Mat<S> X = B;
      moonwalk::detail::trsm_upper<S>(Ugarbage, op, X);
      const Mat<S> Ut = U.template triangularView<Eigen::Upper>();
      const Mat<S> residual = (op == Op::N ? Mat<S>(Ut * X) : Mat<S>(Ut.transpose() * X)) - B;
      CHECK(residual.norm() <= 50 * eps * B.norm());
    }
}

TEMPLATE_TEST_CASE("BlockedQR: A = Q [R; 0], Q orthogonal, reused at a new shape", "[core][dense]", float,
                   double) {
  using S = TestType;
  const S eps = std::numeric_limits<S>::epsilon();
  moonwalk::detail::BlockedQR<S> qr;
  // Several panels with a ragged last one, exactly one panel, and under one.
  for (auto [m, k] : {std::array<Index, 2>{300, 130}, {96, 48}, {40, 7}, {120, 120}}) {
    CAPTURE(m, k);
    const Mat<S> A = rand<S>(m, k, 6);
    qr.compute(A);
    REQUIRE(qr.rows() == m);
    REQUIRE(qr.cols() == k);
    const Mat<S> R = qr.matrixQR().template triangularView<Eigen::Upper>();
    // Qᵀ A = [R; 0]
    Mat<S> QtA = A;
    qr.apply_qt(QtA);
    CHECK((QtA - R).norm() <= 20 * eps * std::sqrt(static_cast<S>(m)) * A.norm());
    // Q [R; 0] = A
    Mat<S> QR = R;
    qr.apply_q(QR);
    CHECK((QR - A).norm() <= 20 * eps * std::sqrt(static_cast<S>(m)) * A.norm());
    // Qᵀ Q = I on a block of many columns
    Mat<S> I = Mat<S>::Identity(m, m);
    qr.apply_q(I);
    qr.apply_qt(I);
    CHECK((I - Mat<S>::Identity(m, m)).norm() <= 20 * eps * static_cast<S>(m));
    // Q's columns have unit norm, and Q e_1 is ± A's first column direction
    Mat<S> e1 = Mat<S>::Identity(m, 1);
    qr.apply_q(e1);
    CHECK(std::abs(std::abs(e1.col(0).dot(A.col(0))) - A.col(0).norm()) <= 20 * eps * A.col(0).norm());
  }
}

TEST_CASE("MappedArray: mapped above kMapBytes, heap below; copies, moves and resizes keep their values",
          "[core][dense]") {
  using moonwalk::detail::MappedArray;
  const std::size_t big = moonwalk::detail::kMapBytes / sizeof(float) + 7, small = 10;
  MappedArray<float> a;
  CHECK(a.size() == 0);
  a.assign(big, 1.5f);
  REQUIRE(a.size() == big);
  a[big - 1] = -2;
  MappedArray<float> b = a;  // a deep copy
  REQUIRE(b.size() == big);
  CHECK(b.data() != a.data());
  CHECK(b[0] == 1.5f);
  CHECK(b[big - 1] == -2);
  b[0] = 3;
  CHECK(a[0] == 1.5f);
  b.resize(small);  // (from a mapping to the heap)
  CHECK(b.size() == small);
  b[small - 1] = 4;
  MappedArray<float> c = std::move(b);
  CHECK(b.size() == 0);
  CHECK(b.data() == nullptr);
  REQUIRE(c.size() == small);
  CHECK(c[small - 1] == 4);
  a = c;
  REQUIRE(a.size() == small);
  CHECK(a[small - 1] == 4);
  const float* at = a.data();
  a.resize(small);  // (the same size: the storage stays)
  CHECK(a.data() == at);
  a.clear();
  CHECK(a.size() == 0);
  CHECK(a.data() == nullptr);
}
