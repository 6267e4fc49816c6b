#include "framework/models/dropout.h"

#include <ATen/Parallel.h>
#include <fmt/ranges.h>

#include <cmath>

#include "parallel/errors.h"

namespace crash {

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

// splitmix64's finaliser: element i of stream `key` is mix64(key + (i + 1) * golden).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Kept with probability 1 - p: a uniform 24-bit draw at or above p * 2^24.
struct Draw {
  uint64_t threshold;
  float scale;
  explicit Draw(double p)
      : threshold(static_cast<uint64_t>(std::ceil(p * 16777216.0))), scale(static_cast<float>(1.0 / (1.0 - p))) {}
  float operator()(uint64_t key, uint64_t i) const {
    return (mix64(key + (i + 1) * kGolden) >> 40) < threshold ? 0.0f : scale;
  }
};

void check_rate(double p) {
  if (!(p >= 0 && p < 1)) fail("dropout rate {} is not in [0, 1)", p);
}

// x * mask in float32, returned in x's type.
torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& mask) {
  auto m = mask.to(x.device());
  return x.scalar_type() == torch::kFloat32 ? x * m : (x * m).to(x.scalar_type());
}

const DropoutContext& context_of(const AttentionContext& ctx) {
  if (!ctx.dropout) fail("dropout: the pass carries no dropout context");
  return *ctx.dropout;
}

}  // namespace

std::shared_ptr<DropoutContext> DropoutContext::padded(const torch::Tensor& mask, int64_t first_slot) {
  auto d = std::make_shared<DropoutContext>();
  auto m = mask.to(torch::kCPU).to(torch::kBool).contiguous();
  const int64_t B = m.size(0), T = m.size(1);
  const bool* p = m.data_ptr<bool>();
  d->padded_length = T;
  d->row_offsets.assign(1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t)
      if (p[b * T + t]) d->token_position.push_back(b * T + t);
    d->row_offsets.push_back(static_cast<int64_t>(d->token_position.size()));
    d->slots.push_back(first_slot + b);
  }
  return d;
}

uint64_t dropout_key(uint64_t seed, int64_t step, int64_t slot, int64_t layer, DropoutSite site, int64_t head) {
  uint64_t k = mix64(seed + kGolden);
  for (uint64_t part : {static_cast<uint64_t>(step), static_cast<uint64_t>(slot), static_cast<uint64_t>(layer),
                        static_cast<uint64_t>(site), static_cast<uint64_t>(head)})
    k = mix64((k ^ part) + kGolden);
  return k;
}

torch::Tensor dropout_mask(uint64_t key, int64_t n, double p) {
  check_rate(p);
  auto mask = torch::empty({n}, torch::kFloat32);
  float* m = mask.data_ptr<float>();
  const Draw draw(p);
  at::parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) m[i] = draw(key, static_cast<uint64_t>(i));
  });
  return mask;
}

torch::Tensor residual_dropout(const torch::Tensor& x, const AttentionContext& ctx, int64_t layer, DropoutSite site) {
  const DropoutContext& dc = context_of(ctx);
  check_rate(dc.hidden);
  const int64_t rows = static_cast<int64_t>(dc.slots.size()), d = x.size(-1);
  const bool padded = dc.padded_length > 0;
  const bool fits = static_cast<int64_t>(dc.row_offsets.size()) == rows + 1 && x.dim() == 3 &&
                    (padded ? x.size(0) == rows && x.size(1) == dc.padded_length
                            : x.size(0) == 1 && x.size(1) == dc.row_offsets.back());
  if (!fits)
    fail("dropout: hidden states of shape {} do not match the pass's {} rows", fmt::join(x.sizes(), "x"), rows);
  // Padding keeps its values: attention never reads them and no loss is taken there.
  auto mask = torch::ones(x.sizes(), torch::kFloat32);
  float* m = mask.data_ptr<float>();
  const Draw draw(dc.hidden);
  at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t key = dropout_key(dc.seed, dc.step, dc.slots[b], layer, site);
      const int64_t o = dc.row_offsets[b], L = dc.row_offsets[b + 1] - o;
      for (int64_t t = 0; t < L; ++t) {
        float* out = m + (padded ? dc.token_position[o + t] : o + t) * d;
        for (int64_t j = 0; j < d; ++j) out[j] = draw(key, static_cast<uint64_t>(t * d + j));
      }
    }
  });
  return apply(x, mask);
}

torch::Tensor feature_dropout(const torch::Tensor& x, const AttentionContext& ctx, int64_t layer, DropoutSite site,
                              int64_t stream, double p, int64_t full, int64_t start) {
  const DropoutContext& dc = context_of(ctx);
  check_rate(p);
  const int64_t rows = static_cast<int64_t>(dc.slots.size()), d = x.size(-1);
  const bool padded = dc.padded_length > 0;
  const bool fits = static_cast<int64_t>(dc.row_offsets.size()) == rows + 1 && x.dim() == 3 &&
                    (padded ? x.size(0) == rows && x.size(1) == dc.padded_length
                            : x.size(0) == 1 && x.size(1) == dc.row_offsets.back()) &&
                    start >= 0 && start + d <= full;
  if (!fits) fail("dropout: activations of shape {} do not match the pass's {} rows", fmt::join(x.sizes(), "x"), rows);
  auto mask = torch::ones(x.sizes(), torch::kFloat32);
  float* m = mask.data_ptr<float>();
  const Draw draw(p);
  at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t key = dropout_key(dc.seed, dc.step, dc.slots[b], layer, site, stream);
      const int64_t o = dc.row_offsets[b], L = dc.row_offsets[b + 1] - o;
      for (int64_t t = 0; t < L; ++t) {
        float* out = m + (padded ? dc.token_position[o + t] : o + t) * d;
        for (int64_t j = 0; j < d; ++j) out[j] = draw(key, static_cast<uint64_t>(t * full + start + j));
      }
    }
  });
  return apply(x, mask);
}

namespace {
thread_local const AttentionContext* pass_context = nullptr;
thread_local int64_t pass_layer = -1;
}  // namespace

LayerPass::LayerPass(const AttentionContext& ctx, int64_t layer)
    : previous_ctx_(pass_context), previous_layer_(pass_layer) {
  pass_context = &ctx;
  pass_layer = layer;
}
LayerPass::~LayerPass() {
  pass_context = previous_ctx_;
  pass_layer = previous_layer_;
}
const AttentionContext* LayerPass::context() { return pass_context; }
int64_t LayerPass::layer() { return pass_layer; }

torch::Tensor attention_probs_dropout(const torch::Tensor& probs, const AttentionContext& ctx, int64_t layer,
                                      int64_t first_head) {
  const DropoutContext& dc = context_of(ctx);
  check_rate(dc.attention);
  const int64_t rows = static_cast<int64_t>(dc.slots.size()), H = probs.size(1), T = dc.padded_length;
  if (T == 0 || static_cast<int64_t>(dc.row_offsets.size()) != rows + 1 || probs.dim() != 4 || probs.size(0) != rows ||
      probs.size(2) != T || probs.size(3) != T)
    fail("dropout: attention probabilities of shape {} do not match the pass's {} rows of {} tokens",
         fmt::join(probs.sizes(), "x"), rows, T);
  auto mask = torch::ones(probs.sizes(), torch::kFloat32);
  float* m = mask.data_ptr<float>();
  const Draw draw(dc.attention);
  at::parallel_for(0, rows * H, 1, [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i) {
      const int64_t b = i / H, h = i % H;
      const uint64_t key =
          dropout_key(dc.seed, dc.step, dc.slots[b], layer, DropoutSite::AttentionProbs, first_head + h);
      const int64_t o = dc.row_offsets[b], L = dc.row_offsets[b + 1] - o;
      float* out = m + i * T * T;
      for (int64_t q = 0; q < L; ++q) {
        const int64_t pq = dc.token_position[o + q] - b * T;
        for (int64_t k = 0; k < L; ++k)
          out[pq * T + dc.token_position[o + k] - b * T] = draw(key, static_cast<uint64_t>(q * L + k));
      }
    }
  });
  return apply(probs, mask);
}

torch::Tensor packed_row_probs_dropout(const torch::Tensor& probs, const AttentionContext& ctx, int64_t row,
                                       int64_t layer, int64_t first_head) {
  const DropoutContext& dc = context_of(ctx);
  check_rate(dc.attention);
  const int64_t H = probs.size(0), L = probs.size(1);
  if (dc.padded_length > 0 || row < 0 || row + 1 >= static_cast<int64_t>(dc.row_offsets.size()) ||
      dc.row_offsets[row + 1] - dc.row_offsets[row] != L || probs.size(2) != L)
    fail("dropout: packed attention probabilities of shape {} do not match row {}", fmt::join(probs.sizes(), "x"), row);
  auto mask = torch::empty(probs.sizes(), torch::kFloat32);
  float* m = mask.data_ptr<float>();
  const Draw draw(dc.attention);
  at::parallel_for(0, H, 1, [&](int64_t a, int64_t z) {
    for (int64_t h = a; h < z; ++h) {
      const uint64_t key =
          dropout_key(dc.seed, dc.step, dc.slots[row], layer, DropoutSite::AttentionProbs, first_head + h);
      for (int64_t i = 0; i < L * L; ++i) m[h * L * L + i] = draw(key, static_cast<uint64_t>(i));
    }
  });
  return apply(probs, mask);
}

}  // namespace crash
