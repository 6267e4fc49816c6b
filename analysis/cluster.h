// Layers of a chain grouped into K clusters from their similarity matrix S (CKA),
// docs/architecture.md section 1:
// - adjacent (CRaSh's rule): cut the chain at its K-1 weakest adjacent links S[i][i+1]
//   (ties: the earlier link is cut first);
// - optimal: the contiguous segmentation into K segments with the highest score (below), by
//   dynamic programming over the chain (exact, O(K n^2));
// - average: average-linkage agglomerative clustering (merge the two clusters with the highest
//   mean cross-similarity until K remain). Not contiguous: for exploration only.
// Score of clusters C_1..C_K of n layers, the objective `optimal` maximises and every method
// reports: the mean over clusters of the mean within-cluster CKA, each cluster weighted by its
// size,
//   score = (1/n) sum_k |C_k| mean_{i in C_k, j in C_k} S[i][j]
// i.e. the mean over layers of a layer's mean CKA with its cluster (itself included, S[i][i] = 1).
// Why weighted: the unweighted mean over clusters scores a lone layer 1 and so prefers K-1
// singletons and one big cluster (on S[i][j] = 0.95^|i-j|, 12 layers, K = 3: sizes 1, 1, 10
// unweighted, 4, 4, 4 weighted).
// A cluster's representative (the layer an emulator keeps) is cluster[len / 2].
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace crash {

enum class ClusterMethod { Adjacent, Optimal, Average };
ClusterMethod parse_cluster_method(const std::string& name);  // UserError naming --method
std::string cluster_method_name(ClusterMethod method);

struct Clustering {
  std::vector<std::vector<int64_t>> clusters;  // positions 0..n-1 in the chain; sorted, ordered by first member
  std::vector<int64_t> representatives;        // cluster[len / 2] of each
  double score = 0;
};

// S: [n, n] similarities of the chain's layers. K outside 1..n: UserError.
Clustering cluster_chain(const torch::Tensor& sim, int64_t k, ClusterMethod method);
// The score above of any clustering of the chain.
double clustering_score(const torch::Tensor& sim, const std::vector<std::vector<int64_t>>& clusters);

}  // namespace crash
