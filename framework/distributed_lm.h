// A causal LM on a DP x PP x TP grid: this rank's stage of layers with its TP slices,
// inference streamed through the pipeline and training steps with the 1F1B schedule.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/models/decoder.h"
#include "parallel/grid.h"
#include "parallel/pipeline.h"

namespace crash {

// Checks that a model can be split as asked, before any weight is read (UserError otherwise).
void validate_model_grid(const ModelConfig& config, int world_size, const GridSizes& sizes,
                         const std::vector<int64_t>& pp_layers = {});

struct DistributedOptions {
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> pp_layers;  // layers per stage; empty: balanced
};

class DistributedLM {
 public:
  DistributedLM(const CheckpointReader& checkpoint, std::shared_ptr<ProcessGrid> grid,
                const DistributedOptions& options = {});

  CausalLM& stage() { return *stage_; }
  const ProcessGrid& grid() const { return *grid_; }
  // Parameters this rank trains (its stage, its TP slices).
  std::vector<torch::Tensor> parameters() const { return stage_->parameters(); }

  struct Output {
    torch::Tensor logits;                   // last stage: [B, T, vocab] (full vocabulary)
    std::map<int64_t, torch::Tensor> hidden;  // HF hidden_states index -> [B, T, d], for this stage's layers
  };
  // Inference on this DP rank's rows, in `micro_batches` pieces along the batch. Without
  // `logits` the LM head is skipped (collection needs hidden states only).
  Output forward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches, bool hidden_states,
                 bool logits = true);

  // One forward and backward of the causal-LM loss (next token, padding ignored) over the
  // global batch: every DP rank passes its own rows. Returns the loss (mean over all target
  // tokens of all DP ranks) on every rank. Gradients accumulate; with `sync` they are then
  // summed across ranks (sync_gradients): leave it false on all but the last step of an
  // accumulation.
  double forward_backward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches, bool sync = true);

  // Sums gradients that several ranks hold copies of: over DP (bucketed), over ranks that
  // share replicated key/value heads, and between a tied embedding's first and last stage.
  void sync_gradients();

 private:
  torch::Device device() const;
  std::shared_ptr<ProcessGrid> grid_;
  std::shared_ptr<CausalLM> stage_;
  CommPtr kv_group_, embedding_group_;
  std::vector<torch::Tensor> kv_replicated_;
  torch::Tensor tied_embedding_;  // first or last stage's copy when the embedding is tied across PP
};

// Next-token targets: ids shifted left, ignore_index where the target or the position is padding.
torch::Tensor causal_targets(const torch::Tensor& ids, const torch::Tensor& mask, int64_t ignore_index = -100);

}  // namespace crash
