// The spec grammar's table (nets/spec.hpp) is the one source of the layer
// tokens: docs/gradcheck.md's token table and the README's token list are
// generated from it (tools/update_grammar_docs.sh), and must match it.
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

/// The lines strictly between "<!-- BEGIN marker…" and "<!-- END marker -->".
std::string generated_region(const std::string& text, const std::string& marker) {
  const std::string begin = "<!-- BEGIN " + marker, end = "<!-- END " + marker + " -->";
  const auto b = text.find(begin);
  REQUIRE(b != std::string::npos);
  REQUIRE(text.find(begin, b + 1) == std::string::npos);
  const auto first = text.find('\n', b);
  REQUIRE(first != std::string::npos);
  const auto e = text.find(end, first);
  REQUIRE(e != std::string::npos);
  return text.substr(first + 1, e - first - 1);
}
}  // namespace

TEST_CASE("spec: docs/gradcheck.md and the README hold the grammar table as generated from it",
          "[tools][spec]") {
  const std::string root = MOONWALK_SOURCE_DIR;
  INFO("regenerate with tools/update_grammar_docs.sh BUILD_DIR");
  CHECK(generated_region(read(root + "/docs/gradcheck.md"), "spec_layers") ==
        moonwalk::spec::grammar_markdown());
  CHECK(generated_region(read(root + "/README.md"), "spec_tokens") == moonwalk::spec::grammar_list());
}

TEST_CASE("spec: the generated docs name every grammar entry with its syntax, doc and first example",
          "[tools][spec]") {
  const std::string table = moonwalk::spec::grammar_markdown();
  const std::string list = moonwalk::spec::grammar_list();
  for (const auto& [name, rule] : moonwalk::spec_layers<double>()) {
    INFO(rule.syntax);
    REQUIRE_FALSE(rule.doc.empty());
    REQUIRE_FALSE(rule.examples.empty());
    CHECK(table.find("| `" + rule.syntax + "` | " + rule.doc + " |") != std::string::npos);
    CHECK(table.find("`" + rule.examples.front() + "`") != std::string::npos);
    CHECK(list.find("`" + rule.syntax + "`") != std::string::npos);
  }
}
