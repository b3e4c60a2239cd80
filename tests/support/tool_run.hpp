// Test support: running a command-line tool as a separate process (stdout,
// stderr, exit status) and a minimal strict JSON reader for its output.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#ifndef _WIN32
#include <sys/wait.h>
#endif

namespace moonwalk::test {

// ---- a minimal JSON reader (enough to check the tool's output strictly) ----

struct Json {
  enum class Type { null, boolean, number, string, array, object } type = Type::null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  // in document order

  [[nodiscard]] bool has(const std::string& key) const {
    for (const auto& [k, v] : object)
      if (k == key) return true;
    return false;
  }
  [[nodiscard]] const Json& operator[](const std::string& key) const {
    for (const auto& [k, v] : object)
      if (k == key) return v;
    throw std::runtime_error("JSON: no key '" + key + "'");
  }
  [[nodiscard]] std::vector<std::string> keys() const {
    std::vector<std::string> out;
    for (const auto& [k, v] : object) out.push_back(k);
    return out;
  }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}

  /// The whole text must be exactly one JSON value (surrounding whitespace allowed).
  Json document() {
    Json v = value();
    skip();
    if (p_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at offset " + std::to_string(p_));
  }
  void skip() {
    while (p_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[p_]))) ++p_;
  }
  bool eat(char c) {
    skip();
    if (p_ < s_.size() && s_[p_] == c) {
      ++p_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(const char* word) {
    const std::string w(word);
    if (s_.compare(p_, w.size(), w) != 0) return false;
    p_ += w.size();
    return true;
  }
  std::string str() {
    expect('"');
    std::string out;
    while (p_ < s_.size() && s_[p_] != '"') {
      char c = s_[p_++];
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c == '\\') {
        if (p_ >= s_.size()) fail("bad escape");
        c = s_[p_++];
        if (c == 'u') {
          if (p_ + 4 > s_.size()) fail("bad \\u escape");
          out += static_cast<char>(std::stoi(s_.substr(p_, 4), nullptr, 16));
          p_ += 4;
          continue;
        }
        if (c == 'n') c = '\n';
        if (c == 't') c = '\t';
      }
      out += c;
    }
    expect('"');
    return out;
  }
  Json value() {
    skip();
    if (p_ >= s_.size()) fail("unexpected end");
    Json v;
    const char c = s_[p_];
    if (c == '{') {
      v.type = Json::Type::object;
      ++p_;
      if (eat('}')) return v;
      do {
        skip();
        std::string k = str();
        expect(':');
        v.object.emplace_back(std::move(k), value());
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      v.type = Json::Type::array;
      ++p_;
      if (eat(']')) return v;
      do v.array.push_back(value());
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.type = Json::Type::string;
      v.string = str();
    } else if (literal("true")) {
      v.type = Json::Type::boolean;
      v.boolean = true;
    } else if (literal("false")) {
      v.type = Json::Type::boolean;
    } else if (literal("null")) {
      v.type = Json::Type::null;
    } else {
      const std::size_t start = p_;
      while (p_ < s_.size() && std::string("+-0123456789.eE").find(s_[p_]) != std::string::npos) ++p_;
      if (p_ == start) fail("unexpected character");
      std::size_t used = 0;
      v.type = Json::Type::number;
      v.number = std::stod(s_.substr(start, p_ - start), &used);
      if (used != p_ - start) fail("bad number");
    }
    return v;
  }

  const std::string& s_;
  std::size_t p_ = 0;
};

// ---- running the tool ----------------------------------------------------------

struct Run {
  int exit_code = -1;
  std::string out, err;
  [[nodiscard]] Json json() const { return JsonReader(out).document(); }
};

inline std::string quote(const std::string& arg) {
#ifdef _WIN32
  return "\"" + arg + "\"";
#else
  std::string q = "'";
  for (const char c : arg) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
#endif
}

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// Runs the program at `path` with `args`, capturing stdout, stderr and the exit status.
inline Run run_tool(const std::string& path, const std::vector<std::string>& args) {
  static std::mt19937_64 gen(std::random_device{}());
  const auto dir = std::filesystem::temp_directory_path();
  const std::string stem = std::string("moonwalk-tool-test-").append(std::to_string(gen()));
  const auto out_path = dir / (stem + ".out"), err_path = dir / (stem + ".err");
  // Appends only: `"literal" + std::string&&` trips GCC 12's -Wrestrict false
  // positive (GCC PR 105651) under -Werror.
  std::string cmd = quote(path);
  for (const auto& a : args) cmd.append(" ").append(quote(a));
  cmd.append(" >").append(quote(out_path.string())).append(" 2>").append(quote(err_path.string()));
#ifdef _WIN32
  cmd = "\"" + cmd + "\"";  // cmd.exe strips one pair of outer quotes
#endif
  const int status = std::system(cmd.c_str());
  Run r;
#ifdef _WIN32
  r.exit_code = status;
#else
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
#endif
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  std::error_code ec;
  std::filesystem::remove(out_path, ec);
  std::filesystem::remove(err_path, ec);
  return r;
}

}  // namespace moonwalk::test
