// What the LLaMA-style families (LLaMA, Qwen2, Qwen3) share: RMSNorm, rotary positions,
// grouped-query attention, a SwiGLU MLP, tied or untied embeddings. A family of this kind
// derives from LlamaStyleFamily and reads its own fields after read_llama_style().
#pragma once
#include "framework/models/family.h"

namespace crash {

// The LLaMA fields (sizes, GQA heads, explicit head_dim, rms_norm_eps, hidden_act, biases,
// rope_theta / rope_parameters / rope_scaling, tied embeddings, token ids); a rope type other
// than default or llama3, or a mixture-of-experts field, fails naming it.
void read_llama_style(ModelConfig& c, const nlohmann::json& j, const std::string& source);
// What Qwen2 and Qwen3 read alike: the LLaMA fields with Qwen's defaults (32768 positions, no
// BOS, a null eos_token_id meaning none) and the sliding-window settings as their HF configs read
// them: sliding_window (default 4096) counts only with use_sliding_window; layer_types, when given,
// says which layers slide, otherwise the layers from max_window_layers (default 28) on do. A
// sliding layer without a window fails, as it does in HF.
void read_qwen_style(ModelConfig& c, const nlohmann::json& j, const std::string& source);

class LlamaStyleFamily : public ModelFamily {
 public:
  // An RMSNorm over each head of q and k (q_norm, k_norm of size head_dim) before the rotary embedding.
  virtual bool qk_norm() const { return false; }
  std::shared_ptr<CausalLM> build(const ModelConfig& c, const ModelShard& shard) const override;
  std::string embedding_name() const override { return "model.embed_tokens.weight"; }
  std::string layer_prefix() const override { return "model.layers."; }
  std::vector<TensorSpec> layer_tensors(const ModelConfig& c) const override;
  std::vector<TensorSpec> outer_tensors(const ModelConfig& c) const override;
};

// Qwen2 and Qwen3: layer_types re-indexed by an emulator's slots, spelled out from
// max_window_layers where config.json has no list.
class QwenFamily : public LlamaStyleFamily {
 public:
  std::vector<std::string> layer_config_fields() const override { return {"layer_types"}; }
  std::map<std::string, nlohmann::json> layer_config_lists(const ModelConfig& c) const override;
};

}  // namespace crash
