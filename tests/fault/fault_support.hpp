// Fault tests: small helpers shared by the kill and full-disk tests (plain
// programs, no Catch2: each is one scenario with its own process tricks).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace moonwalk::fault {

/// CTest's SKIP_RETURN_CODE for these programs.
inline constexpr int skip_code = 77;

/// Prints "FAIL: ..." and exits 1.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  std::fflush(stderr);
  std::exit(1);
}

inline void require(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

/// The names in `dir` that start with `prefix` (e.g. the checkpoint's temporaries).
inline std::vector<std::string> names_starting_with(const std::filesystem::path& dir,
                                                    const std::string& prefix) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0) out.push_back(n);
  }
  return out;
}

}  // namespace moonwalk::fault
