// OPT (facebook/opt-*): learned positions offset by 2, LayerNorm before (or, as in
// OPT-350m, after) each block, ReLU MLP, optional project_in/project_out.
#include "framework/config.h"
#include "framework/json_fields.h"
#include "framework/models/blocks.h"
#include "framework/models/decoder.h"
#include "framework/models/dropout.h"
#include "framework/models/family.h"
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

 private:
  VocabParallelEmbedding embed_tokens{nullptr};
  torch::nn::Embedding embed_positions{nullptr};
  torch::nn::Linear project_in{nullptr}, project_out{nullptr};
  ColumnParallelLinear lm_head{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};

class OptFamily : public ModelFamily {
 public:
  std::vector<std::string> model_types() const override { return {"opt"}; }

  void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& src) const override {
    read_sizes(c, j, src, "ffn_dim");
    c.num_kv_heads = c.num_heads;
    c.max_positions = json_field<int64_t>(j, "max_position_embeddings", src);
    c.word_embed_proj_dim = json_field_or<int64_t>(j, "word_embed_proj_dim", c.hidden_size, src);
    c.pre_norm = json_field_or<bool>(j, "do_layer_norm_before", true, src);
    bool removed = json_field_or<bool>(j, "_remove_final_layer_norm", false, src);
    c.final_norm = c.pre_norm && !removed;
    c.linear_bias = json_field_or<bool>(j, "enable_bias", true, src);
    c.norm_affine = json_field_or<bool>(j, "layer_norm_elementwise_affine", true, src);
    c.activation = json_field_or<std::string>(j, "activation_function", "relu", src);
    c.norm_eps = 1e-5;  // OPT uses nn.LayerNorm's default
    c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", true, src);
    c.dropout = json_field_or<double>(j, "dropout", 0.1, src);  // OPTConfig's default
    c.attention_dropout = json_field_or<double>(j, "attention_dropout", 0.0, src);
    c.activation_dropout = json_field_or<double>(j, "activation_dropout", 0.0, src);
    c.pad_token_id = json_field_or<int64_t>(j, "pad_token_id", 1, src);
    c.bos_token_id = json_field_or<int64_t>(j, "bos_token_id", 2, src);
    c.eos_token_id = json_field_or<int64_t>(j, "eos_token_id", 2, src);
  }

  std::shared_ptr<CausalLM> build(const ModelConfig& c, const ModelShard& shard) const override {
    return std::make_shared<OptLM>(c, shard);
  }
  std::string embedding_name() const override { return "model.decoder.embed_tokens.weight"; }
  std::string layer_prefix() const override { return "model.decoder.layers."; }

  std::vector<TensorSpec> layer_tensors(const ModelConfig& c) const override {
    const int64_t H = c.hidden_size, F = c.intermediate_size;
    const auto col = TpSplit::Column, row = TpSplit::Row, rep = TpSplit::Replicated;
    std::vector<TensorSpec> t;
    for (const char* p : {"q_proj", "k_proj", "v_proj"}) {
      t.push_back({std::string("self_attn.") + p + ".weight", {H, H}, col});
      if (c.linear_bias) t.push_back({std::string("self_attn.") + p + ".bias", {H}, col});
    }
    t.push_back({"self_attn.out_proj.weight", {H, H}, row});
    if (c.linear_bias) t.push_back({"self_attn.out_proj.bias", {H}, rep});
    t.push_back({"fc1.weight", {F, H}, col});
    if (c.linear_bias) t.push_back({"fc1.bias", {F}, col});
    t.push_back({"fc2.weight", {H, F}, row});
    if (c.linear_bias) t.push_back({"fc2.bias", {H}, rep});
    if (c.norm_affine)
      for (const char* n : {"self_attn_layer_norm", "final_layer_norm"})
        for (const char* p : {".weight", ".bias"}) t.push_back({std::string(n) + p, {H}, rep});
    return t;
  }

  std::vector<TensorSpec> outer_tensors(const ModelConfig& c) const override {
    const int64_t H = c.hidden_size, P = c.word_embed_proj_dim, V = c.vocab_size;
    std::vector<TensorSpec> t = {
        {"model.decoder.embed_tokens.weight", {V, P}, TpSplit::Vocab},
        {"model.decoder.embed_positions.weight", {c.max_positions + 2, H}, TpSplit::Replicated}};
    if (c.has_projection())
      t.insert(t.end(), {{"model.decoder.project_in.weight", {H, P}, TpSplit::Replicated},
                         {"model.decoder.project_out.weight", {P, H}, TpSplit::Replicated}});
    if (c.final_norm && c.norm_affine)
      t.insert(t.end(), {{"model.decoder.final_layer_norm.weight", {H}, TpSplit::Replicated},
                         {"model.decoder.final_layer_norm.bias", {H}, TpSplit::Replicated}});
    if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {V, P}, TpSplit::Vocab});
    return t;
  }
};

}  // namespace

const ModelFamily& opt_family() {
  static const OptFamily family;
  return family;
}

}  // namespace crash
