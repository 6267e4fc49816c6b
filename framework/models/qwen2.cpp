// Qwen2 and Qwen2.5 (Qwen2ForCausalLM): LLaMA with biases on the q, k and v projections (none
// on o_proj or the MLP), tied or untied embeddings, sliding-window attention on the layers
// use_sliding_window and max_window_layers (or layer_types) pick.
#include "framework/config.h"
#include "framework/models/llama.h"

namespace crash {

namespace {

class Qwen2Family : public QwenFamily {
 public:
  std::vector<std::string> model_types() const override { return {"qwen2"}; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_qwen_style(c, j, src);
    // Qwen2Config has neither attention_bias nor mlp_bias: its layout is fixed.
    c.attention_bias = false;
    c.qkv_bias = true;
    c.out_bias = false;
    c.mlp_bias = false;
  }
};

}  // namespace

const ModelFamily& qwen2_family() {
  static const Qwen2Family family;
  return family;
}

}  // namespace crash
