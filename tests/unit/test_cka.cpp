// Linear CKA (analysis/cka.h) and layer clustering (analysis/cluster.h).
#include <cmath>
#include <set>

#include "analysis/archive.h"
#include "analysis/cka.h"
#include "analysis/cluster.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

class Cka : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(2);
    torch::manual_seed(0);
  }
};

// CKA written out from its definition, independently of the library.
double reference_cka(const torch::Tensor& x, const torch::Tensor& y) {
  auto xc = x - x.mean(0, true), yc = y - y.mean(0, true);
  const double xy = torch::linalg_norm(yc.t().mm(xc)).item<double>();
  return xy * xy /
         (torch::linalg_norm(xc.t().mm(xc)).item<double>() * torch::linalg_norm(yc.t().mm(yc)).item<double>());
}

// HSIC_1 as the U-statistic of Song et al. 2012: the mean over distinct (i, j, q, r) of
// k_ij l_ij + k_ij l_qr - 2 k_ij l_iq.
double reference_hsic1(const torch::Tensor& k, const torch::Tensor& l) {
  const int64_t n = k.size(0);
  auto a = k.accessor<double, 2>(), b = l.accessor<double, 2>();
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t q = 0; q < n; ++q)
        for (int64_t r = 0; r < n; ++r) {
          if (i == j || i == q || i == r || j == q || j == r || q == r) continue;
          sum += a[i][j] * b[i][j] + a[i][j] * b[q][r] - 2 * a[i][j] * b[i][q];
          ++count;
        }
  return sum / static_cast<double>(count);
}

// y: a noisy nonlinear function of x, so CKA is strictly between 0 and 1.
std::pair<torch::Tensor, torch::Tensor> related(int64_t n, int64_t dx, int64_t dy) {
  auto x = torch::randn({n, dx}, kF64) + 3.0;  // a large mean, as hidden states have
  auto y = torch::tanh(x.mm(torch::randn({dx, dy}, kF64))) + 0.5 * torch::randn({n, dy}, kF64);
  return {x, y};
}

TEST_F(Cka, MatchesTheDefinitionInBothExactForms) {
  for (auto [n, dx, dy] : {std::tuple<int64_t, int64_t, int64_t>{20, 50, 30}, {200, 16, 24}}) {
    auto [x, y] = related(n, dx, dy);
    const double want = reference_cka(x, y);
    EXPECT_GT(want, 0.05);
    EXPECT_LT(want, 0.95);
    const double gram = linear_cka(x, y, CkaMethod::Gram), feature = linear_cka(x, y, CkaMethod::Feature);
    EXPECT_NEAR(gram, want, 1e-12);
    EXPECT_NEAR(feature, want, 1e-12);
    EXPECT_NEAR(gram, feature, 1e-12);
    EXPECT_NEAR(linear_cka(x, y), want, 1e-12);  // auto
    // float32 input is computed in fp64.
    EXPECT_NEAR(linear_cka(x.to(torch::kFloat32), y.to(torch::kFloat32)),
                reference_cka(x.to(torch::kFloat32).to(torch::kFloat64), y.to(torch::kFloat32).to(torch::kFloat64)),
                1e-12);
  }
}

TEST_F(Cka, SymmetricWithUnitDiagonal) {
  auto [x, y] = related(64, 20, 12);
  for (auto m : {CkaMethod::Gram, CkaMethod::Feature, CkaMethod::Minibatch}) {
    EXPECT_NEAR(linear_cka(x, y, m, 16), linear_cka(y, x, m, 16), 1e-12) << cka_method_name(m);
    EXPECT_NEAR(linear_cka(x, x, m, 16), 1.0, 1e-12) << cka_method_name(m);
  }
}

TEST_F(Cka, InvariantToOrthogonalTransformsAndIsotropicScaling) {
  auto [x, y] = related(48, 24, 10);
  auto q = std::get<0>(torch::linalg_qr(torch::randn({24, 24}, kF64)));
  auto x2 = 7.5 * x.mm(q) + 2.0;  // rotated, scaled and shifted
  for (auto m : {CkaMethod::Gram, CkaMethod::Feature, CkaMethod::Minibatch})
    EXPECT_NEAR(linear_cka(x2, 0.01 * y, m, 12), linear_cka(x, y, m, 12), 1e-10) << cka_method_name(m);
  // Not invariant to an arbitrary linear map (sanity: the test can fail).
  auto a = torch::randn({24, 24}, kF64);
  EXPECT_GT(std::abs(linear_cka(x.mm(a), y) - linear_cka(x, y)), 1e-3);
}

TEST_F(Cka, UnbiasedHsicIsSongsUStatistic) {
  auto [x, y] = related(9, 5, 4);
  auto k = x.mm(x.t()), l = y.mm(y.t());
  EXPECT_NEAR(hsic_unbiased(k, l), reference_hsic1(k, l), 1e-9 * std::abs(reference_hsic1(k, l)));
  EXPECT_NEAR(hsic_unbiased(k, k), reference_hsic1(k, k), 1e-9 * reference_hsic1(k, k));
  // Shifting the rows changes nothing: the library centres each minibatch for accuracy.
  auto xs = x + 100.0;
  EXPECT_NEAR(hsic_unbiased(xs.mm(xs.t()), l), hsic_unbiased(k, l), 1e-8 * std::abs(hsic_unbiased(k, l)));
  auto sums = minibatch_hsic(x, y, 9);
  EXPECT_NEAR(sums.xy, reference_hsic1(k, l), 1e-9 * std::abs(sums.xy));
}

TEST_F(Cka, MinibatchSumsTheBatchesHsic) {
  auto [x, y] = related(30, 6, 5);
  // 30 rows in batches of 8: [0,8) [8,16) [16,24) [24,30).
  HsicSums want;
  for (int64_t first : {0, 8, 16, 24}) {
    const int64_t end = std::min<int64_t>(30, first + 8);
    auto xb = x.slice(0, first, end), yb = y.slice(0, first, end);
    want.xy += reference_hsic1(xb.mm(xb.t()), yb.mm(yb.t()));
    want.xx += reference_hsic1(xb.mm(xb.t()), xb.mm(xb.t()));
    want.yy += reference_hsic1(yb.mm(yb.t()), yb.mm(yb.t()));
  }
  EXPECT_NEAR(linear_cka(x, y, CkaMethod::Minibatch, 8), want.xy / std::sqrt(want.xx * want.yy), 1e-10);
  // A remainder of fewer than 4 rows joins the batch before it.
  using Ranges = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(minibatches(10, 4), (Ranges{{0, 4}, {4, 10}}));
  EXPECT_EQ(minibatches(12, 4), (Ranges{{0, 4}, {4, 8}, {8, 12}}));
  EXPECT_EQ(minibatches(13, 4), (Ranges{{0, 4}, {4, 8}, {8, 13}}));
  EXPECT_EQ(minibatches(6, 100), (Ranges{{0, 6}}));
}

TEST_F(Cka, MinibatchConvergesToFullCkaAsBatchesGrow) {
  // Summed unbiased HSIC terms make the minibatch estimate nearly free of bias at any batch size
  // (Nguyen et al.'s point); what shrinks as batches grow is its spread. One batch of all rows is
  // the debiased full-batch CKA, which differs from the exact full CKA by O(1/N).
  auto [x, y] = related(1024, 32, 24);
  auto xc = x - x.mean(0, true), yc = y - y.mean(0, true);
  auto k = xc.mm(xc.t()), l = yc.mm(yc.t());
  const double debiased = hsic_unbiased(k, l) / std::sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l));
  EXPECT_NEAR(linear_cka(x, y, CkaMethod::Minibatch, 1024), debiased, 1e-12);
  EXPECT_NEAR(debiased, linear_cka(x, y), 3e-2);
  // RMS error over 10 row orders, for batches of 8, 64 and 512 rows.
  std::vector<double> rms;
  for (int64_t b : {8, 64, 512}) {
    double sum = 0;
    for (int r = 0; r < 10; ++r) {
      auto order = torch::randperm(1024, torch::kInt64);
      const double e =
          linear_cka(x.index_select(0, order), y.index_select(0, order), CkaMethod::Minibatch, b) - debiased;
      sum += e * e;
    }
    rms.push_back(std::sqrt(sum / 10));
  }
  EXPECT_GT(rms[0], 2e-3);  // small batches are visibly off (the test can fail)
  EXPECT_LT(rms[1], 0.7 * rms[0]);
  EXPECT_LT(rms[2], 0.7 * rms[1]);
  EXPECT_LT(rms[2], 3e-3);
}

TEST_F(Cka, FewerThanFourExamplesIsAUserError) {
  auto [x, y] = related(12, 4, 4);
  test::expect_user_error([&] { linear_cka(x, y, CkaMethod::Minibatch, 3); }, {"--batch-size", "at least 4"});
  test::expect_user_error([&] { linear_cka(x.slice(0, 0, 3), y.slice(0, 0, 3), CkaMethod::Minibatch, 8); },
                          {"at least 4 rows"});
  test::expect_user_error([&] { hsic_unbiased(torch::eye(3, kF64), torch::eye(3, kF64)); }, {"at least 4"});
  test::expect_user_error([&] { linear_cka(x, y.slice(0, 0, 10)); }, {"12 rows", "10"});
}

TEST_F(Cka, NegativeHsicIsReportedAsItIs) {
  // Independent representations: the unbiased cross term is negative about half the time.
  for (int seed = 0; seed < 100; ++seed) {
    torch::manual_seed(seed);
    auto x = torch::randn({8, 3}, kF64), y = torch::randn({8, 3}, kF64);
    const HsicSums s = minibatch_hsic(x, y, 8);
    if (s.xy >= 0) continue;
    const double cka = linear_cka(x, y, CkaMethod::Minibatch, 8);
    EXPECT_LT(cka, 0);
    EXPECT_DOUBLE_EQ(cka, s.xy / std::sqrt(s.xx * s.yy));
    EXPECT_DOUBLE_EQ(cka_from_sums({-0.5, 1.0, 4.0}, "t"), -0.25);
    return;
  }
  FAIL() << "no negative HSIC in 100 draws";
}

TEST_F(Cka, UndefinedCkaFailsInsteadOfNaN) {
  auto x = torch::randn({10, 4}, kF64);
  auto constant = torch::ones({10, 3}, kF64);
  for (auto m : {CkaMethod::Gram, CkaMethod::Feature, CkaMethod::Minibatch})
    test::expect_user_error([&] { linear_cka(x, constant, m, 5); }, {"CKA undefined"});
  test::expect_user_error([&] { cka_from_sums({0.1, -1.0, 2.0}, "layers 3 and 4"); }, {"layers 3 and 4", "undefined"});
  test::expect_user_error([&] { parse_cka_method("svd"); }, {"--method", "svd"});
}

// An archive with `layers` random layers of a chain (each a noisy function of the one before).
std::vector<torch::Tensor> write_archive(const std::string& path, int64_t n, std::vector<int64_t> widths, bool pooled,
                                         int64_t seed, bool complete = true) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> layers;
  for (size_t l = 0; l < widths.size(); ++l) {
    auto prev = l ? layers.back() : torch::randn({n, 8}, kF64);
    layers.push_back((torch::tanh(prev.mm(torch::randn({prev.size(1), widths[l]}, kF64))) +
                      0.3 * torch::randn({n, widths[l]}, kF64) + 1.0)
                         .to(torch::kFloat32)
                         .to(torch::kFloat64));
  }
  ArchiveSpec spec;
  spec.num_examples = pooled ? n : 5;
  spec.widths = widths;
  spec.pooled = pooled;
  spec.block_size = spec.num_examples;
  if (!pooled) spec.offsets = {0, n / 5, 2 * n / 5, 3 * n / 5, 4 * n / 5, n};
  ActivationArchive archive(path, spec, make_local_comm(), false, false);
  std::vector<ActivationArchive::Piece> pieces;
  for (size_t l = 0; l < widths.size(); ++l)
    pieces.push_back({static_cast<int64_t>(l), 0, layers[l].to(torch::kFloat32)});
  ActivationArchive::Ids ids;
  ids.block = 0;
  for (int64_t i = 0; i < spec.num_examples; ++i) {
    ids.index.push_back(i);
    ids.hash.push_back(1000 + static_cast<uint64_t>(i));
  }
  archive.write_round(pieces, ids);
  if (complete) archive.complete();
  return layers;
}

TEST_F(Cka, ArchiveCkaEqualsInMemoryCkaInEveryForm) {
  test::TempDir dir;
  const auto xs = write_archive(dir / "a.h5", 37, {12, 20, 20, 9}, true, 1);
  const auto ys = write_archive(dir / "b.h5", 37, {16, 16, 6}, true, 2);
  ArchiveReader a(dir / "a.h5"), b(dir / "b.h5");
  EXPECT_EQ(a.num_layers(), 4);
  EXPECT_EQ(a.num_rows(), 37);
  EXPECT_TRUE(a.pooled());
  CkaOptions opt;
  opt.chunk_rows = 5;                  // several chunks per pass
  opt.max_tile_rows = 7;               // several Gram tiles, off-diagonal ones too
  opt.feature_budget_bytes = 8 * 400;  // several pair groups
  opt.batch_size = 10;
  for (auto m : {CkaMethod::Gram, CkaMethod::Feature, CkaMethod::Minibatch}) {
    opt.method = m;
    const auto self = archive_cka(a, nullptr, opt, make_local_comm());
    const auto cross = archive_cka(a, &b, opt, make_local_comm());
    EXPECT_EQ(self.method, m);
    ASSERT_EQ(self.cka.sizes().vec(), (std::vector<int64_t>{4, 4}));
    ASSERT_EQ(cross.cka.sizes().vec(), (std::vector<int64_t>{4, 3}));
    for (int64_t i = 0; i < 4; ++i) {
      for (int64_t j = 0; j < 4; ++j)
        EXPECT_NEAR(self.cka[i][j].item<double>(), linear_cka(xs[i], xs[j], m, 10), 1e-12)
            << cka_method_name(m) << " " << i << "," << j;
      for (int64_t j = 0; j < 3; ++j)
        EXPECT_NEAR(cross.cka[i][j].item<double>(), linear_cka(xs[i], ys[j], m, 10), 1e-12)
            << cka_method_name(m) << " " << i << "," << j;
    }
  }
  opt.method = CkaMethod::Auto;  // 37 rows >= 6 features: feature
  EXPECT_EQ(archive_cka(a, &b, opt, make_local_comm()).method, CkaMethod::Feature);
}

TEST_F(Cka, TokenArchivesAndBadArchives) {
  test::TempDir dir;
  const auto xs = write_archive(dir / "tokens.h5", 40, {6, 6}, false, 3);
  ArchiveReader t(dir / "tokens.h5");
  EXPECT_FALSE(t.pooled());
  EXPECT_EQ(t.num_rows(), 40);
  EXPECT_EQ(t.num_examples(), 5);
  CkaOptions opt;
  opt.method = CkaMethod::Minibatch;
  opt.batch_size = 16;  // 40 rows: 16, 16, 8
  EXPECT_NEAR(archive_cka(t, nullptr, opt, make_local_comm()).cka[0][1].item<double>(),
              linear_cka(xs[0], xs[1], CkaMethod::Minibatch, 16), 1e-12);

  write_archive(dir / "partial.h5", 20, {4, 4}, true, 4, /*complete=*/false);
  test::expect_user_error([&] { ArchiveReader r(dir / "partial.h5"); }, {"partial.h5", "no such archive", "--resume"});
  test::expect_user_error([&] { ArchiveReader r(dir / "missing.h5"); }, {"missing.h5", "no such archive"});
  write_archive(dir / "pooled.h5", 20, {4, 4}, true, 5);
  ArchiveReader p(dir / "pooled.h5");
  test::expect_user_error([&] { archive_cka(t, &p, opt, make_local_comm()); }, {"pooled", "every token"});
  opt.batch_size = 2;
  test::expect_user_error([&] { archive_cka(p, nullptr, opt, make_local_comm()); }, {"--batch-size", "at least 4"});
}

TEST_F(Cka, ArchivesOfOtherExamplesAreRefused) {
  test::TempDir dir;
  write_archive(dir / "a.h5", 20, {4, 4}, true, 1);
  write_archive(dir / "b.h5", 21, {4, 4}, true, 2);
  ArchiveReader a(dir / "a.h5"), b(dir / "b.h5");
  test::expect_user_error([&] { archive_cka(a, &b, CkaOptions{}, make_local_comm()); }, {"20 examples", "21"});
}

// ---------------------------------------------------------------------------------------------
// Clustering

// Blocks of the given sizes: 0.85 +- 0.05 inside, 0.25 +- 0.05 across, 1 on the diagonal.
torch::Tensor block_matrix(const std::vector<int64_t>& sizes, std::vector<std::vector<int64_t>>& blocks) {
  int64_t n = 0;
  blocks.clear();
  for (int64_t s : sizes) {
    blocks.emplace_back();
    for (int64_t i = 0; i < s; ++i) blocks.back().push_back(n++);
  }
  auto noise = 0.05 * (2 * torch::rand({n, n}, kF64) - 1);
  auto s = torch::full({n, n}, 0.25, kF64) + noise;
  for (const auto& b : blocks)
    for (int64_t i : b)
      for (int64_t j : b) s[i][j] = 0.85 + noise[i][j].item<double>();
  s = (s + s.t()) / 2;
  s.diagonal().fill_(1.0);
  return s;
}

TEST_F(Cka, EveryRuleRecoversKnownBlocks) {
  std::vector<std::vector<int64_t>> blocks;
  auto s = block_matrix({3, 4, 2, 3}, blocks);
  for (auto m : {ClusterMethod::Adjacent, ClusterMethod::Optimal, ClusterMethod::Average}) {
    const Clustering c = cluster_chain(s, 4, m);
    EXPECT_EQ(c.clusters, blocks) << cluster_method_name(m);
    EXPECT_EQ(c.representatives, (std::vector<int64_t>{1, 5, 8, 10})) << cluster_method_name(m);  // cluster[len / 2]
    EXPECT_NEAR(c.score, clustering_score(s, blocks), 1e-15);
  }
  // Non-contiguous structure: only average linkage puts layers 0-1 and 4-5 together.
  auto t = torch::full({6, 6}, 0.1, kF64);
  for (auto [i, j] : {std::pair<int, int>{0, 1}, {0, 4}, {0, 5}, {1, 4}, {1, 5}, {4, 5}, {2, 3}})
    t[i][j] = t[j][i] = 0.9;
  t.diagonal().fill_(1.0);
  EXPECT_EQ(cluster_chain(t, 2, ClusterMethod::Average).clusters,
            (std::vector<std::vector<int64_t>>{{0, 1, 4, 5}, {2, 3}}));
}

TEST_F(Cka, ScoreIsTheSizeWeightedMeanOfWithinClusterMeans) {
  auto s = torch::tensor({1.0, 0.8, 0.2, 0.8, 1.0, 0.4, 0.2, 0.4, 1.0}, kF64).reshape({3, 3});
  // {0, 1}: mean (1 + 0.8 + 0.8 + 1) / 4 = 0.9, weight 2; {2}: 1, weight 1.
  EXPECT_NEAR(clustering_score(s, {{0, 1}, {2}}), (2 * 0.9 + 1.0) / 3, 1e-15);
  EXPECT_NEAR(clustering_score(s, {{0, 1, 2}}), (3 + 2 * (0.8 + 0.2 + 0.4)) / 9, 1e-15);
  // A smooth chain is cut into even segments, not into lone layers and one big cluster.
  auto d = torch::arange(12, kF64);
  auto chain = torch::pow(0.95, (d.unsqueeze(1) - d.unsqueeze(0)).abs());
  EXPECT_EQ(cluster_chain(chain, 3, ClusterMethod::Optimal).clusters,
            (std::vector<std::vector<int64_t>>{{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}}));
}

TEST_F(Cka, OptimalIsTheBestSegmentationAndBeatsAdjacent) {
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t n = 2 + trial % 9, k = 1 + trial % n;
    auto r = torch::rand({n, n}, kF64);
    auto s = (r + r.t()) / 2;
    s.diagonal().fill_(1.0);
    const Clustering opt = cluster_chain(s, k, ClusterMethod::Optimal);
    const Clustering adj = cluster_chain(s, k, ClusterMethod::Adjacent);
    ASSERT_EQ(static_cast<int64_t>(opt.clusters.size()), k);
    ASSERT_EQ(static_cast<int64_t>(adj.clusters.size()), k);
    EXPECT_GE(opt.score, adj.score - 1e-12) << "n " << n << " k " << k;
    // Brute force over every set of k - 1 cuts among the n - 1 links.
    double best = -1;
    for (int64_t mask = 0; mask < (int64_t(1) << (n - 1)); ++mask) {
      if (__builtin_popcountll(static_cast<unsigned long long>(mask)) != k - 1) continue;
      std::vector<std::vector<int64_t>> segs(1);
      for (int64_t i = 0; i < n; ++i) {
        segs.back().push_back(i);
        if (i < n - 1 && (mask >> i & 1)) segs.emplace_back();
      }
      best = std::max(best, clustering_score(s, segs));
    }
    EXPECT_NEAR(opt.score, best, 1e-12) << "n " << n << " k " << k;
  }
}

TEST_F(Cka, KOutOfRangeIsAUserError) {
  auto s = torch::eye(5, kF64);
  for (int64_t k : {0, 6, -1})
    test::expect_user_error([&] { cluster_chain(s, k, ClusterMethod::Adjacent); }, {"--k", "1 to 5"});
  test::expect_user_error([&] { parse_cluster_method("kmeans"); }, {"--method", "kmeans"});
  EXPECT_EQ(cluster_chain(s, 5, ClusterMethod::Optimal).clusters.size(), 5u);
  EXPECT_EQ(cluster_chain(s, 1, ClusterMethod::Adjacent).representatives, (std::vector<int64_t>{2}));
}

}  // namespace
}  // namespace crash
