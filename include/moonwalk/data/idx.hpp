// Moonwalk — an IDX (MNIST-format) reader, gzip-compressed or raw, and
// labelled image sets built on it (Fashion-MNIST).
//
// An IDX file is a big-endian header followed by the data:
//
//   bytes 0, 1   0x00 0x00
//   byte  2      type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16,
//                0x0C int32, 0x0D float32, 0x0E float64)
//   byte  3      number of dimensions d
//   4·d bytes    the dimensions, each a big-endian unsigned 32-bit integer
//   then         product(dims) values, row-major (last dimension fastest).
//
// Only unsigned bytes (0x08) are read here. Files may be gzip-compressed (the
// usual .gz distribution: one or more gzip members, inflated with zlib) or
// raw. Nothing is allocated on the header's word alone: a raw file's size is
// checked against the header before the data is read, and a gzip file's data
// is read into a buffer that grows with what actually arrives. Bytes after
// the data are an error, in a raw file and inside a gzip stream alike, and so
// is anything after the last gzip member that is not another member.
// Every error is a DataError whose message starts with the offending path.
#pragma once

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "moonwalk/core/image.hpp"
#include "moonwalk/core/random.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk::data {

/// A data file that cannot be read or does not hold what was asked for; the
/// message is "<path>: <what is wrong>".
class DataError : public moonwalk::Error {
 public:
  using Error::Error;
};

/// One IDX file of unsigned bytes.
struct IdxArray {
  std::string path;
  std::vector<Index> dims;           ///< e.g. {60000, 28, 28} or {60000}
  std::vector<std::uint8_t> values;  ///< row-major, size = product(dims)
};

namespace detail {

using moonwalk::detail::cat;

/// The bytes of an IDX file: raw, or gzip-compressed (detected by the 1f 8b
/// magic; each gzip member inflated in turn, as gzip -d does). Unlike zlib's
/// gzread, which ignores what follows the last member, anything after it that
/// is not another gzip member is a DataError.
class IdxSource {
 public:
  explicit IdxSource(const std::string& path) : path_(path), in_(std::size_t{1} << 17) {
    errno = 0;
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_) {
      const int e = errno;
      throw DataError(cat(path, ": cannot open (", e ? std::strerror(e) : "out of memory", ")"));
    }
    struct stat st {};
    if (::fstat(::fileno(f_), &st) == 0 && S_ISREG(st.st_mode))
      size_ = static_cast<std::uint64_t>(st.st_size);
    refill();
    gzip_ = avail_ >= 2 && in_[0] == 0x1f && in_[1] == 0x8b;
    if (gzip_) {
      z_.zalloc = Z_NULL;
      z_.zfree = Z_NULL;
      z_.opaque = Z_NULL;
      z_.next_in = Z_NULL;
      z_.avail_in = 0;
      if (inflateInit2(&z_, 15 + 16) != Z_OK)
        throw DataError(cat(path, ": cannot start zlib (out of memory)"));
      z_ready_ = true;
    }
  }
  ~IdxSource() {
    if (z_ready_) inflateEnd(&z_);
    if (f_) std::fclose(f_);
  }
  IdxSource(const IdxSource&) = delete;
  IdxSource& operator=(const IdxSource&) = delete;

  [[nodiscard]] bool gzip() const { return gzip_; }
  /// The file's size when it is a regular file that is not compressed (the
  /// header's claims can then be checked before reading).
  [[nodiscard]] std::optional<std::uint64_t> raw_size() const {
    if (gzip_ || !size_) return std::nullopt;
    return size_;
  }

  /// Reads up to n bytes into p; returns the count read (less than n only at
  /// the end of the data). A gzip stream that ends early stops the read (the
  /// reason is returned in *truncated_msg); a read error, a corrupt gzip
  /// stream or bytes after the last gzip member throw.
  std::size_t read(std::uint8_t* p, std::size_t n, std::string* truncated_msg) {
    return gzip_ ? read_gzip(p, n, truncated_msg) : read_raw(p, n);
  }

 private:
  /// Moves unread input to the front and reads more from the file; false at its end.
  bool refill() {
    if (pos_ > 0) {
      if (avail_ > 0) std::memmove(in_.data(), in_.data() + pos_, avail_);
      pos_ = 0;
    }
    if (eof_ || avail_ == in_.size()) return false;
    const std::size_t r = std::fread(in_.data() + avail_, 1, in_.size() - avail_, f_);
    if (r == 0) {
      if (std::ferror(f_)) throw DataError(cat(path_, ": read error: ", std::strerror(errno)));
      eof_ = true;
      return false;
    }
    offset_ += r;
    avail_ += r;
    return true;
  }

  std::size_t read_raw(std::uint8_t* p, std::size_t n) {
    std::size_t got = 0;
    while (got < n) {
      if (avail_ == 0 && !refill()) break;
      const std::size_t k = std::min(n - got, avail_);
      std::memcpy(p + got, in_.data() + pos_, k);
      pos_ += k;
      avail_ -= k;
      got += k;
    }
    return got;
  }

  std::size_t read_gzip(std::uint8_t* p, std::size_t n, std::string* truncated_msg) {
    std::size_t got = 0;
    while (got < n) {
      if (member_done_) {
        // Another member, or the end of the file; anything else is garbage.
        while (avail_ < 2 && refill()) {
        }
        if (avail_ == 0) return got;
        if (avail_ < 2 || in_[pos_] != 0x1f || in_[pos_ + 1] != 0x8b) {
          const std::uint64_t at = offset_ - avail_;
          std::uint64_t garbage = avail_;
          while (!eof_) {
            avail_ = 0;
            pos_ = 0;
            refill();
            garbage += avail_;
          }
          throw DataError(cat(path_, ": ", garbage, " bytes of garbage after the gzip stream (from byte ", at,
                              " on; the file must end with its last gzip member)"));
        }
        if (inflateReset(&z_) != Z_OK)
          throw DataError(cat(path_, ": corrupt gzip stream: cannot reset zlib"));
        member_done_ = false;
      }
      if (avail_ == 0 && !refill()) {
        if (truncated_msg) *truncated_msg = "unexpected end of file";
        return got;
      }
      const std::size_t out = std::min<std::size_t>(n - got, std::size_t{1} << 30);
      z_.next_in = in_.data() + pos_;
      z_.avail_in = static_cast<uInt>(avail_);
      z_.next_out = p + got;
      z_.avail_out = static_cast<uInt>(out);
      const int rc = inflate(&z_, Z_NO_FLUSH);
      const std::size_t used = avail_ - z_.avail_in;
      pos_ += used;
      avail_ -= used;
      got += out - z_.avail_out;
      if (rc == Z_STREAM_END) {
        member_done_ = true;
      } else if (rc == Z_MEM_ERROR) {
        throw DataError(cat(path_, ": out of memory while inflating"));
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {  // Z_DATA_ERROR, Z_NEED_DICT, Z_STREAM_ERROR
        throw DataError(cat(path_, ": corrupt gzip stream: ", z_.msg ? z_.msg : "invalid data"));
      }
    }
    return got;
  }

  std::string path_;
  std::FILE* f_ = nullptr;
  std::vector<std::uint8_t> in_;  // input buffer: unread bytes in [pos_, pos_ + avail_)
  std::size_t pos_ = 0, avail_ = 0;
  std::uint64_t offset_ = 0;  // bytes read from the file so far
  std::optional<std::uint64_t> size_;
  bool eof_ = false, gzip_ = false, z_ready_ = false, member_done_ = false;
  z_stream z_{};
};

/// The name of an IDX type code.
inline const char* idx_type_name(unsigned code) {
  switch (code) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "int16";
    case 0x0C:
      return "int32";
    case 0x0D:
      return "float32";
    case 0x0E:
      return "float64";
    default:
      return "not an IDX type";
  }
}

/// "0x%02x" of one byte.
inline std::string hex_byte(unsigned b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02x", b & 0xffu);
  return buf;
}

/// " (gzip stream: <m>)" when m is not empty.
inline std::string gz_note(const std::string& m) { return m.empty() ? "" : cat(" (gzip stream: ", m, ")"); }

/// "a x b x c"
inline std::string dims_str(const std::vector<std::uint64_t>& d) {
  std::ostringstream s;
  for (std::size_t i = 0; i < d.size(); ++i) s << (i ? " x " : "") << d[i];
  return s.str();
}

}  // namespace detail

/// Largest amount of data read_idx accepts, 2^34 bytes (a larger header is
/// taken as corrupt rather than as a reason to allocate). It bounds the
/// product of the non-zero dimensions too, so an empty array cannot carry
/// dimensions whose products overflow (e.g. 0 x 2^32−1 x 2^32−1).
inline constexpr std::uint64_t idx_max_bytes = std::uint64_t{1} << 34;

/// Reads an IDX file of unsigned bytes (type code 0x08), gzip-compressed
/// (detected by the 1f 8b magic) or raw. Throws DataError naming the path and
/// what is wrong: cannot open; bad magic (the first two bytes must be 0; the
/// four magic bytes are shown in hex); unsupported type code (named); zero or
/// more than 4 dimensions; a product of non-zero dimensions above 2^34 bytes;
/// truncated data ("expected N bytes of data, file ends after M": for a raw
/// file found from its size, before anything is allocated); trailing bytes
/// after the data; garbage after the last gzip member; a corrupt gzip stream
/// (zlib's message). Memory: a raw file's data is allocated once its size is
/// known to match; a gzip file's grows with the data that arrives (at most
/// twice what the file holds, whatever the header claims).
inline IdxArray read_idx(const std::string& path) {
  using detail::cat;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw DataError(cat(path, ": cannot open: is a directory"));
  detail::IdxSource file(path);

  std::string trunc;
  std::array<std::uint8_t, 4> magic{};
  std::size_t got = file.read(magic.data(), 4, &trunc);
  if (got < 4)
    throw DataError(cat(path, ": not an IDX file: expected a 4-byte magic, file ends after ", got, " bytes",
                        detail::gz_note(trunc)));
  if (magic[0] != 0 || magic[1] != 0)
    throw DataError(cat(path, ": bad magic ", detail::hex_byte(magic[0]), " ", detail::hex_byte(magic[1]),
                        " ", detail::hex_byte(magic[2]), " ", detail::hex_byte(magic[3]),
                        " (the first two bytes of an IDX file must be 0x00 0x00)"));
  if (magic[2] != 0x08)
    throw DataError(cat(path, ": unsupported IDX type code ", detail::hex_byte(magic[2]), " (",
                        detail::idx_type_name(magic[2]), "); only 0x08 (unsigned byte) is supported"));
  const unsigned nd = magic[3];
  if (nd == 0 || nd > 4)
    throw DataError(cat(path, ": IDX header declares ", nd, " dimensions; expected 1 to 4"));

  std::array<std::uint8_t, 16> raw{};
  got = file.read(raw.data(), 4 * nd, &trunc);
  if (got < 4 * nd)
    throw DataError(cat(path, ": truncated header: expected ", 4 * nd,
                        " bytes of dimensions, file ends after ", got, detail::gz_note(trunc)));
  std::vector<std::uint64_t> dims(nd);
  std::uint64_t nonzero = 1;  // product of the non-zero dimensions, while <= idx_max_bytes
  bool absurd = false, empty = false;
  for (unsigned i = 0; i < nd; ++i) {
    dims[i] = (std::uint64_t{raw[4 * i]} << 24) | (std::uint64_t{raw[4 * i + 1]} << 16) |
              (std::uint64_t{raw[4 * i + 2]} << 8) | std::uint64_t{raw[4 * i + 3]};
    if (dims[i] == 0) {
      empty = true;
    } else if (!absurd) {
      // Checked before multiplying: the product never exceeds idx_max_bytes.
      if (dims[i] > idx_max_bytes / nonzero)
        absurd = true;
      else
        nonzero *= dims[i];
    }
  }
  if (absurd)
    throw DataError(cat(path, ": dimensions ", detail::dims_str(dims),
                        " give an absurd data size (more than 2^34 bytes); corrupt header?"));
  const std::uint64_t total = empty ? 0 : nonzero;
  const std::uint64_t header = 4 + 4 * std::uint64_t{nd};

  IdxArray out;
  out.path = path;
  out.dims.assign(dims.begin(), dims.end());
  const auto n = static_cast<std::size_t>(total);
  if (const auto size = file.raw_size()) {
    // Raw: the file's size must be exactly header + data, checked before allocating.
    const std::uint64_t data = *size - std::min(*size, header);
    if (data < total)
      throw DataError(cat(path, ": truncated: expected ", n, " bytes of data, file ends after ", data,
                          " (the file has ", *size, " bytes)"));
    if (data > total)
      throw DataError(cat(path, ": ", data - total, " trailing bytes after the ", n, " bytes of data"));
  }
  // Grow while reading (doubling from 64 KiB) rather than trusting the header
  // with one big allocation; a raw file's size was checked above.
  std::size_t have = 0;
  while (have < n) {
    const std::size_t step =
        file.raw_size() ? n - have
                        : std::min<std::size_t>(n - have, std::max<std::size_t>(have, std::size_t{1} << 16));
    out.values.resize(have + step);
    const std::size_t r = file.read(out.values.data() + have, step, &trunc);
    have += r;
    if (r < step)
      throw DataError(cat(path, ": truncated: expected ", n, " bytes of data, file ends after ", have,
                          detail::gz_note(trunc)));
  }
  // Anything after the data is an error; reading on also makes zlib check the
  // gzip trailer (CRC, length) and finds garbage after the last member.
  std::uint64_t extra = 0;
  std::array<std::uint8_t, 4096> sink{};
  for (;;) {
    const std::size_t r = file.read(sink.data(), sink.size(), &trunc);
    extra += r;
    if (r < sink.size()) break;
  }
  if (extra > 0) throw DataError(cat(path, ": ", extra, " trailing bytes after the ", n, " bytes of data"));
  if (!trunc.empty())
    throw DataError(cat(path, ": corrupt gzip stream: ", trunc, " (after all ", n, " bytes of data)"));
  return out;
}

/// Images with one class label each.
struct LabelledImages {
  ImageShape shape;                  ///< {1, rows, cols}
  Index count = 0;                   ///< number of samples
  std::vector<std::uint8_t> pixels;  ///< count × (rows·cols), sample-major, each image row-major
  std::vector<Index> labels;         ///< count entries, each in [0, classes)
  Index classes = 10;
  std::string source;  ///< "images_path + labels_path", for messages
};

/// Pairs an idx3 image file (count × rows × cols) with an idx1 label file
/// (count). DataError (naming the file) when the image file is not
/// 3-dimensional, the label file not 1-dimensional, the counts differ (both
/// files and both counts named), or a label is >= classes (the file, the
/// sample index and the value named).
inline LabelledImages load_labelled_images(const std::string& images_path, const std::string& labels_path,
                                           Index classes = 10) {
  using detail::cat;
  if (classes <= 0) throw DataError(cat(labels_path, ": classes = ", classes, " must be positive"));
  IdxArray im = read_idx(images_path);
  if (im.dims.size() != 3)
    throw DataError(cat(images_path,
                        ": an image file must have 3 dimensions (count x rows x cols), this one has ",
                        im.dims.size()));
  IdxArray lb = read_idx(labels_path);
  if (lb.dims.size() != 1)
    throw DataError(
        cat(labels_path, ": a label file must have 1 dimension (count), this one has ", lb.dims.size()));
  if (im.dims[0] != lb.dims[0])
    throw DataError(cat(images_path, ": holds ", im.dims[0], " images but ", labels_path, " holds ",
                        lb.dims[0], " labels"));
  LabelledImages s;
  s.shape = ImageShape{1, im.dims[1], im.dims[2]};
  s.count = im.dims[0];
  s.classes = classes;
  s.source = cat(images_path, " + ", labels_path);
  s.labels.resize(lb.values.size());
  for (std::size_t i = 0; i < lb.values.size(); ++i) {
    const Index v = lb.values[i];
    if (v >= classes)
      throw DataError(
          cat(labels_path, ": label of sample ", i, " is ", v, ", out of range for ", classes, " classes"));
    s.labels[i] = v;
  }
  s.pixels = std::move(im.values);
  return s;
}

/// Default location of Debian's dataset-fashion-mnist package.
inline constexpr const char* default_fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";

/// The Fashion-MNIST training (60000) and test (10000) sets.
struct FashionMnist {
  LabelledImages train, test;
};

namespace detail {

/// DIR/NAME.gz if it exists, else DIR/NAME if it exists, else DataError naming
/// the path tried (with the apt-get hint when dir is the default).
inline std::string find_idx(const std::string& dir, const std::string& name) {
  namespace fs = std::filesystem;
  const fs::path gz = fs::path(dir) / (name + ".gz"), plain = fs::path(dir) / name;
  std::error_code ec;
  if (fs::exists(gz, ec)) return gz.string();
  if (fs::exists(plain, ec)) return plain.string();
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const bool is_default = d == default_fashion_mnist_dir;
  throw DataError(cat(gz.string(), ": missing (also tried ", plain.string(), ")",
                      is_default ? "; install Fashion-MNIST with `apt-get install dataset-fashion-mnist`"
                                 : "; pass the directory holding the Fashion-MNIST IDX files"));
}

}  // namespace detail

/// Loads DIR/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
/// t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (the .gz file
/// when both exist). A missing file is a DataError naming the path tried (and
/// `apt-get install dataset-fashion-mnist` when dir is the default); so is a
/// test set whose image shape differs from the training set's.
inline FashionMnist load_fashion_mnist(const std::string& dir = default_fashion_mnist_dir) {
  const std::string tri = detail::find_idx(dir, "train-images-idx3-ubyte");
  const std::string trl = detail::find_idx(dir, "train-labels-idx1-ubyte");
  const std::string tei = detail::find_idx(dir, "t10k-images-idx3-ubyte");
  const std::string tel = detail::find_idx(dir, "t10k-labels-idx1-ubyte");
  FashionMnist f{load_labelled_images(tri, trl, 10), load_labelled_images(tei, tel, 10)};
  if (f.test.shape != f.train.shape)
    throw DataError(detail::cat(tei, ": images are ", f.test.shape.str(), " but the training images (", tri,
                                ") are ", f.train.shape.str()));
  return f;
}

/// Pixel normalisation x = (p/255 − mean)/stddev.
struct Normalization {
  double mean = 0, stddev = 1;
};

/// Mean and (population) standard deviation of p/255 over all pixels of a set,
/// computed in double from the exact 256-bin histogram. An empty or constant
/// set gives stddev = 1, so normalising never divides by zero.
inline Normalization normalization_of(const LabelledImages& set) {
  std::array<std::uint64_t, 256> hist{};
  for (std::uint8_t p : set.pixels) ++hist[p];
  const double n = static_cast<double>(set.pixels.size());
  Normalization r;
  if (set.pixels.empty()) return r;
  double sum = 0;
  for (int v = 0; v < 256; ++v) sum += static_cast<double>(hist[v]) * (v / 255.0);
  r.mean = sum / n;
  double ss = 0;
  for (int v = 0; v < 256; ++v) {
    const double d = v / 255.0 - r.mean;
    ss += static_cast<double>(hist[v]) * d * d;
  }
  r.stddev = std::sqrt(ss / n);
  if (!(r.stddev > 0)) r.stddev = 1;
  return r;
}

/// Fills x (features × idx.size(), one normalised sample per column; resized
/// only if its shape differs, so a caller reusing x never reallocates) and y
/// (the labels) for samples idx of set. ShapeError, before anything is written,
/// if an index is outside [0, set.count).
template <class S>
void gather(const LabelledImages& set, std::span<const Index> idx, const Normalization& n, Matrix<S>& x,
            std::vector<Index>& y) {
  using detail::cat;
  for (std::size_t j = 0; j < idx.size(); ++j)
    if (idx[j] < 0 || idx[j] >= set.count)
      throw ShapeError(
          cat("gather: index ", idx[j], " (entry ", j, ") is outside [0, ", set.count, ") of ", set.source));
  const Index features = set.shape.size();
  const auto cols = static_cast<Index>(idx.size());
  if (x.rows() != features || x.cols() != cols) x.resize(features, cols);
  y.resize(idx.size());
  std::array<S, 256> lut;
  for (int v = 0; v < 256; ++v) lut[v] = static_cast<S>((v / 255.0 - n.mean) / n.stddev);
  for (Index j = 0; j < cols; ++j) {
    const Index s = idx[static_cast<std::size_t>(j)];
    const std::uint8_t* p = set.pixels.data() + s * features;
    S* col = x.data() + j * features;
    for (Index r = 0; r < features; ++r) col[r] = lut[p[r]];
    y[static_cast<std::size_t>(j)] = set.labels[static_cast<std::size_t>(s)];
  }
}

/// 0..n−1 in a seeded random order: Fisher–Yates driven by splitmix64, with
/// an unbiased bounded draw by rejection. Unlike std::shuffle this does not
/// depend on the standard library, so a seed gives the same order everywhere.
/// n <= 0 gives an empty vector.
inline std::vector<Index> shuffled_indices(Index n, std::uint64_t seed) {
  std::vector<Index> v(static_cast<std::size_t>(std::max<Index>(n, 0)));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<Index>(i);
  std::uint64_t state = seed;
  for (std::size_t i = v.size(); i > 1; --i) {
    const std::uint64_t bound = i;                        // draw j uniformly in [0, i)
    const std::uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
    std::uint64_t r = moonwalk::detail::splitmix64(state);
    while (r < threshold) r = moonwalk::detail::splitmix64(state);
    std::swap(v[i - 1], v[static_cast<std::size_t>(r % bound)]);
  }
  return v;
}

/// Random horizontal flips (data augmentation): column j of x, one image of
/// `shape` (C×H×W, row-major), is mirrored, x(c, i, k) ← x(c, i, W−1−k), when
/// bit 0 of splitmix64 draw j from `seed` is set (probability 1/2). The draws
/// depend only on the seed and the column, so a run resumed from a checkpoint
/// flips exactly as a straight run. With `first_column` = k, x holds columns
/// k, k+1, … of a larger batch and column j draws as column k + j would: a
/// data-parallel rank flips its shard exactly as one process flips the whole
/// batch. ShapeError if x.rows() != shape.size().
template <class S>
void random_flips(Matrix<S>& x, const ImageShape& shape, std::uint64_t seed, Index first_column = 0) {
  using detail::cat;
  if (x.rows() != shape.size())
    throw ShapeError(cat("random_flips: images of ", shape.str(), " have ", shape.size(), " numbers, x has ",
                         x.rows(), " rows"));
  // (splitmix64 advances its state by a constant per draw: skipping k draws is one multiply)
  std::uint64_t state = seed + static_cast<std::uint64_t>(first_column) * 0x9e3779b97f4a7c15ULL;
  for (Index j = 0; j < x.cols(); ++j) {
    if ((moonwalk::detail::splitmix64(state) & 1U) == 0) continue;
    S* col = x.data() + j * x.rows();
    for (Index c = 0; c < shape.c; ++c)
      for (Index i = 0; i < shape.h; ++i) {
        S* row = col + shape.index(c, i, 0);
        std::reverse(row, row + shape.w);
      }
  }
}

/// Random translations (data augmentation): column j of x, one image of
/// `shape` (C×H×W, row-major), becomes x(c, i, k) ← x(c, i − a, k − b), and
/// `fill` where (i − a, k − b) falls outside the image, for a shift (a, b)
/// drawn uniformly from [−s, s]² (s = `max_shift`) by splitmix64 draw j from
/// `seed`. As random_flips: the draws depend only on the seed and the column
/// (`first_column` = k: column j draws as column k + j of the whole batch).
/// ShapeError if x.rows() != shape.size() or max_shift < 0.
template <class S>
void random_shifts(Matrix<S>& x, const ImageShape& shape, Index max_shift, S fill, std::uint64_t seed,
                   Index first_column = 0) {
  using detail::cat;
  if (x.rows() != shape.size())
    throw ShapeError(cat("random_shifts: images of ", shape.str(), " have ", shape.size(), " numbers, x has ",
                         x.rows(), " rows"));
  if (max_shift < 0) throw ShapeError(cat("random_shifts: max_shift must be >= 0, got ", max_shift));
  const auto span = static_cast<std::uint64_t>(2 * max_shift + 1);
  std::uint64_t state = seed + static_cast<std::uint64_t>(first_column) * 0x9e3779b97f4a7c15ULL;
  std::vector<S> image(static_cast<std::size_t>(shape.size()));
  for (Index j = 0; j < x.cols(); ++j) {
    const std::uint64_t r = moonwalk::detail::splitmix64(state);
    const auto a = static_cast<Index>(r % span) - max_shift,
               b = static_cast<Index>((r / span) % span) - max_shift;
    if (a == 0 && b == 0) continue;
    S* col = x.data() + j * x.rows();
    std::copy(col, col + shape.size(), image.begin());
    for (Index c = 0; c < shape.c; ++c)
      for (Index i = 0; i < shape.h; ++i)
        for (Index k = 0; k < shape.w; ++k) {
          const Index si = i - a, sk = k - b;
          col[shape.index(c, i, k)] = si >= 0 && si < shape.h && sk >= 0 && sk < shape.w
                                          ? image[static_cast<std::size_t>(shape.index(c, si, sk))]
                                          : fill;
        }
  }
}

/// The first `limit` samples of a set (limit <= 0 or >= count: all of it),
/// for smoke runs on a slice.
inline LabelledImages head(const LabelledImages& set, Index limit) {
  if (limit <= 0 || limit >= set.count) return set;
  LabelledImages s;
  s.shape = set.shape;
  s.count = limit;
  s.classes = set.classes;
  s.source = detail::cat(set.source, " (first ", limit, " of ", set.count, ")");
  const auto np = static_cast<std::size_t>(limit * set.shape.size());
  s.pixels.assign(set.pixels.begin(), set.pixels.begin() + static_cast<std::ptrdiff_t>(np));
  s.labels.assign(set.labels.begin(), set.labels.begin() + static_cast<std::ptrdiff_t>(limit));
  return s;
}

}  // namespace moonwalk::data
