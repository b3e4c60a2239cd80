// VersionCache: one value per weight version, recomputed in place when the
// version changes, empty in a copy, holding no version after a throw.
#include <catch2/catch.hpp>
#include <moonwalk/core/version_cache.hpp>
#include <stdexcept>
#include <vector>

using moonwalk::VersionCache;

TEST_CASE("VersionCache: computes once per version, reuses storage, copies start empty", "[core]") {
  VersionCache<std::vector<int>> cache;
  int computed = 0;
  auto fill = [&](int v) {
    return [&computed, v](std::vector<int>& x) {
      ++computed;
      x.assign(4, v);
    };
  };
  CHECK(cache.get(0, fill(1)).front() == 1);
  CHECK(cache.get(0, fill(2)).front() == 1);  // same version: held
  CHECK(computed == 1);
  const int* storage = cache.get(0, fill(3)).data();
  CHECK(cache.get(7, fill(4)).front() == 4);  // new version: recomputed in place
  CHECK(cache.get(7, fill(4)).data() == storage);
  CHECK(computed == 2);

  VersionCache<std::vector<int>> copy = cache;  // copies start empty
  CHECK(copy.get(7, fill(5)).front() == 5);
  CHECK(computed == 3);
  copy = cache;
  CHECK(copy.get(7, fill(6)).front() == 6);
  VersionCache<std::vector<int>> moved = std::move(cache);  // a move keeps the value
  CHECK(moved.get(7, fill(8)).front() == 4);
  CHECK(computed == 4);
}

TEST_CASE("VersionCache: a throwing compute leaves no version held", "[core]") {
  VersionCache<int> cache;
  CHECK(cache.get(1, [](int& x) { x = 10; }) == 10);
  REQUIRE_THROWS_AS(cache.get(2,
                              [](int& x) {
                                x = -1;
                                throw std::runtime_error("rank deficient");
                              }),
                    std::runtime_error);
  // Neither version 2 (it failed) nor version 1 (its value was overwritten) is held.
  CHECK(cache.get(1, [](int& x) { x = 11; }) == 11);
  int calls = 0;
  CHECK(cache.get(2, [&](int& x) { x = 20 + ++calls; }) == 21);
  CHECK(cache.get(2, [&](int& x) { x = 20 + ++calls; }) == 21);
}
