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
  if (method == "max") return h.masked_fill(mask.unsqueeze(-1) == 0, -std::numeric_limits<float>::infinity()).amax(1);
  fail("--pooling: unknown method '{}'", method);
}

torch::Tensor pool_packed(const torch::Tensor& hidden, const std::vector<int64_t>& offsets, const std::string& method) {
  auto h = hidden.to(torch::kFloat32);
  const int64_t B = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<int64_t> row_of, position;  // each token's row, and its place 1..n in it
  row_of.reserve(static_cast<size_t>(h.size(0)));
  position.reserve(static_cast<size_t>(h.size(0)));
  for (int64_t b = 0; b < B; ++b) {
    if (offsets[b + 1] <= offsets[b]) fail("pooling: row {} of a packed pass has no tokens", b);
    for (int64_t t = offsets[b]; t < offsets[b + 1]; ++t) {
      row_of.push_back(b);
      position.push_back(t - offsets[b] + 1);
    }
  }
  auto dev = h.device();
  auto rows = torch::tensor(row_of, torch::kInt64).to(dev);
  auto lengths = torch::tensor(std::vector<int64_t>(offsets.begin() + 1, offsets.end()), torch::kInt64) -
                 torch::tensor(std::vector<int64_t>(offsets.begin(), offsets.end() - 1), torch::kInt64);
  auto len = lengths.to(torch::kFloat32).to(dev).unsqueeze(1);
  auto sums = [&](const torch::Tensor& x) { return torch::zeros({B, h.size(1)}, h.options()).index_add_(0, rows, x); };
  if (method == "mean") return sums(h) / len;
  if (method == "mean_weighted") {
    // Position weights 1..n over n(n + 1) / 2, as pool_hidden normalises them.
    auto w = torch::tensor(position, torch::kInt64).to(dev).to(torch::kFloat32) /
             (len * (len + 1) / 2).squeeze(1).index_select(0, rows);
    return sums(h * w.unsqueeze(1));
  }
  if (method == "last") {
    auto last = torch::tensor(std::vector<int64_t>(offsets.begin() + 1, offsets.end()), torch::kInt64) - 1;
    return h.index_select(0, last.to(dev));
  }
  if (method == "max")
    return torch::full({B, h.size(1)}, -std::numeric_limits<float>::infinity(), h.options())
        .index_reduce_(0, rows, h, "amax", /*include_self=*/true);
  fail("--pooling: unknown method '{}'", method);
}

torch::Tensor unpooled_rows(const torch::Tensor& hidden, const torch::Tensor& mask) {
  auto keep = mask.to(hidden.device()).to(torch::kBool);
  return hidden.to(torch::kFloat32).index({keep});
}

}  // namespace crash
