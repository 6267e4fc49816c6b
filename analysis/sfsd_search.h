// What the decompose job decides besides the factors themselves (analysis/sfsd.h): which
// calibration examples it runs, which candidate fractions the greedy search tries, and when
// the search accepts a rank plan.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace crash {

// Calibration examples mixed from several tasks: the first example of each task in turn, then
// the second of each, and so on (a task that runs out drops out), until `n` or all are taken.
std::vector<std::vector<int64_t>> mix_round_robin(const std::vector<std::vector<std::vector<int64_t>>>& tasks,
                                                  int64_t n);

// --candidates: comma-separated fractions in (0, 1], in the order given. UserError otherwise.
std::vector<double> parse_fractions(const std::string& text);

// The metric the greedy search keeps within tolerance, from an evaluation result
// (TaskResult::to_json): acc (multiple choice), exact_match (generation), else perplexity.
struct HeadlineMetric {
  double value = 0;
  bool larger_better = true;
};
HeadlineMetric headline_metric(const nlohmann::json& result);

// Whether a candidate's metric is close enough to the reference: at most `tolerance` below it
// when larger is better (accuracy points as a fraction), at most `tolerance` times it above it
// otherwise (relative perplexity). Equality at the boundary is accepted.
bool within_tolerance(double value, double reference, bool larger_better, double tolerance);

}  // namespace crash
