#include "analysis/importance.h"

#include <torch/torch.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel/errors.h"

namespace crash {

namespace {

constexpr auto kF64 = torch::kFloat64;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// Row-wise cosine of two [n, d] float64 matrices: [n].
torch::Tensor row_cosine(const torch::Tensor& a, const torch::Tensor& b) {
  return (a * b).sum(1) / (a.norm(2, 1) * b.norm(2, 1));
}

// Token offsets of the examples, N + 1 entries (a token-level archive's /index).
std::vector<int64_t> token_offsets(const ArchiveReader& archive) {
  auto index = h5_read(archive.path(), "index").to(torch::kInt64).contiguous();
  if (index.dim() != 1 || index.numel() != archive.num_examples() + 1)
    fail("{}: /index has {} entries for {} examples (expected N + 1 token offsets)", archive.path(), index.numel(),
         archive.num_examples());
  std::vector<int64_t> out(index.data_ptr<int64_t>(), index.data_ptr<int64_t>() + index.numel());
  for (size_t i = 0; i + 1 < out.size(); ++i)
    if (out[i + 1] <= out[i]) fail("{}: example {} has no tokens in /index", archive.path(), i);
  if (out.front() != 0 || out.back() != archive.num_rows())
    fail("{}: /index runs {}..{} but the layers hold {} token rows", archive.path(), out.front(), out.back(),
         archive.num_rows());
  return out;
}

}  // namespace

void check_importance_archive(const ArchiveReader& archive, const ImportanceOptions& options) {
  if (archive.num_layers() < 2)
    fail("{}: an archive of {} hidden states has no layer to score", archive.path(), archive.num_layers());
  if (!archive.pooled()) return;
  const std::string pooling = archive.attribute("pooling");
  if (options.block_influence)
    fail("{}: block influence needs every token, but this archive is pooled ({}); collect it with --pooling none",
         archive.path(), pooling.empty() ? "unknown pooling" : pooling);
  if (options.angular_distance && pooling != "last")
    fail(
        "{}: angular distance needs each example's last token, but this archive is pooled with '{}'; collect it "
        "with --pooling none or last",
        archive.path(), pooling);
}

HiddenStateScores archive_importance(const ArchiveReader& archive, const ImportanceOptions& options,
                                     const CommPtr& comm) {
  check_importance_archive(archive, options);
  const int64_t L = archive.num_layers() - 1, N = archive.num_examples();
  const bool tokens = !archive.pooled();
  // Pooled ("last") archive: one row per example, which is its last token.
  std::vector<int64_t> offsets;
  if (tokens) {
    offsets = token_offsets(archive);
  } else {
    for (int64_t i = 0; i <= N; ++i) offsets.push_back(i);
  }
  const int64_t chunk = std::max<int64_t>(1, options.chunk_tokens);
  const int64_t first = N * comm->rank() / comm->size(), end = N * (comm->rank() + 1) / comm->size();

  // Partial sums: [bi_0..bi_{L-1} | d(l, n) row-major L x L].
  auto bi_sum = torch::zeros({L}, kF64);
  auto ang_sum = torch::zeros({L, L}, kF64);
  for (int64_t e0 = first; e0 < end;) {
    // As many examples as fit in `chunk` tokens, at least one.
    int64_t e1 = e0 + 1;
    while (e1 < end && offsets[static_cast<size_t>(e1 + 1)] - offsets[static_cast<size_t>(e0)] <= chunk) ++e1;
    const int64_t r0 = offsets[static_cast<size_t>(e0)], rows = offsets[static_cast<size_t>(e1)] - r0;
    std::vector<int64_t> last;
    for (int64_t i = e0; i < e1; ++i) last.push_back(offsets[static_cast<size_t>(i + 1)] - 1 - r0);
    const auto last_rows = torch::tensor(last, torch::kInt64);

    std::vector<torch::Tensor> lasts;  // per hidden state, the chunk's last-token rows
    torch::Tensor previous;
    for (int64_t l = 0; l <= L; ++l) {
      auto h = archive.read(l, r0, rows);
      if (options.block_influence && l > 0 && previous.size(1) == h.size(1))
        bi_sum[l - 1] += row_cosine(previous, h).sum();
      if (options.angular_distance) lasts.push_back(h.index_select(0, last_rows));
      if (options.block_influence) previous = std::move(h);
    }
    if (options.angular_distance)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t n = 1; l + n <= L; ++n) {
          const auto& a = lasts[static_cast<size_t>(l)];
          const auto& b = lasts[static_cast<size_t>(l + n)];
          if (a.size(1) != b.size(1)) continue;
          ang_sum[l][n - 1] += (row_cosine(a, b).clamp(-1.0, 1.0).acos() / M_PI).sum();
        }
    if (options.progress) options.progress(e1 - e0);
    e0 = e1;
  }

  auto sums = torch::cat({bi_sum, ang_sum.flatten()});
  comm->allreduce(sums);
  HiddenStateScores out;
  out.num_examples = N;
  if (options.block_influence) {
    const int64_t T = offsets.back();
    out.num_tokens = T;
    out.block_influence = 1.0 - sums.slice(0, 0, L) / static_cast<double>(T);
    // Layers whose input and output differ in width have no cosine.
    for (int64_t l = 0; l < L; ++l)
      if (archive.width(l) != archive.width(l + 1)) out.block_influence[l] = kNaN;
  }
  if (options.angular_distance) {
    out.angular_distance = sums.slice(0, L).reshape({L, L}) / static_cast<double>(N);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t n = 1; n <= L; ++n)
        if (l + n > L || archive.width(l) != archive.width(l + n)) out.angular_distance[l][n - 1] = kNaN;
  }
  return out;
}

torch::Tensor adjacent_cka_importance(const torch::Tensor& cka) {
  if (cka.dim() != 2 || cka.size(0) != cka.size(1) || cka.size(0) < 2)
    fail("a CKA matrix of one archive against itself ([L+1, L+1], L >= 1) is needed, got shape [{}]",
         fmt::join(cka.sizes().vec(), ", "));
  const int64_t L = cka.size(0) - 1;
  auto c = cka.to(kF64);
  auto out = torch::empty({L}, kF64);
  for (int64_t l = 0; l < L; ++l) out[l] = 1.0 - c[l][l + 1].item<double>();
  return out;
}

}  // namespace crash
