// Moonwalk — what every schedule returns, and the engine's accounted storage.
#pragma once

#include <algorithm>
#include <any>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

namespace detail {

/// A map from names to values, in name order, read like the std::map it
/// stands for ([], at, find, count, contains, iteration over key/value
/// pairs). clear() keeps the storage: the entries and their strings stay as
/// spares that the next insertions reuse, so a Stats filled again step after
/// step (gradient_into) allocates nothing once it has held its keys.
template <class V>
class FlatMap {
 public:
  using value_type = std::pair<std::string, V>;
  using iterator = typename std::vector<value_type>::iterator;
  using const_iterator = typename std::vector<value_type>::const_iterator;

  /// The value under `key`, inserted as V{} when absent.
  V& operator[](std::string_view key) {
    const auto pos = lower(key) - items_.begin();
    if (static_cast<std::size_t>(pos) < n_ && items_[static_cast<std::size_t>(pos)].first == key)
      return items_[static_cast<std::size_t>(pos)].second;
    if (n_ == items_.size()) items_.emplace_back();
    // The spare whose string fits the key most tightly (best fit: once the
    // spares have held a set of keys, they hold it again in any order).
    std::size_t fit = n_;
    for (std::size_t k = n_; k < items_.size(); ++k) {
      const std::size_t c = items_[k].first.capacity();
      if (c >= key.size() && (items_[fit].first.capacity() < key.size() || c < items_[fit].first.capacity()))
        fit = k;
    }
    if (fit != n_) std::swap(items_[fit], items_[n_]);
    value_type& spare = items_[n_];  // (its string keeps its capacity)
    spare.first.assign(key.data(), key.size());
    spare.second = V{};
    std::rotate(items_.begin() + pos, items_.begin() + static_cast<std::ptrdiff_t>(n_),
                items_.begin() + static_cast<std::ptrdiff_t>(n_ + 1));
    ++n_;
    return items_[static_cast<std::size_t>(pos)].second;
  }
  /// The value under `key`; throws std::out_of_range naming it when absent.
  [[nodiscard]] const V& at(std::string_view key) const {
    const auto it = find(key);
    if (it == end()) throw std::out_of_range("no entry '" + std::string(key) + "'");
    return it->second;
  }
  [[nodiscard]] const_iterator find(std::string_view key) const {
    const auto it = std::as_const(*this).lower(key);
    return it != end() && it->first == key ? it : end();
  }
  [[nodiscard]] std::size_t count(std::string_view key) const { return find(key) == end() ? 0 : 1; }
  [[nodiscard]] bool contains(std::string_view key) const { return count(key) == 1; }
  [[nodiscard]] std::size_t size() const { return n_; }
  [[nodiscard]] bool empty() const { return n_ == 0; }
  /// Removes every entry; their storage stays for the next insertions.
  void clear() { n_ = 0; }

  iterator begin() { return items_.begin(); }
  iterator end() { return items_.begin() + static_cast<std::ptrdiff_t>(n_); }
  [[nodiscard]] const_iterator begin() const { return items_.begin(); }
  [[nodiscard]] const_iterator end() const { return items_.begin() + static_cast<std::ptrdiff_t>(n_); }

  /// Same entries (the spares are not compared).
  friend bool operator==(const FlatMap& a, const FlatMap& b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
  }

 private:
  [[nodiscard]] iterator lower(std::string_view key) {
    return std::lower_bound(begin(), end(), key,
                            [](const value_type& e, std::string_view k) { return e.first < k; });
  }
  [[nodiscard]] const_iterator lower(std::string_view key) const {
    return std::lower_bound(begin(), end(), key,
                            [](const value_type& e, std::string_view k) { return e.first < k; });
  }

  std::vector<value_type> items_;  // [0, n_) in key order, then spares
  std::size_t n_ = 0;
};

}  // namespace detail

/// One value a schedule kept between its passes.
struct SavedEntry {
  std::size_t layer = 0;   ///< index of the layer it belongs to
  std::string layer_name;  ///< e.g. "linear(64->48)"
  std::string kind;        ///< none | mask | derivative | fragment | anchor | activation
  std::size_t bytes = 0;
};

/// Operator calls made by a schedule.
struct Counts {
  std::size_t forward = 0, jvp = 0, jvp_params = 0, vjp = 0, vjp_params = 0, vijp = 0, inverse = 0;
  /// Operator applications inside layers' iterative solves (a Residual block's
  /// GMRES and Newton steps; core/step.hpp), set by gradient() and gradient_into().
  std::size_t solver_iterations = 0;
};

/// A layer's amplification as the fidelity policy saw it (core/amplification.hpp).
struct LayerFidelity {
  std::size_t layer = 0;
  std::string layer_name;
  double bound = 1;    ///< κ, worst direction
  double typical = 1;  ///< γ, what the anchor policy predicts from
  bool known = true;   ///< false: the layer offers no estimate
  bool anchored = false;
};

/// What a step found not to be a finite number (Stats::non_finite): the first
/// in the order the step meets them.
enum class NonFinite {
  none,        ///< the loss, ∂ℓ/∂θ and h_0 are finite
  input,       ///< the batch x_0 holds a NaN or an infinity
  parameters,  ///< a parameter does (x_0 is finite)
  loss,        ///< x_0 and θ are finite, the loss is not
  gradient,    ///< the loss is finite, ∂ℓ/∂θ or h_0 is not
};

/// "none", "input", "parameters", "loss" or "gradient".
inline const char* to_string(NonFinite n) {
  switch (n) {
    case NonFinite::input:
      return "input";
    case NonFinite::parameters:
      return "parameters";
    case NonFinite::loss:
      return "loss";
    case NonFinite::gradient:
      return "gradient";
    case NonFinite::none:
      break;
  }
  return "none";
}

/// Figures every schedule reports.
struct Stats {
  std::string schedule;
  /// Peak bytes held by the engine's store between passes (accounted, not estimated).
  std::size_t residual_bytes = 0;
  /// Peak bytes of the step's working set as the engine accounts it (0 where a
  /// schedule does not: Backprop and MixedMoonwalk do): every buffer of its
  /// workspace (activations, cotangents and their conversions, residuals,
  /// anchors, the casts' parameters and gradients), the values its store owns,
  /// and this thread's product scratch (thread_scratch_bytes()). Not counted:
  /// what layers derive from their weights (a Linear's factorisation), the
  /// result itself, the allocator's slack. Includes residual_bytes' values.
  std::size_t working_bytes = 0;
  /// Bytes stored per kind, summed over the step.
  detail::FlatMap<std::size_t> bytes_by_kind;
  /// Every saved value, in the order stored (the saved-residual report).
  std::vector<SavedEntry> saved;
  Counts counts;
  /// A-posteriori relative error estimate of the returned gradient (0 for
  /// schedules exact up to backprop's own rounding).
  double error_estimate = 0;
  /// True when the gradient is a stochastic estimate, not the gradient.
  bool is_estimate = false;
  /// Schedule-specific figures.
  detail::FlatMap<double> figures;

  // ---- fidelity (Moonwalk schedules; fidelity/policy.hpp)
  /// The relative error the schedule was asked to hold (0: none asked).
  double tolerance = 0;
  /// The gradient can be trusted: the loss, ∂ℓ/∂θ and h_0 are finite and
  /// error_estimate ≤ tolerance (default_target<S>() where the schedule was
  /// asked none; NaN never is). Set for every schedule by gradient() and
  /// gradient_into() (detail::judge). A gradient with this false was returned
  /// only because its policy said not to verify, or nothing could do better,
  /// or its numbers are not finite; the caller must not trust it.
  bool within_tolerance = true;
  /// What was not finite (NonFinite::none when everything was). A
  /// non-finite input, parameter or loss is no rounding a fallback could
  /// repair: Moonwalk schedules return at once.
  NonFinite non_finite = NonFinite::none;
  /// Recomputations forced by the a-posteriori check (denser anchors, double
  /// cotangents, backprop), and the precision escalations.
  std::size_t fallbacks = 0;
  /// What the final attempt was: "float" or "double" cotangents, or
  /// "backprop" when the last fallback computed the gradient.
  std::string precision;
  /// The policy's calibrated prediction of the error (0 when it made none).
  double predicted_error = 0;
  /// Layers whose output cotangent was kept as an anchor.
  std::vector<std::size_t> anchor_layers;
  /// Per-layer amplification seen in the reverse pass.
  std::vector<LayerFidelity> amplification;

  [[nodiscard]] std::size_t bytes_of(std::string_view kind) const {
    auto it = bytes_by_kind.find(kind);
    return it == bytes_by_kind.end() ? 0 : it->second;
  }
  [[nodiscard]] std::size_t fragment_bytes() const { return bytes_of("fragment"); }
  [[nodiscard]] std::size_t anchor_bytes() const { return bytes_of("anchor"); }

  /// Resets every figure for a new step, keeping the storage (the maps' and
  /// lists' capacity): a Stats reused step after step (gradient_into) is
  /// filled again without allocating. `saved` and `amplification` are left
  /// as they are, for the schedule to overwrite in place: SavedStore::report_to
  /// sizes `saved`, and a schedule sizes `amplification` (or clears it).
  void restart() {
    schedule.clear();
    residual_bytes = 0;
    working_bytes = 0;
    bytes_by_kind.clear();
    counts = Counts{};
    error_estimate = 0;
    is_estimate = false;
    figures.clear();
    tolerance = 0;
    within_tolerance = true;
    non_finite = NonFinite::none;
    fallbacks = 0;
    precision.clear();
    predicted_error = 0;
    anchor_layers.clear();
  }
};

/// Loss value, flat parameter gradient ∂ℓ/∂θ, input cotangent h_0 = ∂ℓ/∂x_0, stats.
template <class S>
struct GradientResult {
  S loss = 0;
  Vector<S> gradient;
  /// h_0 = ∂ℓ/∂x_0 (in_features × batch) when the schedule was asked for it
  /// (`input_gradient` of Backprop, MixedMoonwalk, Checkpointing, RevBackprop
  /// and ScheduleChoice), else empty: a gradient for training needs none, and
  /// h_0 costs one more input-vjp (Moonwalk: also a vijp) through the first
  /// layer. PureMoonwalk, NaiveForward and ProjForward always return it.
  Matrix<S> h0;
  Stats stats;
  /// Whether `gradient` is filled. Set it false (once, on a result reused by
  /// gradient_into) when ∂ℓ/∂θ is read from the layers' gradient storage, as
  /// the optimizers and MpiDataParallel do: `gradient` then stays empty, and
  /// a step holds no second copy of ∂ℓ/∂θ. That copy is made once the step's
  /// buffers are freed, so where they are smaller than it, it sits on top of
  /// them in the heap (a depth-40 width-256 MLP: 10 MiB above an 8 MiB step).
  bool flat_gradient = true;
};

/// Where a schedule keeps values between passes: slots per layer, every byte
/// accounted (current and peak) and every entry listed for the report. A
/// store kept across steps (restart) lists and accounts them again without
/// allocating: its slots and entries keep their storage.
class SavedStore {
 public:
  enum Slot { residual = 0, fragment = 1, anchor = 2, activation = 3 };

  explicit SavedStore(std::size_t layers = 0) { restart(layers); }

  /// Starts a step on `layers` layers: nothing held, nothing listed.
  void restart(std::size_t layers) {
    slots_.resize(layers);
    for (auto& layer : slots_)
      for (Held& s : layer) s = Held{};
    n_entries_ = 0;
    bytes_by_kind_.clear();
    current_ = peak_ = owned_ = 0;
  }

  /// Keeps `value` for layer i; `kind` defaults to the value's own kind.
  template <class T>
  void put(std::size_t i, Slot slot, const std::string& layer_name, T value, const char* kind = nullptr) {
    const char* k = kind ? kind : residual_kind(value);
    const std::size_t b = nbytes(value);
    hold(i, slot, layer_name, b, k);
    Held& s = slots_[i][slot];
    s.value = std::move(value);
    s.owned = true;
    owned_ += b;
  }

  /// Accounts `bytes` of `kind` for layer i's slot as kept, for a value the
  /// schedule keeps in buffers of its own (a workspace reused across steps);
  /// drop() or take() ends it.
  void hold(std::size_t i, Slot slot, const std::string& layer_name, std::size_t bytes, const char* kind) {
    if (n_entries_ == entries_.size()) entries_.emplace_back();
    SavedEntry& e = entries_[n_entries_++];  // (a spare's strings keep their capacity)
    e.layer = i;
    e.layer_name = layer_name;
    e.kind = kind;
    e.bytes = bytes;
    bytes_by_kind_[kind] += bytes;
    auto& s = slots_[i][slot];
    if (s.present) current_ -= s.bytes;
    if (s.owned) owned_ -= s.bytes;
    s.value.reset();
    s.owned = false;
    s.present = true;
    s.bytes = bytes;
    current_ += bytes;
    peak_ = std::max(peak_, current_);
  }

  [[nodiscard]] bool has(std::size_t i, Slot slot) const { return slots_[i][slot].present; }

  /// Reads the value for layer i without releasing it.
  template <class T>
  const T& get(std::size_t i, Slot slot) const {
    return std::any_cast<const T&>(slots_[i][slot].value);
  }

  /// Moves the value out and releases its bytes.
  template <class T>
  T take(std::size_t i, Slot slot) {
    auto& s = slots_[i][slot];
    T v = std::any_cast<T&&>(std::move(s.value));
    drop(i, slot);
    return v;
  }

  /// Releases the value's bytes.
  void drop(std::size_t i, Slot slot) {
    auto& s = slots_[i][slot];
    s.value.reset();
    if (s.present) current_ -= s.bytes;
    if (s.owned) owned_ -= s.bytes;
    s.present = s.owned = false;
    s.bytes = 0;
  }

  [[nodiscard]] std::size_t current_bytes() const { return current_; }
  /// Bytes of the values the store holds itself (put(), not hold()).
  [[nodiscard]] std::size_t owned_bytes() const { return owned_; }
  /// Bytes stored so far under `kind` (every put counted, released or not).
  [[nodiscard]] std::size_t bytes_put(std::string_view kind) const {
    const auto it = bytes_by_kind_.find(kind);
    return it == bytes_by_kind_.end() ? 0 : it->second;
  }
  [[nodiscard]] std::size_t peak_bytes() const { return peak_; }

  /// Writes the accounting into a Stats: its peak, bytes by kind and the
  /// entry list (over what `st` held, reusing its storage).
  void report_to(Stats& st) const {
    st.residual_bytes = peak_;
    st.bytes_by_kind.clear();
    for (const auto& [k, b] : bytes_by_kind_) st.bytes_by_kind[k] = b;
    st.saved.resize(n_entries_);
    for (std::size_t k = 0; k < n_entries_; ++k) st.saved[k] = entries_[k];
  }

 private:
  struct Held {
    std::any value;  // empty for a held() value
    std::size_t bytes = 0;
    bool present = false;
    bool owned = false;  // put(): value is the store's
  };
  std::vector<std::array<Held, 4>> slots_;
  std::vector<SavedEntry> entries_;  // [0, n_entries_) this step, then spares
  std::size_t n_entries_ = 0;
  detail::FlatMap<std::size_t> bytes_by_kind_;
  std::size_t current_ = 0, peak_ = 0, owned_ = 0;
};

namespace detail {

/// max|a − ref| / max|ref| (absolute when ref is 0); +∞ when either holds a
/// NaN or infinity, so a broken reconstruction can never look accurate.
template <class A, class B>
double rel_max_err(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& ref) {
  if (a.size() == 0) return 0;
  if (!a.allFinite() || !ref.allFinite()) return std::numeric_limits<double>::infinity();
  const double den = static_cast<double>(ref.cwiseAbs().maxCoeff());
  const double num = static_cast<double>((a - ref).cwiseAbs().maxCoeff());
  return den > 0 ? num / den : num;
}

/// A JSON number, or null for NaN and infinities (which JSON cannot spell).
inline std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s.precision(6);
  s << v;
  return s.str();
}

inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      o += ' ';
      continue;
    }
    o += c;
  }
  return o;
}

}  // namespace detail

/// The saved-residual report as a text table: what the schedule keeps between
/// passes, per layer, with kind and bytes.
inline std::string report_text(const Stats& st) {
  std::ostringstream s;
  s << "schedule " << st.schedule << ": peak " << st.residual_bytes << " bytes kept between passes";
  if (st.working_bytes > 0) s << ", peak " << st.working_bytes << " working bytes";
  s << "\n";
  s << "  layer  " << std::left;
  s.width(30);
  s << "name";
  s.width(12);
  s << "kind"
    << "bytes\n";
  for (const auto& e : st.saved) {
    s << "  ";
    s.width(7);
    s << e.layer;
    s.width(30);
    s << e.layer_name;
    s.width(12);
    s << e.kind << e.bytes << "\n";
  }
  s << "  by kind:";
  for (const auto& [k, b] : st.bytes_by_kind) s << " " << k << "=" << b;
  s << "\n";
  if (st.counts.solver_iterations > 0)
    s << "  solver iterations (layers' iterative solves): " << st.counts.solver_iterations << "\n";
  if (st.non_finite != NonFinite::none)
    s << "  not finite: " << to_string(st.non_finite) << " (the gradient cannot be trusted)\n";
  if (!st.precision.empty()) {
    s << "  fidelity: estimate " << st.error_estimate;
    if (st.tolerance > 0) s << (st.within_tolerance ? " <= " : " > ") << "tolerance " << st.tolerance;
    s << ", predicted " << st.predicted_error << ", cotangents " << st.precision << ", anchors "
      << st.anchor_layers.size() << ", fallbacks " << st.fallbacks << "\n";
  }
  if (!st.amplification.empty()) {
    s << "  layer  ";
    s.width(30);
    s << "name";
    s.width(14);
    s << "bound";
    s.width(14);
    s << "typical"
      << "anchor\n";
    for (const auto& a : st.amplification) {
      s << "  ";
      s.width(7);
      s << a.layer;
      s.width(30);
      s << a.layer_name;
      s.width(14);
      s << (a.known ? a.bound : std::numeric_limits<double>::quiet_NaN());
      s.width(14);
      s << (a.known ? a.typical : std::numeric_limits<double>::quiet_NaN()) << (a.anchored ? "yes" : "")
        << "\n";
    }
  }
  return s.str();
}

/// The saved-residual report as one JSON object.
inline std::string report_json(const Stats& st) {
  std::ostringstream s;
  s << "{\"schedule\":\"" << detail::json_escape(st.schedule) << "\",\"residual_bytes\":" << st.residual_bytes
    << ",\"working_bytes\":" << st.working_bytes << ",\"by_kind\":{";
  bool first = true;
  for (const auto& [k, b] : st.bytes_by_kind) {
    s << (first ? "" : ",") << "\"" << detail::json_escape(k) << "\":" << b;
    first = false;
  }
  s << "},\"layers\":[";
  first = true;
  for (const auto& e : st.saved) {
    s << (first ? "" : ",") << "{\"layer\":" << e.layer << ",\"name\":\"" << detail::json_escape(e.layer_name)
      << "\",\"kind\":\"" << e.kind << "\",\"bytes\":" << e.bytes << "}";
    first = false;
  }
  const Counts& c = st.counts;
  s << "],\"counts\":{\"forward\":" << c.forward << ",\"jvp\":" << c.jvp << ",\"jvp_params\":" << c.jvp_params
    << ",\"vjp\":" << c.vjp << ",\"vjp_params\":" << c.vjp_params << ",\"vijp\":" << c.vijp
    << ",\"inverse\":" << c.inverse << ",\"solver_iterations\":" << c.solver_iterations << "}";
  s << ",\"error_estimate\":" << detail::json_number(st.error_estimate)
    << ",\"within_tolerance\":" << (st.within_tolerance ? "true" : "false") << ",\"non_finite\":\""
    << to_string(st.non_finite) << "\"";
  if (!st.precision.empty()) {
    s << ",\"fidelity\":{\"error_estimate\":" << detail::json_number(st.error_estimate)
      << ",\"tolerance\":" << detail::json_number(st.tolerance)
      << ",\"within_tolerance\":" << (st.within_tolerance ? "true" : "false")
      << ",\"predicted_error\":" << detail::json_number(st.predicted_error) << ",\"precision\":\""
      << st.precision << "\",\"fallbacks\":" << st.fallbacks << ",\"anchors\":[";
    for (std::size_t k = 0; k < st.anchor_layers.size(); ++k) s << (k ? "," : "") << st.anchor_layers[k];
    s << "],\"amplification\":[";
    for (std::size_t k = 0; k < st.amplification.size(); ++k) {
      const auto& a = st.amplification[k];
      s << (k ? "," : "") << "{\"layer\":" << a.layer
        << ",\"bound\":" << (a.known ? detail::json_number(a.bound) : "null")
        << ",\"typical\":" << (a.known ? detail::json_number(a.typical) : "null") << "}";
    }
    s << "]}";
  }
  s << "}";
  return s.str();
}

}  // namespace moonwalk
