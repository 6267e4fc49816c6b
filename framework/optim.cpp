#include "framework/optim.h"

#include <cmath>

namespace crash {

void Optimizer::zero_grad() {
  for (auto& p : params_)
    if (p.param.grad().defined()) p.param.mutable_grad().zero_();
}

double Optimizer::clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over) {
  return clip_grad_norm(params_, max_norm, sum_over);
}

AdamW::AdamW(std::vector<OptimParam> params, const AdamWOptions& options) : options_(options) {
  params_ = std::move(params);
  torch::NoGradGuard no_grad;
  for (auto& p : params_) {
    auto param = p.param.detach();
    own_master_.push_back(param.scalar_type() == torch::kFloat32);
    master_.push_back(own_master_.back() ? param : param.to(torch::kFloat32));
    exp_avg_.push_back(torch::zeros_like(master_.back()));
    exp_avg_sq_.push_back(torch::zeros_like(master_.back()));
  }
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto param = params_[i].param;
    if (!param.grad().defined()) continue;
    auto grad = param.grad().to(torch::kFloat32);
    adamw_update(master_[i], exp_avg_[i], exp_avg_sq_[i], grad, lr, steps_, options_);
    if (!own_master_[i]) param.detach().copy_(master_[i]);
  }
}

void adamw_update(torch::Tensor& w, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq, const torch::Tensor& grad,
                  double lr, int64_t step, const AdamWOptions& o) {
  const double bias1 = 1 - std::pow(o.beta1, static_cast<double>(step));
  const double bias2 = 1 - std::pow(o.beta2, static_cast<double>(step));
  // The order of torch::optim::AdamW, so both give the same bits.
  w.mul_(1 - lr * o.weight_decay);
  exp_avg.mul_(o.beta1).add_(grad, 1 - o.beta1);
  exp_avg_sq.mul_(o.beta2).addcmul_(grad, grad, 1 - o.beta2);
  auto denom = (exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(o.eps);
  w.addcdiv_(exp_avg, denom, -lr / bias1);
}

std::vector<StateTensor> AdamW::state() {
  std::vector<StateTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].name;
    out.push_back({"param", name, params_[i].param.detach()});
    if (!own_master_[i]) out.push_back({"master", name, master_[i]});
    out.push_back({"exp_avg", name, exp_avg_[i]});
    out.push_back({"exp_avg_sq", name, exp_avg_sq_[i]});
  }
  return out;
}

void AdamW::state_loaded() {}

double global_norm(const std::vector<torch::Tensor>& tensors, torch::Device device,
                   const std::vector<CommPtr>& sum_over) {
  torch::NoGradGuard no_grad;
  torch::Tensor sum;
  // Summed where the gradients are, in the same order: on a GPU one copy to the host per step
  // instead of one per tensor.
  for (const auto& t : tensors) {
    auto s = t.to(torch::kFloat64).pow(2).sum();
    sum = sum.defined() ? sum + s.to(sum.device()) : s;
  }
  auto total = (sum.defined() ? sum : torch::zeros({}, torch::kFloat64)).reshape({1}).to(device);
  for (const auto& comm : sum_over)
    if (comm && comm->size() > 1) comm->allreduce(total);
  return std::sqrt(total.item<double>());
}

double global_grad_norm(const std::vector<OptimParam>& params, const std::vector<CommPtr>& sum_over) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.in_norm && p.param.grad().defined()) grads.push_back(p.param.grad());
  return global_norm(grads, params.empty() ? torch::Device(torch::kCPU) : params.front().param.device(), sum_over);
}

double clip_grad_norm(const std::vector<OptimParam>& params, double max_norm, const std::vector<CommPtr>& sum_over) {
  const double norm = global_grad_norm(params, sum_over);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1) {
      torch::NoGradGuard no_grad;
      for (const auto& p : params)
        if (p.param.grad().defined()) p.param.mutable_grad().mul_(coef);
    }
  }
  return norm;
}

int64_t state_bytes(Optimizer& optimizer) {
  int64_t bytes = 0;
  for (const auto& s : optimizer.state())
    if (s.kind != "param") bytes += s.value.numel() * static_cast<int64_t>(s.value.element_size());
  return bytes;
}

double linear_schedule(double peak, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return peak * static_cast<double>(step) / static_cast<double>(warmup);
  if (total <= warmup) return peak;
  return peak * std::max(0.0, static_cast<double>(total - step) / static_cast<double>(total - warmup));
}

}  // namespace crash
