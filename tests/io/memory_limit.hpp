// Test support: run a function under an address-space limit, in a child
// process, to show that crafted files are refused before any large allocation.
#pragma once

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOONWALK_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define MOONWALK_TEST_SANITIZED 1
#endif
#endif

namespace moonwalk::test {

/// f()'s result, run in a forked child whose address space may grow by at
/// most `headroom` bytes beyond what it maps when f starts (RLIMIT_AS), so
/// an allocation larger than that throws std::bad_alloc there. f should
/// return a small status (0 = as expected); a signal gives 128 + its number.
/// nullopt where the limit cannot be applied: under a sanitizer (ASan maps
/// terabytes of shadow memory) or when fork fails.
inline std::optional<int> run_with_memory_headroom(std::size_t headroom, const std::function<int()>& f) {
#ifdef MOONWALK_TEST_SANITIZED
  (void)headroom;
  (void)f;
  return std::nullopt;
#else
  std::fflush(nullptr);
  const ::pid_t pid = ::fork();
  if (pid < 0) return std::nullopt;
  if (pid == 0) {
    int code = 99;
    try {
      std::size_t pages = 0;
      std::ifstream statm("/proc/self/statm");
      if (!(statm >> pages)) ::_exit(98);
      const auto now = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE));
      const struct rlimit lim { now + headroom, now + headroom };
      if (::setrlimit(RLIMIT_AS, &lim) != 0) ::_exit(97);
      code = f();
    } catch (...) {
      code = 96;
    }
    ::_exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 255;
#endif
}

}  // namespace moonwalk::test
