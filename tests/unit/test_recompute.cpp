// Activation recomputation (framework/recompute.h): the recomputed function runs again in
// backward, and a training pass gives the gradients of no recomputation bit for bit, with
// dropout on, on every family's attention (grouped heads, biases, soft-capping, sliding layers).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "framework/distributed_lm.h"
#include "framework/emulator.h"
#include "framework/recompute.h"
#include "framework/trainer.h"
#include "test_util.h"

using namespace crash;
using crash::test::expect_user_error;
using crash::test::fixture;

TEST(Recompute, RunsTheFunctionAgainInBackwardWithTheSameGradients) {
  torch::manual_seed(0);
  auto w = torch::randn({6, 5}, torch::requires_grad());
  auto x0 = torch::randn({4, 6});
  int calls = 0;
  RecomputedFn fn = [&](const std::vector<torch::Tensor>& in) {
    ++calls;
    return torch::tanh(torch::matmul(in[0], w)).pow(2) * in[0].sum(1, true);
  };
  auto direct_x = x0.clone().requires_grad_(true);
  fn({direct_x}).sum().backward();
  const auto direct_w = w.grad().clone(), direct_xg = direct_x.grad().clone();
  w.mutable_grad().zero_();
  calls = 0;
  auto x = x0.clone().requires_grad_(true);
  auto y = recomputed(fn, {x});
  EXPECT_EQ(calls, 1);
  y.sum().backward();
  EXPECT_EQ(calls, 2);  // again in backward
  EXPECT_TRUE(torch::equal(w.grad(), direct_w));
  EXPECT_TRUE(torch::equal(x.grad(), direct_xg));

  // An input that needs no gradient still gives the function's parameters theirs.
  w.mutable_grad().zero_();
  recomputed(fn, {x0}).sum().backward();
  EXPECT_TRUE(torch::equal(w.grad(), direct_w));

  // Without grad mode: one plain call.
  calls = 0;
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(recomputed(fn, {x0}), fn({x0})));
  EXPECT_EQ(calls, 2);
}

TEST(Recompute, ParsesTheThreeModesOnly) {
  EXPECT_EQ(parse_recompute("none"), Recompute::None);
  EXPECT_EQ(parse_recompute("full"), Recompute::Full);
  EXPECT_EQ(parse_recompute("selective"), Recompute::Selective);
  EXPECT_STREQ(recompute_name(Recompute::Selective), "selective");
  expect_user_error([] { parse_recompute("some"); }, {"--recompute", "none, full or selective", "some"});
  TrainOptions o;
  o.recompute = "FULL";
  expect_user_error([&] { check_train_options(o, 1); }, {"--recompute"});
}

namespace {

struct Grads {
  double loss = 0;
  std::vector<std::pair<std::string, torch::Tensor>> grads;
};

// One training pass (2 micro-batches, dropout 0.1 on residual branches and attention
// probabilities) of `model` from its fixture's weights, with `mode`.
Grads pass(const std::string& model, Recompute mode, bool all_train) {
  CheckpointReader ckpt(fixture("models/" + model));
  DistributedLM lm(ckpt, ProcessGrid::create({1, 1}));
  // Frozen embedding and first layer: the layers' inputs then need no gradient at first.
  lm.set_trainable([all_train](const std::string& name) {
    if (all_train) return true;
    auto l = layer_of_parameter(name);
    return l && *l >= 1;
  });
  lm.set_recompute(mode);
  auto ids = torch::tensor({5, 9, 17, 33, 2, 41, 8, 12, 7, 99, 3, 60, 21, 14, 77, 6}, torch::kInt64).reshape({4, 4});
  auto mask = torch::ones({4, 4}, torch::kInt64);
  mask[1][3] = 0;
  mask[3][2] = 0, mask[3][3] = 0;
  DistributedLM::Dropout drop{0.1, 0.1, 7, 3, 0};
  Grads g;
  g.loss = lm.forward_backward(ids, mask, 2, true, {}, 0, nullptr, &drop);
  for (const auto& p : lm.trainable())
    g.grads.emplace_back(p.name, p.tensor.grad().defined() ? p.tensor.grad().clone() : torch::Tensor());
  return g;
}

}  // namespace

TEST(Recompute, TrainingGradientsBitwiseEqualNoRecomputation) {
  torch::set_num_threads(2);
  for (const std::string model : {"opt_preln", "llama_gqa", "qwen2_bias", "gemma2_softcap", "mistral_swa"}) {
    for (bool all : {true, false}) {
      const auto none = pass(model, Recompute::None, all);
      ASSERT_FALSE(none.grads.empty());
      for (auto mode : {Recompute::Full, Recompute::Selective}) {
        const auto r = pass(model, mode, all);
        const std::string what = model + (all ? " all" : " layers 1+") + " " + recompute_name(mode);
        EXPECT_EQ(r.loss, none.loss) << what;
        ASSERT_EQ(r.grads.size(), none.grads.size()) << what;
        for (size_t i = 0; i < r.grads.size(); ++i) {
          ASSERT_TRUE(none.grads[i].second.defined()) << what << " " << none.grads[i].first;
          ASSERT_TRUE(r.grads[i].second.defined()) << what << " " << r.grads[i].first;
          EXPECT_TRUE(torch::equal(r.grads[i].second, none.grads[i].second))
              << what << " " << r.grads[i].first << ": max diff "
              << (r.grads[i].second - none.grads[i].second).abs().max().item<double>();
        }
      }
    }
  }
}
