#include "framework/config.h"

#include "framework/json_fields.h"

namespace crash {

namespace {

// Sizes beyond any real model's are rejected here: an absurd one would otherwise reach a
// tensor allocation (an overflowing size or a failed terabyte request) before any shape check.
void require_positive(int64_t v, const char* key, const std::string& source, int64_t most = int64_t(1) << 24) {
  if (v <= 0) fail("{}: field '{}' must be positive, got {}", source, key, v);
  if (v > most) fail("{}: field '{}' is {}, larger than any model's (at most {})", source, key, v, most);
}

// The sizes both families name alike, but for the MLP's width.
void read_sizes(ModelConfig& c, const nlohmann::json& j, const std::string& src, const char* intermediate_key) {
  c.vocab_size = json_field<int64_t>(j, "vocab_size", src);
  c.hidden_size = json_field<int64_t>(j, "hidden_size", src);
  c.intermediate_size = json_field<int64_t>(j, intermediate_key, src);
  c.num_layers = json_field<int64_t>(j, "num_hidden_layers", src);
  c.num_heads = json_field<int64_t>(j, "num_attention_heads", src);
}

void read_opt(ModelConfig& c, const nlohmann::json& j, const std::string& src) {
  c.family = Family::OPT;
  read_sizes(c, j, src, "ffn_dim");
  c.num_kv_heads = c.num_heads;
  c.max_positions = json_field<int64_t>(j, "max_position_embeddings", src);
  c.word_embed_proj_dim = json_field_or<int64_t>(j, "word_embed_proj_dim", c.hidden_size, src);
  c.pre_norm = json_field_or<bool>(j, "do_layer_norm_before", true, src);
  bool removed = json_field_or<bool>(j, "_remove_final_layer_norm", false, src);
  c.final_norm = c.pre_norm && !removed;
  c.linear_bias = json_field_or<bool>(j, "enable_bias", true, src);
  c.norm_affine = json_field_or<bool>(j, "layer_norm_elementwise_affine", true, src);
  c.activation = json_field_or<std::string>(j, "activation_function", "relu", src);
  c.norm_eps = 1e-5;  // OPT uses nn.LayerNorm's default
  c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", true, src);
  c.dropout = json_field_or<double>(j, "dropout", 0.1, src);  // OPTConfig's default
  c.attention_dropout = json_field_or<double>(j, "attention_dropout", 0.0, src);
  c.activation_dropout = json_field_or<double>(j, "activation_dropout", 0.0, src);
  c.pad_token_id = json_field_or<int64_t>(j, "pad_token_id", 1, src);
  c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", 2, src);
  c.eos_token_id = json_field_or<int64_t>(j, "eos_token_id", 2, src);
}

void read_llama(ModelConfig& c, const nlohmann::json& j, const std::string& src) {
  c.family = Family::LLaMA;
  read_sizes(c, j, src, "intermediate_size");
  c.num_kv_heads = json_field_or<int64_t>(j, "num_key_value_heads", c.num_heads, src);
  c.max_positions = json_field_or<int64_t>(j, "max_position_embeddings", 2048, src);
  c.word_embed_proj_dim = c.hidden_size;
  c.norm_eps = json_field_or<double>(j, "rms_norm_eps", 1e-6, src);
  c.activation = json_field_or<std::string>(j, "hidden_act", "silu", src);
  c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", false, src);
  c.attention_bias = json_field_or<bool>(j, "attention_bias", false, src);
  c.mlp_bias = json_field_or<bool>(j, "mlp_bias", false, src);
  // transformers 5 writes "rope_parameters" (theta inside); older files "rope_theta" and "rope_scaling".
  nlohmann::json rs;
  std::string where = src;
  if (j.contains("rope_parameters") && !j.at("rope_parameters").is_null()) {
    rs = json_field<nlohmann::json>(j, "rope_parameters", src);
    where = src + " rope_parameters";
    c.rope_theta = json_field_or<double>(rs, "rope_theta", 10000.0, where);
  } else {
    c.rope_theta = json_field_or<double>(j, "rope_theta", 10000.0, src);
    if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
      rs = json_field<nlohmann::json>(j, "rope_scaling", src);
    where = src + " rope_scaling";
  }
  if (c.rope_theta <= 0) fail("{}: rope_theta must be positive, got {}", where, c.rope_theta);
  if (!rs.is_null()) {
    std::string type = rs.contains("rope_type") ? json_field<std::string>(rs, "rope_type", where)
                                                : json_field_or<std::string>(rs, "type", "default", where);
    if (type == "default") {
      // no scaling
    } else if (type == "llama3") {
      RopeScaling s;
      s.factor = json_field<double>(rs, "factor", where);
      s.low_freq_factor = json_field<double>(rs, "low_freq_factor", where);
      s.high_freq_factor = json_field<double>(rs, "high_freq_factor", where);
      s.original_max_position_embeddings = json_field<int64_t>(rs, "original_max_position_embeddings", where);
      if (s.factor <= 0 || s.high_freq_factor <= s.low_freq_factor)
        fail("{}: factor must be positive and high_freq_factor > low_freq_factor", where);
      c.rope_scaling = s;
    } else {
      fail("{}: rope type '{}' is not supported (expected 'llama3' or 'default')", where, type);
    }
  }
  c.attention_dropout = json_field_or<double>(j, "attention_dropout", 0.0, src);
  c.pad_token_id = json_field_or<int64_t>(j, "pad_token_id", -1, src);
  c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", 1, src);
  c.eos_token_id = j.contains("eos_token_id") && j.at("eos_token_id").is_array()
                       ? (j.at("eos_token_id").empty() ? -1 : j.at("eos_token_id")[0].get<int64_t>())
                       : json_field_or<int64_t>(j, "eos_token_id", 2, src);
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& src) {
  ModelConfig c;
  c.raw = j;
  c.model_type = json_field<std::string>(j, "model_type", src);
  if (c.model_type == "opt") {
    read_opt(c, j, src);
  } else if (c.model_type == "llama") {
    read_llama(c, j, src);
  } else {
    fail("{}: model_type '{}' is not supported (expected 'opt' or 'llama')", src, c.model_type);
  }
  require_positive(c.vocab_size, "vocab_size", src);
  require_positive(c.hidden_size, "hidden_size", src, 1 << 20);
  require_positive(c.intermediate_size, c.family == Family::OPT ? "ffn_dim" : "intermediate_size", src, 1 << 22);
  require_positive(c.num_layers, "num_hidden_layers", src, 1 << 16);
  require_positive(c.num_heads, "num_attention_heads", src, 1 << 16);
  require_positive(c.num_kv_heads, "num_key_value_heads", src, 1 << 16);
  require_positive(c.max_positions, "max_position_embeddings", src);
  require_positive(c.word_embed_proj_dim, "word_embed_proj_dim", src, 1 << 20);
  if (c.family == Family::LLaMA && j.contains("head_dim") && !j.at("head_dim").is_null()) {
    c.head_dim = json_field<int64_t>(j, "head_dim", src);
    require_positive(c.head_dim, "head_dim", src);
  } else {
    if (c.hidden_size % c.num_heads != 0)
      fail("{}: hidden_size {} is not divisible by num_attention_heads {}", src, c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.num_heads % c.num_kv_heads != 0)
    fail("{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", src, c.num_heads, c.num_kv_heads);
  if (c.family == Family::LLaMA && c.head_dim % 2 != 0)
    fail("{}: head_dim {} must be even for rotary embeddings", src, c.head_dim);
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
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) { return from_json(read_json_file(path), path); }

int64_t ModelConfig::stored_layers() const {
  int64_t n = 0;
  for (int64_t l = 0; l < num_layers; ++l) n += storage_of(l) == l ? 1 : 0;
  return n;
}

int64_t ModelConfig::parameter_count() const {
  const int64_t H = hidden_size, F = intermediate_size, V = vocab_size;
  const int64_t q = num_heads * head_dim, kv = kv_dim();
  int64_t n = 0;
  if (family == Family::OPT) {
    const int64_t P = word_embed_proj_dim, b = linear_bias ? 1 : 0, ln = norm_affine ? 2 * H : 0;
    n += V * P + (max_positions + 2) * H;
    if (has_projection()) n += 2 * P * H;
    int64_t layer = 4 * (H * H + b * H) + 2 * ln + (H * F + b * F) + (F * H + b * H);
    n += stored_layers() * layer;
    if (final_norm) n += ln;
    if (!tie_word_embeddings) n += V * P;
  } else {
    int64_t attn = H * q + 2 * H * kv + q * H + (attention_bias ? q + 2 * kv + H : 0);
    int64_t mlp = 3 * H * F + (mlp_bias ? 2 * F + H : 0);
    n += V * H + stored_layers() * (attn + mlp + 2 * H) + H;
    if (!tie_word_embeddings) n += V * H;
  }
  return n;
}

}  // namespace crash
