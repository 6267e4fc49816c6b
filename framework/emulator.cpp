#include "framework/emulator.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "framework/checkpoint.h"
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
  for (const auto& slot : slots) s.push_back({{"source", slot.source}, {"train", slot.train}, {"stored_as", slot.stored_as}});
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
        fail("clusters: expected contiguous clusters covering the middle layers {}..{} in order; found layer {} where "
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
    kept.push_back(a + (keep == 1 ? 0 : static_cast<int64_t>(std::nearbyint(double(i) * double(M - 1) / double(keep - 1)))));
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
  const auto path = fs::path(model_dir) / "crash_plan.json";
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << plan.to_json().dump(2) << "\n";
    if (!out) fail("{}: cannot write", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail("{}: cannot move into place ({})", path.string(), ec.message());
}

std::optional<int64_t> layer_of_parameter(const std::string& hf_name) {
  static const std::regex pattern(R"((?:^|\.)layers\.(\d+)\.)");
  std::smatch m;
  if (!std::regex_search(hf_name, m, pattern)) return std::nullopt;
  return std::stoll(m[1].str());
}

// ---- emulator and plug-in folders ----

namespace {

// "model.decoder.layers.7.fc1.weight" with layer 7 renamed to `to`.
std::string rename_layer(const std::string& name, int64_t to) {
  static const std::regex pattern(R"(((?:^|\.)layers\.)(\d+)\.)");
  return std::regex_replace(name, pattern, "$01" + std::to_string(to) + ".", std::regex_constants::format_first_only);
}

std::map<int64_t, std::vector<std::string>> names_by_layer(const CheckpointReader& ckpt) {
  std::map<int64_t, std::vector<std::string>> out;
  for (const auto& name : ckpt.names())
    if (auto l = layer_of_parameter(name)) out[*l].push_back(name);
  return out;
}

std::vector<std::string> side_files(const std::string& dir) {
  return {(fs::path(dir) / "tokenizer.json").string(), (fs::path(dir) / "tokenizer_config.json").string(),
          (fs::path(dir) / "special_tokens_map.json").string()};
}

}  // namespace

void write_emulator_folder(const CheckpointReader& full, const EmulatorPlan& plan, const std::string& out) {
  const ModelConfig& c = full.config();
  if (plan.full_layers != c.num_layers)
    fail("{}: the plan is for a {}-layer model, this one has {}", full.dir(), plan.full_layers, c.num_layers);
  if (!c.shared_layers.empty()) fail("{}: is already a share emulator; build emulators from a full model", full.dir());
  auto by_layer = names_by_layer(full);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& name : full.names())
    if (!layer_of_parameter(name)) tensors.emplace_back(name, full.view(name));
  for (size_t s = 0; s < plan.slots.size(); ++s) {
    const auto& slot = plan.slots[s];
    if (slot.stored_as != static_cast<int64_t>(s)) continue;
    for (const auto& name : by_layer[slot.source])
      tensors.emplace_back(rename_layer(name, static_cast<int64_t>(s)), full.view(name));
  }
  nlohmann::json updates = {{"num_hidden_layers", plan.slots.size()}, {"crash_emulator", plan.mode}};
  auto storage = plan.storage();
  updates["crash_shared_layers"] = storage.empty() ? nlohmann::json(nullptr) : nlohmann::json(storage);
  SaveOptions options;
  options.copy_files = side_files(full.dir());
  EmulatorPlan saved = plan;
  saved.source_model = fs::absolute(full.dir()).string();
  options.extra_files["crash_plan.json"] = saved.to_json().dump(2) + "\n";
  save_hf_folder(out, c, tensors, options, updates);
}

void write_plugin_folder(const CheckpointReader& full, const CheckpointReader& emulator, const EmulatorPlan& plan,
                         const std::string& out) {
  const ModelConfig& c = full.config();
  if (plan.full_layers != c.num_layers)
    fail("{}: the emulator was made from a {}-layer model, {} has {}", emulator.dir(), plan.full_layers, full.dir(),
         c.num_layers);
  const ModelConfig& e = emulator.config();
  if (e.model_type != c.model_type || e.hidden_size != c.hidden_size || e.intermediate_size != c.intermediate_size)
    fail("{}: the emulator is a {} model of width {}, but {} is a {} model of width {}", emulator.dir(), e.model_type,
         e.hidden_size, full.dir(), c.model_type, c.hidden_size);
  if (static_cast<int64_t>(plan.slots.size()) != emulator.config().num_layers)
    fail("{}: crash_plan.json has {} slots but config.json {} layers", emulator.dir(), plan.slots.size(),
         emulator.config().num_layers);
  // Full-model layer -> the trained emulator slot that replaces it.
  std::map<int64_t, int64_t> plugged;
  for (int64_t s : plan.trainable_slots()) plugged[plan.slots[static_cast<size_t>(s)].source] = s;
  if (plugged.empty()) fail("{}: crash_plan.json has no trained slots to plug in", emulator.dir());
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& name : full.names()) {
    auto layer = layer_of_parameter(name);
    auto it = layer ? plugged.find(*layer) : plugged.end();
    if (it == plugged.end()) {
      tensors.emplace_back(name, full.view(name));
      continue;
    }
    const std::string from = rename_layer(name, it->second);
    if (!emulator.contains(from)) fail("{}: has no tensor '{}' to plug into '{}'", emulator.dir(), from, name);
    if (emulator.info(from).shape != full.info(name).shape)
      fail("{}: tensor '{}' has shape {} but '{}' in {} has {}", emulator.dir(), from,
           fmt::join(emulator.info(from).shape, "x"), name, full.dir(), fmt::join(full.info(name).shape, "x"));
    tensors.emplace_back(name, emulator.view(from).to(full.view(name).scalar_type()));
  }
  SaveOptions options;
  options.copy_files = side_files(full.dir());
  nlohmann::json record = {{"format", "crash-hpc plug-in 1"},
                           {"full_model", fs::absolute(full.dir()).string()},
                           {"emulator", fs::absolute(emulator.dir()).string()},
                           {"mode", plan.mode},
                           {"plugged_layers", nlohmann::json::array()}};
  for (const auto& [layer, slot] : plugged) record["plugged_layers"].push_back({{"layer", layer}, {"slot", slot}});
  options.extra_files["crash_plugin.json"] = record.dump(2) + "\n";
  save_hf_folder(out, c, tensors, options);
}

}  // namespace crash
