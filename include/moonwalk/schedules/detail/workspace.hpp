// Moonwalk — buffers a schedule keeps across its steps.
//
// A training loop calls a schedule on the same shapes step after step. The
// schedule's working buffers (activations, cotangents, residuals, anchors)
// live in a Workspace that persists across those steps: sized by the first
// step on a shape, reused by every later one (Eigen's resize keeps storage of
// the same size), so the steady state allocates nothing activation-sized.
//
// Kept across steps only while the activations are no larger than the
// parameters (keep_across_steps): in the activation-dominated regime a
// Moonwalk step's working set changes with its phase (residuals, then
// anchors, then the sweep's buffers), and holding all of it at once raised
// the peak (depth 64, width 256, batch 4096: 187 MiB against 146 MiB
// released, BENCHMARKS.md), so there the buffers are sized once per step,
// reused by every layer, and freed with the step.
//
// Copies of a schedule share one workspace (the trainer copies its schedule
// every step); one step uses it at a time, and a step that finds it busy
// (another thread, or a schedule nested in another's fallback) works in a
// fresh one of its own.
#pragma once

#include <algorithm>
#include <any>
#include <cstddef>
#include <deque>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk::detail {

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

/// Bytes of storage a workspace value holds: `storage_bytes()` where it has
/// one (Buffer, CastLayers), a dense matrix's coefficients, the sum over a
/// vector of such values, a residual's nbytes(); 0 for bookkeeping (names,
/// plans, accounts).
template <class T>
std::size_t storage_bytes(const T& t) {
  if constexpr (requires { t.storage_bytes(); }) {
    return t.storage_bytes();
  } else if constexpr (std::is_base_of_v<Eigen::DenseBase<T>, T>) {
    return static_cast<std::size_t>(t.size()) * sizeof(typename T::Scalar);
  } else if constexpr (is_std_vector<T>::value) {
    std::size_t b = 0;
    for (const auto& e : t) b += storage_bytes(e);
    return b;
  } else if constexpr (requires { t.bytes(); }) {
    return moonwalk::nbytes(t);
  } else {
    return 0;
  }
}

/// Typed buffers by slot number, kept until clear(). A reference get()
/// returns stays valid while other slots are added (a deque never moves its
/// elements when it grows at the end).
class Workspace {
 public:
  /// Slot k as a T: default-constructed on first use (or when k held another
  /// type), the same object on every later call.
  template <class T>
  T& get(std::size_t k) {
    if (k >= slots_.size()) slots_.resize(k + 1);
    Slot& s = slots_[k];
    if (T* p = std::any_cast<T>(&s.value)) return *p;
    s.bytes = [](const std::any& a) { return storage_bytes(*std::any_cast<T>(&a)); };
    return s.value.template emplace<T>();
  }

  /// Bytes of storage every slot holds now (storage_bytes).
  [[nodiscard]] std::size_t bytes() const {
    std::size_t b = 0;
    for (const Slot& s : slots_)
      if (s.value.has_value()) b += s.bytes(s.value);
    return b;
  }

  /// A spare buffer from pool k (empty when none is spare); give it back with
  /// recycle(k, …) once its contents are consumed. A pool holds as many
  /// buffers as were ever out at once.
  template <class T>
  T take_spare(std::size_t k) {
    auto& pool = get<std::vector<T>>(k);
    if (pool.empty()) return T{};
    T t = std::move(pool.back());
    pool.pop_back();
    return t;
  }
  template <class T>
  void recycle(std::size_t k, T&& t) {
    auto& pool = get<std::vector<std::remove_cvref_t<T>>>(k);
    pool.push_back(std::forward<T>(t));
  }

  /// Frees slot k's buffer.
  void release(std::size_t k) {
    if (k < slots_.size()) slots_[k].value.reset();
  }
  /// Frees every buffer.
  void clear() { slots_.clear(); }
  /// Frees every buffer but those of the slots in `kept` (a step's
  /// bookkeeping, a few entries per layer, kept where its buffers are not).
  void clear_except(std::initializer_list<std::size_t> kept) {
    for (std::size_t k = 0; k < slots_.size(); ++k)
      if (std::find(kept.begin(), kept.end(), k) == kept.end()) slots_[k].value.reset();
  }

 private:
  struct Slot {
    std::any value;
    std::size_t (*bytes)(const std::any&) = nullptr;  // storage_bytes of the value's type
  };
  std::deque<Slot> slots_;
};

/// Storage for matrices whose shape changes from layer to layer: it grows to
/// the largest view asked for and never shrinks, so one buffer serves a whole
/// network, step after step.
template <class S>
class Buffer {
 public:
  /// A rows × cols matrix over this storage. Its contents are those left by
  /// the last writer when the storage did not grow, unspecified otherwise;
  /// growing invalidates earlier views.
  Eigen::Map<Matrix<S>> view(Index rows, Index cols) {
    if (storage_.size() < rows * cols) safe_resize(storage_, rows * cols);
    return {storage_.data(), rows, cols};
  }
  [[nodiscard]] const S* data() const { return storage_.data(); }
  [[nodiscard]] std::size_t storage_bytes() const {
    return static_cast<std::size_t>(storage_.size()) * sizeof(S);
  }

 private:
  Vector<S> storage_;
};

/// Two buffers a chain of layer operations alternates between: current()
/// holds the last result, next(rows, cols) is where the following one is
/// written, and flip() makes it current.
template <class S>
class PingPong {
 public:
  PingPong(Buffer<S>& a, Buffer<S>& b) : buf_{&a, &b} {}
  /// Makes a copy of m the current value.
  template <class D>
  void assign(const Eigen::MatrixBase<D>& m) {
    rows_ = m.rows();
    cols_ = m.cols();
    buf_[cur_]->view(rows_, cols_) = m;
  }
  Eigen::Map<Matrix<S>> current() { return buf_[cur_]->view(rows_, cols_); }
  Eigen::Map<Matrix<S>> next(Index rows, Index cols) {
    next_rows_ = rows;
    next_cols_ = cols;
    return buf_[1 - cur_]->view(rows, cols);
  }
  void flip() {
    cur_ = 1 - cur_;
    rows_ = next_rows_;
    cols_ = next_cols_;
  }

 private:
  Buffer<S>* buf_[2];
  int cur_ = 0;
  Index rows_ = 0, cols_ = 0, next_rows_ = 0, next_cols_ = 0;
};

/// Whether a step's buffers stay for the next one: the activations a
/// backprop step would keep (Σ_i in_i · batch) are no larger than the
/// parameters.
template <class N>
bool keep_across_steps(N& net, Index batch) {
  Index activations = 0, params = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      activations += l.in_features() * batch;
      params += l.num_params();
    });
  return activations <= params;
}

/// Layer names resolved once: l.name() formats a new string on every call,
/// so a schedule that lists layers in its report each step reads them here.
/// Layer i's name is formatted again when the layer at position i is another
/// object, of another type (for a type-erased layer: another wrapped layer)
/// or of other widths than the one it was formatted for.
class LayerNames {
 public:
  template <class L>
  const std::string& operator()(std::size_t i, const L& l) {
    if (i >= names_.size()) names_.resize(i + 1);
    Entry& e = names_[i];
    Key k{&l, &l, &typeid(L), l.in_features(), l.out_features()};
    if constexpr (requires { l.wrapped_address(); }) {
      k.wrapped = l.wrapped_address();
      k.type = &l.wrapped_type();
    }
    if (!e.formatted || !(e.key == k)) {
      e.name = l.name();
      e.key = k;
      e.formatted = true;
    }
    return e.name;
  }

 private:
  struct Key {
    const void* address = nullptr;
    const void* wrapped = nullptr;
    const std::type_info* type = nullptr;
    Index in = 0, out = 0;
    bool operator==(const Key&) const = default;
  };
  struct Entry {
    Key key;
    std::string name;
    bool formatted = false;
  };
  std::vector<Entry> names_;
};

/// A Workspace with the lock that gives it to one step at a time.
struct SharedWorkspace {
  std::mutex busy;
  Workspace buffers;
};

/// A new shared workspace, or nullptr when memory is short (a schedule then
/// works in a fresh workspace each step); noexcept so that schedules stay
/// nothrow-default-constructible.
inline std::shared_ptr<SharedWorkspace> new_workspace() noexcept {
  try {
    return std::make_shared<SharedWorkspace>();
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

/// The workspace one step works in: the shared one when it is free, else a
/// local one that lives as long as the lease.
class WorkspaceLease {
 public:
  explicit WorkspaceLease(const std::shared_ptr<SharedWorkspace>& shared) {
    if (shared && shared->busy.try_lock()) {
      held_ = shared.get();
      ws_ = &shared->buffers;
    } else {
      local_ = std::make_unique<Workspace>();
      ws_ = local_.get();
    }
  }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  ~WorkspaceLease() {
    if (held_) held_->busy.unlock();
  }
  Workspace& operator*() const { return *ws_; }
  Workspace* operator->() const { return ws_; }

 private:
  SharedWorkspace* held_ = nullptr;
  std::unique_ptr<Workspace> local_;
  Workspace* ws_ = nullptr;
};

}  // namespace moonwalk::detail
