// The forward job's outputs on any DP x PP x TP grid, brought to rank 0. Each DP replica runs a
// contiguous share of the sequences, all padded to one length; its last stage holds their
// logits, and each stage the hidden states of the layers it runs.
#pragma once
#include <torch/types.h>

#include <map>
#include <utility>
#include <vector>

#include "framework/distributed_lm.h"

namespace crash {

// The items [begin, end) of n that DP rank d of dp takes: contiguous, in rank order, sizes
// differing by at most one.
std::pair<int64_t, int64_t> dp_share(int64_t n, int64_t dp, int64_t d);

// The pipeline stage that makes hidden_states[l] (HF numbering: 0 is the embedding's output,
// l > 0 that of layer l - 1), given each stage's layers [first, end) (split_layers).
int hidden_state_stage(const std::vector<std::pair<int64_t, int64_t>>& stages, int64_t l);

// What one rank's forward passes made on its DP share, batch after batch, float32.
struct ShareOutputs {
  std::vector<torch::Tensor> logits;                     // last stage: [rows, T, vocab]
  std::map<int64_t, std::vector<torch::Tensor>> hidden;  // hidden_states index -> [rows, T, d], this stage's
};

// Runs this DP rank's share of `seqs` (dp_share) through the model, `batch_size` rows a pass in
// `micro_batches` pieces (a short last batch in one), every sequence padded to `length` tokens
// on the left or the right. Collective over the model's grid.
ShareOutputs forward_share(DistributedLM& model, const std::vector<std::vector<int64_t>>& seqs, int64_t length,
                           int64_t batch_size, int micro_batches, bool left, bool hidden_states);

struct GatheredOutputs {
  torch::Tensor logits;               // [N, T, vocab]
  std::vector<torch::Tensor> hidden;  // hidden_states[l], l = 0..L: [N, T, d]; empty without hidden states
};

// Collective over the grid's world: the TP-rank-0 ranks send their share's outputs to rank 0,
// which returns all `num_sequences` in order (T = `length`); other ranks return nothing.
// `pp_layers` is the model's split (DistributedOptions::pp_layers).
GatheredOutputs gather_outputs(const DistributedLM& model, const std::vector<int64_t>& pp_layers,
                               const ShareOutputs& local, int64_t num_sequences, int64_t length, bool hidden_states);

}  // namespace crash
