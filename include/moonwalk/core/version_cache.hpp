// Moonwalk — what a layer derives from its weights, computed once per weight
// version.
//
// A layer that factorises W (Linear's QR, ConvValid's pseudo-inverse of its
// first tap) or estimates its vijp's amplification keeps the result for as
// long as the weights stay the same. The layer counts weight versions (every
// mutable access to θ starts a new one) and keeps a VersionCache: asked for
// version v, it returns the value it holds for v or recomputes it in place.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <utility>

namespace moonwalk {

/// One value of type T valid for one weight version (header comment).
/// Copying a layer gives the copy an empty cache: the copies' weights may
/// diverge. The value lives on the heap, so a layer stays cheap to move.
template <class T>
class VersionCache {
 public:
  VersionCache() = default;
  VersionCache(const VersionCache&) {}
  VersionCache& operator=(const VersionCache&) {
    slot_.reset();
    return *this;
  }
  VersionCache(VersionCache&&) noexcept = default;
  VersionCache& operator=(VersionCache&&) noexcept = default;
  ~VersionCache() = default;

  /// The value for `version`: held, or refilled by compute(T&) (which may
  /// reuse the storage of the previous version's value). If compute throws,
  /// the cache holds no version and the exception propagates.
  template <class F>
  T& get(std::uint64_t version, F&& compute) const {
    if (!slot_) slot_ = std::make_unique<Slot>();
    if (slot_->version != version) {
      slot_->version = kNone;
      std::forward<F>(compute)(slot_->value);
      slot_->version = version;
    }
    return slot_->value;
  }

  /// Frees the held value (the next get() recomputes it).
  void reset() const noexcept { slot_.reset(); }

 private:
  static constexpr std::uint64_t kNone = std::numeric_limits<std::uint64_t>::max();
  struct Slot {
    std::uint64_t version = kNone;
    T value{};
  };
  mutable std::unique_ptr<Slot> slot_;
};

}  // namespace moonwalk
