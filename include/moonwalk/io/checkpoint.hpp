// Moonwalk — checkpoints: parameters, layer buffers and optimizer state in
// one versioned file, written atomically.
//
// File format (version 3): a text header, then the payload.
//
//   moonwalk-checkpoint
//   version 3
//   KEY VALUE            (any number: model, spec, dtype, epoch, …; VALUE is
//   ...                   the rest of the line)
//   parameters P
//   buffers B            (the layers' untrained state: BatchNorm's running
//                         statistics; core/step.hpp)
//   optimizer_state K
//   crc32 XXXXXXXX       (of every byte of the file but this line: the header
//   end                   lines above, "end\n" and the payload; IEEE 802.3)
//   P + B + K doubles, little-endian IEEE 754 (parameters, buffers, then
//   optimizer state)
//
// Parameters are stored as double whatever the network's scalar: exact for
// float. Every value is finite (save and load refuse NaN and infinities).
// Version 2 (the same without buffers) is read as holding none. Version 1
// (whose CRC covered only the payload, so a flipped bit in the header, e.g.
// in the epoch, went unnoticed) is refused with a message saying so. The header is at most
// checkpoint_max_header_bytes, each line at most checkpoint_max_line_bytes.
//
// write_file_atomically() writes a temporary file `TARGET.tmp.XXXXXX` next
// to the target, fsyncs it, renames it over the target and fsyncs the
// directory, so a crash leaves the old checkpoint or the new one, never a
// torn file. A crash does leave its temporary: the next save of the same
// target removes them (remove_stale_temporaries: only names of that exact
// form, only regular files, never one a running writer holds locked).
//
// Every load error is a CheckpointError naming the file and what is wrong;
// sizes claimed by the header are checked against the file's size before
// anything is allocated. load_optimizer_state() restores an optimizer's
// state and names the file in any error the optimizer raises.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "moonwalk/core/types.hpp"

namespace moonwalk::io {

/// A checkpoint that cannot be written or read; the message starts with the path.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// Longest header load_checkpoint reads (all lines up to and including "end").
inline constexpr std::size_t checkpoint_max_header_bytes = std::size_t{1} << 20;
/// Longest header line (a metadata value such as a long spec string included).
inline constexpr std::size_t checkpoint_max_line_bytes = std::size_t{1} << 16;

/// What a checkpoint holds: free-form metadata (keys without spaces, values
/// without newlines), the flat parameters, the layers' flat buffers and the
/// optimizer's flat state.
struct Checkpoint {
  static constexpr int format_version = 3;
  std::map<std::string, std::string> meta;
  Vector<double> parameters;
  Vector<double> buffers;
  Vector<double> optimizer_state;

  /// meta[key], or CheckpointError naming `path` when absent.
  [[nodiscard]] const std::string& at(const std::string& key, const std::string& path) const {
    const auto it = meta.find(key);
    if (it == meta.end()) throw CheckpointError(detail::cat(path, ": checkpoint has no '", key, "' entry"));
    return it->second;
  }

  /// meta[key] as an integer in [lo, hi] (e.g. the epoch), or CheckpointError
  /// naming `path`, the key and the value when absent, not a decimal integer
  /// or out of range.
  [[nodiscard]] long long integer(const std::string& key, const std::string& path, long long lo = 0,
                                  long long hi = std::numeric_limits<long long>::max()) const {
    const std::string& v = at(key, path);
    long long n = 0;
    const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (v.empty() || ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi)
      throw CheckpointError(
          detail::cat(path, ": checkpoint '", key, "' is '", v, "', not an integer in [", lo, ", ", hi, "]"));
    return n;
  }
};

namespace detail {

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib's crc32();
/// crc32(b, m, crc32(a, n)) is the CRC of a followed by b.
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

inline std::uint32_t crc32(std::string_view s, std::uint32_t crc = 0) {
  return crc32(reinterpret_cast<const unsigned char*>(s.data()), s.size(), crc);
}

/// The CRC of a vector's bytes, continuing from `crc`.
inline std::uint32_t crc32(const Vector<double>& v, std::uint32_t crc) {
  if (v.size() == 0) return crc;
  return crc32(reinterpret_cast<const unsigned char*>(v.data()), static_cast<std::size_t>(v.size()) * 8, crc);
}

inline std::string errno_text() { return std::strerror(errno); }

inline std::string hex8(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(v));
  return buf;
}

/// Index of the first non-finite entry of v, or -1.
inline Index first_non_finite(const Vector<double>& v) {
  for (Index i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) return i;
  return -1;
}

/// True for `<target>.tmp.XXXXXX`, X from mkstemp's alphabet [A-Za-z0-9].
inline bool is_temporary_name(const std::string& name, const std::string& target) {
  const std::string prefix = target + ".tmp.";
  if (name.size() != prefix.size() + 6 || name.compare(0, prefix.size(), prefix) != 0) return false;
  for (std::size_t i = prefix.size(); i < name.size(); ++i) {
    const char c = name[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) return false;
  }
  return true;
}

/// Closes a file descriptor on destruction.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

/// Reads exactly n bytes at the current offset (fewer only at the end of the file).
inline std::size_t read_fully(int fd, void* p, std::size_t n) {
  auto* c = static_cast<char*>(p);
  std::size_t done = 0;
  while (done < n) {
    const ::ssize_t r = ::read(fd, c + done, std::min<std::size_t>(n - done, std::size_t{1} << 30));
    if (r < 0) {
      if (errno == EINTR) continue;
      return static_cast<std::size_t>(-1);
    }
    if (r == 0) break;
    done += static_cast<std::size_t>(r);
  }
  return done;
}

}  // namespace detail

/// Removes the temporaries `<path>.tmp.XXXXXX` that interrupted writes of
/// `path` left behind (a kill during write_file_atomically), and nothing
/// else: only regular files whose name is exactly the target's name,
/// ".tmp." and six characters of mkstemp's alphabet, and never one whose
/// writer is still running (writers hold an flock on their temporary).
/// Best effort: a file that cannot be removed is left. Returns how many
/// were removed. save_checkpoint calls it before writing.
inline std::size_t remove_stale_temporaries(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const std::string name = target.filename().string();
  if (name.empty()) return 0;
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  fs::directory_iterator it(dir, ec), end;
  std::vector<fs::path> candidates;
  for (; !ec && it != end; it.increment(ec))
    if (detail::is_temporary_name(it->path().filename().string(), name)) candidates.push_back(it->path());
  std::size_t removed = 0;
  for (const fs::path& p : candidates) {
    const detail::Fd fd(::open(p.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
    if (fd.fd < 0) continue;
    struct stat st {};
    if (::fstat(fd.fd, &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (::flock(fd.fd, LOCK_EX | LOCK_NB) != 0) continue;  // a writer is still at work
    if (::unlink(p.c_str()) == 0) ++removed;
  }
  return removed;
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory (flock-ed while written), fsync, rename over `path`, fsync of
/// the directory. On any failure the temporary is removed, `path` is
/// untouched, and CheckpointError says which step failed.
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
  // Marks the temporary as in use for remove_stale_temporaries (released by
  // the kernel when this process dies, so a killed writer's file is stale).
  (void)::flock(fd, LOCK_EX | LOCK_NB);
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
  // Renamed while still open (and locked), so no cleanup can take it between the two.
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("rename over the target of");
  if (::close(fd) != 0)
    throw CheckpointError(
        moonwalk::detail::cat(path, ": closing it after the rename failed: ", detail::errno_text()));
  // The rename itself must reach the disk: fsync the directory (best effort
  // where directories cannot be opened).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

/// The checkpoint file's bytes (format above). CheckpointError for bad
/// metadata or a non-finite value (the message names `path` when given).
inline std::string serialize(const Checkpoint& c, const std::string& path = "checkpoint") {
  using moonwalk::detail::cat;
  static_assert(std::endian::native == std::endian::little, "checkpoints are little-endian");
  static_assert(std::numeric_limits<double>::is_iec559, "checkpoints hold IEEE 754 doubles");
  if (const Index i = detail::first_non_finite(c.parameters); i >= 0)
    throw CheckpointError(
        cat(path, ": refusing to save a non-finite parameter (entry ", i, " is ", c.parameters[i], ")"));
  if (const Index i = detail::first_non_finite(c.buffers); i >= 0)
    throw CheckpointError(
        cat(path, ": refusing to save a non-finite layer buffer (entry ", i, " is ", c.buffers[i], ")"));
  if (const Index i = detail::first_non_finite(c.optimizer_state); i >= 0)
    throw CheckpointError(cat(path, ": refusing to save a non-finite optimizer state (entry ", i, " is ",
                              c.optimizer_state[i], ")"));
  std::ostringstream h;
  h << "moonwalk-checkpoint\nversion " << Checkpoint::format_version << "\n";
  for (const auto& [k, v] : c.meta) {
    if (k.empty() || k.find_first_of(" \n") != std::string::npos || v.find('\n') != std::string::npos)
      throw CheckpointError(
          cat(path, ": bad metadata entry '", k, "' (keys need no spaces or newlines, values no newlines)"));
    if (k == "version" || k == "parameters" || k == "buffers" || k == "optimizer_state" || k == "crc32" ||
        k == "end")
      throw CheckpointError(cat(path, ": metadata key '", k, "' is reserved"));
    if (k.size() + v.size() + 2 > checkpoint_max_line_bytes)
      throw CheckpointError(
          cat(path, ": metadata entry '", k, "' is longer than ", checkpoint_max_line_bytes, " bytes"));
    h << k << ' ' << v << '\n';
  }
  h << "parameters " << c.parameters.size() << "\nbuffers " << c.buffers.size() << "\noptimizer_state "
    << c.optimizer_state.size() << "\n";
  const std::string head = h.str();
  if (head.size() + 64 > checkpoint_max_header_bytes)
    throw CheckpointError(
        cat(path, ": checkpoint metadata is longer than ", checkpoint_max_header_bytes, " bytes"));
  const std::string tail = "end\n";
  std::uint32_t crc = detail::crc32(head);
  crc = detail::crc32(tail, crc);
  crc = detail::crc32(c.parameters, crc);
  crc = detail::crc32(c.buffers, crc);
  crc = detail::crc32(c.optimizer_state, crc);
  std::string out = head + "crc32 " + detail::hex8(crc) + "\n" + tail;
  for (const Vector<double>* v : {&c.parameters, &c.buffers, &c.optimizer_state}) {
    const std::size_t n = static_cast<std::size_t>(v->size()) * sizeof(double);
    const std::size_t at = out.size();
    out.resize(at + n);
    if (n > 0) std::memcpy(out.data() + at, v->data(), n);
  }
  return out;
}

/// Saves `c` to `path` atomically (write_file_atomically), after removing
/// the temporaries earlier interrupted saves of `path` left
/// (remove_stale_temporaries). CheckpointError for bad metadata or a
/// non-finite value, before anything is written.
inline void save_checkpoint(const std::string& path, const Checkpoint& c) {
  const std::string bytes = serialize(c, path);
  remove_stale_temporaries(path);
  write_file_atomically(path, bytes);
}

/// Reads a checkpoint written by save_checkpoint. CheckpointError (naming
/// `path`) when the file cannot be read or is not a regular file, is not a
/// checkpoint, has another format version than 2 or 3, a malformed
/// or over-long header, sizes the file cannot hold (checked before anything
/// is allocated), a payload of the wrong length (short or trailing bytes), a
/// CRC mismatch (header or payload) or a non-finite value.
inline Checkpoint load_checkpoint(const std::string& path) {
  using moonwalk::detail::cat;
  const detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.fd < 0) throw CheckpointError(cat(path, ": cannot open checkpoint: ", detail::errno_text()));
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0)
    throw CheckpointError(cat(path, ": cannot stat checkpoint: ", detail::errno_text()));
  if (S_ISDIR(st.st_mode)) throw CheckpointError(cat(path, ": cannot open checkpoint: is a directory"));
  if (!S_ISREG(st.st_mode))
    throw CheckpointError(cat(path, ": not a Moonwalk checkpoint (not a regular file)"));
  const auto file_size = static_cast<std::uint64_t>(st.st_size);

  // The header: at most checkpoint_max_header_bytes, read in one go.
  std::string head(static_cast<std::size_t>(std::min<std::uint64_t>(file_size, checkpoint_max_header_bytes)),
                   '\0');
  const std::size_t got_head = detail::read_fully(fd.fd, head.data(), head.size());
  if (got_head == static_cast<std::size_t>(-1))
    throw CheckpointError(cat(path, ": read error: ", detail::errno_text()));
  head.resize(got_head);
  const std::string_view magic = "moonwalk-checkpoint\n";
  if (head.compare(0, magic.size(), magic) != 0)
    throw CheckpointError(cat(path, ": not a Moonwalk checkpoint (first line is not 'moonwalk-checkpoint')"));

  Checkpoint c;
  long long params = -1, buffers = -1, state = -1, version = 0;
  std::string crc;
  bool version_seen = false, ended = false;
  std::size_t pos = magic.size(), crc_line_begin = 0, crc_line_end = 0;
  while (pos < head.size()) {
    const std::size_t nl = head.find('\n', pos);
    const std::size_t len = (nl == std::string::npos ? head.size() : nl) - pos;
    if (len > checkpoint_max_line_bytes)
      throw CheckpointError(cat(path, ": checkpoint header line longer than ", checkpoint_max_line_bytes,
                                " bytes (corrupt header?)"));
    if (nl == std::string::npos) break;  // an unterminated line: truncated header
    const std::string line = head.substr(pos, len);
    const std::size_t line_begin = pos;
    pos = nl + 1;
    if (line == "end") {
      ended = true;
      break;
    }
    const auto sp = line.find(' ');
    if (sp == std::string::npos || sp == 0)
      throw CheckpointError(cat(path, ": malformed header line '", line, "'"));
    const std::string key = line.substr(0, sp), value = line.substr(sp + 1);
    auto count = [&](const std::string& v) {
      long long n = 0;
      const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (v.empty() || v[0] == '-' || v[0] == '+' || ec != std::errc() || p != v.data() + v.size())
        throw CheckpointError(cat(path, ": header '", key, "' is not a count: '", v, "'"));
      return n;
    };
    if (!version_seen && key != "version")
      throw CheckpointError(cat(path, ": checkpoint header has no version (second line is '", line, "')"));
    if (key == "version") {
      if (version_seen) throw CheckpointError(cat(path, ": checkpoint header has two 'version' lines"));
      const long long v = count(value);
      if (v == 1)
        throw CheckpointError(cat(path,
                                  ": checkpoint format version 1 is no longer read (its CRC does not cover "
                                  "the header, so a corrupt epoch or size would go unnoticed); this build "
                                  "reads version ",
                                  Checkpoint::format_version, ": save the checkpoint again with this build"));
      if (v != 2 && v != Checkpoint::format_version)
        throw CheckpointError(cat(path, ": checkpoint format version ", v,
                                  ", this build reads versions 2 and ", Checkpoint::format_version));
      version = v;
      version_seen = true;
    } else if (key == "buffers" && version == 2) {
      throw CheckpointError(
          cat(path, ": checkpoint format version 2 has no 'buffers' line (corrupt header?)"));
    } else if (key == "parameters" || key == "buffers" || key == "optimizer_state") {
      long long& slot = key == "parameters" ? params : key == "buffers" ? buffers : state;
      if (slot >= 0) throw CheckpointError(cat(path, ": checkpoint header has two '", key, "' lines"));
      slot = count(value);
    } else if (key == "crc32") {
      if (!crc.empty()) throw CheckpointError(cat(path, ": checkpoint header has two 'crc32' lines"));
      if (value.size() != 8 || value.find_first_not_of("0123456789abcdef") != std::string::npos)
        throw CheckpointError(cat(path, ": header 'crc32' is not 8 hex digits: '", value, "'"));
      crc = value;
      crc_line_begin = line_begin;
      crc_line_end = pos;
    } else if (key == "end") {  // (reserved, as save refuses it: what loads can be saved again)
      throw CheckpointError(cat(path, ": metadata key 'end' is reserved (malformed line '", line, "')"));
    } else if (!c.meta.emplace(key, value).second) {
      throw CheckpointError(cat(path, ": checkpoint header has two '", key, "' lines"));
    }
  }
  if (!ended) {
    if (!version_seen) throw CheckpointError(cat(path, ": checkpoint header has no version"));
    if (head.size() >= checkpoint_max_header_bytes)
      throw CheckpointError(cat(path, ": checkpoint header longer than ", checkpoint_max_header_bytes,
                                " bytes (no 'end' line; corrupt header?)"));
  }
  if (version == 2 && buffers < 0) buffers = 0;  // (version 2 has none)
  if (!ended || params < 0 || buffers < 0 || state < 0 || crc.empty())
    throw CheckpointError(
        cat(path, ": truncated checkpoint header (needs parameters, buffers, optimizer_state, crc32, end)"));

  // The payload's size, in checked arithmetic, against the bytes the file holds.
  const std::uint64_t available = file_size - pos;
  const auto p = static_cast<std::uint64_t>(params), b = static_cast<std::uint64_t>(buffers),
             k = static_cast<std::uint64_t>(state);
  const std::uint64_t limit = std::numeric_limits<std::uint64_t>::max() / sizeof(double);
  if (p > limit || b > limit - p || k > limit - p - b)
    throw CheckpointError(cat(path, ": checkpoint header claims ", params, " parameters, ", buffers,
                              " buffer values and ", state,
                              " optimizer state values, more than any file holds (corrupt header?)"));
  const std::uint64_t want = (p + b + k) * sizeof(double);
  if (want > available)
    throw CheckpointError(cat(path, ": truncated checkpoint: expected ", want, " bytes of data (", params,
                              " parameters + ", buffers, " buffer values + ", state,
                              " optimizer state values), file ends after ", available));
  if (want < available)
    throw CheckpointError(cat(path, ": ", available - want, " trailing bytes after the checkpoint data"));

  // Allocated now: at most the file's own size.
  c.parameters.resize(static_cast<Index>(params));
  c.buffers.resize(static_cast<Index>(buffers));
  c.optimizer_state.resize(static_cast<Index>(state));
  // The header holds the start of the payload already; the rest is read from the file.
  std::size_t from_head = head.size() - pos;
  auto fill = [&](Vector<double>& v) {
    const std::size_t n = static_cast<std::size_t>(v.size()) * sizeof(double);
    if (n == 0) return;
    auto* dst = reinterpret_cast<char*>(v.data());
    const std::size_t a = std::min(n, from_head);
    if (a > 0) std::memcpy(dst, head.data() + (head.size() - from_head), a);
    from_head -= a;
    if (a < n) {
      const std::size_t r = detail::read_fully(fd.fd, dst + a, n - a);
      if (r == static_cast<std::size_t>(-1))
        throw CheckpointError(cat(path, ": read error: ", detail::errno_text()));
      if (r != n - a)
        throw CheckpointError(cat(path, ": truncated checkpoint: the file shrank while being read"));
    }
  };
  fill(c.parameters);
  fill(c.buffers);
  fill(c.optimizer_state);

  std::uint32_t have = detail::crc32(std::string_view(head).substr(0, crc_line_begin));
  have = detail::crc32(std::string_view(head).substr(crc_line_end, pos - crc_line_end), have);
  have = detail::crc32(c.parameters, have);
  have = detail::crc32(c.buffers, have);
  have = detail::crc32(c.optimizer_state, have);
  if (crc != detail::hex8(have))
    throw CheckpointError(cat(path, ": checkpoint is corrupt (crc32 of header and data ", detail::hex8(have),
                              ", header says ", crc, ")"));
  if (const Index i = detail::first_non_finite(c.parameters); i >= 0)
    throw CheckpointError(cat(path, ": checkpoint parameter ", i, " is ", c.parameters[i],
                              " (a checkpoint holds finite parameters)"));
  if (const Index i = detail::first_non_finite(c.buffers); i >= 0)
    throw CheckpointError(cat(path, ": checkpoint layer buffer entry ", i, " is ", c.buffers[i],
                              " (a checkpoint holds finite values)"));
  if (const Index i = detail::first_non_finite(c.optimizer_state); i >= 0)
    throw CheckpointError(cat(path, ": checkpoint optimizer state entry ", i, " is ", c.optimizer_state[i],
                              " (a checkpoint holds finite values)"));
  return c;
}

/// Restores a checkpoint's optimizer state: `opt.load_state(net, state)`
/// (Sgd, Adam, or anything with that member), with any moonwalk::Error it
/// raises — a state of the wrong size, a step counter that is not a
/// non-negative integer, a negative Adam second moment — re-thrown as a
/// CheckpointError naming `path`.
template <class Optimizer, class N>
void load_optimizer_state(const std::string& path, Optimizer& opt, N& net, const Vector<double>& state) {
  try {
    opt.load_state(net, state);
  } catch (const CheckpointError&) {
    throw;
  } catch (const Error& e) {
    throw CheckpointError(moonwalk::detail::cat(path, ": checkpoint optimizer state refused: ", e.what()));
  }
}

}  // namespace moonwalk::io
