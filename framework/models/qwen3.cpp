// Qwen3 (Qwen3ForCausalLM): LLaMA with an RMSNorm over each head of the queries and keys
// (q_norm, k_norm of size head_dim) before the rotary embedding, and an explicit head_dim
// (128 when absent, as in Qwen3Config). Biases follow `attention_bias` (all four projections).
// Sliding-window layers as in Qwen2 (read_qwen_style).
#include "framework/config.h"
#include "framework/models/llama.h"

namespace crash {

namespace {

class Qwen3Family : public QwenFamily {
 public:
  std::vector<std::string> model_types() const override { return {"qwen3"}; }
  bool qk_norm() const override { return true; }
  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_qwen_style(c, j, src);
    if (c.head_dim == 0) c.head_dim = 128;  // Qwen3Config's default, not hidden / heads
    c.qkv_bias = c.out_bias = c.attention_bias;
    c.mlp_bias = false;
  }
};

}  // namespace

const ModelFamily& qwen3_family() {
  static const Qwen3Family family;
  return family;
}

}  // namespace crash
