// LLaMA family (LlamaForCausalLM): RMSNorm, rotary positions (llama3 scaling optional),
// grouped-query attention, SwiGLU MLP, tied or untied embeddings.
#include "framework/models/blocks.h"
#include "framework/models/decoder.h"
#include "framework/models/dropout.h"
#include "framework/models/layer_stack.h"

namespace crash {

namespace {

class LlamaMLP : public torch::nn::Module {
 public:
  LlamaMLP(const ModelConfig& c, const CommPtr& tp) : act_(c.activation) {
    gate_proj = register_module("gate_proj", column_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, tp));
    up_proj = register_module("up_proj", column_linear(c.hidden_size, c.intermediate_size, c.mlp_bias, tp));
    down_proj = register_module("down_proj", row_linear(c.intermediate_size, c.hidden_size, c.mlp_bias, tp));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return down_proj->forward(activation(act_, gate_proj->forward(x)) * up_proj->forward(x));
  }
  ColumnParallelLinear gate_proj{nullptr}, up_proj{nullptr};
  RowParallelLinear down_proj{nullptr};

 private:
  std::string act_;
};

class LlamaLayer : public torch::nn::Module {
 public:
  LlamaLayer(const ModelConfig& c, const CommPtr& tp) {
    AttentionShape s;
    s.tp = tp;
    s.hidden = c.hidden_size;
    s.heads = c.num_heads;
    s.kv_heads = c.num_kv_heads;
    s.head_dim = c.head_dim;
    s.qkv_bias = s.out_bias = c.attention_bias;
    s.rotary = true;
    self_attn = register_module("self_attn", SelfAttention(s));
    mlp = register_module("mlp", std::make_shared<LlamaMLP>(c, tp));
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
  std::shared_ptr<LlamaMLP> mlp;
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};

class LlamaLM : public LayerStackLM<LlamaLayer> {
 public:
  LlamaLM(const ModelConfig& config, const ModelShard& shard) : LayerStackLM(config, shard) {
    const ModelConfig& c = config_;
    auto model = register_module("model", std::make_shared<Holder>());
    if (has_embedding())
      embed_tokens =
          model->register_module("embed_tokens", place(VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp_)));
    build_layers(*model);
    if (has_head()) {
      norm = model->register_module("norm", RMSNorm(c.hidden_size, c.norm_eps));
      if (!c.tie_word_embeddings || !has_embedding())
        lm_head = register_module("lm_head", place(ColumnParallelLinear(c.hidden_size, c.vocab_size, vocab_start(),
                                                                        local_vocab(), false, tp_)));
    }
    inv_freq_ = rotary_inverse_frequencies(c);
  }

  torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& positions) override {
    return embed_tokens->forward(ids);
  }
  torch::Tensor finish(const torch::Tensor& h) override { return norm->forward(h); }
  torch::Tensor head_local(const torch::Tensor& h) override {
    return lm_head ? lm_head->forward(h) : local_linear(copy_to_tp(h, tp_), embed_tokens->weight);
  }
  torch::Tensor default_positions(const torch::Tensor& mask_all, int64_t new_tokens) const override {
    const int64_t total = mask_all.size(1);
    auto pos =
        torch::arange(total - new_tokens, total, torch::TensorOptions().dtype(torch::kInt64).device(mask_all.device()));
    return pos.unsqueeze(0).expand({mask_all.size(0), new_tokens});
  }

 protected:
  torch::Tensor rotary_inv_freq() const override { return inv_freq_; }
  std::string tied_embedding_name() const override { return "model.embed_tokens.weight"; }

 private:
  VocabParallelEmbedding embed_tokens{nullptr};
  ColumnParallelLinear lm_head{nullptr};
  RMSNorm norm{nullptr};
  torch::Tensor inv_freq_;
};

}  // namespace

std::shared_ptr<CausalLM> build_llama(const ModelConfig& config, const ModelShard& shard) {
  return std::make_shared<LlamaLM>(config, shard);
}

}  // namespace crash
