// Packed passes: TokenPacking, attention within rows (fast CPU path against torch's) and pooling
// a packed layer against pooling the padded one.
#include "analysis/pooling.h"
#include "framework/models/decoder.h"
#include "framework/models/packed_attention.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

torch::Tensor right_padded_mask(const std::vector<int64_t>& lengths, int64_t T) {
  auto mask = torch::zeros({static_cast<int64_t>(lengths.size()), T}, torch::kInt64);
  for (size_t b = 0; b < lengths.size(); ++b) mask[static_cast<int64_t>(b)].narrow(0, 0, lengths[b]).fill_(1);
  return mask;
}

TEST(TokenPacking, KeepsTheRealTokensRowAfterRow) {
  auto mask = torch::tensor({0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0}, torch::kInt64).view({3, 4});  // left, right, right
  auto p = TokenPacking::of(mask);
  EXPECT_EQ(p.row_offsets, (std::vector<int64_t>{0, 3, 4, 5}));
  EXPECT_EQ(p.longest, 3);
  EXPECT_EQ(p.tokens(), 5);
  auto ids = torch::arange(12).view({3, 4});
  EXPECT_TRUE(torch::equal(p.pack(ids.unsqueeze(-1)).view({-1}), torch::tensor({1, 2, 3, 4, 8})));
}

// The layout the attention gets in a model: projections [1, N, H * D] viewed as [1, H, N, D].
torch::Tensor heads_view(int64_t N, int64_t H, int64_t D) { return torch::randn({1, N, H, D}).transpose(1, 2); }

struct AttentionCase {
  int64_t heads, kv_heads, head_dim;
  std::vector<int64_t> lengths;
};

class PackedAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(PackedAttention, FastPathEqualsTorchAndPaddedAttention) {
  torch::manual_seed(3);
  const auto& c = GetParam();
  int64_t T = 0;
  for (auto L : c.lengths) T = std::max(T, L);
  auto packing = TokenPacking::of(right_padded_mask(c.lengths, T));
  const int64_t N = packing.tokens(), H = c.heads, KV = c.kv_heads, D = c.head_dim;
  auto q = heads_view(N, H, D), k = heads_view(N, KV, D), v = heads_view(N, KV, D);
  AttentionContext ctx;
  ctx.row_offsets = packing.row_offsets;
  ctx.bias = torch::full({T, T}, std::numeric_limits<float>::lowest()).triu_(1);
  torch::Tensor fast;
  {
    torch::InferenceMode guard;
    fast = packed_attention(q, k, v, ctx);
  }
  auto reference = packed_attention_reference(q, k, v, ctx);
  ASSERT_EQ(fast.sizes(), (std::vector<int64_t>{1, N, H * D}));
  EXPECT_LE((fast - reference).abs().max().item<double>(), 1e-5);
  // Each row alone, written out: softmax(q k^T / sqrt(D) + causal) v with query head h using
  // key/value head h / (H / KV).
  for (size_t b = 0; b < c.lengths.size(); ++b) {
    const int64_t o = packing.row_offsets[b], L = c.lengths[b];
    auto qb = q[0].narrow(1, o, L), kb = k[0].narrow(1, o, L), vb = v[0].narrow(1, o, L);
    auto kr = kb.repeat_interleave(H / KV, 0), vr = vb.repeat_interleave(H / KV, 0);
    auto scores = torch::matmul(qb, kr.transpose(1, 2)) / std::sqrt(static_cast<double>(D));
    scores = scores.masked_fill(torch::ones({L, L}, torch::kBool).triu(1), -INFINITY);
    auto want = torch::matmul(torch::softmax(scores, -1), vr).transpose(0, 1).reshape({L, H * D});
    EXPECT_LE((fast[0].narrow(0, o, L) - want).abs().max().item<double>(), 1e-5) << "row " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PackedAttention,
                         ::testing::Values(AttentionCase{4, 4, 8, {5, 1, 9, 3}},             // MHA, a one-token row
                                           AttentionCase{8, 2, 16, {17, 4, 30}},             // grouped-query
                                           AttentionCase{4, 1, 32, {2, 64, 33, 7}},          // one key/value head
                                           AttentionCase{12, 12, 64, {96, 128, 64, 100}}));  // OPT-125m's heads

TEST(PoolPacked, EqualsPoolingThePaddedLayer) {
  torch::manual_seed(5);
  const std::vector<int64_t> lengths{3, 7, 1, 5};
  auto mask = right_padded_mask(lengths, 7);
  auto padded = torch::randn({4, 7, 6});
  auto packing = TokenPacking::of(mask);
  auto packed = packing.pack(padded).squeeze(0);
  for (std::string m : {"mean", "mean_weighted", "last", "max"}) {
    SCOPED_TRACE(m);
    auto want = pool_hidden(padded, mask, m), got = pool_packed(packed, packing.row_offsets, m);
    ASSERT_EQ(got.sizes(), want.sizes());
    EXPECT_LE((got - want).abs().max().item<double>(), 1e-6);
  }
  EXPECT_TRUE(torch::equal(unpooled_rows(padded, mask), packed));
  test::expect_user_error([&] { pool_packed(packed, {0, 3, 3, 16}, "mean"); }, {"has no tokens"});
}

}  // namespace
}  // namespace crash
