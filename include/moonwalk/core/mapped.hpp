// Moonwalk — large blocks mapped from the kernel, outside the malloc heap.
//
// A block that lives for one phase (the planner's table) or for the whole
// run (a thread's product scratch) would otherwise sit in the heap: freed,
// it leaves a hole that the next phase's buffers may not fit into, and under
// an allocator that keeps freed memory (moonwalk-train and moonwalk-memory
// set M_TRIM_THRESHOLD and M_MMAP_THRESHOLD high) the hole stays resident.
// Mapped on its own, a block's pages go back to the kernel when it is freed.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MOONWALK_SCRATCH_MMAP 1
#endif

namespace moonwalk::detail {

/// Blocks of at least this size are mapped from the kernel on their own.
inline constexpr std::size_t kMapBytes = std::size_t{64} << 10;

/// `bytes` (aligned for any scalar), mapped on their own when at least
/// kMapBytes (where the platform can), else from Eigen's aligned heap.
/// Throws std::bad_alloc.
inline void* map_bytes(std::size_t bytes) {
#ifdef MOONWALK_SCRATCH_MMAP
  if (bytes >= kMapBytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return p;
  }
#endif
  return Eigen::internal::aligned_malloc(bytes);
}

/// Frees what map_bytes(bytes) returned (nullptr: nothing).
inline void unmap_bytes(void* p, std::size_t bytes) noexcept {
  if (p == nullptr) return;
#ifdef MOONWALK_SCRATCH_MMAP
  if (bytes >= kMapBytes) {
    munmap(p, bytes);
    return;
  }
#endif
  Eigen::internal::aligned_free(p);
}

/// An owning array of n trivially copyable T in map_bytes storage.
template <class T>
class MappedArray {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);

 public:
  MappedArray() = default;
  MappedArray(const MappedArray& o) { *this = o; }
  MappedArray(MappedArray&& o) noexcept : data_(o.data_), n_(o.n_) {
    o.data_ = nullptr;
    o.n_ = 0;
  }
  MappedArray& operator=(const MappedArray& o) {
    if (this != &o) {
      resize(o.n_);
      std::copy(o.data_, o.data_ + o.n_, data_);
    }
    return *this;
  }
  MappedArray& operator=(MappedArray&& o) noexcept {
    if (this != &o) {
      clear();
      std::swap(data_, o.data_);
      std::swap(n_, o.n_);
    }
    return *this;
  }
  ~MappedArray() { clear(); }

  /// n copies of `value` (the old contents freed first, so the two never
  /// coexist).
  void assign(std::size_t n, const T& value) {
    clear();
    resize(n);
    std::fill(data_, data_ + n_, value);
  }
  /// n elements, their values unspecified (nothing happens when it has n).
  void resize(std::size_t n) {
    if (n == n_) return;
    clear();
    if (n == 0) return;
    data_ = static_cast<T*>(map_bytes(n * sizeof(T)));
    n_ = n;
  }
  /// No elements, the storage freed.
  void clear() noexcept {
    unmap_bytes(data_, n_ * sizeof(T));
    data_ = nullptr;
    n_ = 0;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  [[nodiscard]] std::size_t size() const { return n_; }

 private:
  T* data_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace moonwalk::detail
