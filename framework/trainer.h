// The sharded trainer of the `train` job: fine-tunes a model (by default only an emulator's
// adapter layers) on any DP x PP x TP grid with AdamW, a linear schedule, gradient clipping
// and accumulation, loss on target tokens only; validates, keeps the best model, and writes
// checkpoints that resume exactly, on the same grid or another one.
#pragma once
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/distributed_lm.h"
#include "framework/lora.h"
#include "framework/optim.h"
#include "framework/sift.h"
#include "framework/tokenizer.h"
#include "framework/train_checkpoint.h"
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
  // Which layers train, in place of the plan's adapters: the last K decoder layers (healing a
  // pruned model as "Reassessing Layer Pruning" does), and with train_head the final norm and the
  // LM head (a tied head: the embedding it is).
  std::optional<int64_t> train_last;
  bool train_head = false;
  torch::ScalarType dtype = torch::kFloat32;  // compute type; master weights and moments are fp32
  GridSizes grid;
  std::vector<int64_t> pp_layers;
  // Knowledge distillation from the full model (empty: none).
  std::string distill_from;
  double kd_alpha = 0.5, kd_temperature = 2.0;
  int64_t stop_after = 0;  // tests: end (as if killed) after this many steps of this run
  // SIFT (framework/sift.h): rho in (0, 1] trains each tensor's top floor(rho numel) + 1
  // entries by the first step's |gradient|; absent: dense AdamW.
  std::optional<double> sparse_increment;
  // SIFT: backward passes that select the mask, each with the dense gradients of about
  // 1/passes of the parameters (more passes: less memory, a slower first step).
  int sift_selection_passes = 4;
  std::string save_increments;  // SIFT: write the increments (index + trained - base) here at the end
  // Activation recomputation (framework/recompute.h): none, full or selective. Memory and time
  // only: the numbers are those of none, so a checkpoint resumes with any of them.
  std::string recompute = "none";
  // ZeRO-1 (framework/distributed_optim.h): masters and moments sharded over DP. The numbers are
  // those of the replicated optimiser, so a checkpoint resumes with or without it.
  bool distributed_optimizer = false;
  // LoRA (framework/lora.h) on the trainable layers' linears; the base weights stay frozen.
  LoraOptions lora;
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

// Throws UserError naming the first option out of range: every option of `train` is checked
// here and nowhere else. `world_size`: the ranks the grid is made of. With the model's config,
// the options that depend on it too (LoRA's targets).
void check_train_options(const TrainOptions& options, int world_size, const ModelConfig* config = nullptr);

class TrainLog;

// One training run, collective over the world. The constructor does everything before the
// first step (checks, output folder, model, optimiser, resumed state); run() trains. A new
// feature lands as a step of its own, or inside the step it belongs to:
//   check_resume -> load_model -> set_up_optimizer -> restore  (constructor)
//   per step: select_sift_mask (first step only) -> train_step -> validate -> save_or_stop
class Trainer {
 public:
  explicit Trainer(const TrainOptions& options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;
  TrainSummary run();

 private:
  // The output folder: a new run needs it empty (or --overwrite), --resume a checkpoint written
  // with the same schedule, data and model.
  void check_resume();
  // The student (its trainable parameters marked) and the distillation teacher on the grid.
  void load_model();
  // AdamW (replicated, or sharded over DP with --distributed-optimizer), or SIFT's sparse AdamW,
  // over this rank's trainable parameters.
  void set_up_optimizer();
  // The resumed checkpoint's weights, moments and best validation so far.
  void restore();

  // Global batch slot `position` of the run: which example, in epoch order.
  int64_t example_at(int64_t position);
  struct StepRows {
    std::vector<int64_t> rows;  // the step's examples, B of them
    int64_t length = 1;         // the longest
    double targets = 0, tokens = 0;
  };
  StepRows step_rows(int64_t step);
  // This rank's rows of pass k of a step.
  TrainBatch pass_batch(const StepRows& s, int64_t k) const;
  DistributedLM::Dropout pass_dropout(int64_t step, int64_t k) const;
  // SIFT: the mask, from the first pass's gradient, in passes that each compute the dense
  // gradients of a part of the parameters only.
  void select_sift_mask(int64_t step, const StepRows& s);
  struct StepResult {
    double loss = 0, grad_norm = 0, lr = 0, tokens = 0, seconds = 0;
  };
  // Forward/backward over --grad-accum passes, clipping, one optimiser step.
  StepResult train_step(int64_t step);
  // Mean loss per target token over the validation data.
  double validate();
  // Validation, the best model, the final model; after step `done` (1-based).
  void evaluate_and_keep(int64_t done);
  // Checkpoint every --save-every steps and at the end; a stop signal saves and throws
  // StopRequested.
  void save_or_stop(int64_t done);
  nlohmann::json trainer_state(int64_t step) const;
  // OUT/model (merged with LoRA's B A) and, with LoRA, OUT/adapter in PEFT's format.
  void save_model();
  void log_step(int64_t step, const StepResult& r);
  TrainSummary finish();

  const TrainOptions o_;
  std::unique_ptr<CheckpointReader> ckpt_, teacher_ckpt_;
  std::shared_ptr<ProcessGrid> grid_;
  std::function<bool(const std::string&)> trains_;
  std::optional<Tokenizer> tokenizer_;
  TrainData data_;
  std::optional<TrainData> val_;
  std::string out_, ckpt_root_;
  std::optional<std::string> resume_from_;
  nlohmann::json manifest_;

  std::unique_ptr<DistributedLM> model_, teacher_;
  std::unique_ptr<LoraAdapters> lora_;
  std::unique_ptr<Optimizer> optimizer_;
  SparseAdamW* sift_ = nullptr;
  SliceMap slices_;
  std::vector<CommPtr> norm_groups_;
  std::string tied_;
  int64_t optimizer_bytes_ = 0;  // this rank's optimiser state
  double hidden_dropout_ = 0, attention_dropout_ = 0;

  int64_t start_ = 0, best_step_ = -1;
  double best_val_ = 0;
  std::map<int64_t, std::vector<int64_t>> orders_;  // epoch -> order (the last two are kept)
  std::unique_ptr<TrainLog> log_;

  int64_t ran_ = 0;
  double tokens_done_ = 0, last_loss_ = 0;
  std::chrono::steady_clock::time_point run_start_;
  // Sums over the steps since the last log line: its loss is their mean, its rate their tokens/s.
  struct {
    double loss = 0, tokens = 0, seconds = 0;
    int64_t steps = 0;
  } interval_;
};

// Runs the whole training (collective over the world); throws UserError on bad input.
TrainSummary train(const TrainOptions& options);

}  // namespace crash
