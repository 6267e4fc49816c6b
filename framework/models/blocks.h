// Building blocks shared by the model families: attention with an optional rotary
// embedding and grouped-query heads, RMSNorm, activations.
#pragma once
#include <torch/torch.h>

#include <string>

#include "framework/models/decoder.h"

namespace crash {

// May work in place on x, which must be a fresh intermediate (a linear layer's output).
torch::Tensor activation(const std::string& name, torch::Tensor x);

class RMSNormImpl : public torch::nn::Module {
 public:
  // `tp`: set when each TP rank normalises only its own part of the rows (Qwen3's per-head q/k
  // norms): the weight's gradient is then summed over the group.
  // `unit_offset`: Gemma's norm, x_hat * (1 + weight), its weight starting at zero.
  RMSNormImpl(int64_t dim, double eps, CommPtr tp = nullptr, bool unit_offset = false);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
  CommPtr tp_;
  bool unit_offset_;
};
TORCH_MODULE(RMSNorm);

// Column- and row-parallel linear layers splitting `out` (or `in`) evenly over the TP group.
ColumnParallelLinear column_linear(int64_t in, int64_t out, bool bias, const CommPtr& tp);
RowParallelLinear row_linear(int64_t in, int64_t out, bool bias, const CommPtr& tp);

// Full-model head counts; the attention keeps its TP rank's share.
struct AttentionShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  CommPtr tp;
  bool qkv_bias = false, out_bias = false;
  bool rotary = false;
  bool qk_norm = false;           // RMSNorm over each head of q and k before the rotary embedding (Qwen3, Gemma-3)
  bool norm_unit_offset = false;  // those norms as Gemma's (RMSNormImpl)
  double norm_eps = 1e-6;
  std::string out_name = "o_proj";  // OPT calls it out_proj
};

class SelfAttentionImpl : public torch::nn::Module {
 public:
  explicit SelfAttentionImpl(const AttentionShape& shape);
  // `layer`: the model's layer number (a dropout key).
  torch::Tensor forward(const torch::Tensor& h, const AttentionContext& ctx, LayerCache* cache, int64_t layer);

  ColumnParallelLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr};
  RowParallelLinear out_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};

 private:
  int64_t heads_, kv_heads_, head_dim_;  // this rank's
  int64_t first_head_;                   // the model's number of this rank's first query head
  bool rotary_;
};
TORCH_MODULE(SelfAttention);

// Rotary tables for positions [B, T]: cos and sin [B, T, head_dim], as HF computes them.
std::pair<torch::Tensor, torch::Tensor> rotary_tables(const torch::Tensor& inv_freq, const torch::Tensor& positions,
                                                      torch::ScalarType dtype);
// HF's inverse frequencies, with llama3 or linear scaling when configured; `sliding`: those of
// the sliding layers (their own base, unscaled, where the config gives one).
torch::Tensor rotary_inverse_frequencies(const ModelConfig& c, bool sliding = false);
// cap * tanh(x / cap); x itself when cap is 0.
torch::Tensor softcap_scores(const torch::Tensor& x, double cap);

}  // namespace crash
