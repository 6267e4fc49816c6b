// SIFT's sparse optimiser: the top-k selection against a sort (ties to the lower index), the
// shard-to-global index map, RHO = 1 against the dense AdamW bit for bit, and RHO < 1 against
// the dense AdamW on masked gradients, with the entries outside the mask untouched; the
// trainer's mask against torch::topk of a gradient computed independently on the same batch.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "framework/models/decoder.h"
#include "framework/safetensors.h"
#include "framework/sift.h"
#include "framework/trainer.h"
#include "test_util.h"

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
  for (auto g : {torch::randn({13, 17}), torch::randint(-3, 4, {9, 11}).to(torch::kFloat32), torch::zeros({5, 6})}) {
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
  auto dense =
      run_steps([](const std::vector<OptimParam>& op) { return std::make_unique<AdamW>(op, options()); }, masks);
  for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(dense.norms[i], sift.norms[i], 1e-12);
  for (size_t i = 0; i < base.size(); ++i) {
    auto on = masks[i].to(torch::kBool);
    EXPECT_TRUE(torch::equal(sift.params[i].detach().masked_select(~on), base[i].masked_select(~on))) << i;
    const double d = (sift.params[i].detach().masked_select(on) - dense.params[i].detach().masked_select(on))
                         .abs()
                         .max()
                         .item<double>();
    EXPECT_LE(d, 1e-6) << i;
  }
}

namespace {

// A least-squares model y = x a + b trained 5 steps of 2 backward passes each by `opt`;
// `after_backward` sees the parameters after every backward pass.
template <typename AfterBackward>
std::vector<torch::Tensor> train_least_squares(Optimizer& opt, std::vector<torch::Tensor> params,
                                               AfterBackward after_backward) {
  torch::manual_seed(21);
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    for (int pass = 0; pass < 2; ++pass) {
      auto x = torch::randn({8, 6}), y = torch::randn({8, 4});
      ((torch::matmul(x, params[0]) + params[1] - y).pow(2).sum() / 16).backward();
      after_backward(step, params);
    }
    opt.clip_gradients(0.5, {});
    opt.step(2e-2);
  }
  return params;
}

std::vector<torch::Tensor> least_squares_params() {
  torch::manual_seed(20);
  return {torch::randn({6, 4}).requires_grad_(true), torch::randn({4}).requires_grad_(true)};
}

}  // namespace

// Once the mask exists, backward keeps only the masked entries of each gradient (the dense
// .grad is dropped by the hook after accumulation) and the training equals the dense AdamW on
// masked gradients, accumulated over two backward passes per step.
TEST(Sift, ArmedHooksKeepOnlyMaskedGradients) {
  torch::set_num_threads(1);
  const double rho = 0.25;
  // No weight decay: here the loss depends on every entry, and the dense reference would decay
  // those outside the mask.
  AdamWOptions opts = options();
  opts.weight_decay = 0;
  auto sp = least_squares_params();
  std::vector<SiftParam> sift_params;
  for (size_t i = 0; i < sp.size(); ++i)
    sift_params.push_back({{"p" + std::to_string(i), sp[i], true}, std::nullopt, sp[i].numel()});
  SparseAdamW sift(sift_params, rho, opts, nullptr, 0, nullptr);
  int dense_after_arm = 0;
  auto trained = train_least_squares(sift, sp, [&](int step, const std::vector<torch::Tensor>& ps) {
    for (const auto& p : ps) dense_after_arm += step > 0 && p.grad().defined();
  });
  EXPECT_EQ(dense_after_arm, 0);
  ASSERT_TRUE(sift.selected());
  EXPECT_EQ(sift.indices(0).numel(), sift_k(rho, 24));
  EXPECT_EQ(sift.indices(1).numel(), sift_k(rho, 4));

  auto rp = least_squares_params();
  std::vector<torch::Tensor> masks;
  std::vector<OptimParam> dense_params;
  for (size_t i = 0; i < rp.size(); ++i) {
    auto m = torch::zeros({rp[i].numel()});
    m.index_fill_(0, sift.indices(i), 1);
    masks.push_back(m.reshape(rp[i].sizes()));
    rp[i].register_hook([m = masks.back()](const torch::Tensor& g) { return g * m; });
    dense_params.push_back({"p" + std::to_string(i), rp[i], true});
  }
  AdamW dense(dense_params, opts);
  auto reference = train_least_squares(dense, rp, [](int, const std::vector<torch::Tensor>&) {});
  for (size_t i = 0; i < sp.size(); ++i) {
    auto on = masks[i].to(torch::kBool);
    const double d =
        (trained[i].detach().masked_select(on) - reference[i].detach().masked_select(on)).abs().max().item<double>();
    EXPECT_LE(d, 1e-6) << i;
  }
  // The gradient the sums over replicas see is the masked one.
  EXPECT_EQ(sift.gradient_of(sp[0]).numel(), sift.indices(0).numel());
}

// Every rank gets exactly the number of groups asked for, split in order by bytes with pinned
// names in the first; selecting group by group gives each tensor its top k and frees its grad.
TEST(Sift, SelectionGroupsSplitByBytes) {
  std::vector<torch::Tensor> ts = {torch::zeros({100}), torch::zeros({10}), torch::zeros({50}), torch::zeros({40})};
  std::vector<SiftParam> sp;
  for (size_t i = 0; i < ts.size(); ++i)
    sp.push_back({{"t" + std::to_string(i), ts[i], true}, std::nullopt, ts[i].numel()});
  SparseAdamW sift(sp, 0.1, options(), nullptr, 0, nullptr);
  auto groups = sift.selection_groups(4, {"t3"});
  ASSERT_EQ(groups.size(), 4u);
  EXPECT_EQ(groups[0], (std::vector<size_t>{0, 3}));
  EXPECT_EQ(groups[1], (std::vector<size_t>{}));
  EXPECT_EQ(groups[2], (std::vector<size_t>{1, 2}));
  EXPECT_TRUE(groups[3].empty());
  EXPECT_EQ(sift.selection_groups(9, {}).size(), 9u);
  torch::manual_seed(5);
  for (auto& t : ts) t.mutable_grad() = torch::randn(t.sizes());
  std::vector<torch::Tensor> grads;
  for (auto& t : ts) grads.push_back(t.grad().clone());
  for (const auto& g : groups) {
    sift.select(g);
    for (size_t i : g) EXPECT_FALSE(ts[i].grad().defined()) << i;
  }
  for (size_t i = 0; i < ts.size(); ++i)
    EXPECT_EQ(as_vector(sift.indices(i)), reference_top_k(grads[i], sift_k(0.1, ts[i].numel()))) << i;
}

// The trainer's mask against an independent computation. One SIFT step of train() (float64,
// one pass holding every example, two selection passes) on a fixture model; its saved
// increments name each tensor's trained entries. Here the gradient of the summed target-token
// loss is computed with the plain CausalLM, one example at a time without padding, and
// torch::topk picks floor(rho numel) + 1 entries by |g| (rounded to fp32, as the selection
// compares): the sets must be equal. Where the k-th and (k+1)-th |g| tie in fp32 (unseen
// embedding rows have g = 0), the entries above the tie must all be chosen, and the rest of
// the k from the tie, lowest flat index first.
class SiftSelection : public ::testing::TestWithParam<std::string> {};

TEST_P(SiftSelection, TrainerSelectsTheTopGradientEntriesOfTheFirstBatch) {
  torch::set_num_threads(2);
  test::TempDir tmp;
  const std::string model_dir = test::fixture("models/" + GetParam());
  CheckpointReader ckpt(model_dir);
  const int64_t V = ckpt.config().vocab_size;
  torch::manual_seed(21);
  std::vector<std::vector<int64_t>> examples;
  {
    std::ofstream f(tmp / "data.jsonl");
    for (int i = 0; i < 4; ++i) {
      auto t = torch::randint(3, V, {6 + i}, torch::kInt64);
      examples.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
      f << nlohmann::json{{"tokens", examples.back()}}.dump() << "\n";
    }
  }
  const double rho = 0.03;
  TrainOptions o;
  o.model = model_dir;
  o.data = tmp / "data.jsonl";
  o.out = tmp / "run";
  o.steps = 1;
  o.batch_size = 4;  // the first (and only) micro-batch holds every example, in some order
  o.lr = 1e-3;
  o.train_all = true;
  o.dtype = torch::kFloat64;
  o.sparse_increment = rho;
  o.sift_selection_passes = 2;
  o.save_increments = tmp / "inc.safetensors";
  train(o);
  SafetensorsFile inc(tmp / "inc.safetensors");

  // The reference gradient: sum over examples of the next-token cross-entropy (the trainer's
  // mean differs by a positive factor, which keeps the order of |g|).
  auto model = load_model(ckpt);
  model->to(torch::kFloat64);
  for (const auto& ex : examples) {
    auto ids = torch::tensor(ex, torch::kInt64).unsqueeze(0);
    auto logits = model->forward(ids, {}).logits.squeeze(0);
    const int64_t n = ids.size(1);
    torch::nn::functional::cross_entropy(logits.narrow(0, 0, n - 1), ids.squeeze(0).narrow(0, 1, n - 1),
                                         torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
        .backward();
  }
  double scale = 0;
  for (const auto& item : model->named_parameters())
    scale = std::max(scale, item.value().grad().abs().max().item<double>());
  int64_t tensors = 0, exact = 0, no_signal = 0;
  for (const auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    SCOPED_TRACE(name);
    if (name == "lm_head.weight" && ckpt.config().tie_word_embeddings) continue;  // the embedding
    ASSERT_TRUE(inc.contains(name + ".sift_index"));
    auto got = as_vector(inc.read(name + ".sift_index"));
    auto g = item.value().grad().reshape({-1}).abs().to(torch::kFloat32);
    const int64_t k = sift_k(rho, g.numel());
    ASSERT_EQ(static_cast<int64_t>(got.size()), k);
    ++tensors;
    // The key projection's bias has a zero gradient in exact arithmetic (softmax ignores a
    // shift shared by every key of a query): what both computations hold there is rounding
    // noise, so its order is not compared.
    if (item.value().grad().abs().max().item<double>() <= 1e-6 * scale) {  // the others: above 1e-2
      EXPECT_NE(name.find("k_proj.bias"), std::string::npos);
      ++no_signal;
      continue;
    }
    auto [values, order] = torch::topk(g, std::min(k + 1, g.numel()));
    const float kth = values[k - 1].item<float>();
    const bool tie = k < g.numel() && values[k].item<float>() == kth;
    std::vector<int64_t> want;
    if (!tie) {
      want = as_vector(order.narrow(0, 0, k));
    } else {
      want = as_vector((g > kth).nonzero().reshape({-1}));
      const auto at_kth = as_vector((g == kth).nonzero().reshape({-1}));  // ascending
      want.insert(want.end(), at_kth.begin(), at_kth.begin() + (k - static_cast<int64_t>(want.size())));
    }
    std::sort(want.begin(), want.end());
    EXPECT_EQ(got, want);
    exact += tie ? 0 : 1;
  }
  // Every trained tensor was seen (tied head: one tensor), all but OPT's 4 layers' k_proj biases
  // (Qwen3 has none; a rotated key bias would carry signal) compared, most without any tie.
  EXPECT_EQ(tensors, static_cast<int64_t>(inc.tensors().size()) / 2);
  EXPECT_EQ(no_signal, ckpt.config().rotary ? 0 : ckpt.config().num_layers);
  EXPECT_GT(exact, tensors / 2);
}

// OPT (biases everywhere, tied) and Qwen3 (per-head q/k norms, one KV head, untied).
INSTANTIATE_TEST_SUITE_P(Fixtures, SiftSelection, ::testing::Values("opt_preln", "qwen3_kv1"));
