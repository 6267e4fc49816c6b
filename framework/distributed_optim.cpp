#include "framework/distributed_optim.h"

#include <algorithm>

#include "parallel/errors.h"

namespace crash {

namespace {

// A parameter's elements as one contiguous row (the optimiser writes through it).
torch::Tensor flat(const torch::Tensor& p) { return p.detach().view({-1}); }

}  // namespace

DistributedAdamW::DistributedAdamW(std::vector<OptimParam> params, const AdamWOptions& options, CommPtr dp)
    : options_(options), dp_(std::move(dp)) {
  params_ = std::move(params);
  if (!params_.empty()) dtype_ = params_.front().param.scalar_type();
  for (const auto& p : params_) {
    if (p.param.scalar_type() != dtype_)
      fail("the distributed optimizer needs one dtype for every trained parameter; {} is {}, not {}", p.name,
           c10::toString(p.param.scalar_type()), c10::toString(dtype_));
    if (!p.param.is_contiguous()) fail("the distributed optimizer needs contiguous parameters; {} is not", p.name);
    flat_offset_.push_back(total_);
    total_ += p.param.numel();
  }
  const int64_t n = dp_->size();
  // Equal parts for reduce_scatter: the padding is never stepped nor counted.
  total_ = (total_ + n - 1) / n * n;
  shard_ = total_ / n;
  begin_ = dp_->rank() * shard_;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t lo = std::max(begin_, flat_offset_[i]);
    const int64_t hi = std::min(begin_ + shard_, flat_offset_[i] + params_[i].param.numel());
    if (hi > lo) segments_.push_back({i, lo - flat_offset_[i], hi - lo, lo - begin_});
  }
  own_master_ = dtype_ == torch::kFloat32;
  torch::NoGradGuard no_grad;
  if (n > 1 && total_ > 0) {
    grad_buffer_ = torch::zeros({total_}, params_.front().param.options());
    for (size_t i = 0; i < params_.size(); ++i)
      params_[i].param.mutable_grad() =
          grad_buffer_.narrow(0, flat_offset_[i], params_[i].param.numel()).view(params_[i].param.sizes());
  }
  const auto f32 = torch::TensorOptions()
                       .dtype(torch::kFloat32)
                       .device(params_.empty() ? torch::Device(torch::kCPU) : params_.front().param.device());
  exp_avg_ = torch::zeros({shard_}, f32);
  exp_avg_sq_ = torch::zeros({shard_}, f32);
  if (!own_master_) {
    master_ = torch::zeros({shard_}, f32);
    for (const auto& s : segments_)
      master_.narrow(0, s.offset, s.length).copy_(flat(params_[s.param].param).narrow(0, s.start, s.length));
  }
}

void DistributedAdamW::reduce_gradients() {
  if (grad_.defined()) return;
  torch::NoGradGuard no_grad;
  has_grad_.assign(params_.size(), grad_buffer_.defined());
  torch::Tensor buffer = grad_buffer_;
  if (!buffer.defined()) {
    auto opts = torch::TensorOptions().dtype(dtype_);
    if (!params_.empty()) opts = opts.device(params_.front().param.device());
    buffer = torch::zeros({total_}, opts);
  }
  for (size_t i = 0; i < params_.size() && !grad_buffer_.defined(); ++i) {
    const auto& g = params_[i].param.grad();
    if (!g.defined()) continue;
    has_grad_[i] = true;
    buffer.narrow(0, flat_offset_[i], g.numel()).copy_(g.reshape({-1}));
  }
  // The model summed the gradients over every group but DP: the sum over DP is this one, and each
  // rank keeps only its range.
  grad_ = total_ > 0 && dp_->size() > 1 ? dp_->reduce_scatter(buffer, 0) : buffer;
}

double DistributedAdamW::clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over) {
  reduce_gradients();
  // Each element is owned by one DP rank: the squares sum over DP too, with nothing counted twice.
  std::vector<torch::Tensor> owned;
  for (const auto& s : segments_)
    if (params_[s.param].in_norm && has_grad_[s.param]) owned.push_back(grad_.narrow(0, s.offset, s.length));
  auto groups = sum_over;
  groups.push_back(dp_);
  const double norm = global_norm(owned, grad_.device(), groups);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    torch::NoGradGuard no_grad;
    // In the gradients' dtype, as clip_grad_norm scales them.
    if (coef < 1) grad_.mul_(coef);
  }
  return norm;
}

void DistributedAdamW::step(double lr) {
  reduce_gradients();
  torch::NoGradGuard no_grad;
  ++steps_;
  const auto grad = grad_.to(torch::kFloat32);
  // AdamW skips a parameter without a gradient; with DP > 1 the replicated optimiser's sum gave
  // it zeros, so it steps there.
  const bool skip_absent = dp_->size() == 1;
  for (const auto& s : segments_) {
    if (skip_absent && !has_grad_[s.param]) continue;
    auto param = flat(params_[s.param].param).narrow(0, s.start, s.length);
    auto m = exp_avg_.narrow(0, s.offset, s.length);
    auto v = exp_avg_sq_.narrow(0, s.offset, s.length);
    auto w = own_master_ ? param : master_.narrow(0, s.offset, s.length);
    adamw_update(w, m, v, grad.narrow(0, s.offset, s.length), lr, steps_, options_);
    if (!own_master_) param.copy_(w);
  }
  grad_ = torch::Tensor();
  if (dp_->size() == 1 || total_ == 0) return;
  // Every DP rank's updated range, in the parameters' dtype (masters were rounded as AdamW does).
  auto mine = torch::zeros({shard_}, torch::TensorOptions().dtype(dtype_).device(exp_avg_.device()));
  for (const auto& s : segments_)
    mine.narrow(0, s.offset, s.length).copy_(flat(params_[s.param].param).narrow(0, s.start, s.length));
  const auto all = dp_->allgather(mine, 0);
  for (size_t i = 0; i < params_.size(); ++i)
    flat(params_[i].param).copy_(all.narrow(0, flat_offset_[i], params_[i].param.numel()));
}

std::vector<StateTensor> DistributedAdamW::state() {
  std::vector<StateTensor> out;
  for (const auto& p : params_) out.push_back({"param", p.name, p.param.detach()});
  for (const auto& s : segments_) {
    const auto& p = params_[s.param];
    auto piece = [&](const char* kind, const torch::Tensor& t) {
      StateTensor st{kind, p.name, t.narrow(0, s.offset, s.length)};
      st.flat_start = s.start;
      st.shape = p.param.sizes().vec();
      out.push_back(std::move(st));
    };
    if (!own_master_) piece("master", master_);
    piece("exp_avg", exp_avg_);
    piece("exp_avg_sq", exp_avg_sq_);
  }
  return out;
}

}  // namespace crash
