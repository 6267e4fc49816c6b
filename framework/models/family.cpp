#include "framework/models/family.h"

#include <fmt/ranges.h>

#include <filesystem>

#include "framework/config.h"
#include "framework/json_fields.h"
#include "parallel/errors.h"

namespace crash {

// Sizes beyond any real model's are rejected here: an absurd one would otherwise reach a
// tensor allocation (an overflowing size or a failed terabyte request) before any shape check.
void require_positive(int64_t v, const char* key, const std::string& source, int64_t most) {
  if (v <= 0) fail("{}: field '{}' must be positive, got {}", source, key, v);
  if (v > most) fail("{}: field '{}' is {}, larger than any model's (at most {})", source, key, v, most);
}

void read_sizes(ModelConfig& c, const nlohmann::json& j, const std::string& src, const char* intermediate_key) {
  c.vocab_size = json_field<int64_t>(j, "vocab_size", src);
  c.hidden_size = json_field<int64_t>(j, "hidden_size", src);
  c.intermediate_size = json_field<int64_t>(j, intermediate_key, src);
  c.num_layers = json_field<int64_t>(j, "num_hidden_layers", src);
  c.num_heads = json_field<int64_t>(j, "num_attention_heads", src);
  require_positive(c.intermediate_size, intermediate_key, src, 1 << 22);
}

std::vector<bool> read_layer_types(const ModelConfig& c, const nlohmann::json& j, const std::string& src) {
  const auto types = json_field<std::vector<std::string>>(j, "layer_types", src);
  if (static_cast<int64_t>(types.size()) != c.num_layers)
    fail("{}: field 'layer_types' has {} entries for {} layers", src, types.size(), c.num_layers);
  std::vector<bool> sliding;
  for (const auto& t : types) {
    if (t != "full_attention" && t != "attention" && t != "sliding_attention")
      fail("{}: field 'layer_types' names '{}'; supported: 'full_attention', 'sliding_attention'", src, t);
    sliding.push_back(t == "sliding_attention");
  }
  return sliding;
}

int64_t read_sliding_window(const nlohmann::json& j, int64_t fallback, const std::string& src) {
  if (!j.contains("sliding_window")) return fallback;
  if (j.at("sliding_window").is_null()) return 0;
  const auto window = json_field<int64_t>(j, "sliding_window", src);
  require_positive(window, "sliding_window", src);
  return window;
}

int64_t read_eos_token_id(const nlohmann::json& j, int64_t fallback, const std::string& src) {
  if (j.contains("eos_token_id") && j.at("eos_token_id").is_array())
    return j.at("eos_token_id").empty() ? -1 : j.at("eos_token_id")[0].get<int64_t>();
  return json_field_or<int64_t>(j, "eos_token_id", fallback, src);
}

nlohmann::json layer_types_json(const ModelConfig& c) {
  auto out = nlohmann::json::array();
  for (int64_t l = 0; l < c.num_layers; ++l) out.push_back(c.slides(l) ? "sliding_attention" : "full_attention");
  return out;
}

std::map<std::string, nlohmann::json> ModelFamily::layer_config_lists(const ModelConfig& c) const {
  std::map<std::string, nlohmann::json> out;
  for (const auto& field : layer_config_fields()) {
    const auto& list = c.raw.contains(field) ? c.raw.at(field) : nlohmann::json();
    if (list.is_array() && static_cast<int64_t>(list.size()) == c.num_layers) out[field] = list;
  }
  return out;
}

std::vector<std::string> ModelFamily::layer_linears(const ModelConfig& c) const {
  const std::string tail = ".weight";
  std::vector<std::string> out;
  for (const auto& t : layer_tensors(c)) {
    const bool split = t.split == TpSplit::Column || t.split == TpSplit::Row;
    if (split && t.shape.size() == 2 && t.name.size() > tail.size() &&
        t.name.compare(t.name.size() - tail.size(), tail.size(), tail) == 0)
      out.push_back(t.name.substr(0, t.name.size() - tail.size()));
  }
  return out;
}

namespace {
int64_t numel(const TensorSpec& t) {
  int64_t n = 1;
  for (auto d : t.shape) n *= d;
  return n;
}
}  // namespace

int64_t ModelFamily::parameter_count(const ModelConfig& c) const {
  int64_t n = 0, layer = 0;
  for (const auto& t : outer_tensors(c)) n += numel(t);
  for (const auto& t : layer_tensors(c)) layer += numel(t);
  return n + c.stored_layers() * layer;
}

std::vector<TensorSpec> ModelFamily::tensors(const ModelConfig& c) const {
  std::vector<TensorSpec> out = outer_tensors(c);
  const auto layer = layer_tensors(c);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (c.storage_of(l) != l) continue;
    for (auto t : layer) {
      t.name = layer_prefix() + std::to_string(l) + "." + t.name;
      out.push_back(std::move(t));
    }
  }
  return out;
}

const std::vector<const ModelFamily*>& model_families() {
  // A new family adds its line here (and its file to framework/CMakeLists.txt).
  static const std::vector<const ModelFamily*> all = {&opt_family(),   &llama_family(),   &qwen2_family(),
                                                      &qwen3_family(), &mistral_family(), &gemma2_family(),
                                                      &gemma3_family()};
  return all;
}

const ModelFamily& family_of_model_type(const std::string& model_type, const std::string& source) {
  std::vector<std::string> known;
  for (const ModelFamily* f : model_families())
    for (const auto& t : f->model_types()) {
      if (t == model_type) return *f;
      known.push_back("'" + t + "'");
    }
  fail("{}: model_type '{}' is not supported (expected one of {})", source, model_type, fmt::join(known, ", "));
}

const std::vector<std::string>& hf_folder_files() {
  static const std::vector<std::string> files = {"tokenizer.json",
                                                 "tokenizer_config.json",
                                                 "special_tokens_map.json",
                                                 "generation_config.json",
                                                 "tokenizer.model",
                                                 "vocab.json",
                                                 "merges.txt",
                                                 "added_tokens.json",
                                                 "chat_template.jinja"};
  return files;
}

std::vector<std::string> hf_folder_paths(const std::string& dir, const std::vector<std::string>& extra) {
  std::vector<std::string> out;
  for (const auto& f : hf_folder_files()) out.push_back((std::filesystem::path(dir) / f).string());
  for (const auto& f : extra) out.push_back((std::filesystem::path(dir) / f).string());
  return out;
}

}  // namespace crash
