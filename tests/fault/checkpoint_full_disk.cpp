// Fault test: saving a checkpoint onto a full disk. A 1 MiB tmpfs is mounted
// in a private mount namespace (as root; else in a new user namespace where
// the kernel allows unprivileged ones); where neither works the test is
// skipped with a message (exit 77, CTest's SKIP_RETURN_CODE).
//
// On the small disk: a first checkpoint is saved; then saves that cannot fit
// (one larger than the disk; one small after a filler file took the rest)
// must throw a CheckpointError that names the checkpoint file, and leave the
// first checkpoint loadable and unchanged and no temporary file behind.
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <moonwalk/io/checkpoint.hpp>
#include <string>
#include <vector>

#include "fault_support.hpp"

namespace {

using moonwalk::fault::fail;
using moonwalk::fault::require;
namespace fs = std::filesystem;
namespace io = moonwalk::io;

io::Checkpoint make(moonwalk::Index params, double base) {
  io::Checkpoint c;
  c.meta["model"] = "full-disk test";
  c.parameters = moonwalk::Vector<double>::LinSpaced(params, base, base + 1.0);
  c.optimizer_state = moonwalk::Vector<double>::Constant(params / 2, base);
  return c;
}

/// A private mount namespace in which we may mount: "" on success, else why not.
std::string enter_mount_namespace() {
  if (::unshare(CLONE_NEWNS) == 0) {
    // Our mounts must not propagate back to the host's namespace.
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
      return std::string("making / private failed: ") + std::strerror(errno);
    return "";
  }
  const std::string as_root = std::strerror(errno);
  const unsigned uid = ::getuid(), gid = ::getgid();
  if (::unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0) {
    // Map our own user and group in the new namespace, or files cannot be created (EOVERFLOW).
    auto put = [](const char* file, const std::string& text) {
      std::ofstream f(file);
      f << text;
      f.close();
      return static_cast<bool>(f);
    };
    if (!put("/proc/self/setgroups", "deny") ||
        !put("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1") ||
        !put("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1"))
      return "cannot map the user in a new user namespace";
    return "";
  }
  return "unshare(CLONE_NEWNS): " + as_root +
         "; unshare(CLONE_NEWUSER | CLONE_NEWNS): " + std::strerror(errno);
}

/// Saving `c` to `path` must fail with a CheckpointError naming `path`.
void save_must_fail(const std::string& path, const io::Checkpoint& c, const char* what) {
  try {
    io::save_checkpoint(path, c);
  } catch (const io::CheckpointError& e) {
    const std::string msg = e.what();
    std::printf("%s: CheckpointError: %s\n", what, msg.c_str());
    require(msg.find(path) != std::string::npos, std::string(what) + ": the message does not name " + path);
    return;
  } catch (const std::exception& e) {
    fail(std::string(what) + ": not a CheckpointError: " + e.what());
  }
  fail(std::string(what) + ": saving onto a full disk did not fail");
}

/// The directory holds exactly `expected` (no temporaries left behind) and the checkpoint is `first`.
void check_intact(const fs::path& dir, const std::string& path, const io::Checkpoint& first,
                  const std::vector<std::string>& expected, const char* what) {
  std::vector<std::string> names = moonwalk::fault::names_starting_with(dir, "");
  std::sort(names.begin(), names.end());
  std::string list;
  for (const auto& n : names) list += " " + n;
  require(names == expected, std::string(what) + ": the directory holds" + list);
  io::Checkpoint back;
  try {
    back = io::load_checkpoint(path);
  } catch (const std::exception& e) {
    fail(std::string(what) + ": the previous checkpoint no longer loads: " + e.what());
  }
  require(back.meta == first.meta && back.parameters == first.parameters &&
              back.optimizer_state == first.optimizer_state,
          std::string(what) + ": the previous checkpoint changed");
}

}  // namespace

int main() {
  const fs::path dir = fs::temp_directory_path() / ("moonwalk_fault_disk_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  struct Cleanup {
    fs::path d;
    bool mounted = false;
    ~Cleanup() {
      if (mounted) ::umount2(d.c_str(), MNT_DETACH);
      std::error_code ec;
      fs::remove_all(d, ec);
    }
  } cleanup{dir};

  if (const std::string why = enter_mount_namespace(); !why.empty()) {
    std::printf(
        "SKIP: cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN, or user namespaces): %s\n",
        why.c_str());
    return moonwalk::fault::skip_code;
  }
  if (::mount("tmpfs", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m") != 0) {
    std::printf("SKIP: cannot mount a 1 MiB tmpfs on %s: %s\n", dir.c_str(), std::strerror(errno));
    return moonwalk::fault::skip_code;
  }
  cleanup.mounted = true;
  const std::string path = (dir / "model.ckpt").string();

  const io::Checkpoint first = make(20000, 1.0);  // 240 KB
  try {
    io::save_checkpoint(path, first);
  } catch (const std::exception& e) {
    fail(std::string("the first checkpoint cannot be saved on the empty 1 MiB disk: ") + e.what());
  }
  check_intact(dir, path, first, {"model.ckpt"}, "after the first save");

  // 1. A checkpoint larger than the whole disk.
  save_must_fail(path, make(150000, 2.0), "a 1.8 MB checkpoint on a 1 MiB disk");
  check_intact(dir, path, first, {"model.ckpt"}, "after the failed large save");

  // 2. A small checkpoint once a filler file has taken the rest of the disk.
  {
    std::ofstream filler(dir / "filler", std::ios::binary);
    const std::vector<char> block(4096, 'x');
    while (filler.write(block.data(), static_cast<std::streamsize>(block.size()))) {
    }
  }
  save_must_fail(path, make(2000, 3.0), "a 24 KB checkpoint on a full disk");
  check_intact(dir, path, first, {"filler", "model.ckpt"}, "after the failed small save");

  std::printf(
      "full disk: both saves failed with a CheckpointError naming the file; the previous checkpoint "
      "is intact and no temporary was left behind\n");
  return 0;
}
