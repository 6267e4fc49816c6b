// Emulator plans as data: building them (uniform, remove, share), their JSON form and
// crash_plan.json. Kept apart from the folder writers so it builds without LibTorch (the plan
// fuzz target links only this file).
#include <cmath>
#include <filesystem>
#include <fstream>

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
  for (const auto& slot : slots)
    s.push_back({{"source", slot.source}, {"train", slot.train}, {"stored_as", slot.stored_as}});
  return {{"format", "crash-hpc emulator plan 1"},
          {"mode", mode},
          {"source_model", source_model},
          {"full_layers", full_layers},
          {"adapters", {bottom, top}},
          {"slots", s},
          {"clusters", clusters}};
}

EmulatorPlan EmulatorPlan::from_json(const nlohmann::json& j, const std::string& src) {
  EmulatorPlan p;
  if (json_field<std::string>(j, "format", src) != "crash-hpc emulator plan 1")
    fail("{}: field 'format' must be \"crash-hpc emulator plan 1\"", src);
  p.mode = json_field<std::string>(j, "mode", src);
  if (p.mode != "uniform" && p.mode != "remove" && p.mode != "share")
    fail("{}: field 'mode' must be uniform, remove or share, got '{}'", src, p.mode);
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
  p.slots.push_back({source, train, stored_as < 0 ? slot : stored_as});
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
