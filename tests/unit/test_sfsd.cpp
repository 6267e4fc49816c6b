// SFSD (analysis/sfsd.h): factored models at full rank reproduce the original logits, a
// factored folder's save/load round trip keeps the logits, the factors project each module's
// outputs onto their main directions, --ratio and --budget give their formulas' ranks (--budget
// B: about B x the parameters), and bad ranks are user errors.
#include <torch/torch.h>

#include <fstream>

#include "analysis/sfsd.h"
#include "framework/checkpoint.h"
#include "framework/json_fields.h"
#include "framework/models/decoder.h"
#include "test_util.h"

namespace crash {
namespace {

using test::fixture;
using test::TempDir;

class Sfsd : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    ckpt_ = std::make_unique<CheckpointReader>(fixture("models/" + GetParam()));
    linears_ = decoder_linears(*ckpt_);
    torch::manual_seed(0);
    const int64_t V = ckpt_->config().vocab_size;
    for (int i = 0; i < 6; ++i) {
      auto t = torch::randint(3, V, {5 + 2 * i}, torch::kInt64);
      examples_.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    }
    DistributedLM model(*ckpt_, ProcessGrid::create({1, 1}));
    model.stage().eval();
    auto grid = ProcessGrid::create({1, 1});
    stats_ = gather_stats(*grid, linears_, calibrate(model, linears_, examples_, 16, 4));
    ids_ = torch::randint(3, V, {2, 7}, torch::kInt64);
    torch::NoGradGuard ng;
    original_ = load_model(*ckpt_)->forward(ids_, {}).logits;
  }

  // Writes the factored model with these ranks and loads it back.
  std::shared_ptr<CausalLM> factored(const std::map<std::string, int64_t>& ranks, const std::string& dir) {
    save_hf_folder(dir, ckpt_->config(), factored_tensors(*ckpt_, linears_, stats_, ranks), {},
                   {{"crash_sfsd_ranks", ranks}});
    return load_model(CheckpointReader(dir));
  }

  std::unique_ptr<CheckpointReader> ckpt_;
  std::vector<LinearInfo> linears_;
  std::vector<std::vector<int64_t>> examples_;
  std::map<std::string, OutputStats> stats_;
  torch::Tensor ids_, original_;
};

TEST_P(Sfsd, CalibrationCountsEveryNonPaddingToken) {
  double tokens = 0;
  for (const auto& e : examples_) tokens += std::min<size_t>(16, e.size());
  ASSERT_EQ(stats_.size(), linears_.size());
  for (const auto& [name, s] : stats_) EXPECT_EQ(s.count, tokens) << name;
}

TEST_P(Sfsd, FullRankReproducesTheLogits) {
  std::map<std::string, int64_t> ranks;
  for (const auto& m : linears_) ranks[m.name] = m.out;
  TempDir tmp;
  auto model = factored(ranks, tmp / "full");
  torch::NoGradGuard ng;
  auto logits = model->forward(ids_, {}).logits;
  // Two fp32 products (A x, then B) replace one: rounding scales with the logits (5.3 in qwen2_bias).
  EXPECT_LT((logits - original_).abs().max().item<double>(),
            1e-5 * std::max(1.0, original_.abs().max().item<double>()));
  // Every Linear is factored: no dense weight of a decoder Linear is left.
  for (const auto& p : model->named_parameters())
    for (const auto& m : linears_) EXPECT_NE(p.key(), m.name + ".weight");
}

TEST_P(Sfsd, SaveLoadRoundTripKeepsTheLogits) {
  auto ranks = ratio_ranks(linears_, 0.25);
  ASSERT_FALSE(ranks.empty());
  TempDir tmp;
  auto model = factored(ranks, tmp / "a");
  auto state = model->hf_state();
  for (const auto& [name, r] : ranks) {
    bool found = false;
    for (const auto& [n, t] : state)
      if (n == name + ".factor_a.weight") {
        found = true;
        EXPECT_EQ(t.size(0), r);
      }
    EXPECT_TRUE(found) << name;
  }
  save_hf_folder(tmp / "b", model->config(), state);
  auto again = load_model(CheckpointReader(tmp / "b"));
  torch::NoGradGuard ng;
  auto a = model->forward(ids_, {}).logits, b = again->forward(ids_, {}).logits;
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_GT((a - original_).abs().max().item<double>(), 0.0);  // a real compression changes something
}

TEST_P(Sfsd, FactorsProjectOutputsOnTheirMainDirections) {
  const auto& m = linears_.front();
  auto w = ckpt_->view(m.source + ".weight").to(torch::kFloat64);
  auto b = m.bias ? ckpt_->view(m.source + ".bias").to(torch::kFloat64) : torch::zeros({m.out}, torch::kFloat64);
  const auto& s = stats_.at(m.name);
  const int64_t r = m.out / 4;
  auto f = sfsd_factors(w, m.bias ? b : torch::Tensor(), s, r);
  // B is orthonormal, ordered by eigenvalue, and spans the top eigenvectors of C: C B = B diag(top).
  auto eye = torch::eye(r, torch::kFloat64);
  EXPECT_LT((f.b.t().mm(f.b) - eye).abs().max().item<double>(), 1e-10);
  auto cov = s.covariance();
  auto top = f.eigenvalues.narrow(0, 0, r);
  EXPECT_LT((cov.mm(f.b) - f.b * top.unsqueeze(0)).abs().max().item<double>(), 1e-8 * (1 + top[0].item<double>()));
  // On any input: B (A x) + b' = mu + P (W x + b - mu), P = B B^T.
  auto x = torch::randn({5, m.in}, torch::kFloat64);
  auto y = x.mm(w.t()) + b;
  auto mu = s.mean();
  auto expected = mu + (y - mu).mm(f.b).mm(f.b.t());
  auto got = x.mm(f.a.t()).mm(f.b.t()) + f.bias;
  EXPECT_LT((got - expected).abs().max().item<double>(), 1e-10);
}

TEST_P(Sfsd, DenseWhereFactorsWouldNotSaveParameters) {
  for (const auto& m : linears_) {
    const int64_t full = std::min(m.in, m.out);
    EXPECT_FALSE(rank_saves(full, m)) << m.name;
  }
  EXPECT_TRUE(ratio_ranks(linears_, 1.0).empty());
  for (const auto& [name, r] : ratio_ranks(linears_, 0.1)) EXPECT_GE(r, 1) << name;
}

// --budget B: the factored pair of each module holds int(B in out / (in + out)) (in + out)
// parameters, i.e. B x its in x out weights less under one rank's (in + out), in the folder written.
TEST_P(Sfsd, BudgetKeepsBTimesTheWeightParameters) {
  for (double b : {0.25, 0.5, 0.8}) {
    SCOPED_TRACE(b);
    auto ranks = fixed_ranks(linears_, b, RankUnit::kBudget);
    ASSERT_EQ(ranks.size(), linears_.size());  // every fixture module saves parameters at these budgets
    TempDir tmp;
    save_hf_folder(tmp / "f", ckpt_->config(), factored_tensors(*ckpt_, linears_, stats_, ranks), {},
                   {{"crash_sfsd_ranks", ranks}});
    CheckpointReader factored(tmp / "f");
    auto numel = [](const CheckpointReader& c, const std::string& name) {
      int64_t n = 1;
      for (auto d : c.info(name).shape) n *= d;
      return n;
    };
    double before = 0, after = 0, slack = 0;
    for (const auto& m : linears_) {
      const int64_t dense = numel(*ckpt_, m.source + ".weight");
      const int64_t pair = numel(factored, m.name + ".factor_a.weight") + numel(factored, m.name + ".factor_b.weight");
      EXPECT_EQ(dense, m.in * m.out) << m.name;
      EXPECT_LE(pair, b * dense + 1e-9) << m.name;
      EXPECT_GT(pair, b * dense - (m.in + m.out)) << m.name;
      before += dense;
      after += pair;
      slack += m.in + m.out;
    }
    EXPECT_LE(after, b * before + 1e-9);
    EXPECT_GT(after, b * before - slack);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Sfsd, ::testing::Values("opt_preln", "llama_gqa", "qwen2_bias", "qwen3_kv1"));

TEST(SfsdRanks, RatioAndBudgetFormulas) {
  auto linear = [](int64_t in, int64_t out) {
    LinearInfo m;
    m.in = in;
    m.out = out;
    return m;
  };
  // Budget: int(b in out / (in + out)). 4096 x 11008: in out / (in + out) = 2985.22..., x 0.3 = 895.57.
  EXPECT_EQ(unit_rank(linear(4096, 4096), 0.5, RankUnit::kBudget), 1024);
  EXPECT_EQ(unit_rank(linear(4096, 11008), 0.3, RankUnit::kBudget), 895);
  EXPECT_EQ(unit_rank(linear(11008, 4096), 0.3, RankUnit::kBudget), 895);
  EXPECT_EQ(unit_rank(linear(64, 172), 0.4, RankUnit::kBudget), 18);     // 46.64 x 0.4 = 18.66
  EXPECT_EQ(unit_rank(linear(768, 3072), 0.2, RankUnit::kBudget), 122);  // 614.4 x 0.2 = 122.88
  EXPECT_EQ(unit_rank(linear(8, 8), 0.01, RankUnit::kBudget), 1);        // int(0.04) = 0: at least 1
  // Ratio: ceil(f min(in, out)).
  EXPECT_EQ(unit_rank(linear(4096, 11008), 0.3, RankUnit::kRatio), 1229);  // 1228.8
  EXPECT_EQ(unit_rank(linear(64, 172), 0.25, RankUnit::kRatio), 16);
  EXPECT_EQ(unit_rank(linear(768, 3072), 0.2, RankUnit::kRatio), 154);  // 153.6
  // Budget 1 keeps int(in out / (in + out)) directions: on a square matrix exactly its parameters,
  // so the module stays dense.
  const std::vector<LinearInfo> square = {linear(64, 64)};
  EXPECT_TRUE(fixed_ranks(square, 1.0, RankUnit::kBudget).empty());
  EXPECT_EQ(fixed_ranks(square, 0.5, RankUnit::kBudget).begin()->second, 16);
  // The greedy search's candidates follow the unit: accepting everything gives the smallest.
  auto accept_all = [](const std::map<std::string, int64_t>&) { return true; };
  std::vector<LinearInfo> one = {linear(4096, 11008)};
  one[0].name = "m";
  EXPECT_EQ(greedy_ranks(one, {0.5, 0.3}, accept_all, RankUnit::kBudget).at("m"), 895);
  EXPECT_EQ(greedy_ranks(one, {0.5, 0.3}, accept_all, RankUnit::kRatio).at("m"), 1229);
}

TEST(SfsdConfig, BadRanksAreUserErrors) {
  TempDir tmp;
  test::copy_folder(fixture("models/llama_gqa"), tmp / "m");
  auto write = [&](const nlohmann::json& ranks) {
    auto j = read_json_file(tmp / "m/config.json");
    j["crash_sfsd_ranks"] = ranks;
    std::ofstream(tmp / "m/config.json") << j.dump();
  };
  write({{"model.layers.0.mlp.up_proj", 0}});
  test::expect_user_error([&] { CheckpointReader c(tmp / "m"); }, {"crash_sfsd_ranks", "positive"});
  write({{"model.layers.0.mlp.nothing", 2}});
  test::expect_user_error([&] { load_model(CheckpointReader(tmp / "m")); }, {"crash_sfsd_ranks", "nothing"});
  write({{"model.layers.0.input_layernorm", 2}});
  test::expect_user_error([&] { load_model(CheckpointReader(tmp / "m")); }, {"not a decoder Linear"});
  // Ranks naming modules but no factors in the file: the loader names the missing tensor.
  write({{"model.layers.0.mlp.up_proj", 2}});
  test::expect_user_error([&] { load_model(CheckpointReader(tmp / "m")); }, {"factor_a.weight"});
  // An already factored model is not decomposed again.
  test::expect_user_error([&] { decoder_linears(CheckpointReader(tmp / "m")); }, {"already factored"});
}

}  // namespace
}  // namespace crash
