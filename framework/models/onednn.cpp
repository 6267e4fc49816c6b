#include "framework/models/onednn.h"

#ifdef CRASH_HAVE_DNNL
#include <ATen/Parallel.h>

#include <cmath>
#include <dnnl.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "parallel/tensor_parallel.h"
#endif

namespace crash {

#ifdef CRASH_HAVE_DNNL
namespace {

using dims = dnnl::memory::dims;
using dt = dnnl::memory::data_type;

const dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

bool reference_kernel(const std::string& impl) { return impl.find("ref") != std::string::npos; }

// Primitives by shape, kept for the process. A pass meets a handful of shapes per layer kind
// and every layer reuses them; the bound only guards runs that meet a new shape each pass.
template <class Key, class Plan>
class PlanCache {
 public:
  template <class Make>
  std::shared_ptr<Plan> get(const Key& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = plans_.find(key);
      if (it != plans_.end()) return it->second;
    }
    auto plan = make();  // outside the lock: creating a primitive compiles its kernel
    std::lock_guard<std::mutex> lock(mutex_);
    if (plans_.size() >= 4096) plans_.clear();
    return plans_.emplace(key, plan).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, std::shared_ptr<Plan>> plans_;
};

// ---- linear: y [M, N] = x [M, K] W^T + b, W [N, K] read in place as a K x N matrix.

struct LinearPlan {
  dnnl::matmul product;
  dnnl::memory::desc x, w, b, y;
  bool usable = false;
};

std::shared_ptr<LinearPlan> make_linear_plan(int64_t M, int64_t K, int64_t N, bool bias) {
  auto plan = std::make_shared<LinearPlan>();
  plan->x = dnnl::memory::desc(dims{M, K}, dt::f32, dims{K, 1});
  plan->w = dnnl::memory::desc(dims{K, N}, dt::f32, dims{1, K});
  plan->y = dnnl::memory::desc(dims{M, N}, dt::f32, dims{N, 1});
  if (bias) plan->b = dnnl::memory::desc(dims{1, N}, dt::f32, dims{N, 1});
  auto desc =
      bias ? dnnl::matmul::desc(plan->x, plan->w, plan->b, plan->y) : dnnl::matmul::desc(plan->x, plan->w, plan->y);
  dnnl::matmul::primitive_desc pd(desc, cpu_engine());
  plan->usable = !reference_kernel(pd.impl_info_str());
  plan->product = dnnl::matmul(pd);
  return plan;
}

std::optional<torch::Tensor> onednn_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const bool bias = b.defined();
  if (!x.device().is_cpu() || x.scalar_type() != torch::kFloat32 || w.scalar_type() != torch::kFloat32 ||
      w.dim() != 2 || !x.is_contiguous() || !w.is_contiguous() || x.dim() < 1 || x.size(-1) != w.size(1) ||
      x.numel() == 0 || (bias && (b.scalar_type() != torch::kFloat32 || !b.is_contiguous() || b.numel() != w.size(0))))
    return std::nullopt;
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  static PlanCache<std::tuple<int64_t, int64_t, int64_t, bool>, LinearPlan> cache;
  auto plan = cache.get({M, K, N, bias}, [&] { return make_linear_plan(M, K, N, bias); });
  if (!plan->usable) return std::nullopt;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const auto& e = cpu_engine();
  dnnl::memory xm(plan->x, e, x.data_ptr<float>()), wm(plan->w, e, w.data_ptr<float>()),
      ym(plan->y, e, y.data_ptr<float>());
  std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}};
  if (bias) args.emplace(DNNL_ARG_BIAS, dnnl::memory(plan->b, e, b.data_ptr<float>()));
  dnnl::stream stream(e);
  plan->product.execute(stream, args);
  stream.wait();
  return y;
}

// ---- packed attention: per row, scores = scale * Q K^T + causal bias (the sum post-op adds
// the bias the buffer is filled with), softmax in place, out = P V into the packed output.

struct RowPlan {
  dnnl::matmul scores, values;
  dnnl::softmax_forward softmax;
  dnnl::memory::desc q, k, s, v, o;
  bool usable = false;
};

using RowKey =
    std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float>;

std::shared_ptr<RowPlan> make_row_plan(int64_t KV, int64_t rep, int64_t L, int64_t D, float scale,
                                       const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  auto plan = std::make_shared<RowPlan>();
  const auto& engine = cpu_engine();
  const int64_t H = KV * rep;
  // Query heads h = g * rep + r use key/value head g: weights broadcast over r.
  plan->q = dnnl::memory::desc(dims{KV, rep, L, D}, dt::f32, dims{rep * q.stride(1), q.stride(1), q.stride(2), 1});
  plan->k = dnnl::memory::desc(dims{KV, 1, D, L}, dt::f32, dims{k.stride(1), k.stride(1), 1, k.stride(2)});
  plan->s = dnnl::memory::desc(dims{KV, rep, L, L}, dt::f32, dims{rep * L * L, L * L, L, 1});
  plan->v = dnnl::memory::desc(dims{KV, 1, L, D}, dt::f32, dims{v.stride(1), v.stride(1), v.stride(2), 1});
  plan->o = dnnl::memory::desc(dims{KV, rep, L, D}, dt::f32, dims{rep * D, D, H * D, 1});
  dnnl::post_ops sum;
  sum.append_sum(1.0f);
  dnnl::primitive_attr attr;
  attr.set_output_scales(0, {scale});
  attr.set_post_ops(sum);
  dnnl::matmul::primitive_desc scores(dnnl::matmul::desc(plan->q, plan->k, plan->s), attr, engine);
  dnnl::softmax_forward::primitive_desc softmax(
      dnnl::softmax_forward::desc(dnnl::prop_kind::forward_inference, plan->s, 3), engine);
  dnnl::matmul::primitive_desc values(dnnl::matmul::desc(plan->s, plan->v, plan->o), engine);
  plan->usable = !reference_kernel(scores.impl_info_str()) && !reference_kernel(softmax.impl_info_str()) &&
                 !reference_kernel(values.impl_info_str());
  plan->scores = dnnl::matmul(scores);
  plan->softmax = dnnl::softmax_forward(softmax);
  plan->values = dnnl::matmul(values);
  return plan;
}

}  // namespace

void install_onednn_kernels() {
  static std::once_flag once;
  std::call_once(once, [] { set_inference_linear(onednn_linear); });
}

std::optional<torch::Tensor> onednn_packed_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v, const AttentionContext& ctx,
                                                     int64_t layer) {
  const torch::Tensor& bias = ctx.bias_of(layer);  // causal, or the sliding window's band
  if (torch::GradMode::is_enabled()) return std::nullopt;
  for (const auto* t : {&q, &k, &v})
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat32 || t->stride(3) != 1) return std::nullopt;
  if (bias.scalar_type() != torch::kFloat32) return std::nullopt;
  const int64_t H = q.size(1), KV = k.size(1), N = q.size(2), D = q.size(3), rep = H / KV;
  const int64_t B = static_cast<int64_t>(ctx.row_offsets.size()) - 1;
  const auto scale = static_cast<float>(ctx.scale_of(D));
  static PlanCache<RowKey, RowPlan> cache;
  std::vector<std::shared_ptr<RowPlan>> plans(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = ctx.row_offsets[b + 1] - ctx.row_offsets[b];
    if (L == 0) continue;
    const RowKey key{KV,          rep,         L,           D,           q.stride(1), q.stride(2),
                     k.stride(1), k.stride(2), v.stride(1), v.stride(2), scale};
    plans[b] = cache.get(key, [&] { return make_row_plan(KV, rep, L, D, scale, q, k, v); });
    if (!plans[b]->usable) return std::nullopt;
  }
  auto out = torch::empty({N, H, D}, q.options());
  float* Q = q.data_ptr<float>();
  float* K = k.data_ptr<float>();
  float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  // Rows in parallel, one thread each: oneDNN runs single-threaded inside the region, and small
  // products gain more from that than from two threads sharing each one.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const auto& e = cpu_engine();
    dnnl::stream stream(e);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t o = ctx.row_offsets[b], L = ctx.row_offsets[b + 1] - o;
      if (L == 0) continue;
      const RowPlan& p = *plans[b];
      auto scores = bias.narrow(0, 0, L).narrow(1, 0, L).expand({KV * rep, L, L}).contiguous();
      dnnl::memory qm(p.q, e, Q + o * q.stride(2)), km(p.k, e, K + o * k.stride(2)),
          sm(p.s, e, scores.data_ptr<float>()), vm(p.v, e, V + o * v.stride(2)), om(p.o, e, O + o * H * D);
      p.scores.execute(stream, {{DNNL_ARG_SRC, qm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, sm}});
      p.softmax.execute(stream, {{DNNL_ARG_SRC, sm}, {DNNL_ARG_DST, sm}});
      p.values.execute(stream, {{DNNL_ARG_SRC, sm}, {DNNL_ARG_WEIGHTS, vm}, {DNNL_ARG_DST, om}});
    }
    stream.wait();
  });
  return out.view({1, N, H * D});
}

#else

void install_onednn_kernels() {}

std::optional<torch::Tensor> onednn_packed_attention(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                     const AttentionContext&, int64_t) {
  return std::nullopt;
}

#endif

}  // namespace crash
