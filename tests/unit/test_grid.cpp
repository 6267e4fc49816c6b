// The grid's rank arithmetic (GridLayout) and the split of layers over stages, without MPI, as
// TensorRT-LLM tests its WorldConfig.
#include <set>

#include "parallel/grid.h"
#include "parallel/pipeline.h"
#include "test_util.h"

namespace crash {
namespace {

struct Case {
  int world, tp, pp;
};
const Case kCases[] = {{1, 1, 1}, {2, 2, 1}, {2, 1, 2}, {4, 2, 2}, {8, 2, 2}, {12, 3, 2}, {8, 1, 4}, {6, 1, 1}};

TEST(GridLayout, CoordinatesFollowTpThenPpThenDp) {
  GridLayout g(12, {3, 2});
  EXPECT_EQ(g.dp(), 2);
  // rank = tp + TP * (pp + PP * dp)
  const auto c = g.coords_of(10);  // 10 = 1 + 3 * (1 + 2 * 1)
  EXPECT_EQ(c.tp, 1);
  EXPECT_EQ(c.pp, 1);
  EXPECT_EQ(c.dp, 1);
  EXPECT_EQ(g.rank_of(2, 0, 1), 8);
  EXPECT_EQ(g.coords_of(5).tp, 2);
  EXPECT_EQ(g.coords_of(5).pp, 1);
  EXPECT_EQ(g.coords_of(5).dp, 0);
}

TEST(GridLayout, RankAndCoordinatesAreInverse) {
  for (const auto& k : kCases) {
    GridLayout g(k.world, {k.tp, k.pp});
    EXPECT_EQ(g.tp() * g.pp() * g.dp(), k.world);
    std::set<std::tuple<int, int, int>> seen;
    for (int r = 0; r < k.world; ++r) {
      const auto c = g.coords_of(r);
      EXPECT_EQ(g.rank_of(c), r);
      EXPECT_TRUE(c.tp >= 0 && c.tp < k.tp && c.pp >= 0 && c.pp < k.pp && c.dp >= 0 && c.dp < g.dp());
      seen.insert({c.tp, c.pp, c.dp});
    }
    EXPECT_EQ(static_cast<int>(seen.size()), k.world);
  }
}

// Each group holds exactly the ranks that differ from this one in its own coordinate.
TEST(GridLayout, GroupColoursMatchTheirCoordinate) {
  for (const auto& k : kCases) {
    GridLayout g(k.world, {k.tp, k.pp});
    for (int a = 0; a < k.world; ++a)
      for (int b = 0; b < k.world; ++b) {
        const auto x = g.coords_of(a), y = g.coords_of(b);
        EXPECT_EQ(g.tp_color(a) == g.tp_color(b), x.pp == y.pp && x.dp == y.dp);
        EXPECT_EQ(g.pp_color(a) == g.pp_color(b), x.tp == y.tp && x.dp == y.dp);
        EXPECT_EQ(g.dp_color(a) == g.dp_color(b), x.tp == y.tp && x.pp == y.pp);
      }
  }
}

TEST(GridLayout, TpBlocksAreConsecutiveTpRanksOfOneStage) {
  GridLayout g(16, {4, 2});
  for (int size : {1, 2, 4})
    for (int a = 0; a < 16; ++a)
      for (int b = 0; b < 16; ++b) {
        const auto x = g.coords_of(a), y = g.coords_of(b);
        const bool same = x.pp == y.pp && x.dp == y.dp && x.tp / size == y.tp / size;
        EXPECT_EQ(g.tp_block_color(a, size) == g.tp_block_color(b, size), same) << size << " " << a << " " << b;
      }
}

TEST(GridLayout, EmbeddingGroupJoinsFirstAndLastStageOfOneSlice) {
  GridLayout g(12, {2, 3});
  for (int r = 0; r < 12; ++r) {
    const auto c = g.coords_of(r);
    if (c.pp == 1) {
      EXPECT_EQ(g.embedding_color(r), -1);
      continue;
    }
    ASSERT_GE(g.embedding_color(r), 0);
    const int partner = g.rank_of(c.tp, c.pp == 0 ? 2 : 0, c.dp);
    EXPECT_EQ(g.embedding_color(r), g.embedding_color(partner));
    for (int o = 0; o < 12; ++o) {
      if (o == r || o == partner) continue;
      EXPECT_NE(g.embedding_color(o), g.embedding_color(r));
    }
  }
  GridLayout one_stage(4, {2, 1});
  for (int r = 0; r < 4; ++r) EXPECT_EQ(one_stage.embedding_color(r), -1);
}

TEST(GridLayout, RefusesGridsThatCannotWork) {
  test::expect_user_error([] { GridLayout(3, {2, 1}); }, {"world size 3 is not divisible by tp x pp = 2 x 1"});
  test::expect_user_error([] { GridLayout(4, {0, 1}); }, {"--tp must be at least 1"});
  test::expect_user_error([] { GridLayout(4, {1, -1}); }, {"--pp must be at least 1"});
  test::expect_user_error([] { GridLayout(4, {1, 1, "gloo"}); }, {"--backend", "gloo"});
}

TEST(SplitLayers, BalancedWithEarlierStagesTakingTheRemainder) {
  const auto s = split_layers(10, 4);
  ASSERT_EQ(s.size(), 4u);
  EXPECT_EQ(s[0], (std::pair<int64_t, int64_t>{0, 3}));
  EXPECT_EQ(s[1], (std::pair<int64_t, int64_t>{3, 6}));
  EXPECT_EQ(s[2], (std::pair<int64_t, int64_t>{6, 8}));
  EXPECT_EQ(s[3], (std::pair<int64_t, int64_t>{8, 10}));
  for (int stages = 1; stages <= 7; ++stages) {
    const auto t = split_layers(7, stages);
    int64_t next = 0;
    for (const auto& [first, end] : t) {
      EXPECT_EQ(first, next);
      EXPECT_GE(end - first, 7 / stages);
      EXPECT_LE(end - first, 7 / stages + 1);
      next = end;
    }
    EXPECT_EQ(next, 7);
  }
}

TEST(SplitLayers, ExplicitCountsAndTheirErrors) {
  const auto s = split_layers(12, 2, {5, 7});
  EXPECT_EQ(s[0], (std::pair<int64_t, int64_t>{0, 5}));
  EXPECT_EQ(s[1], (std::pair<int64_t, int64_t>{5, 12}));
  test::expect_user_error([] { split_layers(1, 2); }, {"1 layers, fewer than the 2 pipeline stages"});
  test::expect_user_error([] { split_layers(4, 2, {2, 3}); }, {"--pp-layers adds up to 5 layers but the model has 4"});
}

}  // namespace
}  // namespace crash
