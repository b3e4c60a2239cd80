// Small numeric helpers shared by the layer, network, loss and reference
// tests: the public ones (moonwalk/testing/numerics.hpp) under mwtest::, and
// a Catch assertion on exceptions.
#pragma once

#include <catch2/catch.hpp>
#include <initializer_list>
#include <moonwalk/testing/numerics.hpp>
#include <string>
#include <utility>

namespace mwtest {

using moonwalk::Index;
template <class S>
using Mat = moonwalk::testing::Mat<S>;
template <class S>
using Vec = moonwalk::testing::Vec<S>;
using moonwalk::testing::catch_as;
using moonwalk::testing::dot;
using moonwalk::testing::norm;
using moonwalk::testing::randn;
using moonwalk::testing::rel_err;
using moonwalk::testing::scalar_name;
using moonwalk::testing::Thrown;

/// Asserts (Catch) that f throws exactly an E whose what() contains every
/// string in `needles`; returns the message.
template <class E, class F>
std::string require_throw(F&& f, std::initializer_list<std::string> needles = {}) {
  const Thrown t = catch_as<E>(std::forward<F>(f));
  INFO("exception message: \"" << t.message << "\"");
  REQUIRE(t.kind == Thrown::expected);
  for (const auto& n : needles) CHECK_THAT(t.message, Catch::Matchers::Contains(n));
  return t.message;
}

}  // namespace mwtest
