// Fuzz support: the libFuzzer input as a file (the readers under test take a
// path), and the rule every harness follows — an error the library documents
// (a moonwalk::Error: DataError, CheckpointError, SpecError, ShapeError, ...)
// is an expected outcome; anything else escaping the library (std::bad_alloc,
// std::length_error, another exception), a crash, a sanitizer report, a leak
// or a hang is a finding and stops the fuzzer.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <moonwalk/core/types.hpp>
#include <string>
#include <string_view>
#include <typeinfo>

namespace moonwalk::fuzz {

/// A per-process scratch file, rewritten for every input and removed at exit.
/// In /dev/shm when it exists (no disk traffic), else the system temp directory.
class ScratchFile {
 public:
  explicit ScratchFile(const std::string& name) {
    std::error_code ec;
    std::filesystem::path dir = "/dev/shm";
    if (!std::filesystem::is_directory(dir, ec)) dir = std::filesystem::temp_directory_path();
    path_ = (dir / ("moonwalk_fuzz_" + name + "_" + std::to_string(::getpid()))).string();
  }
  ~ScratchFile() { std::remove(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  /// Writes `bytes` as the whole file; returns its path.
  const std::string& write(std::string_view bytes) const {
    std::FILE* f = std::fopen(path_.c_str(), "wb");
    if (f == nullptr) die("cannot create the scratch file");
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) die("cannot write");
    if (std::fclose(f) != 0) die("cannot close the scratch file");
    return path_;
  }
  [[nodiscard]] const std::string& path() const { return path_; }

 private:
  [[noreturn]] void die(const char* what) const {
    std::fprintf(stderr, "fuzz harness: %s %s\n", what, path_.c_str());
    std::abort();  // a harness failure, not a finding in the library
  }
  std::string path_;
};

/// Runs `f`; a moonwalk::Error is expected (returns false), success returns
/// true, and any other exception aborts with its type and message (a finding).
template <class F>
bool expect_documented_errors(const char* target, F&& f) {
  try {
    f();
    return true;
  } catch (const moonwalk::Error&) {
    return false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FINDING in %s: undocumented exception %s: %s\n", target, typeid(e).name(),
                 e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "FINDING in %s: a non-std exception escaped\n", target);
    std::abort();
  }
}

/// A broken invariant that no input may break: print and abort (a finding).
[[noreturn]] inline void finding(const char* target, const std::string& what) {
  std::fprintf(stderr, "FINDING in %s: %s\n", target, what.c_str());
  std::abort();
}

inline std::string_view as_view(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

}  // namespace moonwalk::fuzz
