// Moonwalk benchmarks — counts the process's heap allocations.
//
// Interposes glibc's allocation entry points (malloc, calloc, realloc,
// memalign, posix_memalign, aligned_alloc, valloc, pvalloc): each call adds
// one to `allocation_count()` and the bytes it asks for to
// `allocation_bytes()`, and forwards to glibc's own implementation
// (__libc_*), so mallopt settings and peak RSS are unchanged. Eigen, the
// standard library and the OpenMP runtime all allocate through these, so the
// difference of two readings is every heap allocation made in between.
// Anonymous mappings asked for by name (mmap, mmap64: what Moonwalk's large
// scratch blocks use, core/dense.hpp) count too; glibc's own mappings for
// large mallocs are already counted as the malloc.
//
// Include in exactly one translation unit of an executable (it defines the
// symbols), never in a library.
#pragma once

#include <malloc.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* __libc_valloc(std::size_t);
void* __libc_pvalloc(std::size_t);
void __libc_free(void*);
}

namespace moonwalk::bench {

inline std::atomic<std::uint64_t> allocations{0};
inline std::atomic<std::uint64_t> allocated_bytes{0};
inline std::atomic<std::int64_t> live_bytes{0};       // usable bytes of live heap blocks
inline std::atomic<std::int64_t> live_bytes_peak{0};  // their maximum since reset_live_peak()

/// Heap allocations made by the process so far.
inline std::uint64_t allocation_count() { return allocations.load(std::memory_order_relaxed); }
/// Bytes those allocations asked for.
inline std::uint64_t allocation_bytes() { return allocated_bytes.load(std::memory_order_relaxed); }

/// Bytes of heap blocks live now (malloc_usable_size of each: what the
/// allocator hands out, not its bookkeeping or free holes).
inline std::int64_t heap_live_bytes() { return live_bytes.load(std::memory_order_relaxed); }
/// The most heap_live_bytes() has been since the last reset_live_peak().
inline std::int64_t heap_live_peak() { return live_bytes_peak.load(std::memory_order_relaxed); }
/// Starts a new maximum at the live bytes of now.
inline void reset_live_peak() { live_bytes_peak.store(heap_live_bytes(), std::memory_order_relaxed); }

namespace detail {
inline void count_one(std::size_t bytes) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(bytes, std::memory_order_relaxed);
}
/// A block of `usable` bytes came (+) or went (−).
inline void live_change(std::int64_t usable) {
  const std::int64_t now = live_bytes.fetch_add(usable, std::memory_order_relaxed) + usable;
  std::int64_t peak = live_bytes_peak.load(std::memory_order_relaxed);
  while (now > peak && !live_bytes_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}
inline void* came(void* p) {
  if (p != nullptr) live_change(static_cast<std::int64_t>(malloc_usable_size(p)));
  return p;
}
}  // namespace detail

}  // namespace moonwalk::bench

extern "C" {
void* malloc(std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  return moonwalk::bench::detail::came(__libc_malloc(n));
}
void* calloc(std::size_t n, std::size_t size) noexcept {
  moonwalk::bench::detail::count_one(n * size);
  return moonwalk::bench::detail::came(__libc_calloc(n, size));
}
void* realloc(void* p, std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  const auto before = static_cast<std::int64_t>(p != nullptr ? malloc_usable_size(p) : 0);
  void* q = __libc_realloc(p, n);
  // (A failed realloc leaves p live; realloc(p, 0) may free it and return null.)
  if (q != nullptr) moonwalk::bench::detail::live_change(static_cast<std::int64_t>(malloc_usable_size(q)) - before);
  else if (n == 0) moonwalk::bench::detail::live_change(-before);
  return q;
}
void free(void* p) noexcept {
  if (p != nullptr) moonwalk::bench::detail::live_change(-static_cast<std::int64_t>(malloc_usable_size(p)));
  __libc_free(p);
}
void* memalign(std::size_t alignment, std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  return moonwalk::bench::detail::came(__libc_memalign(alignment, n));
}
void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  return moonwalk::bench::detail::came(__libc_memalign(alignment, n));
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  // posix_memalign: alignment a power of two multiple of sizeof(void*), else EINVAL.
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return 22;  // EINVAL
  void* p = moonwalk::bench::detail::came(__libc_memalign(alignment, n));
  if (p == nullptr && n != 0) return 12;  // ENOMEM
  *out = p;
  return 0;
}
void* valloc(std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  return moonwalk::bench::detail::came(__libc_valloc(n));
}
void* pvalloc(std::size_t n) noexcept {
  moonwalk::bench::detail::count_one(n);
  return moonwalk::bench::detail::came(__libc_pvalloc(n));
}
// mmap by name (glibc's __mmap is private): the system call itself.
void* mmap(void* addr, std::size_t n, int prot, int flags, int fd, off_t offset) noexcept {
  if (flags & MAP_ANONYMOUS) moonwalk::bench::detail::count_one(n);
  return reinterpret_cast<void*>(syscall(SYS_mmap, addr, n, prot, flags, fd, offset));
}
void* mmap64(void* addr, std::size_t n, int prot, int flags, int fd, off_t offset) noexcept {
  return mmap(addr, n, prot, flags, fd, offset);
}
}
