// The spec grammar's table (nets/spec.hpp) is the one source of the layer
// tokens: the README's grammar list, docs/gradcheck.md's tables and spec.hpp's
// own header comment each name every entry's syntax.
#include <catch2/catch.hpp>
#include <fstream>
#include <moonwalk/nets/spec.hpp>
#include <sstream>
#include <string>

namespace {
std::string read(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}
}  // namespace

TEST_CASE("spec: the README, docs/gradcheck.md and spec.hpp list every grammar entry", "[tools][spec]") {
  const std::string root = MOONWALK_SOURCE_DIR;
  const std::string readme = read(root + "/README.md");
  const std::string docs = read(root + "/docs/gradcheck.md");
  const std::string header = read(root + "/include/moonwalk/nets/spec.hpp");
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    INFO(rule.syntax);
    CHECK(readme.find("`" + rule.syntax + "`") != std::string::npos);
    CHECK(docs.find("`" + rule.syntax + "`") != std::string::npos);
    CHECK(header.find("//   " + rule.syntax) != std::string::npos);
  }
}
