// Moonwalk — dense kernels that allocate nothing once warm: matrix products,
// triangular solves with many right-hand sides, and a blocked Householder QR
// with its Q and Qᵀ applications.
//
// Eigen's level-3 kernels pack their operands into blocks on the heap for
// every product above EIGEN_STACK_ALLOCATION_LIMIT, and its blocked
// Householder code allocates its triangular factors and panel temporaries per
// call. A training step makes hundreds of such calls. Here the same Eigen
// kernels (gebp through general_matrix_matrix_product, triangular_solve_matrix)
// run on blocking objects whose buffers are this thread's scratch (`scratch`):
// one buffer per role, grown to the largest size asked and then reused. The
// packing buffers are bounded by Eigen's cache-derived blocking sizes, not by
// the problem; the Householder roles hold one panel (rows × 48) and its
// products. `moonwalk::release_thread_scratch()` gives a thread's back.
//
// With more than one Eigen thread (Eigen::nbThreads() > 1, in a program built
// with OpenMP) the products go through Eigen's own parallel GEMM, which
// allocates its per-thread blocks; without OpenMP that path is not compiled.
#pragma once

#include <Eigen/Core>
#include <Eigen/Householder>
#include <Eigen/QR>
#include <algorithm>
#include <array>
#include <cstddef>
#include <new>

#include "moonwalk/core/mapped.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk::detail {

/// What a scratch buffer is for. Kernels that call each other use different
/// roles, so an inner call never moves an outer one's buffer.
enum class Scratch : std::size_t {
  pack_lhs,    // level-3 packing (gemm, trsm): innermost
  pack_rhs,    //
  reflectors,  // Householder: one panel's V, unit lower trapezoidal, made dense
  panel,       // Householder: Vᵀ B
  panel_t,     // Householder: Tᵀ (Vᵀ B)
  unblocked,   // Householder: the unblocked panel factorisation's row scratch
  t_factor,    // Householder: a panel's T while factorising
  layer,       // a layer's own temporary (e.g. Linear's Qᵀ h_x)
  factor,      // a layer's factor converted to double for its estimates
  estimate,    // the estimates' work columns
  count
};

/// This thread's scratch: one raw, aligned block per role, shared by float
/// and double (a role is never in use at both types at once: the kernels
/// that nest run at one scalar type, and a float layer's estimates in double
/// run after its float factorisation has returned).
class ScratchArena {
 public:
  ScratchArena() = default;
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;
  ~ScratchArena() { release(); }

  /// At least `bytes` for `role`, grown (exactly: a step's sizes repeat, and
  /// memory is the point), never shrunk; the contents are not kept.
  void* get(Scratch role, std::size_t bytes) {
    Block& b = blocks_[static_cast<std::size_t>(role)];
    if (b.bytes < bytes) {
      free_block(b);  // a failed allocation (std::bad_alloc) leaves the role empty
      b.data = allocate(bytes);
      b.bytes = bytes;
    }
    return b.data;
  }
  /// Bytes held, over all roles.
  [[nodiscard]] std::size_t bytes() const {
    std::size_t n = 0;
    for (const Block& b : blocks_) n += b.bytes;
    return n;
  }
  void release() noexcept {
    for (Block& b : blocks_) free_block(b);
  }

 private:
  struct Block {
    void* data = nullptr;
    std::size_t bytes = 0;
  };
  // Blocks of at least kMapBytes are mapped from the kernel on their own
  // (core/mapped.hpp), outside the malloc heap: a long-lived block in the
  // middle of the heap would split the holes a step's large buffers are
  // reallocated into (measured: +10 MiB of peak at depth 56–80, batch 1024,
  // with the scratch on the heap under moonwalk-memory's no-trim allocator
  // setting).
  static void* allocate(std::size_t bytes) { return map_bytes(bytes); }
  static void free_block(Block& b) noexcept {
    unmap_bytes(b.data, b.bytes);
    b = {};
  }
  std::array<Block, static_cast<std::size_t>(Scratch::count)> blocks_{};
};

inline ScratchArena& scratch_arena() {
  thread_local ScratchArena arena;
  return arena;
}

/// This thread's buffer for `role`, at least n scalars (a size seen before
/// allocates nothing). Valid until the next call for the same role on this
/// thread.
template <class S>
S* scratch(Scratch role, Index n) {
  return static_cast<S*>(scratch_arena().get(role, static_cast<std::size_t>(n) * sizeof(S)));
}

/// An rows × cols matrix over this thread's buffer for `role` (uninitialised).
template <class S>
Eigen::Map<Matrix<S>> scratch_matrix(Scratch role, Index rows, Index cols) {
  return {scratch<S>(role, rows * cols), rows, cols};
}

}  // namespace moonwalk::detail

namespace moonwalk {

/// Bytes of scratch this thread holds for the dense kernels (core/dense.hpp):
/// bounded by the blocking sizes and by the largest layer's input batch.
inline std::size_t thread_scratch_bytes() { return detail::scratch_arena().bytes(); }

/// Gives this thread's scratch back to the allocator (the next product on
/// this thread allocates it again), e.g. after training, before other work.
inline void release_thread_scratch() noexcept { detail::scratch_arena().release(); }

}  // namespace moonwalk

namespace moonwalk::detail {

/// Whether an operand enters a product as is or transposed.
enum class Op { N, T };

/// Eigen's level-3 blocking with caller-owned blocks.
template <class S>
class OwnedBlocking : public Eigen::internal::level3_blocking<S, S> {
 public:
  /// Blocking sizes for an m × n result with inner dimension k, as Eigen's
  /// own products choose them (KcFactor 1 for products, 4 for solves).
  template <int KcFactor>
  static OwnedBlocking sized(Index m, Index n, Index k, bool l3_blocking) {
    Index kc = k, mc = m, nc = n;
    Index n_for_sizes = nc;  // without l3 blocking, nc stays n (as Eigen's gemm_blocking_space)
    Eigen::internal::computeProductBlockingSizes<S, S, KcFactor, Index>(
        kc, mc, l3_blocking ? nc : n_for_sizes, Index(1));
    OwnedBlocking b;
    b.m_kc = kc;
    b.m_mc = mc;
    b.m_nc = nc;
    b.m_blockA = scratch<S>(Scratch::pack_lhs, kc * mc);
    b.m_blockB = scratch<S>(Scratch::pack_rhs, kc * nc);
    return b;
  }
};

template <class S, int LhsOrder, int RhsOrder>
void gemm_kernel(Index m, Index n, Index k, const S* a, Index lda, const S* b, Index ldb, S* c, Index ldc,
                 S alpha) {
  auto blocking = OwnedBlocking<S>::template sized<1>(m, n, k, true);
  Eigen::internal::general_matrix_matrix_product<Index, S, LhsOrder, false, S, RhsOrder, false,
                                                 Eigen::ColMajor, 1>::run(m, n, k, a, lda, b, ldb, c, 1, ldc,
                                                                          alpha, blocking, nullptr);
}

/// C = α op(A) op(B), or C += α op(A) op(B) when `accumulate`. Operands are
/// column-major views with unit inner stride (a matrix, a block, a map);
/// op = Op::T reads one transposed in place. Through Eigen's GEMM kernel with
/// packing buffers from `scratch` (file comment): no allocation once warm on
/// one thread. Tiny products are coefficient-based; a product with one row
/// or one column of C is a loop of dot products or axpys (the expression
/// templates of a general Eigen product would instantiate Eigen's GEMV and
/// GEMM a second time per operand layout, in every program).
template <class S>
void gemm(MatRef<S> C, const CRef<S>& A, Op opa, const CRef<S>& B, Op opb, S alpha = S(1),
          bool accumulate = false) {
  const Index m = C.rows(), n = C.cols();
  const Index k = opa == Op::N ? A.cols() : A.rows();
  eigen_assert((opa == Op::N ? A.rows() : A.cols()) == m);
  eigen_assert((opb == Op::N ? B.rows() : B.cols()) == k && (opb == Op::N ? B.cols() : B.rows()) == n);
  if (!accumulate) C.setZero();
  if (m == 0 || n == 0 || k == 0) return;
  const bool small = m + n + k < 20;  // EIGEN_GEMM_TO_COEFFBASED_THRESHOLD
  if (small) {                        // coefficient-based
    auto add = [&](const auto& a, const auto& b) { C.noalias() += alpha * a.lazyProduct(b); };
    if (opa == Op::N && opb == Op::N) add(A, B);
    if (opa == Op::N && opb == Op::T) add(A, B.transpose());
    if (opa == Op::T && opb == Op::N) add(A.transpose(), B);
    if (opa == Op::T && opb == Op::T) add(A.transpose(), B.transpose());
    return;
  }
  if (n == 1) {  // C(:, 0) += α op(A) b with b = op(B)(:, 0): A's columns (axpy) or dot products
    auto c = C.col(0);
    if (opa == Op::N) {
      for (Index l = 0; l < k; ++l) c += (alpha * (opb == Op::N ? B(l, 0) : B(0, l))) * A.col(l);
    } else {
      for (Index i = 0; i < m; ++i)
        c(i) += alpha * (opb == Op::N ? A.col(i).dot(B.col(0)) : A.col(i).dot(B.row(0).transpose()));
    }
    return;
  }
  if (m == 1) {  // C(0, :) += α a op(B) with a = op(A)(0, :): dot products or Bᵀ's rows (axpy)
    auto c = C.row(0);
    if (opb == Op::T) {
      for (Index l = 0; l < k; ++l) c += (alpha * (opa == Op::N ? A(0, l) : A(l, 0))) * B.col(l).transpose();
    } else {
      for (Index j = 0; j < n; ++j)
        c(j) += alpha * (opa == Op::T ? A.col(0).dot(B.col(j)) : A.row(0).transpose().dot(B.col(j)));
    }
    return;
  }
#ifdef EIGEN_HAS_OPENMP
  if (Eigen::nbThreads() > 1) {  // Eigen's parallel GEMM
    auto add = [&](const auto& a, const auto& b) { C.noalias() += alpha * a * b; };
    if (opa == Op::N && opb == Op::N) add(A, B);
    if (opa == Op::N && opb == Op::T) add(A, B.transpose());
    if (opa == Op::T && opb == Op::N) add(A.transpose(), B);
    if (opa == Op::T && opb == Op::T) add(A.transpose(), B.transpose());
    return;
  }
#endif
  // A column-major matrix read transposed is a row-major one over the same storage.
  constexpr int N = Eigen::ColMajor, T = Eigen::RowMajor;
  const S *a = A.data(), *b = B.data();
  const Index lda = A.outerStride(), ldb = B.outerStride(), ldc = C.outerStride();
  if (opa == Op::N && opb == Op::N) gemm_kernel<S, N, N>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  if (opa == Op::N && opb == Op::T) gemm_kernel<S, N, T>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  if (opa == Op::T && opb == Op::N) gemm_kernel<S, T, N>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
  if (opa == Op::T && opb == Op::T) gemm_kernel<S, T, T>(m, n, k, a, lda, b, ldb, C.data(), ldc, alpha);
}

/// B ← op(U)⁻¹ B for U the upper triangle of a k × k view (its strictly lower
/// part is not read; op = Op::T solves with Uᵀ), B k × n. Eigen's blocked
/// triangular solver with packing buffers from `scratch`; one right-hand side
/// goes through Eigen's own (stack temporaries only).
template <class S>
void trsm_upper(const CRef<S>& U, Op op, MatRef<S> B) {
  const Index k = U.rows(), n = B.cols();
  eigen_assert(U.cols() == k && B.rows() == k);
  if (k == 0 || n == 0) return;
  if (n == 1) {
    if (op == Op::N)
      U.template triangularView<Eigen::Upper>().solveInPlace(B);
    else
      U.transpose().template triangularView<Eigen::Lower>().solveInPlace(B);
    return;
  }
  // As Eigen's triangular_solver_selector: KcFactor 4, no l3 blocking.
  auto blocking = OwnedBlocking<S>::template sized<4>(k, n, k, false);
  if (op == Op::N)
    Eigen::internal::triangular_solve_matrix<S, Index, Eigen::OnTheLeft, Eigen::Upper, false, Eigen::ColMajor,
                                             Eigen::ColMajor, 1>::run(k, n, U.data(), U.outerStride(),
                                                                      B.data(), 1, B.outerStride(), blocking);
  else  // Uᵀ: a lower triangle, row-major over U's storage
    Eigen::internal::triangular_solve_matrix<S, Index, Eigen::OnTheLeft, Eigen::Lower, false, Eigen::RowMajor,
                                             Eigen::ColMajor, 1>::run(k, n, U.data(), U.outerStride(),
                                                                      B.data(), 1, B.outerStride(), blocking);
}

/// Householder QR of an m × k matrix (m ≥ k), A = Q R with
/// Q = H₁ H₂ ⋯ H_k, H_j = I − τ_j v_j v_jᵀ, blocked as LAPACK's xGEQRF: each
/// panel of kBlock columns is factorised column by column, then applied to
/// the trailing columns as one block reflector H_j ⋯ H_{j+b−1} = I − V T Vᵀ
/// (T upper triangular, xLARFT), through two products and a small one. The
/// T factors are formed again on the first application of Q or Qᵀ and kept,
/// so applying Q or Qᵀ to a block is also level 3.
/// Storage as Eigen's HouseholderQR: R on and above the diagonal of
/// matrixQR(), v_j (unit leading entry implied) below it, τ in hCoeffs().
/// Nothing is allocated once the shape has been seen (storage is reused; the
/// temporaries are `scratch`).
template <class S>
class BlockedQR {
 public:
  static constexpr Index kBlock = 48;

  /// Factorises a (m × k, m ≥ k) into this object's storage.
  template <class Derived>
  void compute(const Eigen::MatrixBase<Derived>& a) {
    const Index m = a.rows(), k = a.cols();
    eigen_assert(m >= k);
    safe_resize(qr_, m, k);
    safe_resize(tau_, k);
    t_formed_ = false;
    qr_ = a;
    S* row_scratch = scratch<S>(Scratch::unblocked, k);
    for (Index j = 0; j < k; j += kBlock) {
      const Index b = std::min(kBlock, k - j), rows = m - j, trailing = k - j - b;
      auto panel = qr_.block(j, j, rows, b);
      auto tau = tau_.segment(j, b);
      Eigen::internal::householder_qr_inplace_unblocked(panel, tau, row_scratch);
      if (trailing > 0) {
        auto T = scratch_matrix<S>(Scratch::t_factor, b, b);
        make_t(j, b, T);
        apply_block(j, b, T, qr_.block(j, j + b, rows, trailing), true);
      }
    }
  }

  [[nodiscard]] const Matrix<S>& matrixQR() const { return qr_; }
  [[nodiscard]] const Vector<S>& hCoeffs() const { return tau_; }
  [[nodiscard]] Index rows() const { return qr_.rows(); }
  [[nodiscard]] Index cols() const { return qr_.cols(); }

  /// B ← Qᵀ B = H_k ⋯ H₁ B (B m × n): the panels' block reflectors, first to last.
  void apply_qt(MatRef<S> B) const {
    eigen_assert(B.rows() == rows());
    form_t();
    for (Index j = 0; j < cols(); j += kBlock) {
      const Index b = std::min(kBlock, cols() - j);
      apply_block(j, b, t_.block(0, j, b, b), B.bottomRows(rows() - j), true);
    }
  }
  /// B ← Q B = H₁ ⋯ H_k B (B m × n): the panels' block reflectors, last to first.
  void apply_q(MatRef<S> B) const {
    eigen_assert(B.rows() == rows());
    if (cols() == 0) return;
    form_t();
    for (Index j = (cols() - 1) / kBlock * kBlock; j >= 0; j -= kBlock) {
      const Index b = std::min(kBlock, cols() - j);
      apply_block(j, b, t_.block(0, j, b, b), B.bottomRows(rows() - j), false);
    }
  }

 private:
  /// T (b × b, upper triangular, zeros below) of the panel of b reflectors
  /// starting at column j: H_j ⋯ H_{j+b−1} = I − V T Vᵀ (xLARFT).
  void make_t(Index j, Index b, MatRef<S> T) const {
    T.setZero();
    Eigen::internal::make_block_householder_triangular_factor(T, qr_.block(j, j, rows() - j, b),
                                                              tau_.segment(j, b));
  }
  /// The panels' T factors, kept from the first application of Q or Qᵀ on
  /// (not by compute(): a factorisation read only for R, e.g. for condition
  /// estimates, holds no more than Eigen's would).
  void form_t() const {
    if (t_formed_) return;
    safe_resize(t_, std::min(kBlock, std::max<Index>(cols(), 1)), cols());
    for (Index j = 0; j < cols(); j += kBlock) {
      const Index b = std::min(kBlock, cols() - j);
      make_t(j, b, t_.block(0, j, b, b));
    }
    t_formed_ = true;
  }

  /// B ← (I − V T Vᵀ)ᵀ B (`transposed`) or (I − V T Vᵀ) B, for the panel of
  /// b reflectors starting at column j with its T (B holds rows j… of the operand).
  void apply_block(Index j, Index b, const CRef<S>& T, MatRef<S> B, bool transposed) const {
    const Index rows = B.rows(), n = B.cols();
    if (n == 0) return;
    // V made dense: unit diagonal, zeros above, the stored vectors below.
    auto V = scratch_matrix<S>(Scratch::reflectors, rows, b);
    V = qr_.block(j, j, rows, b).template triangularView<Eigen::StrictlyLower>();
    V.diagonal().setOnes();
    auto W = scratch_matrix<S>(Scratch::panel, b, n);
    auto TW = scratch_matrix<S>(Scratch::panel_t, b, n);
    gemm<S>(W, V, Op::T, B, Op::N);                               // W = Vᵀ B
    gemm<S>(TW, T, transposed ? Op::T : Op::N, W, Op::N);         // T W or Tᵀ W
    gemm<S>(B, V, Op::N, TW, Op::N, S(-1), /*accumulate=*/true);  // B −= V (·)
  }

  Matrix<S> qr_;
  Vector<S> tau_;
  mutable Matrix<S> t_;  // the panels' T factors side by side (kBlock × k), formed on first use
  mutable bool t_formed_ = false;
};

}  // namespace moonwalk::detail
