// The public layer checker (moonwalk/testing/check_layer.hpp) as Catch test
// cases: one line per layer,
//
//   MOONWALK_LAYER_TEST("linear contracting 7->5", (Linear<S>(7, 5, {.seed = 1})))
//
// registers one test case per scalar type (float, double), every check its
// own Catch assertion. The expression may use the scalar type `S`.
#pragma once

#include <catch2/catch.hpp>
#include <moonwalk/testing/check_layer.hpp>
#include <string>
#include <type_traits>
#include <utility>

#include "support/check_util.hpp"

namespace mwtest {

using moonwalk::testing::LayerCheckOptions;
using moonwalk::testing::LayerCheckReport;
using moonwalk::testing::LayerTol;
using moonwalk::testing::perturbed;

/// Every check a Catch assertion (to_catch), or only recorded in the report.
template <class L, class LD>
LayerCheckReport test_layer_pair(L layer, LD twin, const LayerCheckOptions& o = {}, bool to_catch = true) {
  INFO("layer " << layer.name() << " in " << scalar_name<typename L::scalar_type>() << ", seed " << o.seed);
  moonwalk::testing::CheckSink sink;
  if (to_catch)
    sink = [](const std::string& line, bool ok) {
      INFO(line);
      CHECK(ok);
    };
  return moonwalk::testing::test_layer_pair(std::move(layer), std::move(twin), o, std::move(sink));
}

/// `make(std::type_identity<T>{})` builds the layer for scalar T.
template <class S, class Make>
LayerCheckReport test_layer(Make&& make, const LayerCheckOptions& o = {}) {
  return mwtest::test_layer_pair(make(std::type_identity<S>{}), make(std::type_identity<double>{}), o);
}

}  // namespace mwtest

#define MOONWALK_LAYER_TEST(NAME, ...)                                               \
  TEMPLATE_TEST_CASE("layer check: " NAME, "[layers][layer_check]", float, double) { \
    ::mwtest::test_layer<TestType>([](auto mwtest_scalar_tag) {                      \
      using S = typename decltype(mwtest_scalar_tag)::type;                          \
      return __VA_ARGS__;                                                            \
    });                                                                              \
  }
