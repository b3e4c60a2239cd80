// BitMask: packing (contiguous fast path and strided expressions) and apply
// agree with the predicate element by element, at sizes on and off the 32-
// and 64-bit word boundaries.
#include <catch2/catch.hpp>
#include <moonwalk/core/residuals.hpp>

using moonwalk::BitMask;
using moonwalk::CRef;
using moonwalk::Index;
using moonwalk::Matrix;

TEST_CASE("BitMask: bits, count and apply match the predicate elementwise", "[core]") {
  for (const Index r : {1, 3, 31, 32, 64, 65, 256})
    for (const Index c : {1, 2, 7, 33}) {
      INFO(r << " x " << c);
      const Matrix<float> x = Matrix<float>::Random(r, c);
      const Matrix<float> wide = Matrix<float>::Random(r + 5, c);
      const auto block = wide.topRows(r);  // outer stride r + 5: the elementwise path
      const auto positive = [](float v) { return v > 0; };
      const BitMask m(x, positive), mb(block, positive);
      REQUIRE((m.rows() == r && m.cols() == c));
      CHECK(m.bytes() == static_cast<std::size_t>((r * c + 63) / 64) * 8);
      Index positives = 0;
      bool bits_ok = true;
      for (Index j = 0; j < c; ++j)
        for (Index i = 0; i < r; ++i) {
          bits_ok = bits_ok && m(i, j) == (x(i, j) > 0) && mb(i, j) == (block(i, j) > 0);
          positives += x(i, j) > 0 ? 1 : 0;
        }
      CHECK(bits_ok);
      CHECK(m.count() == positives);

      // apply over a contiguous and a strided cotangent.
      const Matrix<float> h = Matrix<float>::Random(r, c);
      Matrix<float> out;
      m.apply<float>(h, out, [](bool on, float v) { return v * (on ? 1.0f : 0.1f); });
      REQUIRE((out.rows() == r && out.cols() == c));
      const Matrix<float> want = (x.array() > 0).select(h, 0.1f * h);
      CHECK(out == want);
      const CRef<float> hs(wide.topRows(r));
      m.apply<float>(hs, out, [](bool on, float v) { return on ? v : 0.0f; });
      const Matrix<float> want_s = (x.array() > 0).select(wide.topRows(r), 0.0f);
      CHECK(out == want_s);
    }
}
