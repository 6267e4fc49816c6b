// analysis/collection.h: the round schedule DP replicas follow (and skip on resume), the length
// groups of a block, and a collection on one rank: equal to the model's own pooled hidden
// states, and the same after an interrupted run is resumed.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <numeric>

#include "analysis/collection.h"
#include "analysis/hdf5.h"
#include "analysis/pooling.h"
#include "framework/checkpoint.h"
#include "framework/token_input.h"
#include "test_util.h"

namespace crash {
namespace {

using test::fixture;
using test::TempDir;

TEST(CollectionSchedule, EveryBlockOnceInRoundsOfDp) {
  for (int64_t dp : {1, 2, 3}) {
    for (int64_t blocks : {1, 5, 6, 7}) {
      const int64_t rounds = collection_rounds(blocks, dp);
      EXPECT_EQ(rounds, (blocks + dp - 1) / dp) << "dp " << dp << " blocks " << blocks;
      std::vector<int> seen(static_cast<size_t>(blocks), 0);
      for (int64_t r = 0; r < rounds; ++r)
        for (int64_t d = 0; d < dp; ++d) {
          const int64_t b = round_block(r, dp, d);
          EXPECT_EQ(b, r * dp + d);
          if (b < blocks) ++seen[static_cast<size_t>(b)];
        }
      for (int s : seen) EXPECT_EQ(s, 1) << "dp " << dp << " blocks " << blocks;
    }
  }
}

TEST(CollectionSchedule, RoundIsDoneOnlyWhenAllItsBlocksAre) {
  // 7 blocks, 0, 1, 2 and 6 done.
  const std::vector<uint8_t> done{1, 1, 1, 0, 0, 0, 1};
  // dp = 1: one block a round.
  for (int64_t r = 0; r < 7; ++r) EXPECT_EQ(round_done(done, r, 1), done[static_cast<size_t>(r)] != 0) << r;
  // dp = 2: rounds {0,1} {2,3} {4,5} {6}.
  EXPECT_TRUE(round_done(done, 0, 2));
  EXPECT_FALSE(round_done(done, 1, 2));
  EXPECT_FALSE(round_done(done, 2, 2));
  EXPECT_TRUE(round_done(done, 3, 2));  // block 7 does not exist
  // dp = 3: rounds {0,1,2} {3,4,5} {6}.
  EXPECT_TRUE(round_done(done, 0, 3));
  EXPECT_FALSE(round_done(done, 1, 3));
  EXPECT_TRUE(round_done(done, 2, 3));
  // Nothing done: no round is skipped.
  const std::vector<uint8_t> none(7, 0);
  for (int64_t dp : {1, 2, 3})
    for (int64_t r = 0; r < collection_rounds(7, dp); ++r) EXPECT_FALSE(round_done(none, r, dp));
}

TEST(CollectionSchedule, ExamplesDoneCountsAShortLastBlock) {
  // 10 examples in blocks of 4: 4, 4, 2.
  EXPECT_EQ(examples_done({0, 0, 0}, 4, 10), 0);
  EXPECT_EQ(examples_done({1, 0, 0}, 4, 10), 4);
  EXPECT_EQ(examples_done({0, 0, 1}, 4, 10), 2);
  EXPECT_EQ(examples_done({1, 1, 1}, 4, 10), 10);
}

std::vector<std::vector<int64_t>> of_lengths(const std::vector<int>& lengths) {
  std::vector<std::vector<int64_t>> seqs;
  for (size_t i = 0; i < lengths.size(); ++i) seqs.emplace_back(static_cast<size_t>(lengths[i]), int64_t(i));
  return seqs;
}

TEST(LengthSortedGroups, SortedNearEqualAndStable) {
  //                      index: 0  1  2  3  4  5  6  7  8  9
  const auto seqs = of_lengths({9, 3, 5, 3, 1, 7, 3, 2, 8, 4});
  // The block [2, 9): lengths 5 3 1 7 3 2 8 at indices 2..8.
  const auto groups = length_sorted_groups(seqs, 2, 7, 3);
  ASSERT_EQ(groups.size(), 3u);
  std::vector<int64_t> all;
  for (const auto& g : groups) {
    EXPECT_GE(g.size(), 2u);  // 7 into 3: sizes 2, 2, 3
    EXPECT_LE(g.size(), 3u);
    all.insert(all.end(), g.begin(), g.end());
  }
  // Sorted by length; the two of length 3 (indices 3 and 6) keep their order.
  EXPECT_EQ(all, (std::vector<int64_t>{4, 7, 3, 6, 2, 5, 8}));
  EXPECT_EQ(groups[0], (std::vector<int64_t>{4, 7}));
  EXPECT_EQ(groups[1], (std::vector<int64_t>{3, 6}));
  EXPECT_EQ(groups[2], (std::vector<int64_t>{2, 5, 8}));
}

TEST(LengthSortedGroups, EqualLengthsKeepTheirOrder) {
  const auto seqs = of_lengths({4, 4, 4, 4, 4, 4});
  const auto groups = length_sorted_groups(seqs, 0, 6, 4);
  std::vector<int64_t> all;
  for (const auto& g : groups) all.insert(all.end(), g.begin(), g.end());
  std::vector<int64_t> expected(6);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(all, expected);
}

TEST(LengthSortedGroups, MoreGroupsThanExamplesGivesOneEach) {
  const auto seqs = of_lengths({6, 2, 4});
  const auto groups = length_sorted_groups(seqs, 0, 3, 8);
  ASSERT_EQ(groups.size(), 3u);
  EXPECT_EQ(groups[0], (std::vector<int64_t>{1}));
  EXPECT_EQ(groups[1], (std::vector<int64_t>{2}));
  EXPECT_EQ(groups[2], (std::vector<int64_t>{0}));
  ASSERT_EQ(length_sorted_groups(seqs, 0, 3, 1).size(), 1u);
  EXPECT_EQ(length_sorted_groups(seqs, 0, 3, 1)[0], (std::vector<int64_t>{1, 2, 0}));
}

class Collection : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    ckpt_ = std::make_unique<CheckpointReader>(fixture("models/opt_preln"));
    const auto& cfg = ckpt_->config();
    torch::manual_seed(0);
    for (int64_t n : {5, 3, 8, 3, 6, 2, 7}) {
      auto t = torch::randint(3, cfg.vocab_size, {n}, torch::kInt64);
      seqs_.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    }
    spec_.num_examples = static_cast<int64_t>(seqs_.size());
    spec_.block_size = 3;
    for (int64_t l = 0; l <= cfg.num_layers; ++l)
      spec_.widths.push_back(l == cfg.num_layers ? cfg.word_embed_proj_dim : cfg.hidden_size);
    settings_.length_groups = 2;
  }
  // Collects into `path`; with `fail_after` the run stops (throws) after that many rounds.
  void collect(const std::string& path, bool resume, int fail_after = -1) {
    auto grid = ProcessGrid::create({1, 1});
    ActivationArchive archive(path, spec_, grid->world(), resume, false);
    DistributedLM model(*ckpt_, grid);
    model.stage().eval();
    CollectSettings settings = settings_;
    settings.fail_after_rounds = fail_after;
    collect_activations(model, archive, spec_, seqs_, settings);
    archive.complete();
  }
  std::unique_ptr<CheckpointReader> ckpt_;
  std::vector<std::vector<int64_t>> seqs_;
  ArchiveSpec spec_;
  CollectSettings settings_;
};

TEST_F(Collection, RowsAreEachExamplesPooledHiddenStates) {
  TempDir tmp;
  const auto path = tmp / "a.h5";
  collect(path, false);
  auto model = load_model(*ckpt_);
  model->eval();
  torch::NoGradGuard ng;
  for (size_t i = 0; i < seqs_.size(); ++i) {
    auto batch = pad_batch(seqs_, i, i + 1, ckpt_->config().pad_token_id, false);
    auto out = model->forward(batch.ids, batch.mask, /*hidden_states=*/true);
    for (int64_t l = 0; l <= ckpt_->config().num_layers; ++l) {
      auto expected = pool_hidden(out.hidden_states[static_cast<size_t>(l)], batch.mask, "mean");
      auto got = h5_read(path, "layers/" + std::to_string(l)).slice(0, int64_t(i), int64_t(i) + 1);
      EXPECT_TRUE(torch::allclose(got, expected, 1e-4, 1e-5)) << "example " << i << " layer " << l;
    }
  }
}

TEST_F(Collection, ResumedRunEqualsOneRun) {
  TempDir tmp;
  const auto whole = tmp / "whole.h5", resumed = tmp / "resumed.h5";
  collect(whole, false);
  EXPECT_THROW(collect(resumed, false, 1), std::runtime_error);
  collect(resumed, true);
  for (int64_t l = 0; l <= ckpt_->config().num_layers; ++l) {
    const auto name = "layers/" + std::to_string(l);
    EXPECT_TRUE(torch::equal(h5_read(whole, name), h5_read(resumed, name))) << name;
  }
  EXPECT_TRUE(torch::equal(h5_read(whole, "example_hash"), h5_read(resumed, "example_hash")));
}

}  // namespace
}  // namespace crash
