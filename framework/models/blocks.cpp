#include "framework/models/blocks.h"

#include <cmath>

#include "framework/models/dropout.h"
#include "framework/models/packed_attention.h"
#include "framework/recompute.h"
#include "parallel/errors.h"

namespace crash {

torch::Tensor activation(const std::string& name, torch::Tensor x) {
  if (name == "relu") return x.relu_();  // x is a fresh linear output: in place is safe for autograd
  if (name == "silu" || name == "swish") return torch::silu(x);
  if (name == "gelu") return torch::gelu(x);
  return torch::gelu(x, "tanh");  // gelu_new, gelu_pytorch_tanh
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps, CommPtr tp, bool unit_offset)
    : eps_(eps), tp_(std::move(tp)), unit_offset_(unit_offset) {
  weight = register_parameter("weight", unit_offset ? torch::zeros({dim}) : torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  auto xf = x.to(torch::kFloat32);
  auto var = xf.pow(2).mean(-1, /*keepdim=*/true);
  auto w = tp_ && tp_->size() > 1 ? copy_to_tp(weight, tp_) : weight;
  // Gemma scales in float32 and rounds once; LLaMA rounds the normalised x, then scales.
  if (unit_offset_) return ((xf * torch::rsqrt(var + eps_)) * (w.to(torch::kFloat32) + 1.0)).to(x.scalar_type());
  return w * (xf * torch::rsqrt(var + eps_)).to(x.scalar_type());
}

ColumnParallelLinear column_linear(int64_t in, int64_t out, bool bias, const CommPtr& tp) {
  const int64_t local = out / tp->size();
  return ColumnParallelLinear(in, out, tp->rank() * local, local, bias, tp);
}

RowParallelLinear row_linear(int64_t in, int64_t out, bool bias, const CommPtr& tp) {
  const int64_t local = in / tp->size();
  return RowParallelLinear(in, tp->rank() * local, local, out, bias, tp);
}

SelfAttentionImpl::SelfAttentionImpl(const AttentionShape& s) : head_dim_(s.head_dim), rotary_(s.rotary) {
  const auto& tp = s.tp;
  const int T = tp->size(), r = tp->rank();
  const int64_t D = s.head_dim;
  heads_ = s.heads / T;
  first_head_ = r * heads_;
  q_proj = register_module("q_proj", column_linear(s.hidden, s.heads * D, s.qkv_bias, tp));
  if (s.kv_heads % T == 0) {
    kv_heads_ = s.kv_heads / T;
    k_proj = register_module("k_proj", column_linear(s.hidden, s.kv_heads * D, s.qkv_bias, tp));
    v_proj = register_module("v_proj", column_linear(s.hidden, s.kv_heads * D, s.qkv_bias, tp));
  } else {
    // Fewer key/value heads than ranks: each rank holds the one head its query heads use,
    // shared by `group` consecutive ranks.
    const int group = T / static_cast<int>(s.kv_heads);
    const int64_t head = r / group;
    kv_heads_ = 1;
    k_proj =
        register_module("k_proj", ColumnParallelLinear(s.hidden, s.kv_heads * D, head * D, D, s.qkv_bias, tp, group));
    v_proj =
        register_module("v_proj", ColumnParallelLinear(s.hidden, s.kv_heads * D, head * D, D, s.qkv_bias, tp, group));
  }
  out_proj = register_module(s.out_name, row_linear(s.heads * D, s.hidden, s.out_bias, tp));
  if (s.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(D, s.norm_eps, tp, s.norm_unit_offset));
    k_norm = register_module("k_norm", RMSNorm(D, s.norm_eps, tp, s.norm_unit_offset));
  }
}

namespace {
torch::Tensor rotate_half(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}
}  // namespace

torch::Tensor SelfAttentionImpl::forward(const torch::Tensor& h, const AttentionContext& ctx, LayerCache* cache,
                                         int64_t layer) {
  const int64_t B = h.size(0), T = h.size(1), H = heads_, KV = kv_heads_, D = head_dim_;
  auto q = q_proj->forward(h).view({B, T, H, D});
  auto k = k_proj->forward(h).view({B, T, KV, D});
  if (q_norm) {
    q = q_norm->forward(q);
    k = k_norm->forward(k);
  }
  q = q.transpose(1, 2);
  k = k.transpose(1, 2);
  auto v = v_proj->forward(h).view({B, T, KV, D}).transpose(1, 2);
  if (rotary_) {
    auto cos = ctx.cos_of(layer).unsqueeze(1), sin = ctx.sin_of(layer).unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
  }
  if (ctx.packed()) {
    if (cache) fail("attention: a packed pass keeps no key/value cache");
    return out_proj->forward(packed_attention(q, k, v, ctx, layer, first_head_));
  }
  if (cache) {
    if (cache->k.defined()) {
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  // The core (scores, softmax, dropout, probabilities @ V); selective recomputation keeps only
  // q, k, v and runs it again in backward (framework/recompute.h).
  auto core = [this, B, T, H, KV, D, layer](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                            const AttentionContext& ctx) {
    const int64_t Tk = k.size(2), rep = H / KV;
    // Grouped-query attention without copying K/V: the `rep` query heads of a group share a matmul.
    auto qg = q.reshape({B * KV, rep * T, D});
    const double scale = ctx.scale_of(D);
    torch::Tensor scores;
    const auto& mask_bias = ctx.bias_of(layer);
    if (q.scalar_type() == torch::kFloat32 && ctx.softcap == 0) {  // scale, product and mask in one BLAS call
      auto bias = mask_bias.expand({B, KV * rep, T, Tk}).reshape({B * KV, rep * T, Tk});
      scores = torch::baddbmm(bias, qg, k.reshape({B * KV, Tk, D}).transpose(1, 2), 1.0, scale).view({B, H, T, Tk});
    } else {
      scores = softcap_scores(torch::matmul(qg, k.reshape({B * KV, Tk, D}).transpose(1, 2)).view({B, H, T, Tk}) * scale,
                              ctx.softcap)
                   .to(torch::kFloat32) +
               mask_bias;
    }
    auto probs = torch::softmax(scores, -1).to(v.scalar_type());
    if (ctx.dropout_attention()) probs = attention_probs_dropout(probs, ctx, layer, first_head_);
    return torch::bmm(probs.view({B * KV, rep * T, Tk}), v.reshape({B * KV, Tk, D})).view({B, H, T, D});
  };
  torch::Tensor out;
  if (ctx.recompute_attention && torch::GradMode::is_enabled()) {
    auto held = std::make_shared<const AttentionContext>(ctx);
    out = recomputed([core, held](const std::vector<torch::Tensor>& x) { return core(x[0], x[1], x[2], *held); },
                     {q, k, v});
  } else {
    out = core(q, k, v, ctx);
  }
  return out_proj->forward(out.transpose(1, 2).reshape({B, T, H * D}));
}

torch::Tensor softcap_scores(const torch::Tensor& x, double cap) {
  if (cap <= 0) return x;
  return (x / cap).tanh() * cap;  // not in place: tanh's backward keeps its output
}

torch::Tensor rotary_inverse_frequencies(const ModelConfig& c, bool sliding) {
  const int64_t dim = c.head_dim;
  const double theta = sliding && c.sliding_rope_theta > 0 ? c.sliding_rope_theta : c.rope_theta;
  auto exponent = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat32) / static_cast<double>(dim);
  auto inv_freq = 1.0 / torch::pow(theta, exponent);
  if (!c.rope_scaling || (sliding && c.sliding_rope_theta > 0)) return inv_freq;
  const RopeScaling& s = *c.rope_scaling;
  if (s.linear) return inv_freq / s.factor;
  const double old_len = static_cast<double>(s.original_max_position_embeddings);
  const double low_wavelen = old_len / s.low_freq_factor, high_wavelen = old_len / s.high_freq_factor;
  auto wavelen = 2 * M_PI / inv_freq;
  auto scaled = torch::where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq);
  auto smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  auto smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
  auto medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
  return torch::where(medium, smoothed, scaled);
}

std::pair<torch::Tensor, torch::Tensor> rotary_tables(const torch::Tensor& inv_freq, const torch::Tensor& positions,
                                                      torch::ScalarType dtype) {
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq.to(positions.device()).view({1, 1, -1});
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

}  // namespace crash
