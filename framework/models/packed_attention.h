// Causal attention within each row of a packed pass (TokenPacking): every row attends over its
// own tokens only, so no work goes to padding.
#pragma once
#include <torch/torch.h>

#include "framework/models/decoder.h"

namespace crash {

// q [1, H, N, D], k and v [1, KV, N, D] (H a multiple of KV: grouped-query heads share theirs),
// rows as ctx.row_offsets says. Returns [1, N, H * D]. On CPU in float32 without autograd the
// rows run in parallel through oneDNN's small-matrix kernels (where the build has oneDNN);
// elsewhere through torch, row by row. With attention dropout in ctx (training) the torch path
// runs, and `layer` and `first_head` (the model's number of q's first head) key the masks.
// `layer` also picks ctx.bias_of(layer): a sliding layer attends within its window.
torch::Tensor packed_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const AttentionContext& ctx, int64_t layer = 0, int64_t first_head = 0);

// The torch path alone (the reference the fast path is tested against).
torch::Tensor packed_attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const AttentionContext& ctx, int64_t layer = 0, int64_t first_head = 0);

}  // namespace crash
