// What the LLaMA-style families share: RMSNorm, rotary positions,
// grouped-query attention, a SwiGLU MLP, tied or untied embeddings. A family of this kind
// derives from LlamaStyleFamily and reads its own fields after read_llama_style().
#pragma once
#include "framework/models/family.h"

namespace crash {

// The LLaMA fields (sizes, GQA heads, explicit head_dim, rms_norm_eps, hidden_act, biases,
// rope_theta / rope_parameters / rope_scaling, tied embeddings, token ids); a rope type other
// than default or llama3, or a mixture-of-experts field, fails naming it.
void read_llama_style(ModelConfig& c, const nlohmann::json& j, const std::string& source);

class LlamaStyleFamily : public ModelFamily {
 public:
  std::shared_ptr<CausalLM> build(const ModelConfig& c, const ModelShard& shard) const override;
  std::string embedding_name() const override { return "model.embed_tokens.weight"; }
  std::string layer_prefix() const override { return "model.layers."; }
  std::vector<TensorSpec> layer_tensors(const ModelConfig& c) const override;
  std::vector<TensorSpec> outer_tensors(const ModelConfig& c) const override;
};

}  // namespace crash
