// What the LLaMA-style families (LLaMA, Qwen2, Qwen3, Mistral, Gemma-2, Gemma-3) share: RMSNorm,
// rotary positions, grouped-query attention, a gated MLP, tied or untied embeddings. A family of
// this kind derives from LlamaStyleFamily and reads its own fields after read_llama_style().
#pragma once
#include "framework/models/blocks.h"
#include "framework/models/family.h"
#include "framework/models/layer_stack.h"

#include <cmath>
#include <optional>

namespace crash {

// The LLaMA fields (sizes, GQA heads, explicit head_dim, rms_norm_eps, hidden_act, biases,
// rope_theta / rope_parameters / rope_scaling, tied embeddings, token ids); a rope type other
// than default, linear or llama3, or a mixture-of-experts field, fails naming it.
void read_llama_style(ModelConfig& c, const nlohmann::json& j, const std::string& source);
// One rope_scaling / rope_parameters object's scaling: none for "default", else llama3 or linear;
// any other type fails naming `where`.
std::optional<RopeScaling> read_rope_scaling(const nlohmann::json& rs, const std::string& where);
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
  // Gemma's RMSNorm, x_hat * (1 + w), everywhere.
  virtual bool unit_offset_norms() const { return false; }
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

// gate_proj, up_proj, down_proj: down(act(gate(x)) * up(x)).
class GatedMLP : public torch::nn::Module {
 public:
  GatedMLP(const ModelConfig& c, const CommPtr& tp);
  torch::Tensor forward(const torch::Tensor& x);
  ColumnParallelLinear gate_proj{nullptr}, up_proj{nullptr};
  RowParallelLinear down_proj{nullptr};

 private:
  std::string act_;
};

// The attention of a LLaMA-style layer as its family and config shape it.
SelfAttention llama_style_attention(const ModelConfig& c, const CommPtr& tp);

// The LLaMA-style CausalLM over decoder layers `Layer`: token embeddings (Gemma's scaled by
// sqrt(hidden) in the model's dtype), the layers, the final RMSNorm, a tied or untied head
// (Gemma-2's logits soft-capped).
template <class Layer>
class LlamaStyleLM : public LayerStackLM<Layer> {
  using Base = LayerStackLM<Layer>;

 public:
  LlamaStyleLM(const ModelConfig& config, const ModelShard& shard) : Base(config, shard) {
    const ModelConfig& c = this->config_;
    const bool gemma = static_cast<const LlamaStyleFamily&>(*c.family).unit_offset_norms();
    auto model = this->register_module("model", std::make_shared<Holder>());
    if (this->has_embedding())
      embed_tokens = model->register_module(
          "embed_tokens", this->place(VocabParallelEmbedding(c.vocab_size, c.hidden_size, this->tp_)));
    this->build_layers(*model);
    if (this->has_head()) {
      norm = model->register_module("norm", RMSNorm(c.hidden_size, c.norm_eps, nullptr, gemma));
      if (!c.tie_word_embeddings || !this->has_embedding())
        lm_head = this->register_module(
            "lm_head", this->place(ColumnParallelLinear(c.hidden_size, c.vocab_size, this->vocab_start(),
                                                        this->local_vocab(), false, this->tp_)));
    }
    if (gemma) embed_scale_ = std::sqrt(static_cast<double>(c.hidden_size));
    inv_freq_ = rotary_inverse_frequencies(c);
    if (c.sliding_rope_theta > 0) sliding_inv_freq_ = rotary_inverse_frequencies(c, /*sliding=*/true);
  }

  torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& positions) override {
    auto h = embed_tokens->forward(ids);
    // HF rounds the scale to the model's dtype first (sqrt(3072) is 55.5 in bfloat16).
    if (embed_scale_ > 0) h = h * torch::scalar_tensor(embed_scale_, h.options());
    return h;
  }
  torch::Tensor finish(const torch::Tensor& h) override { return norm->forward(h); }
  torch::Tensor head_local(const torch::Tensor& h) override {
    auto logits = lm_head ? lm_head->forward(h) : local_linear(copy_to_tp(h, this->tp_), embed_tokens->weight);
    return softcap_scores(logits, this->config_.logit_softcap);
  }
  torch::Tensor default_positions(const torch::Tensor& mask_all, int64_t new_tokens) const override {
    const int64_t total = mask_all.size(1);
    auto pos =
        torch::arange(total - new_tokens, total, torch::TensorOptions().dtype(torch::kInt64).device(mask_all.device()));
    return pos.unsqueeze(0).expand({mask_all.size(0), new_tokens});
  }

 protected:
  torch::Tensor rotary_inv_freq() const override { return inv_freq_; }
  torch::Tensor sliding_rotary_inv_freq() const override { return sliding_inv_freq_; }

 private:
  VocabParallelEmbedding embed_tokens{nullptr};
  ColumnParallelLinear lm_head{nullptr};
  RMSNorm norm{nullptr};
  torch::Tensor inv_freq_, sliding_inv_freq_;
  double embed_scale_ = 0;
};

}  // namespace crash
