// The sharded trainer of the `train` job: fine-tunes a model (by default only an emulator's
// adapter layers) on any DP x PP x TP grid with AdamW, a linear schedule, gradient clipping
// and accumulation, loss on target tokens only; validates, keeps the best model, and writes
// checkpoints that resume exactly, on the same grid or another one.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framework/config.h"
#include "framework/tokenizer.h"
#include "parallel/grid.h"

namespace crash {

struct TrainOptions {
  std::string model, data, val_data, out;
  int64_t steps = 100;
  int64_t batch_size = 8;  // examples per optimiser step, over all DP ranks
  int micro_batches = 1;   // pipeline micro-batches per forward/backward
  int grad_accum = 1;      // forward/backward passes per optimiser step
  double lr = 1e-4;
  int64_t warmup = 0;
  double weight_decay = 0.0, clip = 1.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  uint64_t seed = 0;  // data order and dropout masks
  // Residual-branch dropout (the config's `dropout`, which this replaces when set); attention
  // probabilities take the config's `attention_dropout`. Training passes only.
  std::optional<double> dropout;
  int64_t eval_every = 0;     // 0: validate only at the end (when --val-data is given)
  int64_t save_every = 0;     // 0: a checkpoint only at the end
  int64_t log_interval = 10;  // a log line every N steps (and the first and last); train_log.jsonl has all
  int keep_checkpoints = 2;
  bool train_all = false, resume = false, overwrite = false;
  torch::ScalarType dtype = torch::kFloat32;  // compute type; master weights and moments are fp32
  GridSizes grid;
  std::vector<int64_t> pp_layers;
  // Knowledge distillation from the full model (empty: none).
  std::string distill_from;
  double kd_alpha = 0.5, kd_temperature = 2.0;
  int64_t stop_after = 0;  // tests: end (as if killed) after this many steps of this run
  // SIFT (framework/sift.h): rho in (0, 1] trains each tensor's top floor(rho numel) + 1
  // entries by the first step's |gradient|; 0: dense AdamW.
  double sparse_increment = 0;
  // SIFT: backward passes that select the mask, each with the dense gradients of about
  // 1/passes of the parameters (more passes: less memory, a slower first step).
  int sift_selection_passes = 4;
  std::string save_increments;  // SIFT: write the increments (index + trained - base) here at the end
};

// One training example: tokens, and from which position on they are targets (each predicted
// from the tokens before it): 1 for text, the continuation's start for multiple choice.
struct TrainExample {
  std::vector<int64_t> tokens;
  int64_t loss_from = 1;
};

struct TrainData {
  std::string path;
  std::string kind;  // multiple_choice, text or tokens
  std::vector<TrainExample> examples;
  uint64_t hash = 0;  // of every example's tokens and loss_from: a changed data set is refused on resume
};

// A prepared folder (multiple choice: context + gold continuation, loss on the continuation;
// text: every token) or JSON Lines of {"tokens"} (or {"text"} with a tokenizer). Examples
// longer than max_length keep their last tokens.
TrainData read_train_data(const std::string& path, const ModelConfig& config, const Tokenizer* tokenizer);

struct TrainBatch {
  torch::Tensor ids, mask, labels;  // [rows, length]; labels as causal_targets, -100 where no loss
};
// Rows of `data` (index -1: a filler row with no loss) right-padded to `length`.
TrainBatch make_batch(const TrainData& data, const std::vector<int64_t>& rows, int64_t length, int64_t pad_id);

// The order of epoch `epoch`: a permutation of n drawn from (seed, epoch) alone, so any step's
// examples are known without replaying earlier ones.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

struct TrainSummary {
  int64_t steps = 0;
  double last_loss = 0, best_val = 0, tokens_per_second = 0;
};

// The dropout rates a run trains with: {residual branches, attention probabilities}.
std::pair<double, double> train_dropout(const TrainOptions& options, const ModelConfig& config);

// Runs the whole training (collective over the world); throws UserError on bad input.
TrainSummary train(const TrainOptions& options);

}  // namespace crash
