// Moonwalk — counter-based random numbers: splitmix64 (Steele, Lea, Flood
// 2014). Draw k of a stream is a pure function of (stream key, k), so any
// pass can replay any draw without storing it.
#pragma once

#include <cstdint>

namespace moonwalk::detail {

/// The splitmix64 output for state z + golden (the finaliser of one step).
inline std::uint64_t splitmix64_at(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// splitmix64: the next 64-bit output of state (which advances by one step).
inline std::uint64_t splitmix64(std::uint64_t& state) {
  const std::uint64_t z = splitmix64_at(state);
  state += 0x9e3779b97f4a7c15ULL;
  return z;
}

/// A uniform number in [0, 1) from 64 random bits (their top 53).
inline double unit_interval(std::uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

}  // namespace moonwalk::detail
