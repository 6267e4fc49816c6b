// Logit lens: every hidden state (HF hidden_states index l = 0..L) read through the final
// norm and the LM head, p_l = softmax(head(finish(h_l))) (h_L is already finished), and how
// those next-token distributions differ layer to layer: mean KL(p_i || p_j) and Jensen-Shannon
// divergence (nats), top-1 agreement with the last layer and the cross-entropy of each layer
// against the actual next token ("lens loss"), over all non-padding tokens.
//
// Runs on the model's DP x PP x TP grid: hidden states travel to the last stage, which holds
// the head; with TP the vocabulary stays split (vocabulary-parallel log-softmax and partial
// sums, never the full logits); sums are fp64 and summed over DP at the end.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "framework/distributed_lm.h"

namespace crash {

struct LensResult {
  torch::Tensor kl, js;          // [L+1, L+1] float64, means over tokens; kl[i][j] = KL(p_i || p_j)
  torch::Tensor top1_agreement;  // [L+1] float64: share of tokens whose argmax equals the last layer's
  torch::Tensor lens_loss;       // [L+1] float64: mean -log p_l(next token) over tokens with a target
  int64_t num_tokens = 0;        // non-padding tokens
  int64_t num_targets = 0;       // of those, tokens followed by a non-padding token
};

class LogitLens {
 public:
  // `pp_layers` as the model was built with (which stage makes which hidden state).
  // `chunk_tokens`: tokens whose L+1 distributions are held at once (0: about 256 MiB worth).
  LogitLens(DistributedLM& model, const std::vector<int64_t>& pp_layers, int64_t chunk_tokens = 0);

  // One batch of this DP rank's rows (every rank of the replica passes the same rows):
  // runs the model and adds the batch's tokens to the sums. Collective over the replica.
  void add(const torch::Tensor& ids, const torch::Tensor& mask);

  // Sums over every rank (collective over the world): the means, on every rank.
  LensResult result();

 private:
  // Adds the tokens of `hidden` ([n, d] per HF index, rows = tokens) on the last stage.
  void accumulate(const std::vector<torch::Tensor>& hidden, const torch::Tensor& targets);

  DistributedLM& model_;
  int64_t L_ = 0, chunk_ = 0;
  std::vector<int> source_stage_;  // HF index -> pipeline stage that makes it
  torch::Tensor neg_entropy_;      // [L+1] sum_t sum_v p log p (this rank's vocabulary part)
  torch::Tensor cross_;            // [L+1, L+1] sum_t sum_v p_i log p_j (part)
  torch::Tensor mix_;              // [L+1, L+1] sum_t sum_v m log m, m = (p_i + p_j) / 2 (part)
  torch::Tensor nll_;              // [L+1] sum over targets of -log p_l(target) (part)
  torch::Tensor counts_;           // [L+1 top-1 agreements, tokens, targets] (TP rank 0 only)
};

// Vocabulary-parallel log-softmax over the last dimension of this rank's logit columns (the
// padding columns past the real vocabulary already removed): max and sum of exponentials
// reduced over `tp`. Works when a rank holds no column.
torch::Tensor vocab_parallel_log_softmax(const torch::Tensor& local_logits, const CommPtr& tp);

// Index of the largest logit over the whole vocabulary (the first one on ties, as argmax),
// from this rank's columns starting at vocab_start. Returns float64 indices (exact below 2^53).
torch::Tensor vocab_parallel_argmax(const torch::Tensor& local_logits, int64_t vocab_start, const CommPtr& tp);

}  // namespace crash
