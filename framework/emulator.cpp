#include "framework/emulator.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "framework/checkpoint.h"
#include "framework/json_fields.h"
#include "framework/models/family.h"
#include "parallel/errors.h"

namespace crash {

namespace fs = std::filesystem;

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

// A merged slot's tensor: sum_j w_j theta_j over its source and merged layers, in fp64, stored in
// the source layer's dtype (LaCo's theta_l + sum_i (theta_l+i - theta_l) and merges of merges).
torch::Tensor merged_tensor(const CheckpointReader& full, const std::string& name, const EmulatorSlot& slot) {
  const auto base = full.view(name);
  auto sum = base.to(torch::kFloat64) * slot.weights.at(0);
  for (size_t k = 0; k < slot.merged.size(); ++k) {
    const auto other = rename_layer(name, slot.merged[k]);
    if (!full.contains(other))
      fail("{}: layer {} has '{}' but layer {} has no '{}' to merge", full.dir(), slot.source, name, slot.merged[k],
           other);
    const auto t = full.view(other);
    if (t.sizes() != base.sizes())
      fail("{}: '{}' has shape {} but '{}' {}; layers of different shapes cannot merge", full.dir(), other,
           fmt::join(t.sizes(), "x"), name, fmt::join(base.sizes(), "x"));
    sum += t.to(torch::kFloat64) * slot.weights.at(k + 1);
  }
  return sum.to(base.scalar_type()).contiguous();
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
      tensors.emplace_back(rename_layer(name, static_cast<int64_t>(s)), slot.merged.empty() || is_norm_tensor(name)
                                                                            ? full.view(name)
                                                                            : merged_tensor(full, name, slot));
  }
  nlohmann::json updates = {{"num_hidden_layers", plan.slots.size()}, {"crash_emulator", plan.mode}};
  auto storage = plan.storage();
  updates["crash_shared_layers"] = storage.empty() ? nlohmann::json(nullptr) : nlohmann::json(storage);
  for (const auto& [field, list] : c.family->layer_config_lists(c)) {
    nlohmann::json v = nlohmann::json::array();
    for (const auto& slot : plan.slots) v.push_back(list.at(static_cast<size_t>(slot.source)));
    updates[field] = v;
  }
  SaveOptions options;
  options.copy_files = hf_folder_paths(full.dir());
  EmulatorPlan saved = plan;
  saved.source_model = fs::absolute(full.dir()).string();
  options.extra_files["crash_plan.json"] = saved.to_json().dump(2) + "\n";
  save_hf_folder(out, c, tensors, options, updates);
}

namespace {

// Whether an emulator tensor still holds the full model's values (compared in the lower of the
// two precisions, so a checkpoint saved in another dtype is not mistaken for a trained one).
bool unchanged(const torch::Tensor& emu, const torch::Tensor& full) {
  return torch::equal(full.to(emu.scalar_type()), emu) || torch::equal(emu.to(full.scalar_type()), full);
}

}  // namespace

std::vector<std::string> write_plugin_folder(const CheckpointReader& full, const CheckpointReader& emulator,
                                             const EmulatorPlan& plan, const std::string& out) {
  if (plan.mode == "prune" || plan.mode == "merge")
    fail(
        "{}: is a {} model (its layers were removed{}), not an emulator: there are no adapter layers to plug back "
        "into the full model; evaluate it (healed or not) as it is",
        emulator.dir(), plan.mode == "prune" ? "pruned" : "merged", plan.mode == "merge" ? " by merging" : "");
  const ModelConfig& c = full.config();
  if (plan.full_layers != c.num_layers)
    fail("{}: the emulator was made from a {}-layer model, {} has {}", emulator.dir(), plan.full_layers, full.dir(),
         c.num_layers);
  const ModelConfig& e = emulator.config();
  if (e.model_type != c.model_type || e.hidden_size != c.hidden_size || e.intermediate_size != c.intermediate_size)
    fail("{}: the emulator is a {} model of width {}, but {} is a {} model of width {}", emulator.dir(), e.model_type,
         e.hidden_size, full.dir(), c.model_type, c.hidden_size);
  if (e.tie_word_embeddings != c.tie_word_embeddings)
    fail("{}: tie_word_embeddings is {} but {} in {}", emulator.dir(), e.tie_word_embeddings, c.tie_word_embeddings,
         full.dir());
  if (static_cast<int64_t>(plan.slots.size()) != emulator.config().num_layers)
    fail("{}: crash_plan.json has {} slots but config.json {} layers", emulator.dir(), plan.slots.size(),
         emulator.config().num_layers);
  // Older OPT files lack the "model." prefix that a trained emulator's tensors have.
  auto in_emulator = [&](const std::string& name) {
    return emulator.contains(name) || !emulator.contains("model." + name) ? name : "model." + name;
  };
  auto check_shape = [&](const std::string& from, const std::string& name) {
    if (!emulator.contains(from)) fail("{}: has no tensor '{}' to plug into '{}'", emulator.dir(), from, name);
    if (emulator.info(from).shape != full.info(name).shape)
      fail("{}: tensor '{}' has shape {} but '{}' in {} has {}", emulator.dir(), from,
           fmt::join(emulator.info(from).shape, "x"), name, full.dir(), fmt::join(full.info(name).shape, "x"));
  };
  // Full-model layer -> the trained emulator slot that replaces it.
  std::map<int64_t, int64_t> plugged;
  for (int64_t s : plan.trainable_slots()) plugged[plan.slots[static_cast<size_t>(s)].source] = s;
  if (plugged.empty()) fail("{}: crash_plan.json has no trained slots to plug in", emulator.dir());
  // A frozen slot has no place in the full model: if it was trained anyway (train --train-all),
  // plugging in would drop that training silently, so it is refused.
  const auto by_layer = names_by_layer(full);
  for (size_t s = 0; s < plan.slots.size(); ++s) {
    const auto& slot = plan.slots[s];
    if (slot.train || slot.stored_as != static_cast<int64_t>(s)) continue;
    auto layer = by_layer.find(slot.source);
    if (layer == by_layer.end()) continue;
    for (const auto& name : layer->second) {
      const std::string from = in_emulator(rename_layer(name, static_cast<int64_t>(s)));
      check_shape(from, name);
      if (!unchanged(emulator.view(from), full.view(name)))
        fail(
            "{}: tensor '{}' of frozen slot {} was trained, but the plug-in carries back only the adapter layers, "
            "embeddings, final norm and head (train without --train-all)",
            emulator.dir(), from, s);
    }
  }
  // Embeddings, the final norm and the head: the emulator's, trained or not (equal to the full
  // model's unless trained with --train-all).
  std::map<std::string, std::string> outside;  // full-model name -> emulator name
  for (const auto& name : emulator.names()) {
    if (layer_of_parameter(name)) continue;
    std::string to = name;
    if (!full.contains(to) && name.rfind("model.", 0) == 0) to = name.substr(6);
    if (!full.contains(to))
      fail("{}: tensor '{}' has no counterpart in {} to carry it into", emulator.dir(), name, full.dir());
    check_shape(name, to);
    outside[to] = name;
  }
  // Older OPT checkpoints name their tensors without the "model." prefix.
  const std::string embedding = full.contains(c.embedding_name()) || c.embedding_name().rfind("model.", 0) != 0
                                    ? c.embedding_name()
                                    : c.embedding_name().substr(6);
  // A tied head is the embedding: a stored copy of it follows the (possibly trained) embedding.
  if (c.tie_word_embeddings && full.contains("lm_head.weight") && outside.count(embedding)) {
    check_shape(outside[embedding], "lm_head.weight");
    outside["lm_head.weight"] = outside[embedding];
  }
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> carried;
  for (const auto& name : full.names()) {
    auto o = outside.find(name);
    if (o != outside.end()) {
      auto t = emulator.view(o->second);
      if (!unchanged(t, full.view(name))) carried.push_back(name);
      tensors.emplace_back(name, t.to(full.view(name).scalar_type()));
      continue;
    }
    auto layer = layer_of_parameter(name);
    auto it = layer ? plugged.find(*layer) : plugged.end();
    if (it == plugged.end()) {
      tensors.emplace_back(name, full.view(name));
      continue;
    }
    const std::string from = in_emulator(rename_layer(name, it->second));
    check_shape(from, name);
    tensors.emplace_back(name, emulator.view(from).to(full.view(name).scalar_type()));
  }
  SaveOptions options;
  options.copy_files = hf_folder_paths(full.dir());
  nlohmann::json record = {{"format", "crash-hpc plug-in 1"},
                           {"full_model", fs::absolute(full.dir()).string()},
                           {"emulator", fs::absolute(emulator.dir()).string()},
                           {"mode", plan.mode},
                           {"plugged_layers", nlohmann::json::array()},
                           {"carried_tensors", carried}};
  for (const auto& [layer, slot] : plugged) record["plugged_layers"].push_back({{"layer", layer}, {"slot", slot}});
  options.extra_files["crash_plugin.json"] = record.dump(2) + "\n";
  save_hf_folder(out, c, tensors, options);
  return carried;
}

}  // namespace crash
