#include "framework/models/packed_attention.h"

#include <cmath>
#include <vector>

#include "framework/models/blocks.h"
#include "framework/models/dropout.h"
#include "framework/models/onednn.h"

namespace crash {

torch::Tensor packed_attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                         const AttentionContext& ctx, int64_t layer, int64_t first_head) {
  const int64_t H = q.size(1), KV = k.size(1), N = q.size(2), D = q.size(3), rep = H / KV;
  const double scale = ctx.scale_of(D);
  std::vector<torch::Tensor> rows;
  for (size_t b = 0; b + 1 < ctx.row_offsets.size(); ++b) {
    const int64_t o = ctx.row_offsets[b], L = ctx.row_offsets[b + 1] - o;
    if (L == 0) continue;
    // The `rep` query heads of a group share one matmul with their key/value head.
    auto qb = q.narrow(2, o, L).reshape({KV, rep * L, D});
    auto kb = k.narrow(2, o, L).reshape({KV, L, D}), vb = v.narrow(2, o, L).reshape({KV, L, D});
    auto causal = ctx.bias_of(layer).narrow(0, 0, L).narrow(1, 0, L);
    if (rep > 1) causal = causal.repeat({rep, 1});
    torch::Tensor scores;
    if (q.scalar_type() == torch::kFloat32 && ctx.softcap == 0)
      scores = torch::baddbmm(causal, qb, kb.transpose(1, 2), 1.0, scale);
    else
      scores = softcap_scores(torch::matmul(qb, kb.transpose(1, 2)) * scale, ctx.softcap).to(torch::kFloat32) + causal;
    auto probs = torch::softmax(scores, -1).to(v.scalar_type());
    if (ctx.dropout_attention())  // [KV, rep * L, L] is [H, L, L] head by head
      probs = packed_row_probs_dropout(probs.view({H, L, L}), ctx, static_cast<int64_t>(b), layer, first_head)
                  .view({KV, rep * L, L});
    rows.push_back(torch::bmm(probs, vb).view({H, L, D}).transpose(0, 1));  // [L, H, D]
  }
  if (rows.empty()) return torch::zeros({1, N, H * D}, q.options());
  return torch::cat(rows, 0).view({1, N, H * D});
}

torch::Tensor packed_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const AttentionContext& ctx, int64_t layer, int64_t first_head) {
  if (!ctx.dropout_attention() && ctx.softcap == 0)
    if (auto out = onednn_packed_attention(q, k, v, ctx, layer)) return *out;
  return packed_attention_reference(q, k, v, ctx, layer, first_head);
}

}  // namespace crash
