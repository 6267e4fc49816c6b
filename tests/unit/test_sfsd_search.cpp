// analysis/sfsd_search.h: the calibration mix over several tasks, the greedy search's metric and
// acceptance rule, and --candidates parsing.
#include <gtest/gtest.h>

#include "analysis/sfsd_search.h"
#include "test_util.h"

namespace crash {
namespace {

using Examples = std::vector<std::vector<int64_t>>;

TEST(MixRoundRobin, TakesOneFromEachTaskInTurn) {
  const std::vector<Examples> tasks{{{1}, {2}, {3}}, {{10}, {20}, {30}}};
  EXPECT_EQ(mix_round_robin(tasks, 6), (Examples{{1}, {10}, {2}, {20}, {3}, {30}}));
  EXPECT_EQ(mix_round_robin({{{1}, {2}, {3}}}, 2), (Examples{{1}, {2}}));
}

TEST(MixRoundRobin, StopsAtNEvenMidTurn) {
  const std::vector<Examples> tasks{{{1}, {2}}, {{10}, {20}}, {{100}, {200}}};
  EXPECT_EQ(mix_round_robin(tasks, 4), (Examples{{1}, {10}, {100}, {2}}));
  EXPECT_EQ(mix_round_robin(tasks, 1), (Examples{{1}}));
}

TEST(MixRoundRobin, UnevenTasksDropOutWhenTheyRunOut) {
  const std::vector<Examples> tasks{{{1}}, {{10}, {20}, {30}}, {{100}, {200}}};
  EXPECT_EQ(mix_round_robin(tasks, 100), (Examples{{1}, {10}, {100}, {20}, {200}, {30}}));
  EXPECT_EQ(mix_round_robin(tasks, 5), (Examples{{1}, {10}, {100}, {20}, {200}}));
  EXPECT_TRUE(mix_round_robin({}, 3).empty());
}

nlohmann::json result_with(const nlohmann::json& metrics) { return {{"task", "t"}, {"metrics", metrics}}; }

TEST(HeadlineMetric, AccuracyThenExactMatchThenPerplexity) {
  auto m = headline_metric(result_with({{"acc", {{"value", 0.5}}}, {"acc_norm", {{"value", 0.7}}}}));
  EXPECT_EQ(m.value, 0.5);
  EXPECT_TRUE(m.larger_better);
  m = headline_metric(result_with({{"exact_match", {{"value", 0.25}}}}));
  EXPECT_EQ(m.value, 0.25);
  EXPECT_TRUE(m.larger_better);
  m = headline_metric(result_with({{"perplexity", {{"value", 12.5}}}, {"loss", {{"value", 2.5}}}}));
  EXPECT_EQ(m.value, 12.5);
  EXPECT_FALSE(m.larger_better);
}

TEST(WithinTolerance, LargerIsBetterAllowsAnAbsoluteLoss) {
  // Values exact in binary, so the boundary is exact.
  EXPECT_TRUE(within_tolerance(0.75, 0.75, true, 0.0));
  EXPECT_TRUE(within_tolerance(0.5, 0.75, true, 0.25));  // on the boundary: accepted
  EXPECT_FALSE(within_tolerance(0.5, 0.75, true, 0.125));
  EXPECT_TRUE(within_tolerance(0.875, 0.75, true, 0.0));  // better than the reference
  EXPECT_FALSE(within_tolerance(0.7, 0.75, true, 0.0));
}

TEST(WithinTolerance, SmallerIsBetterAllowsARelativeRise) {
  EXPECT_TRUE(within_tolerance(4.0, 4.0, false, 0.0));
  EXPECT_TRUE(within_tolerance(6.0, 4.0, false, 0.5));  // on the boundary 4 (1 + 0.5): accepted
  EXPECT_FALSE(within_tolerance(6.0, 4.0, false, 0.25));
  EXPECT_TRUE(within_tolerance(3.0, 4.0, false, 0.0));  // better than the reference
  EXPECT_FALSE(within_tolerance(4.5, 4.0, false, 0.0));
}

TEST(ParseFractions, InTheOrderGiven) {
  EXPECT_EQ(parse_fractions("0.05,0.1,1"), (std::vector<double>{0.05, 0.1, 1.0}));
  EXPECT_EQ(parse_fractions("0.5"), (std::vector<double>{0.5}));
}

TEST(ParseFractions, BadInputsAreUserErrors) {
  test::expect_user_error([] { parse_fractions(""); }, {"--candidates", "no fraction"});
  test::expect_user_error([] { parse_fractions("abc"); }, {"--candidates", "'abc' is not a number"});
  test::expect_user_error([] { parse_fractions("0.5x"); }, {"'0.5x' is not a number"});
  test::expect_user_error([] { parse_fractions("0.5,,0.2"); }, {"'' is not a number"});
  test::expect_user_error([] { parse_fractions("0"); }, {"0 is outside (0, 1]"});
  test::expect_user_error([] { parse_fractions("0.5,2"); }, {"2 is outside (0, 1]"});
  test::expect_user_error([] { parse_fractions("-0.1"); }, {"-0.1 is outside"});
  test::expect_user_error([] { parse_fractions("nan"); }, {"nan is outside"});
}

}  // namespace
}  // namespace crash
