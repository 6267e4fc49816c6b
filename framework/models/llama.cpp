// LLaMA family (LlamaForCausalLM): RMSNorm, rotary positions (llama3 or linear scaling optional),
// grouped-query attention, SwiGLU MLP, tied or untied embeddings. Its layer serves Qwen2, Qwen3
// and Mistral too (framework/models/llama.h).
#include "framework/models/llama.h"

#include "framework/config.h"
#include "framework/json_fields.h"
#include "framework/models/blocks.h"
#include "framework/models/decoder.h"
#include "framework/models/dropout.h"
#include "framework/models/layer_stack.h"

#include <algorithm>

namespace crash {

namespace {

class LlamaLayer : public torch::nn::Module {
 public:
  LlamaLayer(const ModelConfig& c, const CommPtr& tp) {
    self_attn = register_module("self_attn", llama_style_attention(c, tp));
    mlp = register_module("mlp", std::make_shared<GatedMLP>(c, tp));
    input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.norm_eps));
    post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.norm_eps));
  }
  // HF's LlamaDecoderLayer drops only attention probabilities (`attention_dropout`); residual
  // dropout runs only when the trainer asks for it (train --dropout), at OPT's sites.
  torch::Tensor forward(const torch::Tensor& h_in, const AttentionContext& ctx, LayerCache* cache, int64_t layer) {
    auto a = self_attn->forward(input_layernorm->forward(h_in), ctx, cache, layer);
    if (ctx.dropout_hidden()) a = residual_dropout(a, ctx, layer, DropoutSite::AttentionOutput);
    auto h = a.add_(h_in);
    auto f = mlp->forward(post_attention_layernorm->forward(h));
    if (ctx.dropout_hidden()) f = residual_dropout(f, ctx, layer, DropoutSite::MlpOutput);
    return f.add_(h);
  }
  SelfAttention self_attn{nullptr};
  std::shared_ptr<GatedMLP> mlp;
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};

class LlamaFamily : public LlamaStyleFamily {
 public:
  std::vector<std::string> model_types() const override { return {"llama"}; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_llama_style(c, j, src);
    c.mlp_bias = json_field_or<bool>(j, "mlp_bias", false, src);
    c.qkv_bias = c.out_bias = c.attention_bias;
  }
};

}  // namespace

GatedMLP::GatedMLP(const ModelConfig& c, const CommPtr& tp) : act_(c.activation) {
  gate_proj = register_module("gate_proj", column_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, tp));
  up_proj = register_module("up_proj", column_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, tp));
  down_proj = register_module("down_proj", row_linear(c.intermediate_size, c.hidden_size, c.mlp_bias, tp));
}

torch::Tensor GatedMLP::forward(const torch::Tensor& x) {
  return down_proj->forward(activation(act_, gate_proj->forward(x)) * up_proj->forward(x));
}

SelfAttention llama_style_attention(const ModelConfig& c, const CommPtr& tp) {
  const auto& family = static_cast<const LlamaStyleFamily&>(*c.family);
  AttentionShape s;
  s.tp = tp;
  s.hidden = c.hidden_size;
  s.heads = c.num_heads;
  s.kv_heads = c.num_kv_heads;
  s.head_dim = c.head_dim;
  s.qkv_bias = c.qkv_bias;
  s.out_bias = c.out_bias;
  s.qk_norm = family.qk_norm();
  s.norm_unit_offset = family.unit_offset_norms();
  s.norm_eps = c.norm_eps;
  s.rotary = true;
  return SelfAttention(s);
}

void read_llama_style(ModelConfig& c, const nlohmann::json& j, const std::string& src) {
  read_sizes(c, j, src, "intermediate_size");
  c.rotary = true;
  c.num_kv_heads = json_field_or<int64_t>(j, "num_key_value_heads", c.num_heads, src);
  c.max_positions = json_field_or<int64_t>(j, "max_position_embeddings", 2048, src);
  c.word_embed_proj_dim = c.hidden_size;
  if (j.contains("head_dim") && !j.at("head_dim").is_null()) {
    c.head_dim = json_field<int64_t>(j, "head_dim", src);
    require_positive(c.head_dim, "head_dim", src);
  }
  c.norm_eps = json_field_or<double>(j, "rms_norm_eps", 1e-6, src);
  c.activation = json_field_or<std::string>(j, "hidden_act", "silu", src);
  c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", false, src);
  c.attention_bias = json_field_or<bool>(j, "attention_bias", false, src);
  for (const char* moe : {"num_experts", "num_local_experts", "n_routed_experts"})
    if (j.contains(moe) && !j.at(moe).is_null() && !(j.at(moe).is_number() && j.at(moe).get<double>() == 0))
      fail("{}: field '{}' (mixture of experts) is not supported", src, moe);
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
  if (!rs.is_null()) c.rope_scaling = read_rope_scaling(rs, where);
  c.attention_dropout = json_field_or<double>(j, "attention_dropout", 0.0, src);
  c.pad_token_id = json_field_or<int64_t>(j, "pad_token_id", -1, src);
  c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", 1, src);
  c.eos_token_id = read_eos_token_id(j, 2, src);
}

std::optional<RopeScaling> read_rope_scaling(const nlohmann::json& rs, const std::string& where) {
  std::string type = rs.contains("rope_type") ? json_field<std::string>(rs, "rope_type", where)
                                              : json_field_or<std::string>(rs, "type", "default", where);
  if (type == "default") return std::nullopt;
  RopeScaling s;
  s.factor = json_field<double>(rs, "factor", where);
  if (type == "linear") {
    if (s.factor <= 0) fail("{}: factor must be positive", where);
    s.linear = true;
    return s;
  }
  if (type != "llama3")
    fail("{}: rope type '{}' is not supported (expected 'llama3', 'linear' or 'default')", where, type);
  s.low_freq_factor = json_field<double>(rs, "low_freq_factor", where);
  s.high_freq_factor = json_field<double>(rs, "high_freq_factor", where);
  s.original_max_position_embeddings = json_field<int64_t>(rs, "original_max_position_embeddings", where);
  if (s.factor <= 0 || s.high_freq_factor <= s.low_freq_factor)
    fail("{}: factor must be positive and high_freq_factor > low_freq_factor", where);
  return s;
}

void read_qwen_style(ModelConfig& c, const nlohmann::json& j, const std::string& src) {
  read_llama_style(c, j, src);
  c.max_positions = json_field_or<int64_t>(j, "max_position_embeddings", 32768, src);
  c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", -1, src);
  if (!j.contains("eos_token_id") || j.at("eos_token_id").is_null()) c.eos_token_id = -1;
  const int64_t window =
      json_field_or<bool>(j, "use_sliding_window", false, src) ? read_sliding_window(j, 4096, src) : 0;
  std::vector<bool> sliding;
  if (j.contains("layer_types") && !j.at("layer_types").is_null()) {
    sliding = read_layer_types(c, j, src);
  } else if (window > 0) {
    const int64_t first = json_field_or<int64_t>(j, "max_window_layers", 28, src);
    for (int64_t l = 0; l < c.num_layers; ++l) sliding.push_back(l >= first);
  }
  const bool any = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
  if (any && window == 0)
    fail(
        "{}: field 'layer_types' names 'sliding_attention' layers but no window applies (use_sliding_window false "
        "or sliding_window null)",
        src);
  c.sliding_window = any ? window : 0;
  c.sliding_layers = any ? sliding : std::vector<bool>{};
}

std::map<std::string, nlohmann::json> QwenFamily::layer_config_lists(const ModelConfig& c) const {
  if (c.sliding_window == 0) return ModelFamily::layer_config_lists(c);
  return {{"layer_types", layer_types_json(c)}};
}

std::shared_ptr<CausalLM> LlamaStyleFamily::build(const ModelConfig& config, const ModelShard& shard) const {
  return std::make_shared<LlamaStyleLM<LlamaLayer>>(config, shard);
}

std::vector<TensorSpec> LlamaStyleFamily::layer_tensors(const ModelConfig& c) const {
  const int64_t H = c.hidden_size, F = c.intermediate_size, q = c.num_heads * c.head_dim, kv = c.kv_dim();
  const auto col = TpSplit::Column, row = TpSplit::Row, rep = TpSplit::Replicated;
  std::vector<TensorSpec> t = {{"self_attn.q_proj.weight", {q, H}, col},
                               {"self_attn.k_proj.weight", {kv, H}, col},
                               {"self_attn.v_proj.weight", {kv, H}, col},
                               {"self_attn.o_proj.weight", {H, q}, row}};
  if (c.qkv_bias)
    t.insert(t.end(), {{"self_attn.q_proj.bias", {q}, col},
                       {"self_attn.k_proj.bias", {kv}, col},
                       {"self_attn.v_proj.bias", {kv}, col}});
  if (c.out_bias) t.push_back({"self_attn.o_proj.bias", {H}, rep});
  if (qk_norm())
    t.insert(t.end(), {{"self_attn.q_norm.weight", {c.head_dim}, rep}, {"self_attn.k_norm.weight", {c.head_dim}, rep}});
  t.insert(t.end(), {{"mlp.gate_proj.weight", {F, H}, col},
                     {"mlp.up_proj.weight", {F, H}, col},
                     {"mlp.down_proj.weight", {H, F}, row}});
  if (c.mlp_bias)
    t.insert(t.end(),
             {{"mlp.gate_proj.bias", {F}, col}, {"mlp.up_proj.bias", {F}, col}, {"mlp.down_proj.bias", {H}, rep}});
  t.insert(t.end(), {{"input_layernorm.weight", {H}, rep}, {"post_attention_layernorm.weight", {H}, rep}});
  return t;
}

std::vector<TensorSpec> LlamaStyleFamily::outer_tensors(const ModelConfig& c) const {
  std::vector<TensorSpec> t = {{"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}, TpSplit::Vocab},
                               {"model.norm.weight", {c.hidden_size}, TpSplit::Replicated}};
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, c.hidden_size}, TpSplit::Vocab});
  return t;
}

const ModelFamily& llama_family() {
  static const LlamaFamily family;
  return family;
}

}  // namespace crash
