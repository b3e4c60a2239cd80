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
// usual .gz distribution); zlib's gzread reads both compressed and raw files.
// Every error is a DataError whose message starts with the offending path.
#pragma once

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
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "moonwalk/core/image.hpp"
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

/// Owns a gzFile (closed on destruction).
struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzHandle = std::unique_ptr<gzFile_s, GzCloser>;

/// zlib's message for the last error on f, without the "<path>: " prefix zlib adds.
inline std::string gz_message(gzFile f, const std::string& path, int* errnum = nullptr) {
  int e = Z_OK;
  const char* m = gzerror(f, &e);
  if (errnum) *errnum = e;
  std::string s = m ? m : "";
  const std::string prefix = cat(path, ": ");
  if (s.compare(0, prefix.size(), prefix) == 0) s.erase(0, prefix.size());
  if (e == Z_ERRNO && s.empty()) s = std::strerror(errno);
  return s;
}

/// Reads up to n bytes into p; returns the count read (less than n only at the
/// end of the file). A gzip stream that ends early stops the read (its error
/// is returned in *truncated_msg); any other read or gzip error throws.
inline std::size_t gz_read(gzFile f, const std::string& path, std::uint8_t* p, std::size_t n,
                           std::string* truncated_msg) {
  std::size_t got = 0;
  while (got < n) {
    const std::size_t want = std::min<std::size_t>(n - got, std::size_t{1} << 30);
    const int r = gzread(f, p + got, static_cast<unsigned>(want));
    if (r < 0) {
      int e = Z_OK;
      const std::string m = gz_message(f, path, &e);
      if (e == Z_BUF_ERROR) {  // "unexpected end of file": a cut-short gzip stream
        if (truncated_msg) *truncated_msg = m;
        return got;
      }
      if (e == Z_ERRNO) throw DataError(cat(path, ": read error: ", m));
      throw DataError(cat(path, ": corrupt gzip stream: ", m));
    }
    if (r == 0) {
      int e = Z_OK;
      const std::string m = gz_message(f, path, &e);
      if (e == Z_BUF_ERROR && truncated_msg)
        *truncated_msg = m;
      else if (e != Z_OK)
        throw DataError(cat(path, ": corrupt gzip stream: ", m));
      return got;
    }
    got += static_cast<std::size_t>(r);
  }
  return got;
}

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
/// taken as corrupt rather than as a reason to allocate).
inline constexpr std::uint64_t idx_max_bytes = std::uint64_t{1} << 34;

/// Reads an IDX file of unsigned bytes (type code 0x08), gzip-compressed
/// (detected by the 1f 8b magic; read through zlib gzopen/gzread, which also
/// reads raw files) or raw. Throws DataError naming the path and what is
/// wrong: cannot open; bad magic (the first two bytes must be 0; the four
/// magic bytes are shown in hex); unsupported type code (named); zero or more
/// than 4 dimensions; a dimension product above 2^34 bytes; truncated data
/// ("expected N bytes of data, file ends after M"); trailing bytes after the
/// data; a corrupt gzip stream (zlib's gzerror message).
inline IdxArray read_idx(const std::string& path) {
  using detail::cat;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw DataError(cat(path, ": cannot open: is a directory"));
  errno = 0;
  detail::GzHandle file(gzopen(path.c_str(), "rb"));
  if (!file) {
    const int e = errno;
    throw DataError(cat(path, ": cannot open (", e ? std::strerror(e) : "out of memory", ")"));
  }
  gzFile f = file.get();
  gzbuffer(f, 1u << 17);

  std::string trunc;
  std::array<std::uint8_t, 4> magic{};
  std::size_t got = detail::gz_read(f, path, magic.data(), 4, &trunc);
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
  got = detail::gz_read(f, path, raw.data(), 4 * nd, &trunc);
  if (got < 4 * nd)
    throw DataError(cat(path, ": truncated header: expected ", 4 * nd,
                        " bytes of dimensions, file ends after ", got, detail::gz_note(trunc)));
  std::vector<std::uint64_t> dims(nd);
  std::uint64_t total = 1;
  bool absurd = false;
  for (unsigned i = 0; i < nd; ++i) {
    dims[i] = (std::uint64_t{raw[4 * i]} << 24) | (std::uint64_t{raw[4 * i + 1]} << 16) |
              (std::uint64_t{raw[4 * i + 2]} << 8) | std::uint64_t{raw[4 * i + 3]};
    // Each factor is < 2^32 and total stays <= 2^34 while !absurd, so this never overflows.
    if (!absurd) {
      total *= dims[i];
      if (total > idx_max_bytes) absurd = true;
    }
  }
  for (auto d : dims) {
    if (d == 0) {  // an empty array is small whatever the other dimensions
      absurd = false;
      total = 0;
    }
  }
  if (absurd)
    throw DataError(cat(path, ": dimensions ", detail::dims_str(dims),
                        " give an absurd data size (more than 2^34 bytes); corrupt header?"));

  IdxArray out;
  out.path = path;
  out.dims.assign(dims.begin(), dims.end());
  // Grow while reading rather than trusting the header with one big allocation.
  const std::size_t n = static_cast<std::size_t>(total);
  out.values.reserve(std::min<std::size_t>(n, std::size_t{1} << 28));
  std::size_t have = 0;
  while (have < n) {
    const std::size_t step =
        std::min<std::size_t>(n - have, std::max<std::size_t>(have, std::size_t{1} << 24));
    out.values.resize(have + step);
    const std::size_t r = detail::gz_read(f, path, out.values.data() + have, step, &trunc);
    have += r;
    if (r < step)
      throw DataError(cat(path, ": truncated: expected ", n, " bytes of data, file ends after ", have,
                          detail::gz_note(trunc)));
  }
  // Anything after the data is an error; reading on also makes zlib check the gzip trailer (CRC, length).
  std::uint64_t extra = 0;
  std::array<std::uint8_t, 4096> sink{};
  for (;;) {
    const std::size_t r = detail::gz_read(f, path, sink.data(), sink.size(), &trunc);
    extra += r;
    if (r < sink.size()) break;
  }
  if (extra > 0) throw DataError(cat(path, ": ", extra, " trailing bytes after the ", n, " bytes of data"));
  if (!trunc.empty())
    throw DataError(cat(path, ": corrupt gzip stream: ", trunc, " (after all ", n, " bytes of data)"));
  const int rc = gzclose(file.release());
  if (rc != Z_OK) throw DataError(cat(path, ": corrupt gzip stream: error ", rc, " on close"));
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

namespace detail {

/// splitmix64 (Steele, Lea, Flood 2014): the next 64-bit output of state.
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace detail

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
    std::uint64_t r = detail::splitmix64(state);
    while (r < threshold) r = detail::splitmix64(state);
    std::swap(v[i - 1], v[static_cast<std::size_t>(r % bound)]);
  }
  return v;
}

/// Random horizontal flips (data augmentation): column j of x, one image of
/// `shape` (C×H×W, row-major), is mirrored, x(c, i, k) ← x(c, i, W−1−k), when
/// bit 0 of splitmix64 draw j from `seed` is set (probability 1/2). The draws
/// depend only on the seed and the column, so a run resumed from a checkpoint
/// flips exactly as a straight run. ShapeError if x.rows() != shape.size().
template <class S>
void random_flips(Matrix<S>& x, const ImageShape& shape, std::uint64_t seed) {
  using detail::cat;
  if (x.rows() != shape.size())
    throw ShapeError(cat("random_flips: images of ", shape.str(), " have ", shape.size(), " numbers, x has ",
                         x.rows(), " rows"));
  std::uint64_t state = seed;
  for (Index j = 0; j < x.cols(); ++j) {
    if ((detail::splitmix64(state) & 1U) == 0) continue;
    S* col = x.data() + j * x.rows();
    for (Index c = 0; c < shape.c; ++c)
      for (Index i = 0; i < shape.h; ++i) {
        S* row = col + shape.index(c, i, 0);
        std::reverse(row, row + shape.w);
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
