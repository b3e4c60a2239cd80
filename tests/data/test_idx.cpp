// The IDX reader: raw and gzipped round trips, every error message, labelled
// image sets, Fashion-MNIST loading, gather/normalisation, seeded shuffles.
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <moonwalk/data/idx.hpp>
#include <new>
#include <string>
#include <vector>

#include "io/memory_limit.hpp"
#include "support/check_util.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
using Catch::Contains;
using moonwalk::Index;
using moonwalk::ShapeError;
using moonwalk::data::DataError;
using moonwalk::data::IdxArray;
using moonwalk::data::LabelledImages;
using moonwalk::data::Normalization;
using moonwalk::data::read_idx;

using moonwalk::test::TempDir;

namespace {

using Bytes = std::vector<std::uint8_t>;

/// An IDX file: magic 00 00 type nd, big-endian dimensions, then the values.
Bytes idx_bytes(const std::vector<std::uint32_t>& dims, const Bytes& values, std::uint8_t type = 0x08) {
  Bytes b{0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (std::uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(d >> s));
  b.insert(b.end(), values.begin(), values.end());
  return b;
}

/// 0, 1, …, n−1 modulo 256, scrambled a little so gzip has something to do.
Bytes ramp(std::size_t n) {
  Bytes v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>((i * 37 + i / 7) % 256);
  return v;
}

void write_raw(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(f.good());
}

void write_gz(const std::string& path, const Bytes& b) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!b.empty())
    REQUIRE(gzwrite(f, b.data(), static_cast<unsigned>(b.size())) == static_cast<int>(b.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

Bytes read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The DataError message read_idx(path) throws ("" if it does not throw).
std::string idx_error(const std::string& path) {
  try {
    (void)read_idx(path);
  } catch (const DataError& e) {
    return e.what();
  }
  return "";
}

/// Writes `count` images of rows × cols (pixels ramp()) and the given labels.
void write_set(const std::string& images, const std::string& labels, std::uint32_t count, std::uint32_t rows,
               std::uint32_t cols, const Bytes& label_values, bool gz) {
  const Bytes im = idx_bytes({count, rows, cols}, ramp(std::size_t{count} * rows * cols));
  const Bytes lb = idx_bytes({static_cast<std::uint32_t>(label_values.size())}, label_values);
  if (gz) {
    write_gz(images, im);
    write_gz(labels, lb);
  } else {
    write_raw(images, im);
    write_raw(labels, lb);
  }
}

}  // namespace

TEST_CASE("read_idx: raw and gzipped round trips keep dims and values exactly", "[data]") {
  TempDir t;
  const std::vector<std::vector<std::uint32_t>> shapes = {
      {7}, {3, 2, 4}, {5, 28, 28}, {2, 3, 1, 2}, {0, 28, 28}};
  for (const auto& dims : shapes) {
    std::size_t n = 1;
    for (auto d : dims) n *= d;
    const Bytes values = ramp(n);
    for (bool gz : {false, true}) {
      const std::string path = t / moonwalk::detail::cat("a", dims.size(), "_", n, gz ? ".gz" : "");
      if (gz)
        write_gz(path, idx_bytes(dims, values));
      else
        write_raw(path, idx_bytes(dims, values));
      CAPTURE(path);
      const IdxArray a = read_idx(path);
      CHECK(a.path == path);
      REQUIRE(a.dims.size() == dims.size());
      for (std::size_t i = 0; i < dims.size(); ++i) CHECK(a.dims[i] == static_cast<Index>(dims[i]));
      CHECK(a.values == values);
    }
  }
  // A dimension above 2^24 survives the big-endian decoding (and an empty partner keeps it small).
  const std::string big = t / "big";
  write_raw(big, idx_bytes({0x01020304u, 0}, {}));
  const IdxArray a = read_idx(big);
  REQUIRE(a.dims.size() == 2);
  CHECK(a.dims[0] == 0x01020304);
  CHECK(a.values.empty());
}

TEST_CASE("read_idx: every malformed file is a DataError naming the path and the problem", "[data]") {
  TempDir t;
  const Bytes good = idx_bytes({2, 3, 4}, ramp(24));

  SECTION("cannot open") {
    const std::string p = t / "does-not-exist";
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("cannot open"));
    REQUIRE_THROWS_WITH(read_idx(t.dir.string()), Contains(t.dir.string()) && Contains("cannot open"));
  }
  SECTION("bad magic, shown in hex") {
    const std::string p = t / "zip";
    write_raw(p, {0x50, 0x4b, 0x03, 0x04, 0, 0, 0, 0});
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("bad magic") && Contains("0x50 0x4b 0x03 0x04"));
    // A gzipped file whose content is not IDX: the magic of the decompressed bytes.
    const std::string q = t / "text.gz";
    write_gz(q, {'h', 'e', 'l', 'l', 'o'});
    REQUIRE_THROWS_WITH(read_idx(q), Contains(q) && Contains("bad magic") && Contains("0x68 0x65 0x6c 0x6c"));
  }
  SECTION("unsupported type code, named") {
    const std::string p = t / "float";
    write_raw(p, idx_bytes({2}, Bytes(8, 0), 0x0D));
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("unsupported") && Contains("0x0d") &&
                                         Contains("float32") && Contains("0x08 (unsigned byte)"));
    const std::string q = t / "int32.gz";
    write_gz(q, idx_bytes({2}, Bytes(8, 0), 0x0C));
    REQUIRE_THROWS_WITH(read_idx(q), Contains(q) && Contains("unsupported") && Contains("int32"));
  }
  SECTION("zero or more than four dimensions") {
    const std::string p = t / "nd0";
    write_raw(p, idx_bytes({}, {1, 2, 3}));
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("0 dimensions") && Contains("1 to 4"));
    const std::string q = t / "nd5";
    write_raw(q, idx_bytes({1, 1, 1, 1, 1}, {9}));
    REQUIRE_THROWS_WITH(read_idx(q), Contains(q) && Contains("5 dimensions") && Contains("1 to 4"));
  }
  SECTION("absurd dimension product") {
    const std::string p = t / "huge";
    write_raw(p, idx_bytes({70000, 70000, 70000}, {}));
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("70000 x 70000 x 70000") && Contains("absurd"));
    // 2^32 − 1 in each of four dimensions: the product overflows 64 bits.
    const std::string q = t / "overflow.gz";
    write_gz(q, idx_bytes({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {}));
    REQUIRE_THROWS_WITH(read_idx(q), Contains(q) && Contains("absurd"));
  }
  SECTION("truncated data, header and magic") {
    const std::string p = t / "short";
    write_raw(p, Bytes(good.begin(), good.end() - 14));
    REQUIRE_THROWS_WITH(read_idx(p),
                        Contains(p) && Contains("expected 24 bytes of data, file ends after 10"));
    const std::string q = t / "short.gz";
    write_gz(q, Bytes(good.begin(), good.end() - 1));
    REQUIRE_THROWS_WITH(read_idx(q),
                        Contains(q) && Contains("expected 24 bytes of data, file ends after 23"));
    const std::string h = t / "short-header";
    write_raw(h, Bytes(good.begin(), good.begin() + 9));
    REQUIRE_THROWS_WITH(read_idx(h), Contains(h) && Contains("truncated header") && Contains("ends after 5"));
    const std::string e = t / "empty";
    write_raw(e, {});
    REQUIRE_THROWS_WITH(read_idx(e), Contains(e) && Contains("file ends after 0"));
    const std::string eg = t / "empty.gz";
    write_gz(eg, {});
    REQUIRE_THROWS_WITH(read_idx(eg), Contains(eg) && Contains("file ends after 0"));
  }
  SECTION("trailing bytes") {
    const std::string p = t / "long";
    Bytes b = good;
    b.insert(b.end(), {1, 2, 3});
    write_raw(p, b);
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("3 trailing bytes after the 24 bytes of data"));
    const std::string q = t / "long.gz";
    b.insert(b.end(), 5000, 7);
    write_gz(q, b);
    REQUIRE_THROWS_WITH(read_idx(q), Contains(q) && Contains("5003 trailing bytes"));
  }
  SECTION("gzip stream cut short") {
    const std::string src = t / "src.gz";
    const Bytes values = ramp(20000);
    write_gz(src, idx_bytes({20, 1000}, values));
    const Bytes gz = read_all(src);
    REQUIRE(gz.size() > 100);
    // Cut in the middle of the compressed data: the data itself is short.
    const std::string p = t / "half.gz";
    write_raw(p, Bytes(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2)));
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) &&
                                         Contains("expected 20000 bytes of data, file ends after") &&
                                         Contains("unexpected end of file"));
    // Cut inside the 8-byte trailer (CRC, length): all data is there but the stream is incomplete.
    const std::string q = t / "notrailer.gz";
    write_raw(q, Bytes(gz.begin(), gz.end() - 4));
    REQUIRE_THROWS_WITH(read_idx(q),
                        Contains(q) && Contains("corrupt gzip stream") && Contains("unexpected end of file"));
  }
  SECTION("corrupted gzip bytes") {
    const std::string src = t / "src.gz";
    write_gz(src, idx_bytes({20, 1000}, ramp(20000)));
    const Bytes gz = read_all(src);
    // A flipped CRC: zlib's "incorrect data check".
    Bytes crc = gz;
    crc[crc.size() - 6] ^= 0xff;
    const std::string p = t / "crc.gz";
    write_raw(p, crc);
    REQUIRE_THROWS_WITH(read_idx(p), Contains(p) && Contains("corrupt gzip stream") && Contains("incorrect"));
    // Garbage over the middle of the deflate stream.
    Bytes mid = gz;
    for (std::size_t i = mid.size() / 3; i < mid.size() / 3 + 16; ++i)
      mid[i] = static_cast<std::uint8_t>(0xff - i);
    const std::string q = t / "mid.gz";
    write_raw(q, mid);
    const std::string m = idx_error(q);
    CAPTURE(m);
    CHECK_THAT(m, Contains(q) && Contains("corrupt gzip stream"));
  }
}

TEST_CASE("load_labelled_images: pairing, shapes, counts and label range", "[data]") {
  TempDir t;
  const std::string im = t / "im.gz", lb = t / "lb";
  write_set(im, lb, 3, 2, 4, {2, 0, 9}, false);
  write_gz(im, idx_bytes({3, 2, 4}, ramp(24)));

  const LabelledImages s = moonwalk::data::load_labelled_images(im, lb);
  CHECK(s.shape == moonwalk::ImageShape{1, 2, 4});
  CHECK(s.count == 3);
  CHECK(s.classes == 10);
  CHECK(s.pixels == ramp(24));
  CHECK(s.labels == std::vector<Index>{2, 0, 9});
  CHECK_THAT(s.source, Contains(im) && Contains(lb));

  SECTION("image file must be 3-dimensional") {
    const std::string p = t / "flat";
    write_raw(p, idx_bytes({3, 8}, ramp(24)));
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(p, lb),
                        Contains(p) && Contains("3 dimensions") && Contains("has 2"));
  }
  SECTION("label file must be 1-dimensional") {
    const std::string p = t / "lb2";
    write_raw(p, idx_bytes({3, 1}, {1, 2, 3}));
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(im, p),
                        Contains(p) && Contains("1 dimension") && Contains("has 2"));
  }
  SECTION("counts differ: both files and both counts named") {
    const std::string p = t / "lb-short";
    write_raw(p, idx_bytes({2}, {1, 2}));
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(im, p),
                        Contains(im) && Contains(p) && Contains("3 images") && Contains("2 labels"));
  }
  SECTION("label out of range: file, index and value named") {
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(im, lb, 5),
                        Contains(lb) && Contains("sample 2 is 9") && Contains("5 classes"));
    const std::string p = t / "lb-bad.gz";
    write_gz(p, idx_bytes({3}, {1, 10, 3}));
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(im, p),
                        Contains(p) && Contains("sample 1 is 10") && Contains("10 classes"));
  }
  SECTION("errors of the underlying files propagate with their paths") {
    const std::string p = t / "missing";
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(p, lb), Contains(p) && Contains("cannot open"));
    REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(im, p), Contains(p) && Contains("cannot open"));
  }
}

TEST_CASE("load_fashion_mnist: a crafted directory, .gz preferred, missing files named", "[data]") {
  TempDir t;
  write_set(t / "train-images-idx3-ubyte.gz", t / "train-labels-idx1-ubyte.gz", 3, 2, 2, {1, 5, 9}, true);
  write_set(t / "t10k-images-idx3-ubyte", t / "t10k-labels-idx1-ubyte", 2, 2, 2, {0, 3}, false);
  // A broken uncompressed twin of a .gz file: never read, since .gz is preferred.
  write_raw(t / "train-images-idx3-ubyte", {1, 2, 3});

  const auto f = moonwalk::data::load_fashion_mnist(t.dir.string());
  CHECK(f.train.count == 3);
  CHECK(f.train.shape == moonwalk::ImageShape{1, 2, 2});
  CHECK(f.train.labels == std::vector<Index>{1, 5, 9});
  CHECK(f.train.pixels == ramp(12));
  CHECK(f.test.count == 2);
  CHECK(f.test.labels == std::vector<Index>{0, 3});
  CHECK(f.test.pixels == ramp(8));
  CHECK_THAT(f.train.source, Contains("train-images-idx3-ubyte.gz"));
  CHECK_THAT(f.test.source, Contains("t10k-labels-idx1-ubyte"));

  SECTION("a missing file names the path tried") {
    fs::remove(t.dir / "t10k-labels-idx1-ubyte");
    const std::string tried = t / "t10k-labels-idx1-ubyte.gz";
    REQUIRE_THROWS_WITH(moonwalk::data::load_fashion_mnist(t.dir.string()),
                        Contains(tried) && Contains("missing") && !Contains("apt-get"));
  }
  SECTION("an empty directory: the first file is missing") {
    TempDir e;
    REQUIRE_THROWS_WITH(moonwalk::data::load_fashion_mnist(e.dir.string()),
                        Contains(e / "train-images-idx3-ubyte.gz") && Contains("missing"));
  }
  SECTION("the default directory's message says how to install the package") {
    // Probed through a name that never exists, since the package may well be installed.
    REQUIRE_THROWS_WITH(
        moonwalk::data::detail::find_idx(moonwalk::data::default_fashion_mnist_dir, "no-such-idx-file"),
        Contains("/usr/share/datasets/fashion-mnist/no-such-idx-file.gz") &&
            Contains("apt-get install dataset-fashion-mnist"));
    if (!fs::exists(moonwalk::data::default_fashion_mnist_dir))
      REQUIRE_THROWS_WITH(
          moonwalk::data::load_fashion_mnist(),
          Contains("train-images-idx3-ubyte.gz") && Contains("apt-get install dataset-fashion-mnist"));
  }
  SECTION("test images of another shape") {
    write_set(t / "t10k-images-idx3-ubyte.gz", t / "t10k-labels-idx1-ubyte.gz", 2, 1, 4, {0, 3}, true);
    REQUIRE_THROWS_WITH(moonwalk::data::load_fashion_mnist(t.dir.string()),
                        Contains(t / "t10k-images-idx3-ubyte.gz") && Contains("1x1x4") && Contains("1x2x2"));
  }
}

TEST_CASE("normalization_of matches a hand computation", "[data]") {
  LabelledImages s;
  s.shape = {1, 2, 2};
  s.count = 1;
  s.pixels = {0, 255, 51, 102};  // 0, 1, 0.2, 0.4 → mean 0.4, variance (0.16 + 0.36 + 0.04 + 0) / 4 = 0.14
  s.labels = {0};
  const Normalization n = moonwalk::data::normalization_of(s);
  CHECK(n.mean == Approx(0.4).epsilon(1e-15));
  CHECK(n.stddev == Approx(std::sqrt(0.14)).epsilon(1e-15));

  s.pixels = {7, 7, 7, 7};  // constant: stddev falls back to 1
  const Normalization c = moonwalk::data::normalization_of(s);
  CHECK(c.mean == Approx(7 / 255.0));
  CHECK(c.stddev == 1);
  CHECK(moonwalk::data::normalization_of(LabelledImages{}).stddev == 1);
}

TEMPLATE_TEST_CASE("gather: normalised columns, labels, range check, no reallocation", "[data]", float,
                   double) {
  using S = TestType;
  LabelledImages s;
  s.shape = {1, 2, 3};
  s.count = 4;
  s.pixels = ramp(24);
  s.labels = {3, 1, 4, 1};
  s.source = "crafted";
  const Normalization n{0.3, 0.25};

  const std::vector<Index> idx{2, 0, 2};
  moonwalk::Matrix<S> x;
  std::vector<Index> y;
  moonwalk::data::gather<S>(s, idx, n, x, y);
  REQUIRE(x.rows() == 6);
  REQUIRE(x.cols() == 3);
  CHECK(y == std::vector<Index>{4, 3, 4});
  for (Index j = 0; j < 3; ++j)
    for (Index r = 0; r < 6; ++r) {
      const double p = s.pixels[static_cast<std::size_t>(idx[static_cast<std::size_t>(j)] * 6 + r)];
      CHECK(x(r, j) == static_cast<S>((p / 255.0 - n.mean) / n.stddev));
    }

  // Same shape again: the storage is reused.
  const S* before = x.data();
  const std::vector<Index> idx2{3, 1, 0};
  moonwalk::data::gather<S>(s, idx2, n, x, y);
  CHECK(x.data() == before);
  CHECK(y == std::vector<Index>{1, 1, 3});
  CHECK(x(0, 0) == static_cast<S>((s.pixels[18] / 255.0 - n.mean) / n.stddev));

  // Out of range (either side): ShapeError, x and y untouched.
  const moonwalk::Matrix<S> keep = x;
  const std::vector<Index> bad{0, 4}, neg{-1};
  REQUIRE_THROWS_AS(moonwalk::data::gather<S>(s, bad, n, x, y), ShapeError);
  REQUIRE_THROWS_WITH(moonwalk::data::gather<S>(s, bad, n, x, y), Contains("index 4") && Contains("crafted"));
  REQUIRE_THROWS_AS(moonwalk::data::gather<S>(s, neg, n, x, y), ShapeError);
  CHECK(x == keep);
  CHECK(y == std::vector<Index>{1, 1, 3});

  // A different batch size resizes; an empty batch is 6 × 0.
  moonwalk::data::gather<S>(s, std::vector<Index>{1}, n, x, y);
  CHECK((x.rows() == 6 && x.cols() == 1 && y.size() == 1));
  moonwalk::data::gather<S>(s, std::span<const Index>{}, n, x, y);
  CHECK((x.rows() == 6 && x.cols() == 0 && y.empty()));
}

TEST_CASE("shuffled_indices: a permutation, deterministic per seed", "[data]") {
  const auto a = moonwalk::data::shuffled_indices(1000, 42);
  REQUIRE(a.size() == 1000);
  std::vector<Index> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (Index i = 0; i < 1000; ++i) CHECK(sorted[static_cast<std::size_t>(i)] == i);
  CHECK(moonwalk::data::shuffled_indices(1000, 42) == a);
  CHECK(moonwalk::data::shuffled_indices(1000, 43) != a);
  std::vector<Index> identity(1000);
  for (Index i = 0; i < 1000; ++i) identity[static_cast<std::size_t>(i)] = i;
  CHECK(a != identity);
  CHECK(moonwalk::data::shuffled_indices(0, 1).empty());
  CHECK(moonwalk::data::shuffled_indices(-3, 1).empty());
  CHECK(moonwalk::data::shuffled_indices(1, 1) == std::vector<Index>{0});
  // Pinned: splitmix64 + Fisher–Yates is fully specified, so this order holds on every platform.
  CHECK(moonwalk::data::shuffled_indices(10, 2024) == std::vector<Index>{9, 0, 6, 3, 4, 2, 5, 7, 8, 1});
}

TEST_CASE("random_flips: each image mirrored left-right or kept, about half of them, per seed", "[data]") {
  const moonwalk::ImageShape shape{2, 3, 4};
  const Index n = 400;
  moonwalk::Matrix<double> x0(shape.size(), n);
  for (Index j = 0; j < n; ++j)
    for (Index r = 0; r < shape.size(); ++r) x0(r, j) = static_cast<double>(1000 * j + r);
  moonwalk::Matrix<double> x = x0;
  moonwalk::data::random_flips(x, shape, 7);
  Index flipped = 0;
  for (Index j = 0; j < n; ++j) {
    const bool kept = x.col(j) == x0.col(j);
    bool mirrored = true;
    for (Index c = 0; c < shape.c; ++c)
      for (Index i = 0; i < shape.h; ++i)
        for (Index k = 0; k < shape.w; ++k)
          mirrored = mirrored && x(shape.index(c, i, k), j) == x0(shape.index(c, i, shape.w - 1 - k), j);
    REQUIRE(kept != mirrored);  // exactly one of the two (no image is symmetric here)
    flipped += mirrored ? 1 : 0;
  }
  CHECK(flipped > n / 2 - 60);  // binomial(400, 1/2): sd 10
  CHECK(flipped < n / 2 + 60);

  // Same seed, same flips; another seed, other flips; flipping twice restores.
  moonwalk::Matrix<double> again = x0;
  moonwalk::data::random_flips(again, shape, 7);
  CHECK(again == x);
  moonwalk::data::random_flips(again, shape, 7);
  CHECK(again == x0);
  moonwalk::data::random_flips(again, shape, 8);
  CHECK(again != x);

  // A shard of columns k.. with first_column = k flips as those columns of the whole batch.
  for (const Index k : {Index(0), Index(1), Index(137), n - 1}) {
    moonwalk::Matrix<double> shard = x0.middleCols(k, n - k);
    moonwalk::data::random_flips(shard, shape, 7, k);
    CHECK(shard == x.middleCols(k, n - k));
  }

  moonwalk::Matrix<double> wrong(5, 2);
  REQUIRE_THROWS_WITH(moonwalk::data::random_flips(wrong, shape, 1), Contains("2x3x4") && Contains("5 rows"));
}

TEST_CASE("random_shifts: each image translated by at most s pixels each way, blanks filled, per seed",
          "[data]") {
  const moonwalk::ImageShape shape{2, 5, 6};
  const Index n = 500, s = 2;
  const double fill = -7;
  moonwalk::Matrix<double> x0(shape.size(), n);
  for (Index j = 0; j < n; ++j)
    for (Index r = 0; r < shape.size(); ++r) x0(r, j) = static_cast<double>(1000 * j + r);
  moonwalk::Matrix<double> x = x0;
  moonwalk::data::random_shifts(x, shape, s, fill, 7);
  // Every column is x0's translated by exactly one (a, b) in [−s, s]²; every
  // shift turns up, about equally often (25 shifts, 20 expected each).
  std::map<std::pair<Index, Index>, Index> seen;
  for (Index j = 0; j < n; ++j) {
    Index matches = 0;
    for (Index a = -s; a <= s; ++a)
      for (Index b = -s; b <= s; ++b) {
        bool same = true;
        for (Index c = 0; c < shape.c; ++c)
          for (Index i = 0; i < shape.h; ++i)
            for (Index k = 0; k < shape.w; ++k) {
              const Index si = i - a, sk = k - b;
              const double want =
                  si >= 0 && si < shape.h && sk >= 0 && sk < shape.w ? x0(shape.index(c, si, sk), j) : fill;
              same = same && x(shape.index(c, i, k), j) == want;
            }
        if (same) {
          ++matches;
          ++seen[{a, b}];
        }
      }
    REQUIRE(matches == 1);
  }
  CHECK(seen.size() == 25);
  for (const auto& [shift, count] : seen) {
    INFO("shift (" << shift.first << ", " << shift.second << ")");
    CHECK(count > 3);
    CHECK(count < 45);
  }

  // Same seed, same shifts; another seed, other shifts; a shard as columns k.. of the batch.
  moonwalk::Matrix<double> again = x0;
  moonwalk::data::random_shifts(again, shape, s, fill, 7);
  CHECK(again == x);
  again = x0;
  moonwalk::data::random_shifts(again, shape, s, fill, 8);
  CHECK(again != x);
  for (const Index k : {Index(1), Index(237), n - 1}) {
    moonwalk::Matrix<double> shard = x0.middleCols(k, n - k);
    moonwalk::data::random_shifts(shard, shape, s, fill, 7, k);
    CHECK(shard == x.middleCols(k, n - k));
  }
  // s = 0 keeps every image.
  again = x0;
  moonwalk::data::random_shifts(again, shape, Index{0}, fill, 7);
  CHECK(again == x0);

  moonwalk::Matrix<double> wrong(5, 2);
  REQUIRE_THROWS_WITH(moonwalk::data::random_shifts(wrong, shape, s, fill, 1),
                      Contains("2x5x6") && Contains("5 rows"));
  REQUIRE_THROWS_WITH(moonwalk::data::random_shifts(x, shape, Index{-1}, fill, 1), Contains("max_shift"));
}

TEST_CASE("head: the first samples of a set", "[data]") {
  LabelledImages s;
  s.shape = {1, 1, 2};
  s.count = 3;
  s.pixels = {1, 2, 3, 4, 5, 6};
  s.labels = {7, 8, 9};
  s.classes = 10;
  s.source = "src";
  const LabelledImages h = moonwalk::data::head(s, 2);
  CHECK(h.count == 2);
  CHECK(h.shape == s.shape);
  CHECK(h.pixels == Bytes{1, 2, 3, 4});
  CHECK(h.labels == std::vector<Index>{7, 8});
  CHECK(h.classes == 10);
  CHECK_THAT(h.source, Contains("src"));
  for (Index all : {Index{0}, Index{-1}, Index{3}, Index{100}}) {
    const LabelledImages w = moonwalk::data::head(s, all);
    CHECK(w.count == 3);
    CHECK(w.pixels == s.pixels);
    CHECK(w.labels == s.labels);
  }
}

TEST_CASE("Fashion-MNIST as installed: 60000 + 10000 images of 28x28, 10 balanced classes", "[data]") {
  if (!fs::exists(moonwalk::data::default_fashion_mnist_dir)) {
    WARN("Fashion-MNIST not installed at " << moonwalk::data::default_fashion_mnist_dir
                                           << " (apt-get install dataset-fashion-mnist); skipped");
    return;
  }
  const auto f = moonwalk::data::load_fashion_mnist();
  CHECK(f.train.count == 60000);
  CHECK(f.test.count == 10000);
  CHECK(f.train.shape == moonwalk::ImageShape{1, 28, 28});
  CHECK(f.test.shape == moonwalk::ImageShape{1, 28, 28});
  CHECK(f.train.pixels.size() == std::size_t{60000} * 784);
  CHECK(f.test.pixels.size() == std::size_t{10000} * 784);
  CHECK(f.train.classes == 10);
  std::vector<Index> train_hist(10, 0), test_hist(10, 0);
  for (Index l : f.train.labels) ++train_hist[static_cast<std::size_t>(l)];
  for (Index l : f.test.labels) ++test_hist[static_cast<std::size_t>(l)];
  for (std::size_t c = 0; c < 10; ++c) {
    CHECK(train_hist[c] == 6000);
    CHECK(test_hist[c] == 1000);
  }
  // Fashion-MNIST's usual statistics: mean ≈ 0.2860, stddev ≈ 0.3530.
  const Normalization n = moonwalk::data::normalization_of(f.train);
  CHECK(n.mean == Approx(0.2860).margin(5e-4));
  CHECK(n.stddev == Approx(0.3530).margin(5e-4));
}

TEST_CASE("read_idx: size claims are checked against the bytes there before allocating", "[data]") {
  TempDir t;
  // 35 bytes whose header claims 2 x 3 x 738197507 = 4429185042 bytes of data (under the 2^34 cap).
  const Bytes claim = idx_bytes({2, 3, 738197507u}, ramp(19));
  REQUIRE(claim.size() == 35);
  const std::string p = t / "claim", q = t / "claim.gz";
  write_raw(p, claim);
  write_gz(q, claim);
  CHECK_THAT(idx_error(p), Contains(p) && Contains("expected 4429185042 bytes of data, file ends after 19") &&
                               Contains("the file has 35 bytes"));
  CHECK_THAT(idx_error(q), Contains(q) && Contains("expected 4429185042 bytes of data, file ends after 19"));
  // The same refusals with 64 MiB of address space to spare: no large reservation was made
  // (a 256 MiB reserve() ended in std::bad_alloc here).
  for (const std::string& path : {p, q}) {
    const auto status = moonwalk::test::run_with_memory_headroom(std::size_t{64} << 20, [&] {
      try {
        (void)read_idx(path);
      } catch (const DataError& e) {
        return std::string(e.what()).find("file ends after 19") != std::string::npos ? 0 : 2;
      } catch (const std::bad_alloc&) {
        return 1;
      }
      return 3;
    });
    if (!status) {
      WARN("memory-limited run skipped (sanitizer build)");
      break;
    }
    CAPTURE(path);
    CHECK(*status == 0);
  }
  // A real file of 4 MiB still reads whole, raw and gzipped, under that limit.
  const Bytes big = idx_bytes({4, 1024, 1024}, ramp(std::size_t{4} << 20));
  write_raw(p, big);
  write_gz(q, big);
  for (const std::string& path : {p, q}) {
    const auto status = moonwalk::test::run_with_memory_headroom(std::size_t{64} << 20, [&] {
      const IdxArray a = read_idx(path);
      return a.values == ramp(std::size_t{4} << 20) ? 0 : 4;
    });
    if (status) CHECK(*status == 0);
  }
}

TEST_CASE("read_idx: garbage after a gzip stream is refused like trailing bytes in a raw file", "[data]") {
  TempDir t;
  const Bytes good = idx_bytes({2, 3}, ramp(6));
  const std::string src = t / "src.gz";
  write_gz(src, good);
  const Bytes gz = read_all(src);
  {
    const std::string raw = t / "raw";
    Bytes b = good;
    b.insert(b.end(), {'j', 'u', 'n', 'k'});
    write_raw(raw, b);
    CHECK_THAT(idx_error(raw), Contains(raw) && Contains("4 trailing bytes"));
  }
  const std::vector<Bytes> garbage = {{'j', 'u', 'n', 'k'}, Bytes(512, 0), {0x1f}, {0x00, 0x8b}};
  for (const Bytes& g : garbage) {
    Bytes b = gz;
    b.insert(b.end(), g.begin(), g.end());
    const std::string p = t / moonwalk::detail::cat("garbage", g.size(), ".gz");
    write_raw(p, b);
    CAPTURE(g.size());
    CHECK_THAT(idx_error(p), Contains(p) && Contains(moonwalk::detail::cat(g.size(), " bytes of garbage")) &&
                                 Contains(moonwalk::detail::cat("from byte ", gz.size())));
  }
  // A second gzip member is data, as gzip -d reads it: here 18 bytes too many.
  {
    Bytes two = gz;
    two.insert(two.end(), gz.begin(), gz.end());
    const std::string p = t / "two.gz";
    write_raw(p, two);
    CHECK_THAT(idx_error(p), Contains(p) && Contains("18 trailing bytes after the 6 bytes of data"));
  }
  // The data split over two members reads whole.
  {
    const std::string a = t / "a.gz", b = t / "b.gz";
    write_gz(a, Bytes(good.begin(), good.begin() + 9));
    write_gz(b, Bytes(good.begin() + 9, good.end()));
    Bytes both = read_all(a);
    const Bytes tail = read_all(b);
    both.insert(both.end(), tail.begin(), tail.end());
    const std::string p = t / "split.gz";
    write_raw(p, both);
    const IdxArray r = read_idx(p);
    CHECK(r.values == ramp(6));
    CHECK(r.dims == std::vector<Index>{2, 3});
  }
  // A second member cut after its 10-byte header is a truncated stream, not garbage.
  {
    Bytes cut = gz;
    cut.insert(cut.end(), gz.begin(), gz.begin() + 10);
    const std::string p = t / "cut.gz";
    write_raw(p, cut);
    CHECK_THAT(idx_error(p),
               Contains(p) && Contains("corrupt gzip stream") && Contains("unexpected end of file"));
  }
}

TEST_CASE("read_idx: products of dimensions never overflow, an empty array included", "[data]") {
  TempDir t;
  // 0 x (2^32 − 1) x (2^32 − 1): empty, but rows x cols overflows 64-bit signed arithmetic downstream.
  const std::string p = t / "wide";
  write_raw(p, idx_bytes({0, 0xffffffffu, 0xffffffffu}, {}));
  CHECK_THAT(idx_error(p), Contains(p) && Contains("0 x 4294967295 x 4294967295") && Contains("absurd"));
  const std::string lb = t / "lb";
  write_raw(lb, idx_bytes({0}, {}));
  REQUIRE_THROWS_WITH(moonwalk::data::load_labelled_images(p, lb), Contains(p) && Contains("absurd"));
  // Exactly 2^34 is the cap; one more element is refused.
  const std::string cap = t / "cap";
  write_raw(cap, idx_bytes({0, 0x10000u, 0x40000u}, {}));
  const IdxArray a = read_idx(cap);
  CHECK(a.values.empty());
  CHECK(a.dims == std::vector<Index>{0, 0x10000, 0x40000});
  write_raw(cap, idx_bytes({0, 0x10000u, 0x40001u}, {}));
  CHECK_THAT(idx_error(cap), Contains(cap) && Contains("absurd"));
  // An empty image set of a sane shape still loads.
  const std::string im = t / "im";
  write_raw(im, idx_bytes({0, 28, 28}, {}));
  const LabelledImages s = moonwalk::data::load_labelled_images(im, lb);
  CHECK(s.count == 0);
  CHECK(s.shape == moonwalk::ImageShape{1, 28, 28});
}
