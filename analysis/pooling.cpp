#include "analysis/pooling.h"

#include <torch/torch.h>

#include <limits>

#include "parallel/errors.h"

namespace crash {

void check_pooling(const std::string& m) {
  if (m != "mean" && m != "mean_weighted" && m != "last" && m != "max" && m != "none")
    fail("--pooling: unknown method '{}' (expected mean, mean_weighted, last, max or none)", m);
}

torch::Tensor pool_hidden(const torch::Tensor& hidden, const torch::Tensor& mask_in, const std::string& method) {
  auto h = hidden.to(torch::kFloat32);
  auto mask = mask_in.to(h.device()).to(torch::kFloat32);  // [B, T]
  if (method == "mean") return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, true).clamp_min(1);
  if (method == "mean_weighted") {
    auto position = mask.cumsum(1) * mask;  // 1..n on tokens, 0 on padding
    auto w = position / position.sum(1, true).clamp_min(1);
    return (h * w.unsqueeze(-1)).sum(1);
  }
  if (method == "last") {
    auto last = (mask.cumsum(1) * mask).argmax(1);  // the token with the highest position
    return h.gather(1, last.view({-1, 1, 1}).expand({-1, 1, h.size(2)})).squeeze(1);
  }
  if (method == "max")
    return h.masked_fill(mask.unsqueeze(-1) == 0, -std::numeric_limits<float>::infinity()).amax(1);
  fail("--pooling: unknown method '{}'", method);
}

torch::Tensor unpooled_rows(const torch::Tensor& hidden, const torch::Tensor& mask) {
  auto keep = mask.to(hidden.device()).to(torch::kBool);
  return hidden.to(torch::kFloat32).index({keep});
}

}  // namespace crash
