// Moonwalk — scalar, matrix aliases and the library's exceptions.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace moonwalk {

using Index = Eigen::Index;

/// A batch: one column per sample (`features × batch`), docs/design.md §2.
template <class S>
using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
template <class S>
using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;
/// Read-only view of a batch, used by non-template hot paths.
template <class S>
using CRef = Eigen::Ref<const Matrix<S>>;
/// Read-only view of a flat parameter vector.
template <class S>
using CVecRef = Eigen::Ref<const Vector<S>>;
/// Writable view of a flat gradient vector.
template <class S>
using VecRef = Eigen::Ref<Vector<S>>;
/// Writable view of a batch of the right shape (the output argument of the
/// `*_into` operations: a matrix, a block or a map over a workspace buffer).
template <class S>
using MatRef = Eigen::Ref<Matrix<S>>;

namespace detail {

/// m.resize(rows, cols) that a failed allocation leaves empty, not broken.
/// Eigen frees the old storage before allocating the new one, and when that
/// allocation throws (std::bad_alloc, e.g. under a memory limit) it keeps
/// pointing at the freed block, which its destructor then frees again.
/// Emptying m first (a move from an empty matrix) avoids that. Nothing
/// happens when the shape is already right.
template <class Derived>
void safe_resize(Eigen::PlainObjectBase<Derived>& m, Index rows, Index cols) {
  if (m.rows() == rows && m.cols() == cols) return;
  m.derived() = Derived();
  m.resize(rows, cols);
}
/// The same for a vector of n entries.
template <class Derived>
void safe_resize(Eigen::PlainObjectBase<Derived>& v, Index n) {
  if (v.size() == n) return;
  v.derived() = Derived();
  v.resize(n);
}

/// A layer's parameter gradient: n numbers, zero until accumulated into.
/// A layer made by its constructor stores them from the start (`stored`); a
/// cast (`on_first_use`) only once they are asked for: a cast made for a
/// schedule's double cotangents never accumulates (its gradient goes to the
/// layer it was cast from), and W-sized zeros per cast — 512 KiB for a
/// 256 × 256 Linear in double — would be memory for nothing. (The first
/// access of a cast's gradient is not thread-safe.)
template <class S>
class Gradient {
 public:
  Gradient() = default;
  [[nodiscard]] static Gradient stored(Index n) {
    Gradient g;
    g.n_ = n;
    g.g_.setZero(n);
    return g;
  }
  [[nodiscard]] static Gradient on_first_use(Index n) {
    Gradient g;
    g.n_ = n;
    return g;
  }
  /// n zeros: in place where n numbers are stored, else stored on first use.
  void assign_zero(Index n) {
    n_ = n;
    if (g_.size() == n)
      g_.setZero();
    else
      g_.resize(0);
  }
  /// Whether the numbers are stored yet.
  [[nodiscard]] bool is_stored() const noexcept { return g_.size() == n_; }
  /// The n numbers (stored, zero, on first use).
  [[nodiscard]] std::span<S> span() const {
    if (!is_stored()) g_.setZero(n_);
    return {g_.data(), static_cast<std::size_t>(n_)};
  }

 private:
  mutable Vector<S> g_;
  Index n_ = 0;
};

}  // namespace detail

/// θ stored as one vector, with its gradient and a weight version: the
/// parameter members of the layer contract (num_params, parameters,
/// gradients, stores_gradient) written once, for a layer to derive from.
/// Mutable access to θ starts a new weight version (`weight_version()`): a
/// layer that caches what it derives from θ (a factorisation, an amplification
/// bound) rebuilds it when the version has moved. Write through a view
/// obtained after the last use of the cache; optimizers re-fetch views each
/// step.
template <class S>
class FlatParameters {
 public:
  [[nodiscard]] Index num_params() const { return theta_.size(); }
  std::span<S> parameters() {
    ++version_;
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  [[nodiscard]] std::span<const S> parameters() const {
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  std::span<S> gradients() { return grad_.span(); }
  [[nodiscard]] std::span<const S> gradients() const { return grad_.span(); }
  /// Whether the gradient is stored yet (a cast stores it on first access).
  [[nodiscard]] bool stores_gradient() const noexcept { return grad_.is_stored(); }
  /// Incremented by every mutable access to θ.
  [[nodiscard]] std::uint64_t weight_version() const noexcept { return version_; }

 protected:
  FlatParameters() = default;
  /// n zeros, gradient stored (a constructed layer).
  explicit FlatParameters(Index n) : theta_(Vector<S>::Zero(n)), grad_(detail::Gradient<S>::stored(n)) {}
  /// θ given, gradient stored on first use (a cast: detail::Gradient).
  explicit FlatParameters(Vector<S> theta)
      : theta_(std::move(theta)), grad_(detail::Gradient<S>::on_first_use(theta_.size())) {}

  Vector<S> theta_;
  detail::Gradient<S> grad_;
  std::uint64_t version_ = 0;
};

/// Base of every error Moonwalk throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A batch whose shape does not fit the layer; the message names both.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A layer asked for an operation its Jacobian cannot give (e.g. vijp of a
/// rank-deficient or expanding Linear).
class RankError : public Error {
 public:
  using Error::Error;
};

/// A schedule that cannot run on a given network.
class ScheduleError : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline std::string shape_str(Index r, Index c) {
  std::ostringstream s;
  s << r << "x" << c;
  return s.str();
}

/// Streams the arguments into one string (used for names and messages instead
/// of `std::string` operator+, which trips GCC 12's -Wrestrict false positive,
/// PR 105329).
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}

/// The name of a layer (or a plain string), computed only when an error is raised.
template <class Named>
std::string name_of(const Named& n) {
  if constexpr (std::is_convertible_v<const Named&, std::string>)
    return std::string(n);
  else
    return n.name();
}

/// Throws ShapeError unless `rows(m) == expected_rows` (and the column count,
/// when `expected_cols >= 0`).
template <class Named, class Derived>
void check_rows(const Named& layer, const char* what, const Eigen::MatrixBase<Derived>& m,
                Index expected_rows, Index expected_cols = -1) {
  if (m.rows() != expected_rows || (expected_cols >= 0 && m.cols() != expected_cols)) {
    std::ostringstream s;
    s << name_of(layer) << ": " << what << " has shape " << shape_str(m.rows(), m.cols()) << ", expected "
      << expected_rows << "x" << (expected_cols >= 0 ? std::to_string(expected_cols) : std::string("batch"));
    throw ShapeError(s.str());
  }
}

/// Throws ShapeError unless two batches have the same column count.
template <class Named>
void check_batch(const Named& layer, const char* a, Index ca, const char* b, Index cb) {
  if (ca != cb) {
    std::ostringstream s;
    s << name_of(layer) << ": " << a << " has " << ca << " columns but " << b << " has " << cb;
    throw ShapeError(s.str());
  }
}

}  // namespace detail
/// A byte count as command lines write it: a positive integer, optionally
/// with a binary suffix K, M or G (case-insensitive): "512M" = 512 · 2^20.
/// Throws Error naming `option` and the text when it is not one.
inline std::size_t parse_bytes(const std::string& option, const std::string& text) {
  const auto bad = [&](const char* why) { return Error(detail::cat(option, ": ", why, ": '", text, "'")); };
  constexpr const char* expected = "expected a number of bytes (suffix K, M or G)";
  std::size_t i = 0, n = 0;
  const std::size_t max = static_cast<std::size_t>(-1);
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    const auto d = static_cast<std::size_t>(text[i] - '0');
    if (n > (max - d) / 10) throw bad("too large");
    n = n * 10 + d;
  }
  if (i == 0) throw bad(expected);
  int shift = 0;
  if (i + 1 == text.size()) {
    switch (text[i]) {
      case 'K':
      case 'k':
        shift = 10;
        break;
      case 'M':
      case 'm':
        shift = 20;
        break;
      case 'G':
      case 'g':
        shift = 30;
        break;
      default:
        throw bad("unknown suffix (expected K, M or G)");
    }
  } else if (i != text.size()) {
    throw bad(expected);
  }
  if (n > (max >> shift)) throw bad("too large");
  n <<= shift;
  if (n == 0) throw bad("must be > 0");
  return n;
}

}  // namespace moonwalk
