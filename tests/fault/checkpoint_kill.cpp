// Fault test: kill -9 during checkpoint writes. A child process resumes from
// the checkpoint and saves the next generations in a loop (save_checkpoint: a
// temporary file, write, fsync, rename over the checkpoint; 8 MiB each, so the
// write takes a while). The parent watches the directory (inotify): it lets 0
// to 2 saves complete, and when the next temporary appears it waits a random
// fraction of the time one write takes (measured on the first) and SIGKILLs
// the child. Then the checkpoint must load, hold exactly the generation the
// child last reported saved (or the next, when the kill fell between the
// rename and the report) with every number that generation's, and the next
// child must resume from it. Repeated until at least 20 kills landed inside a
// write (a temporary was left behind), at most 60 kills.
//
// Write times vary (page cache, fsync, sanitizers, a busy disk), so the kill
// moment is drawn from [0, s * median of the writes timed so far]: every save
// the parent lets complete is timed, and s shrinks by 0.8 (down to 0.2) after
// each kill that fell after the write had finished.
//
// Usage: moonwalk_fault_checkpoint_kill [DIR] (default: a fresh directory
// under the system temp directory, removed at the end). Exit 0 on success.
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <moonwalk/io/checkpoint.hpp>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fault_support.hpp"

namespace {

using moonwalk::fault::fail;
using moonwalk::fault::require;
namespace fs = std::filesystem;
namespace io = moonwalk::io;

constexpr moonwalk::Index n_params = moonwalk::Index{3} << 18;  // 6 MiB
constexpr moonwalk::Index n_state = moonwalk::Index{1} << 18;   // 2 MiB
constexpr int kills_in_write = 20;
constexpr int max_kills = 60;

double value(long long gen, moonwalk::Index i) {
  return static_cast<double>(gen) * 1e7 + static_cast<double>(i);
}

io::Checkpoint generation(long long gen) {
  io::Checkpoint c;
  c.meta["generation"] = std::to_string(gen);
  c.meta["note"] = "kill test";
  c.parameters.resize(n_params);
  c.optimizer_state.resize(n_state);
  for (moonwalk::Index i = 0; i < n_params; ++i) c.parameters[i] = value(gen, i);
  for (moonwalk::Index i = 0; i < n_state; ++i) c.optimizer_state[i] = -value(gen, i);
  return c;
}

/// Loads `path` and checks it is one whole generation; returns that generation.
long long load_whole(const std::string& path) {
  io::Checkpoint c;
  try {
    c = io::load_checkpoint(path);
  } catch (const std::exception& e) {
    fail(std::string("the checkpoint does not load after a kill: ") + e.what());
  }
  const long long gen = std::stoll(c.at("generation", path));
  require(c.parameters.size() == n_params && c.optimizer_state.size() == n_state,
          "generation " + std::to_string(gen) + ": wrong sizes");
  for (moonwalk::Index i = 0; i < n_params; ++i)
    if (c.parameters[i] != value(gen, i)) fail("generation " + std::to_string(gen) + ": parameter mixed up");
  for (moonwalk::Index i = 0; i < n_state; ++i)
    if (c.optimizer_state[i] != -value(gen, i))
      fail("generation " + std::to_string(gen) + ": state mixed up");
  return gen;
}

/// The child: resume from the checkpoint, then save the next generations
/// forever, reporting each saved generation on `report` (8 bytes).
[[noreturn]] void child(const std::string& path, int report) {
  try {
    long long gen = load_whole(path);
    for (;;) {
      io::save_checkpoint(path, generation(++gen));
      if (::write(report, &gen, sizeof gen) != static_cast<::ssize_t>(sizeof gen)) _exit(3);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child: %s\n", e.what());
    _exit(2);
  }
}

/// Watches the checkpoint's directory for the child's temporary files being
/// created and renamed over the checkpoint (inotify).
class DirWatch {
 public:
  explicit DirWatch(const fs::path& dir) : fd_(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) {
    require(fd_ >= 0 && ::inotify_add_watch(fd_, dir.c_str(), IN_CREATE | IN_MOVED_TO) >= 0, "inotify");
  }
  ~DirWatch() { ::close(fd_); }
  DirWatch(const DirWatch&) = delete;
  DirWatch& operator=(const DirWatch&) = delete;

  /// Waits (at most 60 s) for an event `mask` on a name starting with `prefix`.
  void wait_for(std::uint32_t mask, const std::string& prefix) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
      alignas(struct inotify_event) char buf[4096];
      const ::ssize_t n = ::read(fd_, buf, sizeof buf);
      for (::ssize_t off = 0; off < n;) {
        const auto* e = reinterpret_cast<const struct inotify_event*>(buf + off);
        if ((e->mask & mask) && e->len > 0 && std::string(e->name).rfind(prefix, 0) == 0) return;
        off += static_cast<::ssize_t>(sizeof(struct inotify_event) + e->len);
      }
      if (n > 0) continue;
      if (std::chrono::steady_clock::now() > deadline) fail("no checkpoint write seen for 60 s");
      struct pollfd p {
        fd_, POLLIN, 0
      };
      ::poll(&p, 1, 100);
    }
  }
  /// Forgets pending events.
  void drain() {
    char buf[4096];
    while (::read(fd_, buf, sizeof buf) > 0) {
    }
  }

 private:
  int fd_;
};

}  // namespace

int main(int argc, char** argv) {
  const bool own_dir = argc < 2;
  const fs::path dir = own_dir
                           ? fs::temp_directory_path() / ("moonwalk_fault_kill_" + std::to_string(::getpid()))
                           : fs::path(argv[1]);
  fs::create_directories(dir);
  const std::string path = (dir / "run.ckpt").string();
  const std::string tmp_prefix = "run.ckpt.tmp.";
  io::save_checkpoint(path, generation(0));
  DirWatch watch(dir);

  std::mt19937_64 rng(std::random_device{}());
  std::set<std::string> seen_tmp;
  long long last_gen = 0;
  int kills = 0, in_write = 0;
  std::vector<double>
      writes_ms;       // temporary created -> renamed over the checkpoint, every complete save seen
  double scale = 1.0;  // of the median write time; shrinks after kills that missed the write
  const auto median_write_ms = [&] {
    std::vector<double> w = writes_ms;
    std::nth_element(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(w.size() / 2), w.end());
    return w[w.size() / 2];
  };
  const auto t0 = std::chrono::steady_clock::now();
  while (in_write < kills_in_write && kills < max_kills) {
    int fds[2];
    require(::pipe(fds) == 0, "pipe");
    watch.drain();
    const ::pid_t pid = ::fork();
    require(pid >= 0, "fork");
    if (pid == 0) {
      ::close(fds[0]);
      child(path, fds[1]);
    }
    ::close(fds[1]);
    // Let 1 to 3 saves complete (so generations advance), timing each, then kill at a random moment
    // of the next write.
    for (int k = std::uniform_int_distribution<int>(1, 3)(rng); k > 0; --k) {
      watch.wait_for(IN_CREATE, tmp_prefix);
      const auto a = std::chrono::steady_clock::now();
      watch.wait_for(IN_MOVED_TO, "run.ckpt");
      writes_ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
    }
    if (kills == 0)
      std::printf("writing a %lld MiB checkpoint (temporary file, fsync, rename) takes %.1f ms\n",
                  static_cast<long long>((n_params + n_state) * 8) >> 20, writes_ms.front());
    watch.wait_for(IN_CREATE, tmp_prefix);
    std::uniform_real_distribution<double> when(0.0, scale * median_write_ms());
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(when(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    require(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
            "the child ended on its own (status " + std::to_string(status) + ")");
    // The reports written before the kill: the last one is the newest generation saved.
    long long reported = 0;
    while (::read(fds[0], &reported, sizeof reported) == static_cast<::ssize_t>(sizeof reported)) {
      require(reported == last_gen + 1,
              "generations out of order: the child did not resume from the last one");
      last_gen = reported;
    }
    ::close(fds[0]);
    ++kills;

    const long long gen = load_whole(path);
    // The rename may have happened before the report was written.
    require(gen == last_gen || gen == last_gen + 1,
            "after kill " + std::to_string(kills) + " the checkpoint holds generation " +
                std::to_string(gen) + ", expected " + std::to_string(last_gen) + " or the next");
    last_gen = gen;
    bool landed = false;
    for (const auto& n : moonwalk::fault::names_starting_with(dir, tmp_prefix))
      if (seen_tmp.insert(n).second) landed = true;
    if (landed)
      ++in_write;
    else
      scale = std::max(0.2, scale * 0.8);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto left = moonwalk::fault::names_starting_with(dir, tmp_prefix).size();
  std::printf(
      "%d kills, %d inside a write (a temporary left behind), %zu temporaries in the directory now; "
      "the checkpoint was whole and resumable after every kill (last generation %lld, %.1f s; median write "
      "%.1f ms over %zu, kill window %.2f of it)\n",
      kills, in_write, left, last_gen, secs, median_write_ms(), writes_ms.size(), scale);
  if (own_dir) fs::remove_all(dir);
  require(in_write >= kills_in_write, "only " + std::to_string(in_write) + " of " + std::to_string(kills) +
                                          " kills landed inside a write");
  return 0;
}
