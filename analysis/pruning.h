// Which layers the layer-pruning baselines remove (docs/architecture.md section 1), and LaCo's
// calibration check of a merged model:
// - per-layer scores (block_influence, cka_importance): the round(R L) lowest, ties to the lower
//   layer; a NaN score (widths that differ) is never removed;
// - angular_distance (Gromov et al. 2024): the contiguous block [l, l + n), n = round(R L),
//   with the smallest d(l, n), ties to the lower l;
// - sleb: the first round(R L) layers of the file's greedy removal order.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "analysis/importance_file.h"
#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/emulator.h"

namespace crash {

// "3,5-7" -> {3, 5, 6, 7}; UserError naming `option` on anything else.
std::vector<int64_t> parse_layer_list(const std::string& text, const std::string& option);
// "4-6,9-10" -> {{4, 5, 6}, {9, 10}}.
std::vector<std::vector<int64_t>> parse_layer_groups(const std::string& text, const std::string& option);

// round(ratio * L) (half to even, as Python's round); UserError unless 0 < ratio < 1 and the
// count is 1..L-1.
int64_t layers_for_ratio(double ratio, int64_t L);

// UserError when the importance file was computed for another model than `model` (depth, type,
// or the recorded folder's config.json when it is still there).
void check_importance_model(const ImportanceRecord& record, const std::string& file, const CheckpointReader& model);

struct PruneChoice {
  std::vector<int64_t> removed;  // increasing
  nlohmann::json scores;         // {"file", "method", "values"}: what the choice was made from
};
PruneChoice choose_from_importance(const ImportanceRecord& record, const std::string& file, const std::string& method,
                                   double ratio);

// LaCo's search (Yang et al. 2024, Algorithm 1): from the top of the model down, collapse a
// group of `merge_size` consecutive layers of the model merged so far into its first layer and
// keep the merge when `similarity` (the calibration check of the candidate against the full
// model, the same value on every rank) exceeds `threshold`; after a merge the next group starts
// `interval` layers lower, after a rejection one lower; until `remove` layers are gone or no
// group fits. A group is cut short so that no more than `remove` layers go. `plan` starts as the
// full model (every layer its own slot).
struct LacoStep {
  std::vector<int64_t> layers;  // full-model layers of the candidate slot
  int64_t slots = 0;            // how many slots of the current model it merged
  double similarity = 0;
  bool accepted = false;
};
struct LacoResult {
  EmulatorPlan plan;
  std::vector<LacoStep> steps;
  int64_t removed = 0;
};
LacoResult laco_search(int64_t L, int64_t remove, int64_t merge_size, double threshold, int64_t interval,
                       const std::function<double(const EmulatorPlan&)>& similarity);

// SLEB (Song et al. 2024): repeat, for each remaining layer the calibration perplexity of the
// model without it and the layers removed so far, `perplexity(removed)`; remove the layer with
// the lowest (ties: the lower layer), until `remove` layers are gone.
struct SlebResult {
  std::vector<int64_t> order;      // layers in the order removed
  std::vector<double> perplexity;  // after each removal
  double base_perplexity = 0;      // the full model's
};
SlebResult sleb_search(int64_t L, int64_t remove,
                       const std::function<double(const std::vector<int64_t>& removed)>& perplexity);

// Token-level perplexity of the model on `seqs` (every next token of every sequence; each DP
// replica runs them all), the same on every rank. Collective over the model's grid.
double calibration_perplexity(DistributedLM& model, const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size);

// Final hidden states (HF hidden_states[-1], after the final norm) at each sequence's last
// token, [N, d] float64 on rank 0 (undefined elsewhere). Collective over the model's grid.
torch::Tensor last_token_states(DistributedLM& model, const std::vector<int64_t>& pp_layers,
                                const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size);

// Per-row cosine similarity of two [N, d] tensors, float64 [N].
torch::Tensor row_cosine(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace crash
