#include "framework/models/blocks.h"

#include <cmath>

namespace crash {

torch::Tensor activation(const std::string& name, torch::Tensor x) {
  if (name == "relu") return x.relu_();  // x is a fresh linear output: in place is safe for autograd
  if (name == "silu" || name == "swish") return torch::silu(x);
  if (name == "gelu") return torch::gelu(x);
  return torch::gelu(x, "tanh");  // gelu_new, gelu_pytorch_tanh
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  auto xf = x.to(torch::kFloat32);
  auto var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * torch::rsqrt(var + eps_)).to(x.scalar_type());
}

SelfAttentionImpl::SelfAttentionImpl(const AttentionShape& s) : s_(s) {
  using torch::nn::LinearOptions;
  q_proj = register_module("q_proj", torch::nn::Linear(LinearOptions(s.hidden, s.heads * s.head_dim).bias(s.qkv_bias)));
  k_proj = register_module("k_proj", torch::nn::Linear(LinearOptions(s.hidden, s.kv_heads * s.head_dim).bias(s.qkv_bias)));
  v_proj = register_module("v_proj", torch::nn::Linear(LinearOptions(s.hidden, s.kv_heads * s.head_dim).bias(s.qkv_bias)));
  out_proj = register_module(s.out_name, torch::nn::Linear(LinearOptions(s.heads * s.head_dim, s.hidden).bias(s.out_bias)));
}

namespace {
torch::Tensor rotate_half(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}
}  // namespace

torch::Tensor SelfAttentionImpl::forward(const torch::Tensor& h, const AttentionContext& ctx, LayerCache* cache) {
  const int64_t B = h.size(0), T = h.size(1), H = s_.heads, KV = s_.kv_heads, D = s_.head_dim;
  auto q = q_proj->forward(h).view({B, T, H, D}).transpose(1, 2);
  auto k = k_proj->forward(h).view({B, T, KV, D}).transpose(1, 2);
  auto v = v_proj->forward(h).view({B, T, KV, D}).transpose(1, 2);
  if (s_.rotary) {
    auto cos = ctx.cos.unsqueeze(1), sin = ctx.sin.unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
  }
  if (cache) {
    if (cache->k.defined()) {
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  const int64_t Tk = k.size(2), rep = H / KV;
  // Grouped-query attention without copying K/V: the `rep` query heads of a group share a matmul.
  auto qg = q.reshape({B * KV, rep * T, D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  torch::Tensor scores;
  if (q.scalar_type() == torch::kFloat32) {  // scale, product and mask in one BLAS call
    auto bias = ctx.bias.expand({B, KV * rep, T, Tk}).reshape({B * KV, rep * T, Tk});
    scores = torch::baddbmm(bias, qg, k.reshape({B * KV, Tk, D}).transpose(1, 2), 1.0, scale).view({B, H, T, Tk});
  } else {
    scores = torch::matmul(qg, k.reshape({B * KV, Tk, D}).transpose(1, 2)).view({B, H, T, Tk}).to(torch::kFloat32) * scale + ctx.bias;
  }
  auto probs = torch::softmax(scores, -1).to(v.scalar_type());
  auto out = torch::bmm(probs.view({B * KV, rep * T, Tk}), v.reshape({B * KV, Tk, D})).view({B, H, T, D});
  return out_proj->forward(out.transpose(1, 2).reshape({B, T, H * D}));
}

torch::Tensor rotary_inverse_frequencies(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  auto exponent = torch::arange(0, dim, 2, torch::kInt64).to(torch::kFloat32) / static_cast<double>(dim);
  auto inv_freq = 1.0 / torch::pow(c.rope_theta, exponent);
  if (!c.rope_scaling) return inv_freq;
  const RopeScaling& s = *c.rope_scaling;
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
