#include "parallel/tensor_parallel.h"

#include <limits>

#include "parallel/errors.h"

namespace crash {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

Communicator* comm_of(AutogradContext* ctx) { return reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt()); }
void keep_comm(AutogradContext* ctx, const CommPtr& c) { ctx->saved_data["comm"] = reinterpret_cast<int64_t>(c.get()); }

torch::Tensor allreduced(const torch::Tensor& x, Communicator* c) {
  auto y = x.contiguous().clone();
  c->allreduce(y);
  return y;
}

torch::Tensor own_part(const torch::Tensor& x, Communicator* c) {
  const int64_t n = x.size(-1) / c->size();
  return x.narrow(-1, c->rank() * n, n).contiguous();
}

struct CopyToTP : torch::autograd::Function<CopyToTP> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const CommPtr& c) {
    keep_comm(ctx, c);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) { return {allreduced(g[0], comm_of(ctx)), {}}; }
};

struct ReduceFromTP : torch::autograd::Function<ReduceFromTP> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const CommPtr& c) {
    return allreduced(x, c.get());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) { return {g[0], {}}; }
};

struct GatherFromTP : torch::autograd::Function<GatherFromTP> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const CommPtr& c) {
    keep_comm(ctx, c);
    return c->allgather(x.contiguous(), -1);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) { return {own_part(g[0], comm_of(ctx)), {}}; }
};

struct ScatterToTP : torch::autograd::Function<ScatterToTP> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const CommPtr& c) {
    keep_comm(ctx, c);
    return own_part(x, c.get());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {comm_of(ctx)->allgather(g[0].contiguous(), -1), {}};
  }
};

}  // namespace

namespace {
InferenceLinear& inference_linear() {
  static InferenceLinear kernel;
  return kernel;
}
}  // namespace

void set_inference_linear(InferenceLinear kernel) { inference_linear() = std::move(kernel); }

namespace {
thread_local bool training_kernels = false;
}  // namespace
TrainingKernelsGuard::TrainingKernelsGuard() : previous_(training_kernels) { training_kernels = true; }
TrainingKernelsGuard::~TrainingKernelsGuard() { training_kernels = previous_; }

torch::Tensor local_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const auto& kernel = inference_linear();
  if (kernel && !torch::GradMode::is_enabled() && !training_kernels) {
    if (auto y = kernel(x, w, b)) return *y;
  }
  return torch::linear(x, w, b);
}

torch::Tensor copy_to_tp(const torch::Tensor& x, const CommPtr& tp) {
  return tp->size() == 1 ? x : CopyToTP::apply(x, tp);
}
torch::Tensor reduce_from_tp(const torch::Tensor& x, const CommPtr& tp) {
  return tp->size() == 1 ? x : ReduceFromTP::apply(x, tp);
}
torch::Tensor gather_from_tp(const torch::Tensor& x, const CommPtr& tp) {
  return tp->size() == 1 ? x : GatherFromTP::apply(x, tp);
}
torch::Tensor scatter_to_tp(const torch::Tensor& x, const CommPtr& tp) {
  return tp->size() == 1 ? x : ScatterToTP::apply(x, tp);
}

torch::Tensor gather_shards(const torch::Tensor& local, const ShardSlice& s, const CommPtr& tp) {
  if (tp->size() == 1) return local.narrow(s.dim, 0, s.full).clone();
  auto all = tp->allgather(local.contiguous(), s.dim);
  std::vector<torch::Tensor> distinct;
  for (int r = 0; r < tp->size(); r += s.group) distinct.push_back(all.narrow(s.dim, r * s.length, s.length));
  return torch::cat(distinct, s.dim).narrow(s.dim, 0, s.full).contiguous();
}

namespace {
thread_local bool skip_parameter_init = false;

// torch::nn::Linear's initialisation, so that a one-rank layer is an ordinary Linear.
void init_linear(const torch::Tensor& weight, const torch::Tensor& bias, int64_t fan_in) {
  if (SkipParameterInit::active()) return;
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    bias.uniform_(-bound, bound);
  }
}
}  // namespace

SkipParameterInit::SkipParameterInit() : previous_(skip_parameter_init) { skip_parameter_init = true; }
SkipParameterInit::~SkipParameterInit() { skip_parameter_init = previous_; }
bool SkipParameterInit::active() { return skip_parameter_init; }

int64_t padded_vocab(int64_t vocab, int tp) { return (vocab + tp - 1) / tp * tp; }

ColumnParallelLinearImpl::ColumnParallelLinearImpl(int64_t in, int64_t full_out, int64_t start, int64_t local_out,
                                                   bool has_bias, CommPtr tp, int group, bool gather_output)
    : ParallelLinearBase({0, full_out, start, local_out, group}, std::move(tp)), gather_(gather_output) {
  weight = register_parameter("weight", torch::empty({local_out, in}));
  if (has_bias) bias = register_parameter("bias", torch::empty({local_out}));
  init_linear(weight, bias, in);
}

LowRankFactorImpl::LowRankFactorImpl(int64_t out, int64_t in, bool has_bias, std::optional<ShardSlice> slice)
    : slice_(slice) {
  weight = register_parameter("weight", torch::empty({out, in}));
  init_linear(weight, /*bias=*/{}, in);
  if (has_bias) bias = register_parameter("bias", torch::zeros({out}));
}

namespace {
// The whole output of a layer whose last dimension is split as `s` says (key/value heads
// replicated over a group are taken once).
torch::Tensor gather_output(const torch::Tensor& y, ShardSlice s, const CommPtr& tp) {
  s.dim = y.dim() - 1;
  return gather_shards(y, s, tp);
}
}  // namespace

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) {
  auto xin = copy_to_tp(x, tp_);
  auto y = factor_a ? local_linear(local_linear(xin, factor_a->weight), factor_b->weight, factor_b->bias)
                    : local_linear(xin, weight, bias);
  if (adapter) y = y + adapter(x);
  if (observer) observer(gather_output(y.detach(), slice_, tp_));
  return gather_ ? gather_from_tp(y, tp_) : y;
}

void ParallelLinearBase::replace_with_factors(int64_t rank, int64_t a_in, std::optional<ShardSlice> a_slice,
                                              int64_t b_out, std::optional<ShardSlice> b_slice) {
  const auto dtype = weight.scalar_type();
  const auto device = weight.device();
  parameters_.erase("weight");
  if (bias.defined()) parameters_.erase("bias");
  weight = bias = torch::Tensor();
  factor_a = register_module("factor_a", LowRankFactor(rank, a_in, false, a_slice));
  factor_b = register_module("factor_b", LowRankFactor(b_out, rank, true, b_slice));
  factor_a->to(device, dtype);
  factor_b->to(device, dtype);
}

void ColumnParallelLinearImpl::make_low_rank(int64_t rank) {
  replace_with_factors(rank, weight.size(1), std::nullopt, slice_.length, slice_);
}

std::optional<ShardSlice> ColumnParallelLinearImpl::slice_of(const std::string&) const { return slice_; }

RowParallelLinearImpl::RowParallelLinearImpl(int64_t full_in, int64_t start, int64_t local_in, int64_t out,
                                             bool has_bias, CommPtr tp)
    : ParallelLinearBase({1, full_in, start, local_in, 1}, std::move(tp)) {
  weight = register_parameter("weight", torch::empty({out, local_in}));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}));
  init_linear(weight, bias, full_in);
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor y;
  if (factor_a) {
    y = local_linear(reduce_from_tp(local_linear(x, factor_a->weight), tp_), factor_b->weight, factor_b->bias);
  } else if (tp_->size() == 1) {
    y = local_linear(x, weight, bias);
  } else {
    // The bias is added once, after the partial products are summed.
    y = reduce_from_tp(local_linear(x, weight), tp_);
    if (bias.defined()) y = y + bias;
  }
  if (adapter) y = y + adapter(x);
  if (observer) observer(y.detach());
  return y;
}

void RowParallelLinearImpl::make_low_rank(int64_t rank) {
  replace_with_factors(rank, slice_.length, slice_, weight.size(0), std::nullopt);
}

std::optional<ShardSlice> RowParallelLinearImpl::slice_of(const std::string& param) const {
  if (param == "bias") return std::nullopt;
  return slice_;
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, CommPtr tp) : tp_(std::move(tp)) {
  const int64_t local = padded_vocab(vocab, tp_->size()) / tp_->size();
  slice_ = {0, vocab, tp_->rank() * local, local, 1};
  weight = register_parameter("weight",
                              SkipParameterInit::active() ? torch::empty({local, dim}) : torch::randn({local, dim}));
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& ids) {
  if (tp_->size() == 1) return torch::embedding(weight, ids);
  auto outside = (ids < slice_.start).logical_or(ids >= slice_.start + slice_.length);
  auto local_ids = (ids - slice_.start).masked_fill(outside, 0);
  auto out = torch::embedding(weight, local_ids).masked_fill(outside.unsqueeze(-1), 0.0);
  return reduce_from_tp(out, tp_);
}

std::optional<ShardSlice> VocabParallelEmbeddingImpl::slice_of(const std::string&) const { return slice_; }

namespace {

struct VocabParallelCrossEntropy : torch::autograd::Function<VocabParallelCrossEntropy> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& local_logits, const torch::Tensor& targets,
                               int64_t vocab_start, int64_t vocab, const CommPtr& tp, int64_t ignore_index) {
    auto logits = local_logits.to(torch::kFloat32);
    const int64_t local = logits.size(-1);
    auto columns = torch::arange(vocab_start, vocab_start + local, targets.options());
    auto padding = columns >= vocab;
    if (padding.any().item<bool>())
      logits = logits.masked_fill(padding.view({1, local}), -std::numeric_limits<float>::infinity());
    auto max = std::get<0>(logits.max(-1)).contiguous();
    tp->allreduce(max, ReduceOp::Max);
    auto shifted = logits - max.unsqueeze(-1);
    auto exp = shifted.exp();
    auto sum = exp.sum(-1).contiguous();
    tp->allreduce(sum, ReduceOp::Sum);
    auto ignored = targets == ignore_index;
    auto target_local = targets - vocab_start;
    auto here = (target_local >= 0).logical_and(target_local < local).logical_and(ignored.logical_not());
    auto index = target_local.masked_fill(here.logical_not(), 0);
    auto predicted =
        shifted.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(here.logical_not(), 0.0).contiguous();
    tp->allreduce(predicted, ReduceOp::Sum);
    auto loss = (sum.log() - predicted).masked_fill(ignored, 0.0);
    ctx->save_for_backward({exp / sum.unsqueeze(-1), index, here, ignored});
    ctx->saved_data["dtype"] = static_cast<int64_t>(local_logits.scalar_type());
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto saved = ctx->get_saved_variables();
    auto grad = saved[0].clone();
    auto index = saved[1], here = saved[2], ignored = saved[3];
    grad.scatter_add_(-1, index.unsqueeze(-1), -here.to(grad.scalar_type()).unsqueeze(-1));
    grad.mul_((g[0] * ignored.logical_not().to(g[0].scalar_type())).unsqueeze(-1));
    auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), {}, {}, {}, {}, {}};
  }
};

// log-softmax over the whole vocabulary of vocabulary-parallel logits (fp32), and its exp;
// padding columns get probability 0 and log-probability 0 (they never contribute).
std::pair<torch::Tensor, torch::Tensor> vocab_parallel_log_softmax(const torch::Tensor& local_logits,
                                                                   const torch::Tensor& padding, const CommPtr& tp) {
  auto logits = local_logits.to(torch::kFloat32).masked_fill(padding, -std::numeric_limits<float>::infinity());
  auto max = std::get<0>(logits.max(-1)).contiguous();
  tp->allreduce(max, ReduceOp::Max);
  auto shifted = logits - max.unsqueeze(-1);
  auto sum = shifted.exp().sum(-1).contiguous();
  tp->allreduce(sum, ReduceOp::Sum);
  auto log_p = (shifted - sum.log().unsqueeze(-1)).masked_fill(padding, 0.0);
  return {log_p, log_p.exp().masked_fill(padding, 0.0)};
}

struct VocabParallelKL : torch::autograd::Function<VocabParallelKL> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& student_local,
                               const torch::Tensor& teacher_local, double temperature, int64_t vocab_start,
                               int64_t vocab, const CommPtr& tp) {
    const int64_t local = student_local.size(-1);
    auto columns = torch::arange(vocab_start, vocab_start + local, torch::kInt64).to(student_local.device());
    auto padding = (columns >= vocab).view({1, local});
    auto [log_p, p] = vocab_parallel_log_softmax(teacher_local.detach() / temperature, padding, tp);
    auto [log_q, q] = vocab_parallel_log_softmax(student_local.detach() / temperature, padding, tp);
    auto kl = (p * (log_p - log_q)).sum(-1).contiguous();
    tp->allreduce(kl, ReduceOp::Sum);
    ctx->save_for_backward({(q - p) / temperature});
    ctx->saved_data["dtype"] = static_cast<int64_t>(student_local.scalar_type());
    return kl;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto grad = ctx->get_saved_variables()[0] * g[0].unsqueeze(-1);
    auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), {}, {}, {}, {}, {}};
  }
};

}  // namespace

torch::Tensor vocab_parallel_kl_divergence(const torch::Tensor& student_local, const torch::Tensor& teacher_local,
                                           double temperature, int64_t vocab_start, int64_t vocab, const CommPtr& tp) {
  return VocabParallelKL::apply(student_local, teacher_local, temperature, vocab_start, vocab, tp);
}

torch::Tensor vocab_parallel_cross_entropy(const torch::Tensor& local_logits, const torch::Tensor& targets,
                                           int64_t vocab_start, int64_t vocab, const CommPtr& tp,
                                           int64_t ignore_index) {
  return VocabParallelCrossEntropy::apply(local_logits, targets, vocab_start, vocab, tp, ignore_index);
}

}  // namespace crash
