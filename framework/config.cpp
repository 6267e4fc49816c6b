#include "framework/config.h"

#include "framework/json_fields.h"
#include "framework/models/family.h"

namespace crash {

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& src) {
  ModelConfig c;
  c.raw = j;
  c.model_type = json_field<std::string>(j, "model_type", src);
  c.family = &family_of_model_type(c.model_type, src);
  c.family->read_config(c, j, src);
  require_positive(c.vocab_size, "vocab_size", src);
  require_positive(c.hidden_size, "hidden_size", src, 1 << 20);
  require_positive(c.num_layers, "num_hidden_layers", src, 1 << 16);
  require_positive(c.num_heads, "num_attention_heads", src, 1 << 16);
  require_positive(c.num_kv_heads, "num_key_value_heads", src, 1 << 16);
  require_positive(c.max_positions, "max_position_embeddings", src);
  require_positive(c.word_embed_proj_dim, "word_embed_proj_dim", src, 1 << 20);
  if (c.head_dim != 0) {
    require_positive(c.head_dim, "head_dim", src);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      fail("{}: hidden_size {} is not divisible by num_attention_heads {}", src, c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.num_heads % c.num_kv_heads != 0)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", src, c.num_heads, c.num_kv_heads);
  if (c.rotary && c.head_dim % 2 != 0) fail("{}: head_dim {} must be even for rotary embeddings", src, c.head_dim);
  if (j.contains("crash_shared_layers") && !j.at("crash_shared_layers").is_null()) {
    c.shared_layers = json_field<std::vector<int64_t>>(j, "crash_shared_layers", src);
    if (static_cast<int64_t>(c.shared_layers.size()) != c.num_layers)
      fail("{}: 'crash_shared_layers' has {} entries for {} layers", src, c.shared_layers.size(), c.num_layers);
    for (size_t l = 0; l < c.shared_layers.size(); ++l) {
      const int64_t s = c.shared_layers[l];
      if (s < 0 || s >= c.num_layers || c.shared_layers[static_cast<size_t>(s)] != s)
        fail("{}: 'crash_shared_layers'[{}] = {} must name a layer that stores its own weights", src, l, s);
    }
  }
  if (j.contains("crash_sfsd_ranks") && !j.at("crash_sfsd_ranks").is_null()) {
    const auto& ranks = j.at("crash_sfsd_ranks");
    if (!ranks.is_object()) fail("{}: 'crash_sfsd_ranks' must be an object (module name -> rank)", src);
    for (const auto& [name, r] : ranks.items()) {
      if (!r.is_number_integer() || r.get<int64_t>() < 1)
        fail("{}: 'crash_sfsd_ranks'[\"{}\"] = {} must be a positive integer rank", src, name, r.dump());
      c.sfsd_ranks[name] = r.get<int64_t>();
    }
  }
  for (const auto& [key, rate] : {std::pair<const char*, double>{"dropout", c.dropout},
                                  {"attention_dropout", c.attention_dropout},
                                  {"activation_dropout", c.activation_dropout}})
    if (!(rate >= 0 && rate < 1)) fail("{}: field '{}' is {}, not a dropout rate in [0, 1)", src, key, rate);
  static const char* kActivations[] = {"relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish"};
  bool known = false;
  for (const char* a : kActivations) known = known || c.activation == a;
  if (!known) fail("{}: activation '{}' is not supported (expected relu, gelu, gelu_new or silu)", src, c.activation);
  if (c.sliding_window < 0) fail("{}: field 'sliding_window' must be positive, got {}", src, c.sliding_window);
  if (!c.sliding_layers.empty() && static_cast<int64_t>(c.sliding_layers.size()) != c.num_layers)
    fail("{}: {} per-layer attention types for {} layers", src, c.sliding_layers.size(), c.num_layers);
  if (j.contains("eos_token_id") && j.at("eos_token_id").is_array())
    c.eos_token_ids = json_field<std::vector<int64_t>>(j, "eos_token_id", src);
  else if (c.eos_token_id >= 0)
    c.eos_token_ids = {c.eos_token_id};
  c.family->check_config(c, src);
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) { return from_json(read_json_file(path), path); }

int64_t ModelConfig::stored_layers() const {
  int64_t n = 0;
  for (int64_t l = 0; l < num_layers; ++l) n += storage_of(l) == l ? 1 : 0;
  return n;
}

int64_t ModelConfig::parameter_count() const { return family->parameter_count(*this); }

std::string ModelConfig::embedding_name() const { return family->embedding_name(); }

}  // namespace crash
