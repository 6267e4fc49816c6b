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
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

struct AttentionShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  bool qkv_bias = false, out_bias = false;
  bool rotary = false;
  std::string out_name = "o_proj";  // OPT calls it out_proj
};

class SelfAttentionImpl : public torch::nn::Module {
 public:
  explicit SelfAttentionImpl(const AttentionShape& shape);
  torch::Tensor forward(const torch::Tensor& h, const AttentionContext& ctx, LayerCache* cache);

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};

 private:
  AttentionShape s_;
};
TORCH_MODULE(SelfAttention);

// Rotary tables for positions [B, T]: cos and sin [B, T, head_dim], as HF computes them.
std::pair<torch::Tensor, torch::Tensor> rotary_tables(const torch::Tensor& inv_freq, const torch::Tensor& positions,
                                                      torch::ScalarType dtype);
// HF's inverse frequencies, with llama3 scaling when configured.
torch::Tensor rotary_inverse_frequencies(const ModelConfig& c);

}  // namespace crash
