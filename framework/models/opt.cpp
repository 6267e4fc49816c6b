// OPT (facebook/opt-*): learned positions offset by 2, LayerNorm before (or, as in
// OPT-350m, after) each block, ReLU MLP, optional project_in/project_out.
#include "framework/models/blocks.h"
#include "framework/models/decoder.h"
#include "framework/models/dropout.h"
#include "framework/models/layer_stack.h"

namespace crash {

namespace {

torch::nn::LayerNorm layer_norm(const ModelConfig& c) {
  return torch::nn::LayerNorm(
      torch::nn::LayerNormOptions({c.hidden_size}).eps(c.norm_eps).elementwise_affine(c.norm_affine));
}

class OptLayer : public torch::nn::Module {
 public:
  OptLayer(const ModelConfig& c, const CommPtr& tp) : pre_norm_(c.pre_norm), act_(c.activation) {
    AttentionShape s;
    s.tp = tp;
    s.hidden = c.hidden_size;
    s.heads = s.kv_heads = c.num_heads;
    s.head_dim = c.head_dim;
    s.qkv_bias = s.out_bias = c.linear_bias;
    s.out_name = "out_proj";
    self_attn = register_module("self_attn", SelfAttention(s));
    self_attn_layer_norm = register_module("self_attn_layer_norm", layer_norm(c));
    fc1 = register_module("fc1", column_linear(c.hidden_size, c.intermediate_size, c.linear_bias, tp));
    fc2 = register_module("fc2", row_linear(c.intermediate_size, c.hidden_size, c.linear_bias, tp));
    final_layer_norm = register_module("final_layer_norm", layer_norm(c));
  }

  // HF's OPTDecoderLayer: `dropout` on the attention and fc2 outputs before their residual adds,
  // `attention_dropout` inside attention; HF applies neither `activation_dropout` nor any
  // dropout to the embeddings, and neither does this.
  torch::Tensor forward(torch::Tensor h, const AttentionContext& ctx, LayerCache* cache, int64_t layer) {
    auto residual = h;
    if (pre_norm_) h = self_attn_layer_norm->forward(h);
    h = self_attn->forward(h, ctx, cache, layer);
    if (ctx.dropout_hidden()) h = residual_dropout(h, ctx, layer, DropoutSite::AttentionOutput);
    h = h.add_(residual);
    if (!pre_norm_) h = self_attn_layer_norm->forward(h);
    residual = h;
    if (pre_norm_) h = final_layer_norm->forward(h);
    h = fc2->forward(activation(act_, fc1->forward(h)));
    if (ctx.dropout_hidden()) h = residual_dropout(h, ctx, layer, DropoutSite::MlpOutput);
    h = h.add_(residual);
    if (!pre_norm_) h = final_layer_norm->forward(h);
    return h;
  }

  SelfAttention self_attn{nullptr};
  torch::nn::LayerNorm self_attn_layer_norm{nullptr}, final_layer_norm{nullptr};
  ColumnParallelLinear fc1{nullptr};
  RowParallelLinear fc2{nullptr};

 private:
  bool pre_norm_;
  std::string act_;
};

class OptLM : public LayerStackLM<OptLayer> {
 public:
  OptLM(const ModelConfig& config, const ModelShard& shard) : LayerStackLM(config, shard) {
    const ModelConfig& c = config_;
    auto model = register_module("model", std::make_shared<Holder>());
    auto decoder = model->register_module("decoder", std::make_shared<Holder>());
    const bool proj = c.has_projection();
    if (has_embedding()) {
      embed_tokens = decoder->register_module("embed_tokens",
                                              place(VocabParallelEmbedding(c.vocab_size, c.word_embed_proj_dim, tp_)));
      torch::nn::EmbeddingOptions positions(c.max_positions + 2, c.hidden_size);
      if (SkipParameterInit::active()) positions._weight(torch::empty({c.max_positions + 2, c.hidden_size}));
      embed_positions = decoder->register_module("embed_positions", torch::nn::Embedding(positions));
      if (proj)
        project_in = decoder->register_module(
            "project_in",
            torch::nn::Linear(torch::nn::LinearOptions(c.word_embed_proj_dim, c.hidden_size).bias(false)));
    }
    build_layers(*decoder);
    if (has_head()) {
      if (c.final_norm) final_layer_norm = decoder->register_module("final_layer_norm", layer_norm(c));
      if (proj)
        project_out = decoder->register_module(
            "project_out",
            torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.word_embed_proj_dim).bias(false)));
      if (!c.tie_word_embeddings || !has_embedding())
        lm_head = register_module("lm_head", place(ColumnParallelLinear(c.word_embed_proj_dim, c.vocab_size,
                                                                        vocab_start(), local_vocab(), false, tp_)));
    }
  }

  torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& positions) override {
    auto h = embed_tokens->forward(ids);
    if (project_in) h = project_in->forward(h);
    return h + embed_positions->forward(positions + 2);
  }

  torch::Tensor finish(const torch::Tensor& h_in) override {
    auto h = h_in;
    if (final_layer_norm) h = final_layer_norm->forward(h);
    if (project_out) h = project_out->forward(h);
    return h;
  }

  torch::Tensor head_local(const torch::Tensor& h) override {
    return lm_head ? lm_head->forward(h) : local_linear(copy_to_tp(h, tp_), embed_tokens->weight);
  }

  torch::Tensor default_positions(const torch::Tensor& mask_all, int64_t new_tokens) const override {
    auto m = mask_all.to(torch::kInt64);
    auto pos = m.cumsum(1) * m - 1;
    return pos.narrow(1, m.size(1) - new_tokens, new_tokens);
  }

 protected:
  std::string tied_embedding_name() const override { return "model.decoder.embed_tokens.weight"; }

 private:
  VocabParallelEmbedding embed_tokens{nullptr};
  torch::nn::Embedding embed_positions{nullptr};
  torch::nn::Linear project_in{nullptr}, project_out{nullptr};
  ColumnParallelLinear lm_head{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};

}  // namespace

std::shared_ptr<CausalLM> build_opt(const ModelConfig& config, const ModelShard& shard) {
  return std::make_shared<OptLM>(config, shard);
}

}  // namespace crash
