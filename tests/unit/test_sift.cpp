// SIFT's sparse optimiser: the top-k selection against a sort (ties to the lower index), the
// shard-to-global index map, RHO = 1 against the dense AdamW bit for bit, and RHO < 1 against
// the dense AdamW on masked gradients, with the entries outside the mask untouched.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <numeric>

#include "framework/sift.h"

using namespace crash;

namespace {

// The k largest |g| by (|g| descending, flat index ascending), as sorted flat indices.
std::vector<int64_t> reference_top_k(const torch::Tensor& g, int64_t k) {
  auto a = g.abs().to(torch::kFloat64).reshape({-1});
  auto acc = a.accessor<double, 1>();
  std::vector<int64_t> order(static_cast<size_t>(a.numel()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return acc[x] > acc[y]; });
  order.resize(static_cast<size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<int64_t> as_vector(const torch::Tensor& t) {
  auto c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

TEST(Sift, KIsFloorRhoNumelPlusOne) {
  EXPECT_EQ(sift_k(0.05, 1000), 51);
  EXPECT_EQ(sift_k(0.001, 10), 1);
  EXPECT_EQ(sift_k(1.0, 37), 37);  // at most numel
  EXPECT_EQ(sift_k(0.5, 7), 4);
}

TEST(Sift, TopKMatchesSortWithTies) {
  torch::set_num_threads(1);
  torch::manual_seed(3);
  // Random values, and integer values with many ties (zeros included) and negative signs.
  for (auto g : {torch::randn({13, 17}), torch::randint(-3, 4, {9, 11}).to(torch::kFloat32),
                 torch::zeros({5, 6})}) {
    for (int64_t k : {int64_t(1), int64_t(7), g.numel() / 2, g.numel()}) {
      auto idx = select_top_k(g, k, std::nullopt, nullptr, 0);
      EXPECT_EQ(idx.numel(), k);
      EXPECT_EQ(as_vector(idx), reference_top_k(g, k)) << "k " << k;
    }
  }
}

TEST(Sift, ShardToGlobalIndices) {
  auto full = torch::arange(4 * 6 * 3, torch::kInt64).reshape({4, 6, 3});
  for (int64_t dim : {0, 1, 2}) {
    const int64_t n = full.size(dim);
    for (int64_t start : {int64_t(0), n / 2}) {
      ShardSlice s{dim, n, start, n - n / 2, 1};
      auto shard = full.narrow(dim, start, s.length).contiguous();
      auto local = torch::arange(shard.numel(), torch::kInt64);
      // full's values are their own flat indices.
      EXPECT_TRUE(torch::equal(shard_to_global(local, shard.sizes(), s), shard.reshape({-1}))) << dim << " " << start;
    }
  }
}

namespace {

struct Run {
  std::vector<torch::Tensor> params;
  std::vector<double> norms;
  std::unique_ptr<Optimizer> optimizer;
};

// 10 steps with fixed random gradients (a new draw each step) on three tensors.
template <typename MakeOptimizer>
Run run_steps(MakeOptimizer make, const std::vector<torch::Tensor>& masks = {}) {
  torch::manual_seed(11);
  Run r;
  r.params = {torch::randn({7, 5}), torch::randn({5}), torch::randn({3, 4, 2})};
  std::vector<OptimParam> op;
  for (size_t i = 0; i < r.params.size(); ++i) {
    r.params[i].requires_grad_(true);
    op.push_back({"p" + std::to_string(i), r.params[i], true});
  }
  r.optimizer = make(op);
  auto& opt = r.optimizer;
  torch::manual_seed(12);
  for (int step = 0; step < 10; ++step) {
    for (size_t i = 0; i < r.params.size(); ++i) {
      auto g = torch::randn(r.params[i].sizes()) * (step == 0 ? 1.0 : 0.3);
      if (!masks.empty()) g = g * masks[i];
      r.params[i].mutable_grad() = g;
    }
    r.norms.push_back(opt->clip_gradients(1.5, {}));
    opt->step(1e-2 * (step + 1));
  }
  return r;
}

AdamWOptions options() {
  AdamWOptions o;
  o.weight_decay = 0.1;
  o.beta1 = 0.85;
  return o;
}

std::unique_ptr<Optimizer> sparse(const std::vector<OptimParam>& op, double rho) {
  std::vector<SiftParam> sp;
  for (const auto& p : op) sp.push_back({p, std::nullopt, p.param.numel()});
  return std::make_unique<SparseAdamW>(sp, rho, options(), nullptr, 0, nullptr);
}

}  // namespace

TEST(Sift, RhoOneIsDenseAdamWBitForBit) {
  torch::set_num_threads(1);
  auto dense = run_steps([](const std::vector<OptimParam>& op) { return std::make_unique<AdamW>(op, options()); });
  auto sift = run_steps([](const std::vector<OptimParam>& op) { return sparse(op, 1.0); });
  EXPECT_EQ(dense.norms, sift.norms);
  for (size_t i = 0; i < dense.params.size(); ++i) EXPECT_TRUE(torch::equal(dense.params[i], sift.params[i])) << i;
}

TEST(Sift, SparseStepsOnlyTheMask) {
  torch::set_num_threads(1);
  const double rho = 0.2;
  auto sift = run_steps([&](const std::vector<OptimParam>& op) { return sparse(op, rho); });
  auto* kept = static_cast<SparseAdamW*>(sift.optimizer.get());
  // The mask: the first step's top k; the reference is the dense AdamW with every gradient
  // masked (same clipping norm, same moments on the mask).
  torch::manual_seed(11);
  std::vector<torch::Tensor> base = {torch::randn({7, 5}), torch::randn({5}), torch::randn({3, 4, 2})};
  torch::manual_seed(12);
  std::vector<torch::Tensor> masks;
  for (size_t i = 0; i < base.size(); ++i) {
    auto g = torch::randn(base[i].sizes());
    const int64_t k = sift_k(rho, g.numel());
    auto idx = reference_top_k(g, k);
    EXPECT_EQ(as_vector(kept->indices(i)), idx);
    auto m = torch::zeros({g.numel()});
    for (auto j : idx) m[j] = 1;
    masks.push_back(m.reshape(g.sizes()));
  }
  auto dense = run_steps([](const std::vector<OptimParam>& op) { return std::make_unique<AdamW>(op, options()); }, masks);
  for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(dense.norms[i], sift.norms[i], 1e-12);
  for (size_t i = 0; i < base.size(); ++i) {
    auto on = masks[i].to(torch::kBool);
    EXPECT_TRUE(torch::equal(sift.params[i].detach().masked_select(~on), base[i].masked_select(~on))) << i;
    const double d = (sift.params[i].detach().masked_select(on) - dense.params[i].detach().masked_select(on)).abs().max().item<double>();
    EXPECT_LE(d, 1e-6) << i;
  }
}
