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
// Qwen2 and Qwen3 store sliding-window settings that are inert unless switched on: refuses them on.
// Reads num_layers from `c`: layer_types must list one entry per layer.
void refuse_sliding_window(const ModelConfig& c, const nlohmann::json& j, const std::string& source);

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

}  // namespace crash
