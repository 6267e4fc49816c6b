// The trainer's optimiser: AdamW against LibTorch's own, fp32 master weights of bf16
// parameters, clipping by the global norm against a direct computation, the schedule.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>

#include "framework/optim.h"
#include "framework/trainer.h"

using namespace crash;

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

std::vector<torch::Tensor> random_params(uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({7, 5}), torch::randn({5}), torch::randn({3, 4, 2})};
}

}  // namespace

TEST(AdamW, MatchesTorchAdamWWithWeightDecay) {
  torch::set_num_threads(1);
  auto ours = random_params(1), theirs = random_params(1);
  std::vector<OptimParam> op;
  for (size_t i = 0; i < ours.size(); ++i) {
    ours[i].requires_grad_(true);
    theirs[i].requires_grad_(true);
    op.push_back({"p" + std::to_string(i), ours[i], true});
  }
  AdamWOptions o;
  o.weight_decay = 0.1;
  o.beta1 = 0.85;
  o.beta2 = 0.99;
  o.eps = 1e-7;
  AdamW mine(op, o);
  torch::optim::AdamW ref(theirs, torch::optim::AdamWOptions(1e-2).betas({0.85, 0.99}).eps(1e-7).weight_decay(0.1));
  double worst = 0;
  for (int step = 0; step < 6; ++step) {
    const double lr = 1e-2 * (step + 1) / 6.0;  // a changing learning rate, as the schedule gives
    for (auto& g : ref.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    torch::manual_seed(100 + step);
    for (size_t i = 0; i < ours.size(); ++i) {
      auto g = torch::randn(ours[i].sizes());
      ours[i].mutable_grad() = g.clone();
      theirs[i].mutable_grad() = g.clone();
    }
    mine.step(lr);
    ref.step();
    for (size_t i = 0; i < ours.size(); ++i) worst = std::max(worst, max_diff(ours[i], theirs[i]));
  }
  std::cout << "AdamW vs torch::optim::AdamW, 6 steps: max abs diff " << worst << "\n";
  EXPECT_LE(worst, 1e-6);
  EXPECT_EQ(mine.steps(), 6);
  // The parameters moved (the comparison is not between two untouched copies).
  EXPECT_GT(max_diff(ours[0], random_params(1)[0]), 1e-3);
}

TEST(AdamW, Bf16ParametersStepAnFp32Master) {
  torch::set_num_threads(1);
  torch::manual_seed(3);
  auto start = torch::randn({6, 4}).to(torch::kBFloat16);
  auto param = start.clone().requires_grad_(true);
  auto ref_param = start.to(torch::kFloat32).requires_grad_(true);
  AdamWOptions o;
  o.weight_decay = 0.01;
  AdamW mine({{"w", param, true}}, o);
  torch::optim::AdamW ref({ref_param}, torch::optim::AdamWOptions(1e-3).weight_decay(0.01));
  for (int step = 0; step < 5; ++step) {
    auto g = torch::randn({6, 4}).to(torch::kBFloat16);  // representable in bf16: both see the same gradient
    param.mutable_grad() = g.clone();
    ref_param.mutable_grad() = g.to(torch::kFloat32);
    mine.step(1e-3);
    ref.step();
  }
  torch::Tensor master;
  for (auto& s : mine.state())
    if (s.kind == "master") master = s.value;
  ASSERT_TRUE(master.defined());
  EXPECT_EQ(master.scalar_type(), torch::kFloat32);
  EXPECT_LE(max_diff(master, ref_param), 1e-6);
  // The bf16 parameter is the master rounded, not a sum of rounded steps.
  EXPECT_EQ(max_diff(param, master.to(torch::kBFloat16)), 0.0);
}

TEST(ClipGradNorm, MatchesDirectComputation) {
  auto a = torch::randn({4, 3}).requires_grad_(true), b = torch::randn({5}).requires_grad_(true),
       copy = torch::randn({2}).requires_grad_(true);
  a.mutable_grad() = torch::randn({4, 3}) * 3;
  b.mutable_grad() = torch::randn({5}) * 3;
  copy.mutable_grad() = torch::full({2}, 100.0);  // held (and counted) elsewhere: not in the norm
  std::vector<OptimParam> ps = {{"a", a, true}, {"b", b, true}, {"copy", copy, false}};
  const double direct = std::sqrt(a.grad().to(torch::kFloat64).pow(2).sum().item<double>() +
                                  b.grad().to(torch::kFloat64).pow(2).sum().item<double>());
  auto ga = a.grad().clone(), gb = b.grad().clone();
  const double norm = clip_grad_norm(ps, 1.0, {make_local_comm()});
  EXPECT_NEAR(norm, direct, 1e-9 * direct);
  ASSERT_GT(direct, 1.0);
  const double coef = 1.0 / (direct + 1e-6);
  EXPECT_LE(max_diff(a.grad(), ga * coef), 1e-6);
  EXPECT_LE(max_diff(b.grad(), gb * coef), 1e-6);
  EXPECT_NEAR(global_grad_norm(ps, {}), 1.0, 1e-5);
  // Under the limit nothing changes.
  auto before = a.grad().clone();
  clip_grad_norm(ps, 10.0, {});
  EXPECT_EQ(max_diff(a.grad(), before), 0.0);
}

TEST(LinearSchedule, WarmupThenDecayToZero) {
  EXPECT_DOUBLE_EQ(linear_schedule(1.0, 0, 4, 10), 0.0);
  EXPECT_DOUBLE_EQ(linear_schedule(1.0, 2, 4, 10), 0.5);
  EXPECT_DOUBLE_EQ(linear_schedule(1.0, 4, 4, 10), 1.0);
  EXPECT_DOUBLE_EQ(linear_schedule(1.0, 7, 4, 10), 0.5);
  EXPECT_DOUBLE_EQ(linear_schedule(1.0, 10, 4, 10), 0.0);
  EXPECT_DOUBLE_EQ(linear_schedule(2.0, 0, 0, 4), 2.0);
  EXPECT_DOUBLE_EQ(linear_schedule(2.0, 3, 0, 4), 0.5);
}

TEST(EpochOrder, DeterministicPermutationPerEpoch) {
  auto a = epoch_order(50, 7, 0), b = epoch_order(50, 7, 0), c = epoch_order(50, 7, 1), d = epoch_order(50, 8, 0);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
}
