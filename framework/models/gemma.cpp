// Gemma-2 (Gemma2ForCausalLM) and Gemma-3's text model (Gemma3ForCausalLM, model_type
// gemma3_text): the LLaMA layout with
//   - embeddings times sqrt(hidden), the factor rounded to the model's dtype;
//   - RMSNorm as x_hat * (1 + w), and four norms a layer: before and after attention, before and
//     after the MLP (each sublayer's output is normed before the residual add);
//   - a GeGLU MLP (hidden_activation, tanh GELU);
//   - attention scores scaled by query_pre_attn_scalar^-1/2, optionally soft-capped
//     (attn_logit_softcapping), logits soft-capped (final_logit_softcapping);
//   - sliding and global layers (layer_types; otherwise Gemma-2 alternates from a sliding first
//     layer and Gemma-3 makes every sliding_window_pattern-th layer global);
//   - Gemma-3: RMSNorm on each head of q and k, and its own rotary base for sliding layers
//     (rope_local_base_freq, unscaled) while global layers take rope_theta and rope_scaling.
#include "framework/config.h"
#include "framework/json_fields.h"
#include "framework/models/dropout.h"
#include "framework/models/llama.h"
#include "parallel/errors.h"

#include <algorithm>

namespace crash {

namespace {

class GemmaLayer : public torch::nn::Module {
 public:
  GemmaLayer(const ModelConfig& c, const CommPtr& tp) {
    self_attn = register_module("self_attn", llama_style_attention(c, tp));
    mlp = register_module("mlp", std::make_shared<GatedMLP>(c, tp));
    auto norm = [&](const char* name) {
      return register_module(name, RMSNorm(c.hidden_size, c.norm_eps, nullptr, true));
    };
    input_layernorm = norm("input_layernorm");
    post_attention_layernorm = norm("post_attention_layernorm");
    pre_feedforward_layernorm = norm("pre_feedforward_layernorm");
    post_feedforward_layernorm = norm("post_feedforward_layernorm");
  }
  // Residual dropout (train --dropout) at the LLaMA layer's sites: each sublayer's output, after its post-norm.
  torch::Tensor forward(const torch::Tensor& h_in, const AttentionContext& ctx, LayerCache* cache, int64_t layer) {
    auto a = post_attention_layernorm->forward(self_attn->forward(input_layernorm->forward(h_in), ctx, cache, layer));
    if (ctx.dropout_hidden()) a = residual_dropout(a, ctx, layer, DropoutSite::AttentionOutput);
    auto h = a.add_(h_in);
    auto f = post_feedforward_layernorm->forward(mlp->forward(pre_feedforward_layernorm->forward(h)));
    if (ctx.dropout_hidden()) f = residual_dropout(f, ctx, layer, DropoutSite::MlpOutput);
    return f.add_(h);
  }
  SelfAttention self_attn{nullptr};
  std::shared_ptr<GatedMLP> mlp;
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  RMSNorm pre_feedforward_layernorm{nullptr}, post_feedforward_layernorm{nullptr};
};

// A soft-capping field: absent gives the family's default, null none.
double read_softcap(const nlohmann::json& j, const char* key, double fallback, const std::string& src) {
  if (!j.contains(key)) return fallback;
  if (j.at(key).is_null()) return 0;
  const double cap = json_field<double>(j, key, src);
  if (!(cap > 0)) fail("{}: field '{}' must be positive or null, got {}", src, key, cap);
  return cap;
}

class GemmaFamily : public LlamaStyleFamily {
 public:
  bool unit_offset_norms() const override { return true; }
  std::shared_ptr<CausalLM> build(const ModelConfig& c, const ModelShard& shard) const override {
    return std::make_shared<LlamaStyleLM<GemmaLayer>>(c, shard);
  }
  std::vector<TensorSpec> layer_tensors(const ModelConfig& c) const override {
    auto t = LlamaStyleFamily::layer_tensors(c);
    t.insert(t.end(), {{"pre_feedforward_layernorm.weight", {c.hidden_size}, TpSplit::Replicated},
                       {"post_feedforward_layernorm.weight", {c.hidden_size}, TpSplit::Replicated}});
    return t;
  }
  // Always spelled out: a file may give only Gemma-3's sliding_window_pattern, or nothing (Gemma-2).
  std::vector<std::string> layer_config_fields() const override { return {"layer_types"}; }
  std::map<std::string, nlohmann::json> layer_config_lists(const ModelConfig& c) const override {
    return {{"layer_types", layer_types_json(c)}};
  }

 protected:
  // What both read alike, with their HF config classes' defaults where a field is absent;
  // `pattern`: every pattern-th layer is global when layer_types is absent.
  void read_gemma(ModelConfig& c, const nlohmann::json& j, const std::string& src, int64_t pattern, int64_t positions,
                  double final_softcap, double attn_softcap) const {
    read_sizes(c, j, src, "intermediate_size");
    c.rotary = true;
    c.num_kv_heads = json_field_or<int64_t>(j, "num_key_value_heads", 4, src);
    c.head_dim = json_field_or<int64_t>(j, "head_dim", 256, src);
    require_positive(c.head_dim, "head_dim", src);
    c.max_positions = json_field_or<int64_t>(j, "max_position_embeddings", positions, src);
    c.word_embed_proj_dim = c.hidden_size;
    c.norm_eps = json_field_or<double>(j, "rms_norm_eps", 1e-6, src);
    // The MLP's activation is hidden_activation; Gemma's files also carry hidden_act, which HF ignores.
    c.activation = json_field_or<std::string>(j, "hidden_activation", "gelu_pytorch_tanh", src);
    c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", true, src);
    c.attention_bias = json_field_or<bool>(j, "attention_bias", false, src);
    c.qkv_bias = c.out_bias = c.attention_bias;
    c.mlp_bias = false;
    if (json_field_or<bool>(j, "use_bidirectional_attention", false, src))
      fail("{}: field 'use_bidirectional_attention' (attention without the causal mask) is not supported", src);
    const double scalar = json_field_or<double>(j, "query_pre_attn_scalar", 256.0, src);
    if (!(scalar > 0)) fail("{}: field 'query_pre_attn_scalar' must be positive, got {}", src, scalar);
    c.attention_scale = 1.0 / std::sqrt(scalar);
    c.attention_softcap = read_softcap(j, "attn_logit_softcapping", attn_softcap, src);
    c.logit_softcap = read_softcap(j, "final_logit_softcapping", final_softcap, src);
    c.attention_dropout = json_field_or<double>(j, "attention_dropout", 0.0, src);
    c.pad_token_id = json_field_or<int64_t>(j, "pad_token_id", 0, src);
    c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", 2, src);
    c.eos_token_id = read_eos_token_id(j, 1, src);

    const int64_t window = read_sliding_window(j, 4096, src);
    std::vector<bool> sliding;
    if (j.contains("layer_types") && !j.at("layer_types").is_null()) {
      sliding = read_layer_types(c, j, src);
    } else {
      if (j.contains("sliding_window_pattern") && !j.at("sliding_window_pattern").is_null()) {
        pattern = json_field<int64_t>(j, "sliding_window_pattern", src);
        require_positive(pattern, "sliding_window_pattern", src);
      }
      for (int64_t l = 0; l < c.num_layers; ++l) sliding.push_back((l + 1) % pattern != 0);
    }
    const bool any = std::find(sliding.begin(), sliding.end(), true) != sliding.end();
    if (any && window == 0) fail("{}: layers slide ('sliding_attention') but field 'sliding_window' is null", src);
    c.sliding_window = any ? window : 0;
    c.sliding_layers = any ? sliding : std::vector<bool>{};
  }
};

class Gemma2Family : public GemmaFamily {
 public:
  std::vector<std::string> model_types() const override { return {"gemma2"}; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_gemma(c, j, src, /*pattern=*/2, 8192, /*final_softcap=*/30.0, /*attn_softcap=*/50.0);
    // transformers 5 writes rope_parameters; older files rope_theta (and possibly rope_scaling).
    if (j.contains("rope_parameters") && !j.at("rope_parameters").is_null()) {
      const auto rs = json_field<nlohmann::json>(j, "rope_parameters", src);
      c.rope_theta = json_field_or<double>(rs, "rope_theta", 10000.0, src + " rope_parameters");
      c.rope_scaling = read_rope_scaling(rs, src + " rope_parameters");
    } else {
      c.rope_theta = json_field_or<double>(j, "rope_theta", 10000.0, src);
      if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
        c.rope_scaling = read_rope_scaling(json_field<nlohmann::json>(j, "rope_scaling", src), src + " rope_scaling");
    }
    if (!(c.rope_theta > 0)) fail("{}: rope_theta must be positive, got {}", src, c.rope_theta);
  }
};

class Gemma3Family : public GemmaFamily {
 public:
  std::vector<std::string> model_types() const override { return {"gemma3_text"}; }
  bool qk_norm() const override { return true; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_gemma(c, j, src, /*pattern=*/6, 131072, /*final_softcap=*/0, /*attn_softcap=*/0);
    // transformers 5: rope_parameters per layer type; the hub's files: rope_theta (global),
    // rope_local_base_freq (sliding) and rope_scaling (global only).
    nlohmann::json global = nlohmann::json::object(), local = nlohmann::json::object();
    std::string gwhere = src + " rope_scaling", lwhere = src;
    if (j.contains("rope_parameters") && !j.at("rope_parameters").is_null()) {
      const auto rp = json_field<nlohmann::json>(j, "rope_parameters", src);
      if (!rp.contains("full_attention") && !rp.contains("sliding_attention"))
        fail("{}: field 'rope_parameters' must hold 'full_attention' and 'sliding_attention' entries", src);
      if (rp.contains("full_attention")) global = json_field<nlohmann::json>(rp, "full_attention", src);
      if (rp.contains("sliding_attention")) local = json_field<nlohmann::json>(rp, "sliding_attention", src);
      gwhere = src + " rope_parameters.full_attention";
      lwhere = src + " rope_parameters.sliding_attention";
    } else {
      if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
        global = json_field<nlohmann::json>(j, "rope_scaling", src);
      global["rope_theta"] = json_field_or<double>(j, "rope_theta", 1e6, src);
      local["rope_theta"] = json_field_or<double>(j, "rope_local_base_freq", 10000.0, src);
    }
    c.rope_theta = json_field_or<double>(global, "rope_theta", 1e6, gwhere);
    c.rope_scaling = read_rope_scaling(global, gwhere);
    c.sliding_rope_theta = json_field_or<double>(local, "rope_theta", 10000.0, lwhere);
    if (read_rope_scaling(local, lwhere))
      fail("{}: a scaled rotary embedding on sliding layers is not supported (expected rope_type 'default')", lwhere);
    if (!(c.rope_theta > 0) || !(c.sliding_rope_theta > 0))
      fail("{}: rope_theta must be positive, got {} (global) and {} (sliding)", src, c.rope_theta,
           c.sliding_rope_theta);
  }
};

}  // namespace

const ModelFamily& gemma2_family() {
  static const Gemma2Family family;
  return family;
}

const ModelFamily& gemma3_family() {
  static const Gemma3Family family;
  return family;
}

}  // namespace crash
