// Test support: a fresh temporary directory, removed with its contents.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <moonwalk/core/types.hpp>
#include <string>
#include <system_error>

namespace moonwalk::test {

/// A fresh directory under the system temp directory, removed with its contents on destruction.
struct TempDir {
  std::filesystem::path dir;
  TempDir() {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    dir = std::filesystem::temp_directory_path() /
          moonwalk::detail::cat("moonwalk_test_", ::getpid(), "_", stamp, "_", counter++);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] std::string operator/(const std::string& name) const { return (dir / name).string(); }
};

}  // namespace moonwalk::test
