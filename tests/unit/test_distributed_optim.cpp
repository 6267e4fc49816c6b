// The distributed optimiser on one rank (DP = 1): the same numbers as AdamW, clipping
// included, for fp32 and bf16 parameters; its state as flat pieces of each parameter. The
// multi-rank equalities are in tests/cli/train_grids.py (mode zero).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "framework/distributed_optim.h"
#include "framework/optim.h"
#include "framework/trainer.h"
#include "parallel/errors.h"

using namespace crash;

namespace {

std::vector<torch::Tensor> params_of(torch::ScalarType dtype) {
  torch::manual_seed(7);
  return {torch::randn({7, 5}).to(dtype).requires_grad_(true), torch::randn({5}).to(dtype).requires_grad_(true),
          torch::randn({3, 4, 2}).to(dtype).requires_grad_(true)};
}

void run_both(torch::ScalarType dtype) {
  auto a = params_of(dtype), b = params_of(dtype);
  std::vector<OptimParam> pa, pb;
  for (size_t i = 0; i < a.size(); ++i) {
    // The last one is a copy counted elsewhere: out of the norm, still stepped.
    pa.push_back({"p" + std::to_string(i), a[i], i + 1 < a.size()});
    pb.push_back({"p" + std::to_string(i), b[i], i + 1 < a.size()});
  }
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW ref(pa, o);
  DistributedAdamW mine(pb, o, make_local_comm());
  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(50 + step);
    for (size_t i = 0; i < a.size(); ++i) {
      auto g = (torch::randn(a[i].sizes()) * 3).to(dtype);
      a[i].mutable_grad() = g.clone();
      b[i].mutable_grad() = g.clone();
    }
    const double na = ref.clip_gradients(1.0, {}), nb = mine.clip_gradients(1.0, {});
    EXPECT_NEAR(na, nb, 1e-12 * na);
    EXPECT_GT(na, 1.0);  // clipping acted
    ref.step(1e-2);
    mine.step(1e-2);
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
  // The moments (and bf16's masters) as flat pieces equal AdamW's whole tensors.
  std::map<std::string, torch::Tensor> whole;
  for (auto& s : ref.state()) whole[s.kind + "/" + s.param] = s.value;
  int pieces = 0;
  for (auto& s : mine.state()) {
    ASSERT_TRUE(whole.count(s.kind + "/" + s.param)) << s.kind << "/" << s.param;
    const auto& w = whole[s.kind + "/" + s.param];
    if (s.flat_start < 0) {
      EXPECT_TRUE(torch::equal(w, s.value));
      continue;
    }
    ++pieces;
    EXPECT_EQ(s.shape, w.sizes().vec());
    EXPECT_TRUE(torch::equal(w.reshape({-1}).narrow(0, s.flat_start, s.value.numel()), s.value));
  }
  EXPECT_EQ(pieces, static_cast<int>(a.size()) * (dtype == torch::kFloat32 ? 2 : 3));
  EXPECT_EQ(state_bytes(ref), state_bytes(mine));
}

}  // namespace

TEST(DistributedAdamW, OneRankIsAdamWFp32) { run_both(torch::kFloat32); }

TEST(DistributedAdamW, OneRankIsAdamWBf16) { run_both(torch::kBFloat16); }

TEST(DistributedAdamW, RefusedWithSift) {
  TrainOptions o;
  o.distributed_optimizer = true;
  o.sparse_increment = 0.5;
  EXPECT_THROW(check_train_options(o, 1), UserError);
  o.sparse_increment.reset();
  EXPECT_NO_THROW(check_train_options(o, 1));
}
