// Mistral (MistralForCausalLM): LLaMA without biases, with an explicit head_dim (hidden / heads
// when absent) and sliding-window attention on every layer (`sliding_window`; null: none, as in
// Mistral-7B v0.2 and later). MistralModel ignores layer_types, and so does this.
#include "framework/config.h"
#include "framework/json_fields.h"
#include "framework/models/llama.h"

namespace crash {

namespace {

class MistralFamily : public LlamaStyleFamily {
 public:
  std::vector<std::string> model_types() const override { return {"mistral"}; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_llama_style(c, j, src);
    // MistralConfig has neither attention_bias nor mlp_bias: no Linear has a bias.
    c.attention_bias = c.qkv_bias = c.out_bias = c.mlp_bias = false;
    c.max_positions = json_field_or<int64_t>(j, "max_position_embeddings", 4096 * 32, src);
    c.sliding_window = read_sliding_window(j, 4096, src);  // 4096: MistralConfig's default
  }
};

}  // namespace

const ModelFamily& mistral_family() {
  static const MistralFamily family;
  return family;
}

}  // namespace crash
