// Moonwalk — what each layer of a chain costs, for the planner.
//
// chain_costs(net, x0, how) gives the planner's ChainCosts at x0's batch:
// the bytes of every value x_i (rows_i × batch × sizeof(S)) and the seconds
// of each layer's forward step x_{i+1} = f_i(x_i), backward step
// (g_i += J_{θ,i}ᵀ h, h ← J_iᵀ h) and inverse step x_i = f_i⁻¹(x_{i+1})
// (+∞ where the layer has none), and of the loss; the bytes of the
// branch bits of each layer that keeps them (keeps_branches: one bit per
// input element, in 64-bit words); and Moonwalk's moves: how the sweep
// crosses each layer (vijp, fragment or anchor), the bytes of its vijp
// residual r_i and of its fragment φ_i (made from x0's values), and the
// seconds of its cotangent step (h_i = J_iᵀ h_{i+1} from r_i) and sweep step
// (h_{i+1} recovered across it — a vijp with the factorisation it derives,
// a fragment's, or an anchor's vjp — and g_i += J_{θ,i}ᵀ h_{i+1}).
//
//   Calibration::cached    timed on this machine once per layer (by its name,
//                          which carries its widths), batch and scalar type,
//                          kept in a small file under the user's cache
//                          directory and read back by later runs.
//   Calibration::measure   timed now (the file neither read nor written).
//   Calibration::estimate  no timing: forward ∝ (parameters + in + out) ·
//                          batch, backward, inverse and sweep twice that,
//                          cotangent once; deterministic.
//
// The file: ${MOONWALK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moonwalk}/
// layer-costs-v4.tsv, one line per (machine, build, scalar, batch, layer):
// tab-separated key fields, then forward, backward, inverse ("inf": no
// inverse), cotangent and sweep seconds. (The name's version moves when what
// a timing means does: v3 timed inverses through inverse_into, v4 adds
// Moonwalk's steps.) It is
// rewritten whole (a temporary file renamed over it, so a reader never sees
// half of it); lines it cannot read are dropped. MOONWALK_COST_CACHE=0
// turns it off (cached then measures every time). A cache that cannot be
// written costs only the timing next run; it never fails a step.
//
// stretch_drifts(net, x0, limit) measures what rebuilding values by
// inversion drifts (ChainCosts::measured), for the planner's drift budget.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/mapped.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/plan/planner.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/result.hpp"

namespace moonwalk {

/// Where the planner's layer costs come from (see the top of this file).
enum class Calibration : std::uint8_t { cached, measure, estimate };

[[nodiscard]] inline const char* to_string(Calibration c) {
  switch (c) {
    case Calibration::cached:
      return "cached";
    case Calibration::measure:
      return "measure";
    case Calibration::estimate:
      return "estimate";
  }
  return "?";
}

namespace detail {

/// The cost file's path, or empty when MOONWALK_COST_CACHE=0 or no
/// directory is known.
inline std::filesystem::path cost_cache_file() {
  if (const char* off = std::getenv("MOONWALK_COST_CACHE"); off && std::string(off) == "0") return {};
  std::filesystem::path dir;
  if (const char* d = std::getenv("MOONWALK_CACHE_DIR"); d && *d) {
    dir = d;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) {
    dir = std::filesystem::path(x) / "moonwalk";
  } else if (const char* h = std::getenv("HOME"); h && *h) {
    dir = std::filesystem::path(h) / ".cache" / "moonwalk";
  } else {
    return {};
  }
  return dir / "layer-costs-v4.tsv";
}

/// This machine and build, as the cost file keys them: the CPU's model name,
/// the compiler and Eigen's instruction sets.
inline const std::string& machine_key() {
  static const std::string key = [] {
    std::string cpu = "unknown cpu";
    std::ifstream info("/proc/cpuinfo");
    for (std::string line; std::getline(info, line);)
      if (line.rfind("model name", 0) == 0) {
        const auto colon = line.find(':');
        const auto start = colon == std::string::npos ? colon : line.find_first_not_of(' ', colon + 1);
        if (start != std::string::npos) cpu = line.substr(start);
        break;
      }
    std::string k = cat(cpu, " | ", __VERSION__, " | ", Eigen::SimdInstructionSetsInUse());
    std::replace(k.begin(), k.end(), '\t', ' ');
    return k;
  }();
  return key;
}

/// One layer's timed steps, in seconds (inverse: +∞ where it has none).
struct LayerSeconds {
  double forward = 0, backward = 0, inverse = std::numeric_limits<double>::infinity();
  double cotangent = 0, sweep = 0;
};

/// The cost file as a map from its key (every field but the last five,
/// tab-joined) to the layer's seconds; unreadable lines are skipped.
using CostTable = std::map<std::string, LayerSeconds>;

inline CostTable read_cost_file(const std::filesystem::path& file) {
  CostTable t;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    std::size_t cut = line.size();
    double v[5];
    bool ok = true;
    for (int f = 4; f >= 0 && ok; --f) {
      const auto tab = cut == 0 ? std::string::npos : line.rfind('\t', cut - 1);
      if (tab == std::string::npos || tab == 0) {
        ok = false;
        break;
      }
      const std::string field = line.substr(tab + 1, cut - tab - 1);
      char* end = nullptr;
      v[f] = std::strtod(field.c_str(), &end);
      ok = end != field.c_str() && !*end && v[f] >= 0 && (f == 2 || std::isfinite(v[f]));
      cut = tab;
    }
    if (ok) t[line.substr(0, cut)] = {v[0], v[1], v[2], v[3], v[4]};
  }
  return t;
}

/// Writes the table whole: to a temporary file beside it, renamed over it.
/// Returns false (and leaves the old file) when it cannot.
inline bool write_cost_file(const std::filesystem::path& file, const CostTable& t) {
  static std::mutex one_writer;  // (threads of one process; processes have their own temporary files)
  static std::atomic<unsigned> serial{0};
  const std::lock_guard lock(one_writer);
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  const std::filesystem::path tmp = file.string() + cat(".tmp.", ::getpid(), ".", serial++);
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return false;
    out.precision(9);
    for (const auto& [k, v] : t) {
      out << k << '\t' << v.forward << '\t' << v.backward << '\t';
      if (std::isfinite(v.inverse))
        out << v.inverse;
      else
        out << "inf";
      out << '\t' << v.cotangent << '\t' << v.sweep << '\n';
    }
    out.close();
    if (!out) {
      std::filesystem::remove(tmp, ec);
      return false;
    }
  }
  std::filesystem::rename(tmp, file, ec);
  if (!ec) return true;
  std::error_code ignored;
  std::filesystem::remove(tmp, ignored);
  return false;
}

/// Moonwalk's sizes on `c`: each layer's crossing (sweep_mode), its typical
/// amplification γ_i on x0's values (core/amplification.hpp), and the
/// bytes of its residual r_i = save_residual(x_i) and, where the sweep
/// crosses it by a fragment, of φ_i = save_fragment(r_i, h) for a cotangent
/// h of its output's shape (its size is set by r_i), on x0 carried through the
/// chain in two buffers mapped outside the heap (core/mapped.hpp). A layer
/// whose fragment cannot be made there (RankError: a rank-deficient map) is
/// crossed by an anchor.
template <Net N>
void moonwalk_sizes(N& net, const CRef<typename N::scalar_type>& x0, ChainCosts& c) {
  using S = typename N::scalar_type;
  const std::size_t L = net.size();
  const Index batch = x0.cols();
  c.crossing.assign(L, CotangentKeep::none);
  c.residual_bytes.assign(L, 0);
  c.fragment_bytes.assign(L, 0);
  c.sweep_gamma.assign(L, 1);
  Index widest = 0;
  for (std::size_t i = 0; i < L; ++i)
    net.visit(i, [&](const auto& l) { widest = std::max(widest, l.out_features()); });
  MappedArray<S> xb[2];
  for (auto& b : xb) b.resize(static_cast<std::size_t>(widest * batch));
  for (std::size_t i = 0; i < L; ++i)
    net.visit(i, [&](const auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      const CRef<S> x =
          i == 0 ? CRef<S>(x0)
                 : CRef<S>(Eigen::Map<const Matrix<S>>(xb[(i + 1) % 2].data(), l.in_features(), batch));
      Eigen::Map<Matrix<S>> y(xb[i % 2].data(), l.out_features(), batch);
      moonwalk::forward_into(l, x, y);
      const SweepMode m = sweep_mode(l);
      c.crossing[i] = m == SweepMode::vijp       ? CotangentKeep::none
                      : m == SweepMode::fragment ? CotangentKeep::fragment
                                                 : CotangentKeep::anchor;
      const residual_t<Lyr> r = moonwalk::save_residual(l, x);
      c.residual_bytes[i] = nbytes(r);
      c.sweep_gamma[i] = moonwalk::amplification(l, r).typical;
      try {
        if constexpr (Fragmental<Lyr>)
          if (m == SweepMode::fragment) c.fragment_bytes[i] = nbytes(l.save_fragment(r, Matrix<S>(y)));
      } catch (const RankError&) {  // (a rank-deficient map: the sweep crosses it by an anchor)
        c.crossing[i] = CotangentKeep::anchor;
        c.fragment_bytes[i] = 0;
      }
      moonwalk::release_derived(l);  // (a factorisation the probe made: the step derives its own)
    });
}

/// The least of `reps` timings of f(), in seconds.
template <class F>
double least_seconds(int reps, F&& f) {
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace detail

/// The planner's view of `net` at x0's batch (see the top of this file).
/// Timing runs each layer's operations on x0 propagated through the chain;
/// the backward step accumulates into the layers' gradient storage, which
/// the caller zeroes before a step. The loss's time is not measured (one
/// pass over x_L, small next to any layer): 0.
template <Net N>
ChainCosts chain_costs(N& net, const CRef<typename N::scalar_type>& x0, Calibration how) {
  using S = typename N::scalar_type;
  const Index batch = x0.cols();
  ChainCosts c;
  c.value_bytes.push_back(static_cast<std::size_t>(x0.size()) * sizeof(S));
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      c.value_bytes.push_back(static_cast<std::size_t>(l.out_features() * batch) * sizeof(S));
    });
  c.forward.assign(net.size(), 0);
  c.backward.assign(net.size(), 0);
  c.inverse.assign(net.size(), std::numeric_limits<double>::infinity());
  c.branch_bytes.assign(net.size(), 0);
  c.cotangent.assign(net.size(), 0);
  c.sweep.assign(net.size(), 0);
  detail::moonwalk_sizes(net, x0, c);
  std::vector<char> invertible(net.size(), 0);
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      invertible[i] = can_invert(l);
      if (invertible[i] && keeps_branches(l))
        c.branch_bytes[i] = static_cast<std::size_t>((l.in_features() * batch + 63) / 64) * 8;
    });
  if (how == Calibration::estimate) {
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        c.forward[i] =
            1e-9 * static_cast<double>((l.num_params() + l.in_features() + l.out_features()) * batch);
        c.backward[i] = 2 * c.forward[i];
        if (invertible[i]) c.inverse[i] = 2 * c.forward[i];
        c.cotangent[i] = c.forward[i];
        c.sweep[i] = 2 * c.forward[i];
      });
    return c;
  }
  const std::filesystem::path file =
      how == Calibration::cached ? detail::cost_cache_file() : std::filesystem::path{};
  detail::CostTable table = file.empty() ? detail::CostTable{} : detail::read_cost_file(file);
  const std::string prefix =
      detail::cat(detail::machine_key(), '\t', sizeof(S) == 4 ? "float" : "double", '\t', batch, '\t');
  std::vector<std::string> keys(net.size());
  // (an entry of an invertible layer without its inverse's time is timed again)
  const auto known = [&](const detail::LayerSeconds& t, std::size_t i) {
    return !invertible[i] || std::isfinite(t.inverse);
  };
  std::size_t last_missing = net.size();  // the last layer to time (net.size(): none)
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      std::string name = l.name();
      std::replace(name.begin(), name.end(), '\t', ' ');
      std::replace(name.begin(), name.end(), '\n', ' ');
      keys[i] = prefix + name;
      if (const auto it = table.find(keys[i]); it != table.end() && known(it->second, i)) {
        c.forward[i] = it->second.forward;
        c.backward[i] = it->second.backward;
        if (invertible[i]) c.inverse[i] = it->second.inverse;
        c.cotangent[i] = it->second.cotangent;
        c.sweep[i] = it->second.sweep;
      } else {
        last_missing = i;
      }
    });
  if (last_missing == net.size()) return c;  // (every layer known: nothing timed)
  // Up to the last layer to time: x_i (x_0 the caller's) and x_{i+1}
  // alternate between two buffers; h, J_iᵀ h and the sweep's h_{i+1} take three more.
  detail::Buffer<S> xb[2], hb[3];
  for (std::size_t i = 0; i <= last_missing; ++i)
    net.visit(i, [&](auto& l) {
      const CRef<S> x = i == 0 ? CRef<S>(x0) : CRef<S>(xb[(i + 1) % 2].view(l.in_features(), batch));
      auto y = xb[i % 2].view(l.out_features(), batch);
      if (const auto it = table.find(keys[i]); it != table.end() && known(it->second, i)) {
        if (i < last_missing) moonwalk::forward_into(l, x, y);
        return;
      }
      c.forward[i] = detail::least_seconds(3, [&] { moonwalk::forward_into(l, x, y); });
      auto h = hb[0].view(l.out_features(), batch);
      h = y;  // (any cotangent of the right shape times the same)
      const CRef<S> hc = h;
      auto hin = hb[1].view(l.in_features(), batch);
      c.backward[i] = detail::least_seconds(3, [&] {
        moonwalk::accumulate_vjp_params(l, x, hc);
        moonwalk::vjp_into(l, x, hc, hin);
      });
      using Lyr = std::remove_cvref_t<decltype(l)>;
      if constexpr (Invertible<Lyr>)
        if (invertible[i]) {
          auto xr = hb[1].view(l.in_features(), batch);  // (hin's storage: its value is spent)
          // (what the layer derives from its weights, a factorisation, is
          // derived again each step in training: timed with the inverse)
          c.inverse[i] = detail::least_seconds(3, [&] {
            moonwalk::release_derived(l);
            moonwalk::inverse_into(l, CRef<S>(y), xr);
          });
        }
      // Moonwalk's steps: the cotangent step from r_i; the sweep step as
      // the layer's crossing makes it (a vijp derives its factorisation
      // anew, as each training step does).
      residual_t<Lyr> r;
      moonwalk::save_residual_into(l, x, r);
      c.cotangent[i] = detail::least_seconds(3, [&] { moonwalk::vjp_residual_into(l, r, hc, hin); });
      const CRef<S> hx = hin;
      auto hy = hb[2].view(l.out_features(), batch);
      auto anchor_seconds = [&] {
        return detail::least_seconds(3, [&] {
          moonwalk::vjp_into(l, x, hc, hb[2].view(l.in_features(), batch));
          moonwalk::accumulate_vjp_params(l, x, hc);
        });
      };
      try {
        switch (c.crossing[i]) {
          case CotangentKeep::none:
            if constexpr (Submersive<Lyr>)
              c.sweep[i] = detail::least_seconds(3, [&] {
                moonwalk::release_derived(l);
                moonwalk::vijp_into(l, x, hx, hy);
                moonwalk::accumulate_vjp_params(l, x, hc);
              });
            break;
          case CotangentKeep::fragment:
            if constexpr (Fragmental<Lyr>) {
              const auto f = l.save_fragment(r, Matrix<S>(hc));
              c.sweep[i] = detail::least_seconds(3, [&] {
                hy = l.vijp_with_fragment(x, hx, f);
                moonwalk::accumulate_vjp_params(l, x, hc);
              });
            }
            break;
          case CotangentKeep::anchor:
            c.sweep[i] = anchor_seconds();
            break;
        }
      } catch (const RankError&) {  // (a vijp that cannot run here: the sweep crosses the layer by an anchor)
        c.crossing[i] = CotangentKeep::anchor;
        c.fragment_bytes[i] = 0;
        c.sweep[i] = anchor_seconds();
      }
      moonwalk::release_derived(l);
      table[keys[i]] = {c.forward[i], c.backward[i], c.inverse[i], c.cotangent[i], c.sweep[i]};
    });
  for (std::size_t i = 0; i <= last_missing; ++i) {  // (a layer whose twin was timed above it)
    const detail::LayerSeconds& t = table.at(keys[i]);
    c.forward[i] = t.forward;
    c.backward[i] = t.backward;
    if (invertible[i]) c.inverse[i] = t.inverse;
    c.cotangent[i] = t.cotangent;
    c.sweep[i] = t.sweep;
  }
  if (!file.empty()) (void)detail::write_cost_file(file, table);
  return c;
}

/// The drift of every stretch of inverses the chain offers (ChainCosts::
/// measured), measured on the first columns of x0: x_1 … x_L by forward
/// steps, then, for each layer j from the top down that can invert, the
/// inverse of layer j applied at once to x_{j+1} and to every x̂_{j+1}
/// rebuilt from a higher x_k, each against the exact x_j. A stretch
/// stops at a layer without inverse and after its drift first exceeds
/// `limit` (or is not finite), so a chain that drifts fast costs few
/// inverses. Every layer's inverse runs once, on at most the chain's length
/// times that many columns; what a layer derives for it (a Linear's
/// factorisation) is released at once. The columns: up to 16 and as many as
/// keep the values under 2 MiB. Its buffers (the values, and two blocks of
/// the live stretches' rebuilt values) are mapped outside the heap
/// (core/mapped.hpp), so they leave no hole in it for the plan's buffers,
/// and this thread's product scratch, where the probe found it empty, is
/// released again.
template <Net N>
StretchDrifts stretch_drifts(N& net, const CRef<typename N::scalar_type>& x0, double limit) {
  using S = typename N::scalar_type;
  const std::size_t L = net.size();
  std::vector<Index> rows(L + 1), at(L + 2, 0);  // at: x_i's offset in `values`, per column
  rows[0] = net.in_features();
  bool any = false;
  for (std::size_t i = 0; i < L; ++i)
    net.visit(i, [&](const auto& l) {
      rows[i + 1] = l.out_features();
      any = any || (i > 0 && can_invert(l));
    });
  StretchDrifts out{.first = std::vector<std::size_t>(L + 2, 0), .drift = {}, .unit = unit_roundoff<S>()};
  if (!any || x0.cols() == 0) return out;
  for (std::size_t i = 0; i <= L; ++i) at[i + 1] = at[i] + rows[i];
  const Index widest = *std::max_element(rows.begin(), rows.end());
  constexpr Index kMostColumns = 16;
  constexpr std::size_t kValueBytes = std::size_t{2} << 20;
  const Index cols = std::clamp<Index>(
      static_cast<Index>(kValueBytes / (static_cast<std::size_t>(std::max<Index>(at[L + 1], 1)) * sizeof(S))),
      1, std::min(kMostColumns, x0.cols()));
  const std::size_t scratch_before = thread_scratch_bytes();
  detail::MappedArray<S> values, blocks[2];
  values.resize(static_cast<std::size_t>(at[L + 1] * cols));
  // Each block holds up to L stretches' rebuilt values (pages touched as used).
  for (auto& b : blocks) b.resize(static_cast<std::size_t>(widest * cols) * L);
  auto x = [&](std::size_t i) { return Eigen::Map<Matrix<S>>(values.data() + at[i] * cols, rows[i], cols); };
  auto block = [&](int which, Index r, std::size_t n) {
    return Eigen::Map<Matrix<S>>(blocks[which].data(), r, static_cast<Index>(n) * cols);
  };
  x(0) = x0.leftCols(cols);
  for (std::size_t i = 0; i < L; ++i)
    net.visit(i, [&](auto& l) { moonwalk::forward_into(l, x(i), x(i + 1)); });
  // by_top[k]: the drifts of the stretches from x_k, for a = k−2, k−3, …
  std::vector<std::vector<float>> by_top(L + 1);
  std::vector<std::size_t> live;  // tops whose rebuilt x̂_{j+1} are the column blocks of blocks[above]
  int above = 0;
  for (std::size_t j = L - 1; j >= 1; --j) {
    bool inverts = false;
    net.visit(j, [&](const auto& l) { inverts = can_invert(l); });
    if (!inverts) {
      live.clear();
      continue;
    }
    // The stretch from x_{j+1} begins here, after the live ones.
    block(above, rows[j + 1], live.size() + 1).rightCols(cols) = x(j + 1);
    live.push_back(j + 1);
    const auto from = block(above, rows[j + 1], live.size());
    auto to = block(1 - above, rows[j], live.size());
    net.visit(j, [&](const auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      if constexpr (Invertible<Lyr>) {
        moonwalk::inverse_into(l, from, to);
        moonwalk::release_derived(l);
      }
    });
    std::size_t kept = 0;
    for (std::size_t b = 0; b < live.size(); ++b) {
      const double d = detail::rel_max_err(to.middleCols(static_cast<Index>(b) * cols, cols), x(j));
      by_top[live[b]].push_back(static_cast<float>(d));
      if (!(d <= limit)) continue;
      if (kept != b)
        to.middleCols(static_cast<Index>(kept) * cols, cols) =
            to.middleCols(static_cast<Index>(b) * cols, cols);
      live[kept++] = live[b];
    }
    live.resize(kept);
    above = 1 - above;
  }
  // The products on the stretches' columns may have grown this thread's
  // scratch past what the step will need: where the probe found it empty
  // (a first bind), it is given back, and the step's products take what
  // they need again. (Scratch that other work holds is left alone.)
  if (scratch_before == 0) release_thread_scratch();
  for (std::size_t k = 0; k <= L; ++k) out.first[k + 1] = out.first[k] + by_top[k].size();
  out.drift.reserve(out.first.back());
  for (const auto& d : by_top) out.drift.insert(out.drift.end(), d.begin(), d.end());
  return out;
}

}  // namespace moonwalk
