// Layer importance from hidden states: the scores of the layer-pruning baselines.
// h_l is hidden-state index l as HF's output_hidden_states reports it: h_0 the embeddings,
// h_l (0 < l < L) the input of decoder layer l, h_L the last layer's output AFTER the final norm
// (and OPT's project_out). Both scores use what an activation archive stores (analysis/archive.h),
// so the last layer is judged by its normed output, as ShortGPT's and Gromov et al.'s code do
// with HF hidden_states. Where two hidden states differ in width (OPT-350m's h_L), a score that
// compares them is NaN.
// - Block Influence (ShortGPT, Men et al. 2024, arXiv 2403.03853) of decoder layer l:
//     BI_l = 1 - (1/T) sum_t cos(h_l,t, h_l+1,t)
//   over all T real tokens of all examples (token-weighted). Higher: more important.
// - Angular distance of the block of n layers starting at l (Gromov et al. 2024, arXiv 2403.17887):
//     d(l, n) = (1/N) sum_i arccos(cos(h_l, h_l+n)) / pi   on example i's last real token,
//   for l + n <= L. Lower: the block changes less (removed first).
// - CKA-based (CRaSh): 1 - CKA(h_l, h_l+1) from the similarity job's matrix. Higher: more important.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>

#include "analysis/archive.h"
#include "analysis/cka.h"
#include "parallel/comm.h"

namespace crash {

struct HiddenStateScores {
  torch::Tensor block_influence;   // float64 [L] (undefined when not computed)
  torch::Tensor angular_distance;  // float64 [L, L]: [l][n - 1] = d(l, n), NaN where l + n > L
  int64_t num_examples = 0;
  int64_t num_tokens = 0;  // tokens behind block_influence (0 without it)
};

struct ImportanceOptions {
  bool block_influence = true;   // needs a token-level archive (collect --pooling none)
  bool angular_distance = true;  // a token-level archive, or one pooled with "last"
  int64_t chunk_tokens = 8192;   // archive rows read at once per layer
  // Called on every rank after each chunk with the examples it finished (progress lines).
  std::function<void(int64_t)> progress;
};

// Whether an archive can give the scores: block influence needs tokens, angular distance the
// last token (token-level, or pooling "last"). UserError naming the archive and what to collect.
void check_importance_archive(const ArchiveReader& archive, const ImportanceOptions& options);

// Collective over `comm`: the examples are split into contiguous shares, each rank reads only
// its rows, sums in fp64, and one allreduce combines the sums. Every rank gets the result.
HiddenStateScores archive_importance(const ArchiveReader& archive, const ImportanceOptions& options,
                                     const CommPtr& comm);

// 1 - CKA(l, l + 1) for l = 0..L-1, float64 [L], from a self-similarity matrix [L+1, L+1].
torch::Tensor adjacent_cka_importance(const torch::Tensor& cka);

}  // namespace crash
