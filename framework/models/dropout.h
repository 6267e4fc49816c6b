// Training-time dropout with masks that every grid agrees on.
//
// Megatron keeps one RNG state for activations replicated over tensor parallelism (the same
// mask on every TP rank) and another, offset per rank, for split ones. Here each mask is instead
// a pure function of a counter-based key (seed, step, slot in the global batch, layer, site,
// head) and of the element's index among the row's real tokens: replicated hidden states get
// the same mask on every TP rank, each head its own, and a TP, PP or DP run draws exactly the
// masks of the one-rank run, so its numbers stay comparable.
#pragma once
#include <torch/torch.h>

#include <cstdint>

#include "framework/models/decoder.h"

namespace crash {

enum class DropoutSite : uint64_t { AttentionOutput = 1, MlpOutput = 2, AttentionProbs = 3, LoraInput = 4 };

uint64_t dropout_key(uint64_t seed, int64_t step, int64_t slot, int64_t layer, DropoutSite site, int64_t head = 0);

// float32 [n]: element i is 0 with probability p, else 1 / (1 - p) (torch's scaling of kept
// units), a function of (key, i) alone.
torch::Tensor dropout_mask(uint64_t key, int64_t n, double p);

// A residual branch's output, x [B, T, d] (padded pass) or [1, N, d] (packed), with
// ctx.dropout->hidden; every TP rank holds all of d and draws the same mask.
torch::Tensor residual_dropout(const torch::Tensor& x, const AttentionContext& ctx, int64_t layer, DropoutSite site);

// Features [start, start + x.size(-1)) of `full` of x [B, T, ..] (padded pass) or [1, N, ..]
// (packed), with rate p under the key of (layer, site, stream): TP ranks that hold other features
// of the same activation draw their parts of one mask, which the one-rank run draws whole.
torch::Tensor feature_dropout(const torch::Tensor& x, const AttentionContext& ctx, int64_t layer, DropoutSite site,
                              int64_t stream, double p, int64_t full, int64_t start);

// The pass context and layer number of the decoder layer this thread runs (LayerStackLM::run_layer
// sets them), for the dropout of sub-modules that are given no context (LoRA's input).
class LayerPass {
 public:
  LayerPass(const AttentionContext& ctx, int64_t layer);
  ~LayerPass();
  LayerPass(const LayerPass&) = delete;
  LayerPass& operator=(const LayerPass&) = delete;
  static const AttentionContext* context();
  static int64_t layer();

 private:
  const AttentionContext* previous_ctx_;
  int64_t previous_layer_;
};

// Attention probabilities [B, H, T, T] of a padded pass whose heads are the model's
// [first_head, first_head + H), with ctx.dropout->attention.
torch::Tensor attention_probs_dropout(const torch::Tensor& probs, const AttentionContext& ctx, int64_t layer,
                                      int64_t first_head);

// Packed passes: row `row`'s probabilities [H, L, L].
torch::Tensor packed_row_probs_dropout(const torch::Tensor& probs, const AttentionContext& ctx, int64_t row,
                                       int64_t layer, int64_t first_head);

}  // namespace crash
