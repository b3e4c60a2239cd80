// Moonwalk — checkpoints: parameters and optimizer state in one versioned
// file, written atomically.
//
// File format (version 1): a text header, then the payload.
//
//   moonwalk-checkpoint
//   version 1
//   KEY VALUE            (any number: model, spec, dtype, epoch, …; VALUE is
//   ...                   the rest of the line)
//   parameters P
//   optimizer_state K
//   crc32 XXXXXXXX       (of the payload, IEEE 802.3 polynomial)
//   end
//   P + K doubles, little-endian IEEE 754 (parameters, then optimizer state)
//
// Parameters are stored as double whatever the network's scalar: exact for
// float. write_file_atomically() writes a temporary file next to the target,
// fsyncs it, renames it over the target and fsyncs the directory, so a crash
// leaves the old checkpoint or the new one, never a torn file. Every
// load error is a CheckpointError naming the file and what is wrong.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moonwalk/core/types.hpp"

namespace moonwalk::io {

/// A checkpoint that cannot be written or read; the message starts with the path.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// What a checkpoint holds: free-form metadata (keys without spaces, values
/// without newlines), the flat parameters and the optimizer's flat state.
struct Checkpoint {
  static constexpr int format_version = 1;
  std::map<std::string, std::string> meta;
  Vector<double> parameters;
  Vector<double> optimizer_state;

  /// meta[key], or CheckpointError naming `path` when absent.
  [[nodiscard]] const std::string& at(const std::string& key, const std::string& path) const {
    const auto it = meta.find(key);
    if (it == meta.end()) throw CheckpointError(detail::cat(path, ": checkpoint has no '", key, "' entry"));
    return it->second;
  }
};

namespace detail {

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib's crc32().
inline std::uint32_t crc32(const unsigned char* p, std::size_t n, std::uint32_t crc = 0) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

inline std::string errno_text() { return std::strerror(errno); }

}  // namespace detail

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. On any
/// failure the temporary is removed, `path` is untouched, and
/// CheckpointError says which step failed.
inline void write_file_atomically(const std::string& path, std::string_view bytes) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string tmpl = (dir / (target.filename().string() + ".tmp.XXXXXX")).string();
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  const int fd = ::mkstemp(name.data());
  if (fd < 0)
    throw CheckpointError(moonwalk::detail::cat(path, ": cannot create a temporary file in ", dir.string(),
                                                ": ", detail::errno_text()));
  const std::string tmp(name.data());
  auto fail = [&](const char* what) {
    const std::string why = detail::errno_text();
    ::close(fd);
    ::unlink(tmp.c_str());
    throw CheckpointError(moonwalk::detail::cat(path, ": ", what, " ", tmp, " failed: ", why));
  };
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ::ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("writing");
    }
    done += static_cast<std::size_t>(w);
  }
  // mkstemp creates 0600; give the file the mode a plain create would (0666 & ~umask).
  const ::mode_t mask = ::umask(0);
  ::umask(mask);
  if (::fchmod(fd, 0666 & ~mask) != 0) fail("chmod of");
  if (::fsync(fd) != 0) fail("fsync of");
  if (::close(fd) != 0) {
    const std::string why = detail::errno_text();
    ::unlink(tmp.c_str());
    throw CheckpointError(moonwalk::detail::cat(path, ": closing ", tmp, " failed: ", why));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = detail::errno_text();
    ::unlink(tmp.c_str());
    throw CheckpointError(moonwalk::detail::cat(path, ": renaming ", tmp, " over it failed: ", why));
  }
  // The rename itself must reach the disk: fsync the directory (best effort
  // where directories cannot be opened).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

/// The checkpoint file's bytes (format above).
inline std::string serialize(const Checkpoint& c) {
  static_assert(std::endian::native == std::endian::little, "checkpoints are little-endian");
  std::string payload;
  payload.resize(static_cast<std::size_t>(c.parameters.size() + c.optimizer_state.size()) * sizeof(double));
  std::memcpy(payload.data(), c.parameters.data(),
              static_cast<std::size_t>(c.parameters.size()) * sizeof(double));
  std::memcpy(payload.data() + static_cast<std::size_t>(c.parameters.size()) * sizeof(double),
              c.optimizer_state.data(), static_cast<std::size_t>(c.optimizer_state.size()) * sizeof(double));
  std::ostringstream h;
  h << "moonwalk-checkpoint\nversion " << Checkpoint::format_version << "\n";
  for (const auto& [k, v] : c.meta) {
    if (k.empty() || k.find_first_of(" \n") != std::string::npos || v.find('\n') != std::string::npos)
      throw CheckpointError(moonwalk::detail::cat("checkpoint: bad metadata entry '", k,
                                                  "' (keys need no spaces or newlines, values no newlines)"));
    if (k == "version" || k == "parameters" || k == "optimizer_state" || k == "crc32" || k == "end")
      throw CheckpointError(moonwalk::detail::cat("checkpoint: metadata key '", k, "' is reserved"));
    h << k << ' ' << v << '\n';
  }
  char crc[16];
  std::snprintf(crc, sizeof crc, "%08x",
                detail::crc32(reinterpret_cast<const unsigned char*>(payload.data()), payload.size()));
  h << "parameters " << c.parameters.size() << "\noptimizer_state " << c.optimizer_state.size() << "\ncrc32 "
    << crc << "\nend\n";
  return h.str() + payload;
}

/// Saves `c` to `path` atomically (write_file_atomically).
inline void save_checkpoint(const std::string& path, const Checkpoint& c) {
  write_file_atomically(path, serialize(c));
}

/// Reads a checkpoint written by save_checkpoint. CheckpointError (naming
/// `path`) when the file cannot be read, is not a checkpoint, has another
/// format version, a malformed header, a payload of the wrong length (short
/// or trailing bytes) or a CRC mismatch.
inline Checkpoint load_checkpoint(const std::string& path) {
  using moonwalk::detail::cat;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(cat(path, ": cannot open checkpoint: ", detail::errno_text()));
  std::string line;
  if (!std::getline(in, line) || line != "moonwalk-checkpoint")
    throw CheckpointError(cat(path, ": not a Moonwalk checkpoint (first line is not 'moonwalk-checkpoint')"));
  Checkpoint c;
  long long params = -1, state = -1;
  std::string crc;
  bool version_seen = false, ended = false;
  while (std::getline(in, line)) {
    if (line == "end") {
      ended = true;
      break;
    }
    const auto sp = line.find(' ');
    if (sp == std::string::npos || sp == 0)
      throw CheckpointError(cat(path, ": malformed header line '", line, "'"));
    const std::string key = line.substr(0, sp), value = line.substr(sp + 1);
    auto count = [&](const std::string& v) {
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 0)
        throw CheckpointError(cat(path, ": header '", key, "' is not a count: '", v, "'"));
      return n;
    };
    if (key == "version") {
      const long long v = count(value);
      if (v != Checkpoint::format_version)
        throw CheckpointError(cat(path, ": checkpoint format version ", v, ", this build reads version ",
                                  Checkpoint::format_version));
      version_seen = true;
    } else if (key == "parameters") {
      params = count(value);
    } else if (key == "optimizer_state") {
      state = count(value);
    } else if (key == "crc32") {
      crc = value;
    } else {
      c.meta[key] = value;
    }
  }
  if (!version_seen) throw CheckpointError(cat(path, ": checkpoint header has no version"));
  if (!ended || params < 0 || state < 0 || crc.empty())
    throw CheckpointError(
        cat(path, ": truncated checkpoint header (needs parameters, optimizer_state, crc32, end)"));
  const std::size_t want = static_cast<std::size_t>(params + state) * sizeof(double);
  std::string payload(want, '\0');
  in.read(payload.data(), static_cast<std::streamsize>(want));
  const auto got = static_cast<std::size_t>(in.gcount());
  if (got != want)
    throw CheckpointError(
        cat(path, ": truncated checkpoint: expected ", want, " bytes of data, file ends after ", got));
  if (in.peek() != std::char_traits<char>::eof())
    throw CheckpointError(cat(path, ": trailing bytes after the checkpoint data"));
  char have[16];
  std::snprintf(have, sizeof have, "%08x",
                detail::crc32(reinterpret_cast<const unsigned char*>(payload.data()), payload.size()));
  if (crc != have)
    throw CheckpointError(
        cat(path, ": checkpoint data is corrupt (crc32 ", have, ", header says ", crc, ")"));
  c.parameters.resize(params);
  c.optimizer_state.resize(state);
  std::memcpy(c.parameters.data(), payload.data(), static_cast<std::size_t>(params) * sizeof(double));
  std::memcpy(c.optimizer_state.data(), payload.data() + static_cast<std::size_t>(params) * sizeof(double),
              static_cast<std::size_t>(state) * sizeof(double));
  return c;
}

}  // namespace moonwalk::io
