// Linear CKA between layers' representations (docs/architecture.md section 1), accumulated in fp64.
// For rows X [N, dx], Y [N, dy] (examples, or tokens of a token-level archive):
// - exact, full batch: CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc column-centred.
//   The same number in two forms: Gram (<Kc, Lc> over N x N Gram matrices, cheaper when N < d)
//   and feature (||Xc^T Yc||_F^2 over d x d cross-covariances, cheaper when N >= d);
// - minibatch (Nguyen et al. 2021, "Do wide and deep networks learn the same things?"): per
//   minibatch of n >= 4 rows the unbiased HSIC_1 of Song et al. 2012,
//     HSIC_1(K, L) = [tr(K~L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
//   K~ = K with its diagonal zeroed; summed over minibatches,
//     CKA = sum HSIC_1(K,L) / sqrt(sum HSIC_1(K,K) * sum HSIC_1(L,L)).
//   HSIC_1 can be negative; so can this CKA. It needs no full pass over the data.
// archive_cka computes every pair of layers of one archive (or of two archives of the same
// examples) with the rows shared among the ranks of a communicator.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

#include "analysis/archive.h"
#include "analysis/hdf5.h"
#include "parallel/comm.h"

namespace crash {

enum class CkaMethod { Auto, Gram, Feature, Minibatch };
CkaMethod parse_cka_method(const std::string& name);  // UserError naming --method
std::string cka_method_name(CkaMethod method);

// Sums of HSIC terms. CKA = xy / sqrt(xx * yy); xy is reported as it is (it may be negative),
// and xx * yy <= 0 fails (naming `what`) rather than giving NaN.
struct HsicSums {
  double xy = 0, xx = 0, yy = 0;
};
double cka_from_sums(const HsicSums& sums, const std::string& what);

// Unbiased HSIC_1 of two n x n Gram matrices (n >= 4, else UserError).
double hsic_unbiased(const torch::Tensor& k, const torch::Tensor& l);

// One pair of representations in memory, [n, dx] and [n, dy], any floating type.
// Auto: Gram when n < min(dx, dy), feature otherwise. Minibatch uses `batch_size`.
double linear_cka(const torch::Tensor& x, const torch::Tensor& y, CkaMethod method = CkaMethod::Auto,
                  int64_t batch_size = 256);
// Minibatches are consecutive runs of `batch_size` rows; a last run of fewer than 4 rows joins
// the one before it (a lone remainder of 1-3 rows has no unbiased HSIC). batch_size < 4 or
// fewer than 4 rows: UserError.
HsicSums minibatch_hsic(const torch::Tensor& x, const torch::Tensor& y, int64_t batch_size);
// [first, end) row ranges of those minibatches.
std::vector<std::pair<int64_t, int64_t>> minibatches(int64_t rows, int64_t batch_size);

struct CkaOptions {
  CkaMethod method = CkaMethod::Auto;
  int64_t batch_size = 256;                           // minibatch rows
  int64_t chunk_rows = 1024;                          // rows read at once by the streaming passes
  int64_t max_tile_rows = 512;                        // Gram form: tiles of at most this many rows a side
  int64_t feature_budget_bytes = int64_t(512) << 20;  // feature form: accumulators of one pass
};

struct CkaMatrix {
  torch::Tensor cka;                   // float64 [La, Lb], hidden-state indices 0..L of each archive
  CkaMethod method = CkaMethod::Auto;  // the form that ran (Auto resolved)
  int64_t rows = 0;
};

// Collective over `comm`: every rank reads only its share of the rows and accumulates fp64
// partial sums, combined with one allreduce per pass. b == nullptr: A against itself. With b,
// the archives must hold the same examples (example_hash) and the same kind of rows.
CkaMatrix archive_cka(const ArchiveReader& a, const ArchiveReader* b, const CkaOptions& options, const CommPtr& comm);

// The similarity job's output file: /cka and its attributes.
struct CkaFile {
  torch::Tensor cka;  // float64 [La, Lb]
  std::string method;
  std::vector<std::string> archives;  // one (self-similarity) or two
};
CkaFile read_cka_file(const std::string& path);

}  // namespace crash
