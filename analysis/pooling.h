// Pooling a layer's hidden states [B, T, d] over each example's non-padding tokens.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace crash {

// mean, mean_weighted (position weights 1..n normalised), last, max; float32 results [B, d].
// `none` is not pooling: see unpooled_rows.
torch::Tensor pool_hidden(const torch::Tensor& hidden, const torch::Tensor& mask, const std::string& method);
// The same pooling over a packed pass's hidden states [N, d]: row b's tokens are
// [offsets[b], offsets[b + 1]) (TokenPacking::row_offsets). Rows must not be empty.
torch::Tensor pool_packed(const torch::Tensor& hidden, const std::vector<int64_t>& offsets, const std::string& method);
// The non-padding token rows of every example, in order: [sum of lengths, d].
torch::Tensor unpooled_rows(const torch::Tensor& hidden, const torch::Tensor& mask);
// Throws UserError for an unknown method name.
void check_pooling(const std::string& method);

}  // namespace crash
