#include "analysis/sfsd_search.h"

#include <sstream>

#include "parallel/errors.h"

namespace crash {

std::vector<std::vector<int64_t>> mix_round_robin(const std::vector<std::vector<std::vector<int64_t>>>& tasks,
                                                  int64_t n) {
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; static_cast<int64_t>(out.size()) < n; ++i) {
    bool any = false;
    for (const auto& t : tasks)
      if (i < t.size() && static_cast<int64_t>(out.size()) < n) {
        out.push_back(t[i]);
        any = true;
      }
    if (!any) break;
  }
  return out;
}

std::vector<double> parse_fractions(const std::string& text) {
  std::vector<double> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    double f = 0;
    try {
      size_t used = 0;
      f = std::stod(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      fail("--candidates: '{}' is not a number", item);
    }
    if (!(f > 0.0 && f <= 1.0)) fail("--candidates: {} is outside (0, 1]", f);
    out.push_back(f);
  }
  if (out.empty()) fail("--candidates: no fraction given");
  return out;
}

HeadlineMetric headline_metric(const nlohmann::json& result) {
  const auto& m = result.at("metrics");
  for (const char* name : {"acc", "exact_match"})
    if (m.contains(name)) return {m.at(name).at("value").get<double>(), true};
  return {m.at("perplexity").at("value").get<double>(), false};
}

bool within_tolerance(double value, double reference, bool larger_better, double tolerance) {
  return larger_better ? value >= reference - tolerance : value <= reference * (1.0 + tolerance);
}

}  // namespace crash
