#include "analysis/cluster.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "analysis/named_choice.h"
#include "parallel/errors.h"

namespace crash {

namespace {

using Matrix = std::vector<std::vector<double>>;

Matrix to_matrix(const torch::Tensor& sim) {
  if (sim.dim() != 2 || sim.size(0) != sim.size(1))
    fail("clustering needs a square similarity matrix, got {} dimensions", sim.dim());
  auto s = sim.to(torch::kFloat64).contiguous();
  const int64_t n = s.size(0);
  if (!torch::isfinite(s).all().item<bool>()) fail("clustering: the similarity matrix has NaN or infinite entries");
  Matrix out(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(n)));
  auto a = s.accessor<double, 2>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[i][j] = a[i][j];
  return out;
}

std::vector<std::vector<int64_t>> segments_from_cuts(int64_t n, std::vector<int64_t> cuts) {
  // A cut at i separates positions i and i + 1.
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::vector<int64_t>> out(1);
  size_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    out.back().push_back(i);
    if (c < cuts.size() && cuts[c] == i) {
      out.emplace_back();
      ++c;
    }
  }
  return out;
}

std::vector<std::vector<int64_t>> adjacent(const Matrix& s, int64_t k) {
  const int64_t n = static_cast<int64_t>(s.size());
  std::vector<int64_t> links(static_cast<size_t>(n - 1));
  std::iota(links.begin(), links.end(), 0);
  std::stable_sort(links.begin(), links.end(), [&](int64_t a, int64_t b) { return s[a][a + 1] < s[b][b + 1]; });
  links.resize(static_cast<size_t>(k - 1));
  return segments_from_cuts(n, links);
}

std::vector<std::vector<int64_t>> optimal(const Matrix& s, int64_t k) {
  const size_t n = s.size();
  // 2-D prefix sums: sum of S over [i, j) x [i, j) in O(1).
  Matrix p(n + 1, std::vector<double>(n + 1, 0.0));
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) p[i + 1][j + 1] = s[i][j] + p[i][j + 1] + p[i + 1][j] - p[i][j];
  // A segment [i, j) adds |C| * mean over C x C = (sum over C x C) / |C|.
  auto value = [&](size_t i, size_t j) { return (p[j][j] - p[i][j] - p[j][i] + p[i][i]) / static_cast<double>(j - i); };
  const double lowest = -std::numeric_limits<double>::infinity();
  // best[c][j]: the highest sum of segment values splitting [0, j) into c segments; from[c][j]: its last cut.
  Matrix best(static_cast<size_t>(k) + 1, std::vector<double>(n + 1, lowest));
  std::vector<std::vector<size_t>> from(static_cast<size_t>(k) + 1, std::vector<size_t>(n + 1, 0));
  best[0][0] = 0;
  for (size_t c = 1; c <= static_cast<size_t>(k); ++c)
    for (size_t j = c; j <= n; ++j)
      for (size_t i = c - 1; i < j; ++i) {
        if (best[c - 1][i] == lowest) continue;
        const double v = best[c - 1][i] + value(i, j);
        if (v > best[c][j]) {  // strict: among equal scores the earliest cut wins
          best[c][j] = v;
          from[c][j] = i;
        }
      }
  std::vector<int64_t> cuts;
  size_t j = n;
  for (size_t c = static_cast<size_t>(k); c > 1; --c) {
    j = from[c][j];
    cuts.push_back(static_cast<int64_t>(j) - 1);
  }
  return segments_from_cuts(static_cast<int64_t>(n), cuts);
}

std::vector<std::vector<int64_t>> average(const Matrix& s, int64_t k) {
  const int64_t n = static_cast<int64_t>(s.size());
  std::vector<std::vector<int64_t>> clusters;
  for (int64_t i = 0; i < n; ++i) clusters.push_back({i});
  auto link = [&](const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
    double sum = 0;
    for (int64_t i : a)
      for (int64_t j : b) sum += 0.5 * (s[i][j] + s[j][i]);
    return sum / static_cast<double>(a.size() * b.size());
  };
  while (static_cast<int64_t>(clusters.size()) > k) {
    size_t ba = 0, bb = 1;
    double best = -std::numeric_limits<double>::infinity();
    for (size_t a = 0; a < clusters.size(); ++a)
      for (size_t b = a + 1; b < clusters.size(); ++b) {
        const double v = link(clusters[a], clusters[b]);
        if (v > best) {
          best = v;
          ba = a;
          bb = b;
        }
      }
    clusters[ba].insert(clusters[ba].end(), clusters[bb].begin(), clusters[bb].end());
    std::sort(clusters[ba].begin(), clusters[ba].end());
    clusters.erase(clusters.begin() + static_cast<std::ptrdiff_t>(bb));
  }
  std::sort(clusters.begin(), clusters.end());
  return clusters;
}

}  // namespace

namespace {
const NamedChoices<ClusterMethod> kClusterMethods = {
    {"adjacent", ClusterMethod::Adjacent}, {"optimal", ClusterMethod::Optimal}, {"average", ClusterMethod::Average}};
}  // namespace

ClusterMethod parse_cluster_method(const std::string& name) {
  return parse_choice(kClusterMethods, name, "--method", "clustering method");
}

std::string cluster_method_name(ClusterMethod method) { return choice_name(kClusterMethods, method); }

double clustering_score(const torch::Tensor& sim, const std::vector<std::vector<int64_t>>& clusters) {
  const Matrix s = to_matrix(sim);
  if (clusters.empty()) fail("clustering: no clusters to score");
  double total = 0;
  size_t layers = 0;
  for (const auto& c : clusters) {
    if (c.empty()) fail("clustering: an empty cluster");
    double sum = 0;
    for (int64_t i : c)
      for (int64_t j : c) sum += s.at(static_cast<size_t>(i)).at(static_cast<size_t>(j));
    total += sum / static_cast<double>(c.size());  // |C| * mean over C x C
    layers += c.size();
  }
  return total / static_cast<double>(layers);
}

Clustering cluster_chain(const torch::Tensor& sim, int64_t k, ClusterMethod method) {
  const Matrix s = to_matrix(sim);
  const int64_t n = static_cast<int64_t>(s.size());
  if (n == 0) fail("clustering: no layers to cluster");
  if (k < 1 || k > n) fail("--k: expected a number of clusters from 1 to {} (the layers clustered), got {}", n, k);
  Clustering out;
  out.clusters = method == ClusterMethod::Adjacent  ? adjacent(s, k)
                 : method == ClusterMethod::Optimal ? optimal(s, k)
                                                    : average(s, k);
  for (const auto& c : out.clusters) out.representatives.push_back(c[c.size() / 2]);
  out.score = clustering_score(sim, out.clusters);
  return out;
}

}  // namespace crash
