// A causal LM on a DP x PP x TP grid: this rank's stage of layers with its TP slices,
// inference streamed through the pipeline and training steps with the 1F1B schedule.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/models/decoder.h"
#include "framework/recompute.h"
#include "parallel/grid.h"
#include "parallel/pipeline.h"

namespace crash {

// Checks that a model can be split over the grid as asked (heads and MLP over TP, layers over
// the stages), before any weight is read (UserError otherwise). The grid's own sizes are checked
// by GridLayout.
void validate_model_grid(const ModelConfig& config, const GridLayout& grid, const std::vector<int64_t>& pp_layers = {});

struct DistributedOptions {
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> pp_layers;  // layers per stage; empty: balanced
};

class DistributedLM {
 public:
  // Collective over the world (the groups for replicated key/value heads and a tied embedding are
  // made on first use). Checks the model against the grid (validate_model_grid), then loads.
  DistributedLM(const CheckpointReader& checkpoint, std::shared_ptr<ProcessGrid> grid,
                const DistributedOptions& options = {});

  CausalLM& stage() { return *stage_; }
  const ProcessGrid& grid() const { return *grid_; }
  // Parameters this rank trains (its stage, its TP slices).
  std::vector<torch::Tensor> parameters() const { return stage_->parameters(); }

  struct Output {
    torch::Tensor logits;  // last stage: [B, T, vocab] (full vocabulary)
    std::map<int64_t, torch::Tensor>
        hidden;  // HF hidden_states index -> [B, T, d] ([N, d] packed), this stage's layers
  };
  // Inference on this DP rank's rows, in `micro_batches` pieces along the batch. Without
  // `logits` the LM head is skipped (collection needs hidden states only). `packed` runs only
  // the real tokens (TokenPacking): logits and hidden states are then [N, ..], the mask's
  // tokens row after row.
  // `vocab_parallel`: the logits stay this TP rank's columns ([.., local vocabulary] from the
  // stage's vocab_start(), as head_local gives them), not gathered over TP.
  Output forward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches, bool hidden_states,
                 bool logits = true, bool packed = false, bool vocab_parallel = false);

  // Log-probability of each target token under the model, without gathering the logits:
  // targets [B, T] (this DP rank's rows) name the token predicted at each position
  // (ignore_index where nothing is scored, e.g. causal_targets). Returns [B, T] float64 on every
  // rank of the replica (0 where ignored). Inference only.
  torch::Tensor token_logprobs(const torch::Tensor& ids, const torch::Tensor& mask, const torch::Tensor& targets,
                               int micro_batches, int64_t ignore_index = -100);

  // One forward and backward of the causal-LM loss (next token, padding ignored) over the
  // global batch: every DP rank passes its own rows. Returns the loss (mean over all target
  // tokens of all DP ranks) on every rank. Gradients accumulate; with `sync` they are then
  // summed across ranks (sync_gradients): leave it false on all but the last step of an
  // accumulation.
  // `labels` [B, T] (optional) replace causal_targets: the token each position predicts, -100
  // where no loss (e.g. the context of a multiple-choice example). `total_tokens` > 0 divides
  // the summed loss by it instead of this call's global target count (gradient accumulation
  // normalises by the whole optimiser step's tokens).
  // With `kd` the loss is (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T) over the target
  // tokens (knowledge distillation; Hinton et al.).
  struct Distillation {
    // [B, T, local vocabulary] of this rank's rows and TP columns (forward with vocab_parallel),
    // needed on the last stage: no rank holds the teacher's whole-vocabulary logits.
    torch::Tensor teacher_logits;
    double alpha = 0.5, temperature = 2.0;
  };
  // Training-time dropout of one pass (framework/models/dropout.h): the rates, and the key the
  // masks derive from. This rank's row r has slot first_slot + r in the step's global batch, so
  // every grid draws the masks of the one-rank run. Null or zero rates: no dropout.
  struct Dropout {
    double hidden = 0, attention = 0;
    uint64_t seed = 0;
    int64_t step = 0, first_slot = 0;
  };
  double forward_backward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches, bool sync = true,
                          const torch::Tensor& labels = {}, double total_tokens = 0, const Distillation* kd = nullptr,
                          const Dropout* dropout = nullptr);

  // Activation recomputation of training passes (framework/recompute.h): gradients are those of
  // Recompute::None bit for bit; only what is held between forward and backward changes.
  void set_recompute(Recompute r) { recompute_ = r; }
  Recompute recompute() const { return recompute_; }

  // The same loss without gradients. `tokens` (if given) receives the global target count, so
  // that several batches can be averaged by token.
  double evaluate_loss(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                       const torch::Tensor& labels = {}, double* tokens = nullptr);

  // Sums gradients that several ranks hold copies of: over DP (bucketed), over ranks that
  // share replicated key/value heads, and between a tied embedding's first and last stage.
  // Frozen parameters are skipped.
  void sync_gradients();
  // Where the sums above find a parameter's gradient (default: its .grad, made if absent). A
  // sparse optimiser hands out the masked entries it keeps instead: the sums are elementwise,
  // and every copy of a tensor has the same mask.
  using GradientSource = std::function<torch::Tensor(const torch::Tensor& param)>;
  void set_gradient_source(GradientSource source) { gradient_source_ = std::move(source); }
  // Off: sync_gradients leaves the sum over DP to the optimiser (the distributed optimiser
  // reduce-scatters it).
  void set_dp_gradient_sum(bool on) { dp_gradient_sum_ = on; }

  // Marks which parameters train, by Hugging Face name (a tied lm_head is asked as the
  // embedding); the rest get requires_grad = false: no gradient, no sum, no optimiser state.
  void set_trainable(const std::function<bool(const std::string& name)>& trains);
  // This rank's trainable parameters with what the optimiser and checkpoints need.
  struct TrainParam {
    std::string name;                 // as the stage names it (global layer numbers)
    torch::Tensor tensor;             // this rank's shard
    std::optional<ShardSlice> slice;  // which part of the full tensor (absent: whole)
    bool in_norm = true;              // counted in the global gradient norm here (copies count once)
  };
  std::vector<TrainParam> trainable() const;

  // Collective: writes the model this grid holds as one Hugging Face folder (a shard per
  // pipeline stage with model.safetensors.index.json when PP > 1), assembled as DIR.tmp and
  // renamed; tokenizer files and crash_plan.json are copied from the source folder.
  void save_model(const std::string& dir);
  const std::string& source_dir() const { return source_dir_; }
  const ModelConfig& config() const { return stage_->config(); }

 private:
  torch::Device device() const;
  std::shared_ptr<ProcessGrid> grid_;
  std::shared_ptr<CausalLM> stage_;
  CommPtr kv_group_, embedding_group_;
  std::vector<torch::Tensor> kv_replicated_;
  torch::Tensor tied_embedding_;  // first or last stage's copy when the embedding is tied across PP
  std::string source_dir_;
  GradientSource gradient_source_;
  Recompute recompute_ = Recompute::None;
  bool dp_gradient_sum_ = true;
};

// Next-token targets: ids shifted left, ignore_index where the target or the position is padding.
torch::Tensor causal_targets(const torch::Tensor& ids, const torch::Tensor& mask, int64_t ignore_index = -100);

}  // namespace crash
