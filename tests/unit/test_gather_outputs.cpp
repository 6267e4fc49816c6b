// framework/gather_outputs.h: the DP shares of the forward job, which stage makes each hidden
// state, and on one rank the gathered outputs equal the model's own.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "framework/checkpoint.h"
#include "framework/gather_outputs.h"
#include "framework/token_input.h"
#include "parallel/pipeline.h"
#include "test_util.h"

namespace crash {
namespace {

TEST(DpShare, ContiguousNearEqualSharesCoverEveryItem) {
  for (int64_t n : {0, 1, 5, 7, 12})
    for (int64_t dp : {1, 2, 3, 4, 8}) {
      int64_t next = 0;
      for (int64_t d = 0; d < dp; ++d) {
        const auto [begin, end] = dp_share(n, dp, d);
        EXPECT_EQ(begin, next) << "n " << n << " dp " << dp << " d " << d;
        EXPECT_GE(end - begin, n / dp);
        EXPECT_LE(end - begin, n / dp + 1);
        next = end;
      }
      EXPECT_EQ(next, n) << "n " << n << " dp " << dp;
    }
  EXPECT_EQ(dp_share(7, 3, 0), std::make_pair(int64_t(0), int64_t(2)));
  EXPECT_EQ(dp_share(7, 3, 1), std::make_pair(int64_t(2), int64_t(4)));
  EXPECT_EQ(dp_share(7, 3, 2), std::make_pair(int64_t(4), int64_t(7)));
  // More replicas than items: some shares are empty.
  EXPECT_EQ(dp_share(2, 4, 0), std::make_pair(int64_t(0), int64_t(0)));
  EXPECT_EQ(dp_share(2, 4, 3), std::make_pair(int64_t(1), int64_t(2)));
}

TEST(HiddenStateStage, EmbeddingOnTheFirstStageLayerOutputsWhereTheyRun) {
  // 5 layers on 3 stages: [0, 2) [2, 4) [4, 5).
  const auto stages = split_layers(5, 3);
  EXPECT_EQ(hidden_state_stage(stages, 0), 0);  // the embedding's output
  EXPECT_EQ(hidden_state_stage(stages, 1), 0);  // after layer 0
  EXPECT_EQ(hidden_state_stage(stages, 2), 0);
  EXPECT_EQ(hidden_state_stage(stages, 3), 1);
  EXPECT_EQ(hidden_state_stage(stages, 4), 1);
  EXPECT_EQ(hidden_state_stage(stages, 5), 2);  // after the last layer (and the final norm)
  const auto one = split_layers(4, 1);
  for (int64_t l = 0; l <= 4; ++l) EXPECT_EQ(hidden_state_stage(one, l), 0);
}

TEST(GatherOutputs, OneRankReturnsTheModelsOwnOutputs) {
  torch::set_num_threads(1);
  CheckpointReader ckpt(test::fixture("models/llama_gqa"));
  const auto& cfg = ckpt.config();
  torch::manual_seed(0);
  std::vector<std::vector<int64_t>> seqs;
  for (int64_t n : {4, 6, 3, 5, 6}) {
    auto t = torch::randint(3, cfg.vocab_size, {n}, torch::kInt64);
    seqs.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  }
  DistributedLM model(ckpt, ProcessGrid::create({1, 1}));
  model.stage().eval();
  const auto local = forward_share(model, seqs, 6, 2, 1, false, true);
  EXPECT_EQ(local.logits.size(), 3u);  // batches of 2, 2 and 1
  const auto all = gather_outputs(model, {}, local, 5, 6, true);

  auto reference = load_model(ckpt);
  reference->eval();
  torch::NoGradGuard ng;
  auto batch = pad_batch(seqs, 0, seqs.size(), cfg.pad_token_id, false, 6);
  auto out = reference->forward(batch.ids, batch.mask, true);
  ASSERT_EQ(all.hidden.size(), out.hidden_states.size());
  EXPECT_TRUE(torch::allclose(all.logits, out.logits, 1e-4, 1e-5));
  for (size_t l = 0; l < all.hidden.size(); ++l)
    EXPECT_TRUE(torch::allclose(all.hidden[l], out.hidden_states[l], 1e-4, 1e-5)) << "hidden state " << l;

  const auto logits_only = gather_outputs(model, {}, forward_share(model, seqs, 6, 5, 1, false, false), 5, 6, false);
  EXPECT_TRUE(logits_only.hidden.empty());
  EXPECT_TRUE(torch::allclose(logits_only.logits, out.logits, 1e-4, 1e-5));
}

}  // namespace
}  // namespace crash
