// Emulator plans as data: building them (uniform, remove, share, prune, merge), their JSON form and
// crash_plan.json. Kept apart from the folder writers so it builds without LibTorch (the plan
// fuzz target links only this file).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "framework/atomic_file.h"
#include "framework/emulator.h"
#include "framework/json_fields.h"
#include "parallel/errors.h"

namespace crash {

namespace fs = std::filesystem;

std::vector<int64_t> EmulatorPlan::trainable_slots() const {
  std::vector<int64_t> out;
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].train) out.push_back(static_cast<int64_t>(i));
  return out;
}

std::vector<int64_t> EmulatorPlan::storage() const {
  std::vector<int64_t> out;
  bool shared = false;
  for (size_t i = 0; i < slots.size(); ++i) {
    out.push_back(slots[i].stored_as);
    shared = shared || slots[i].stored_as != static_cast<int64_t>(i);
  }
  return shared ? out : std::vector<int64_t>{};
}

nlohmann::json EmulatorPlan::to_json() const {
  nlohmann::json s = nlohmann::json::array();
  for (const auto& slot : slots) {
    nlohmann::json o = {{"source", slot.source}, {"train", slot.train}, {"stored_as", slot.stored_as}};
    if (!slot.merged.empty()) {
      o["merged"] = slot.merged;
      o["weights"] = slot.weights;
    }
    s.push_back(o);
  }
  nlohmann::json j = {{"format", "crash-hpc emulator plan 1"},
                      {"mode", mode},
                      {"source_model", source_model},
                      {"full_layers", full_layers},
                      {"adapters", {bottom, top}},
                      {"slots", s},
                      {"clusters", clusters}};
  if (!pruning.is_null()) j["pruning"] = pruning;
  return j;
}

EmulatorPlan EmulatorPlan::from_json(const nlohmann::json& j, const std::string& src) {
  EmulatorPlan p;
  if (json_field<std::string>(j, "format", src) != "crash-hpc emulator plan 1")
    fail("{}: field 'format' must be \"crash-hpc emulator plan 1\"", src);
  p.mode = json_field<std::string>(j, "mode", src);
  if (p.mode != "uniform" && p.mode != "remove" && p.mode != "share" && p.mode != "prune" && p.mode != "merge")
    fail("{}: field 'mode' must be uniform, remove, share, prune or merge, got '{}'", src, p.mode);
  p.source_model = json_field_or<std::string>(j, "source_model", "", src);
  p.full_layers = json_field<int64_t>(j, "full_layers", src);
  auto adapters = json_field<std::vector<int64_t>>(j, "adapters", src);
  if (adapters.size() != 2 || adapters[0] < 0 || adapters[1] < 0)
    fail("{}: field 'adapters' must be [bottom, top], two non-negative integers", src);
  p.bottom = adapters[0];
  p.top = adapters[1];
  if (!j.contains("slots") || !j["slots"].is_array() || j["slots"].empty())
    fail("{}: field 'slots' must be a non-empty list", src);
  const auto n = static_cast<int64_t>(j["slots"].size());
  for (size_t i = 0; i < j["slots"].size(); ++i) {
    const std::string where = fmt::format("{} slot {}", src, i);
    EmulatorSlot s;
    s.source = json_field<int64_t>(j["slots"][i], "source", where);
    s.train = json_field<bool>(j["slots"][i], "train", where);
    s.stored_as = json_field_or<int64_t>(j["slots"][i], "stored_as", static_cast<int64_t>(i), where);
    if (s.source < 0 || s.source >= p.full_layers)
      fail("{}: 'source' {} is not a layer of the {}-layer full model", where, s.source, p.full_layers);
    if (s.stored_as < 0 || s.stored_as >= n) fail("{}: 'stored_as' {} is not a slot", where, s.stored_as);
    if (j["slots"][i].contains("merged")) {
      s.merged = json_field<std::vector<int64_t>>(j["slots"][i], "merged", where);
      for (size_t k = 0; k < s.merged.size(); ++k)
        if (s.merged[k] != s.source + static_cast<int64_t>(k) + 1 || s.merged[k] >= p.full_layers)
          fail("{}: 'merged' must list the layers after 'source' {} in order, within the {}-layer model", where,
               s.source, p.full_layers);
      if (!s.merged.empty() && s.stored_as != static_cast<int64_t>(i))
        fail("{}: a merged slot cannot share another slot's weights", where);
      const auto& w = j["slots"][i].contains("weights") ? j["slots"][i]["weights"] : nlohmann::json();
      if (w.is_array())
        for (const auto& x : w)
          if (x.is_number()) s.weights.push_back(x.get<double>());
      if (!w.is_array() || s.weights.size() != w.size() || s.weights.size() != s.merged.size() + 1)
        fail("{}: 'weights' must give one weight to 'source' and one to each 'merged' layer ({} numbers)", where,
             s.merged.size() + 1);
    }
    p.slots.push_back(s);
  }
  for (size_t i = 0; i < p.slots.size(); ++i) {
    const auto& home = p.slots[static_cast<size_t>(p.slots[i].stored_as)];
    if (home.stored_as != p.slots[i].stored_as)
      fail("{}: slot {} is stored as slot {}, which is itself stored elsewhere", src, i, p.slots[i].stored_as);
    if (p.slots[i].stored_as != static_cast<int64_t>(i) && (p.slots[i].train || home.train))
      fail("{}: slot {} shares weights with slot {}; shared layers cannot train", src, i, p.slots[i].stored_as);
  }
  if (j.contains("clusters") && j["clusters"].is_array())
    for (const auto& c : j["clusters"]) {
      nlohmann::json holder = {{"cluster", c}};
      p.clusters.push_back(json_field<std::vector<int64_t>>(holder, "cluster", src));
    }
  if (j.contains("pruning")) {
    if (!j["pruning"].is_object()) fail("{}: field 'pruning' must be an object", src);
    p.pruning = j["pruning"];
  }
  return p;
}

namespace {

EmulatorPlan adapters_only(int64_t L, int64_t a, int64_t b, const char* mode) {
  if (a < 0 || b < 0) fail("adapters must be non-negative, got {} and {}", a, b);
  if (a + b >= L) fail("{} + {} adapter layers leave no middle in a {}-layer model", a, b, L);
  EmulatorPlan p;
  p.mode = mode;
  p.full_layers = L;
  p.bottom = a;
  p.top = b;
  return p;
}

void push(EmulatorPlan& p, int64_t source, bool train, int64_t stored_as = -1) {
  const auto slot = static_cast<int64_t>(p.slots.size());
  p.slots.push_back({source, train, stored_as < 0 ? slot : stored_as, {}, {}});
}

// Emulators with a middle of `kept` layers (their full-model indices, increasing).
EmulatorPlan with_middle(EmulatorPlan p, const std::vector<int64_t>& kept) {
  for (int64_t l = 0; l < p.bottom; ++l) push(p, l, true);
  for (int64_t l : kept) push(p, l, false);
  for (int64_t l = p.full_layers - p.top; l < p.full_layers; ++l) push(p, l, true);
  return p;
}

void check_clusters(int64_t L, int64_t a, int64_t b, const std::vector<std::vector<int64_t>>& clusters) {
  int64_t next = a;
  for (const auto& c : clusters) {
    if (c.empty()) fail("clusters: an empty cluster");
    for (int64_t l : c) {
      if (l != next)
        fail(
            "clusters: expected contiguous clusters covering the middle layers {}..{} in order; found layer {} where "
            "{} was expected (cluster the middle layers only: --layers {}:{})",
            a, L - b - 1, l, next, a, L - b);
      ++next;
    }
  }
  if (next != L - b)
    fail("clusters cover the middle layers {}..{} but the middle is {}..{} (cluster with --layers {}:{})", a, next - 1,
         a, L - b - 1, a, L - b);
}

int64_t representative(const std::vector<int64_t>& cluster) { return cluster[cluster.size() / 2]; }

}  // namespace

EmulatorPlan plan_uniform(int64_t L, int64_t a, int64_t b, int64_t keep) {
  EmulatorPlan p = adapters_only(L, a, b, "uniform");
  const int64_t M = L - a - b;
  if (keep < 1 || keep > M) fail("uniform emulator: keep {} middle layers, expected 1..{}", keep, M);
  std::vector<int64_t> kept;
  for (int64_t i = 0; i < keep; ++i)
    // Python's round (half to even), as Offsite-Tuning's uniform_choose_layers uses it.
    kept.push_back(
        a + (keep == 1 ? 0 : static_cast<int64_t>(std::nearbyint(double(i) * double(M - 1) / double(keep - 1)))));
  return with_middle(p, kept);
}

EmulatorPlan plan_remove(int64_t L, int64_t a, int64_t b, const std::vector<std::vector<int64_t>>& clusters) {
  EmulatorPlan p = adapters_only(L, a, b, "remove");
  check_clusters(L, a, b, clusters);
  std::vector<int64_t> kept;
  for (const auto& c : clusters) kept.push_back(representative(c));
  p = with_middle(p, kept);
  p.clusters = clusters;
  return p;
}

EmulatorPlan plan_share(int64_t L, int64_t a, int64_t b, const std::vector<std::vector<int64_t>>& clusters) {
  EmulatorPlan p = adapters_only(L, a, b, "share");
  check_clusters(L, a, b, clusters);
  std::vector<int64_t> reps;
  for (const auto& c : clusters) reps.push_back(representative(c));
  for (int64_t l = 0; l < L; ++l) {
    if (l < a || l >= L - b) {
      push(p, l, true);
      continue;
    }
    // The nearest kept layer; on a tie, the one on the right.
    int64_t best = reps.front();
    for (int64_t r : reps)
      if (std::abs(r - l) < std::abs(best - l) || (std::abs(r - l) == std::abs(best - l) && r > best)) best = r;
    push(p, best, false, best);
  }
  p.clusters = clusters;
  return p;
}

void train_top(EmulatorPlan& p, int64_t train_last) {
  const auto n = static_cast<int64_t>(p.slots.size());
  if (train_last < 0 || train_last > n)
    fail("--train-last {}: expected 0..{} (the pruned model's layers)", train_last, n);
  p.bottom = 0;
  p.top = train_last;
  for (int64_t s = 0; s < n; ++s) p.slots[static_cast<size_t>(s)].train = s >= n - train_last;
}

EmulatorPlan plan_prune(int64_t L, const std::vector<int64_t>& removed, int64_t train_last) {
  std::vector<bool> gone(static_cast<size_t>(std::max<int64_t>(L, 0)), false);
  for (int64_t l : removed) {
    if (l < 0 || l >= L) fail("layer {} is not a layer of the {}-layer model (layers 0..{})", l, L, L - 1);
    if (gone[static_cast<size_t>(l)]) fail("layer {} is named twice", l);
    gone[static_cast<size_t>(l)] = true;
  }
  if (removed.empty()) fail("no layer to remove");
  if (static_cast<int64_t>(removed.size()) >= L) fail("removing {} of {} layers leaves none", removed.size(), L);
  EmulatorPlan p;
  p.mode = "prune";
  p.full_layers = L;
  for (int64_t l = 0; l < L; ++l)
    if (!gone[static_cast<size_t>(l)]) push(p, l, false);
  train_top(p, train_last);
  return p;
}

EmulatorPlan plan_merge(int64_t L, const std::vector<std::vector<int64_t>>& groups, int64_t train_last) {
  std::vector<int64_t> group_of(static_cast<size_t>(std::max<int64_t>(L, 0)), -1);
  if (groups.empty()) fail("no layers to merge");
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& grp = groups[g];
    if (grp.size() < 2) fail("a merge group needs at least two layers (got {} layer)", grp.size());
    for (size_t k = 0; k < grp.size(); ++k) {
      const int64_t l = grp[k];
      if (l < 0 || l >= L) fail("layer {} is not a layer of the {}-layer model (layers 0..{})", l, L, L - 1);
      if (k > 0 && l != grp[k - 1] + 1) fail("merge group {}: layers must be contiguous and increasing", g);
      if (group_of[static_cast<size_t>(l)] >= 0) fail("layer {} is in two merge groups", l);
      group_of[static_cast<size_t>(l)] = static_cast<int64_t>(g);
    }
  }
  EmulatorPlan p;
  p.mode = "merge";
  p.full_layers = L;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t g = group_of[static_cast<size_t>(l)];
    if (g < 0) {
      push(p, l, false);
    } else if (groups[static_cast<size_t>(g)].front() == l) {
      push(p, l, false);
      const auto& grp = groups[static_cast<size_t>(g)];
      p.slots.back().merged.assign(grp.begin() + 1, grp.end());
      p.slots.back().weights.assign(grp.size(), 1.0);
      p.slots.back().weights[0] = 2.0 - static_cast<double>(grp.size());  // theta_l - k theta_l
    }
  }
  train_top(p, train_last);
  return p;
}

EmulatorPlan merge_slots(const EmulatorPlan& plan, int64_t first, int64_t count) {
  const auto n = static_cast<int64_t>(plan.slots.size());
  if (first < 0 || count < 2 || first + count > n) fail("cannot merge slots {}..{} of {}", first, first + count - 1, n);
  // Each slot as weights over the full model's layers it spans.
  std::map<int64_t, double> w;
  auto weights_of = [](const EmulatorSlot& s) {
    std::map<int64_t, double> out;
    if (s.merged.empty()) {
      out[s.source] = 1.0;
      return out;
    }
    out[s.source] = s.weights.at(0);
    for (size_t k = 0; k < s.merged.size(); ++k) out[s.merged[k]] = s.weights.at(k + 1);
    return out;
  };
  const auto base = weights_of(plan.slots[static_cast<size_t>(first)]);
  w = base;
  for (int64_t i = first + 1; i < first + count; ++i) {
    for (const auto& [l, x] : weights_of(plan.slots[static_cast<size_t>(i)])) w[l] += x;
    for (const auto& [l, x] : base) w[l] -= x;
  }
  EmulatorPlan out = plan;
  EmulatorSlot slot = plan.slots[static_cast<size_t>(first)];
  slot.merged.clear();
  slot.weights = {w.at(slot.source)};
  for (const auto& [l, x] : w)
    if (l != slot.source) {
      slot.merged.push_back(l);
      slot.weights.push_back(x);
    }
  out.slots.erase(out.slots.begin() + first, out.slots.begin() + first + count);
  out.slots.insert(out.slots.begin() + first, slot);
  for (size_t s = 0; s < out.slots.size(); ++s) out.slots[s].stored_as = static_cast<int64_t>(s);
  out.mode = "merge";
  return out;
}

bool is_norm_tensor(const std::string& hf_name) {
  const auto dot = hf_name.rfind('.');
  const auto module = hf_name.substr(0, dot == std::string::npos ? 0 : dot);
  const auto last = module.rfind('.');
  return module.substr(last == std::string::npos ? 0 : last + 1).find("norm") != std::string::npos;
}

std::vector<std::vector<int64_t>> read_clusters(const std::string& path) {
  const auto j = read_json_file(path);
  if (json_field<std::string>(j, "format", path) != "crash-hpc clusters 1")
    fail("{}: field 'format' must be \"crash-hpc clusters 1\" (the cluster job's output)", path);
  if (!j.contains("clusters") || !j["clusters"].is_array() || j["clusters"].empty())
    fail("{}: field 'clusters' must be a non-empty list of layer lists", path);
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < j["clusters"].size(); ++i) {
    nlohmann::json holder = {{"cluster", j["clusters"][i]}};
    out.push_back(json_field<std::vector<int64_t>>(holder, "cluster", fmt::format("{} cluster {}", path, i)));
  }
  return out;
}

std::optional<EmulatorPlan> read_plan(const std::string& model_dir) {
  const auto path = fs::path(model_dir) / "crash_plan.json";
  if (!fs::exists(path)) return std::nullopt;
  return EmulatorPlan::from_json(read_json_file(path.string()), path.string());
}

void write_plan(const std::string& model_dir, const EmulatorPlan& plan) {
  write_atomic((fs::path(model_dir) / "crash_plan.json").string(), plan.to_json().dump(2) + "\n");
}

}  // namespace crash
