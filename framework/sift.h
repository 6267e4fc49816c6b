// SIFT, sparse increment fine-tuning (Song et al. 2024, docs/architecture.md section 1): from the
// gradient of the first optimiser step, each tensor's k = floor(rho x numel) + 1 entries of
// largest |g| form a fixed mask; only they train. Their fp32 values and AdamW moments are kept
// sparsely (flat indices into this rank's shard + values), so optimiser memory grows with rho.
// The mask is the same on every DP rank (DP rank 0's is broadcast) and, under TP, selected
// over the full tensor by an exact distributed selection, never gathering it.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/optim.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/tensor_parallel.h"

namespace crash {

// Entries trained per tensor of `numel` entries: floor(rho x numel) + 1, at most numel.
int64_t sift_k(double rho, int64_t numel);

// Flat global index (into the full tensor) of each flat local index of a shard.
torch::Tensor shard_to_global(const torch::Tensor& local, c10::IntArrayRef shard_shape, const ShardSlice& slice);

// Flat indices (int64, ascending) into `grad` (this rank's shard) of its entries among the k
// largest |g| of the full tensor; ties go to the lower global flat index, so exactly k entries
// are chosen over all shards. With a slice, collective over `tp` (ranks of a replicated group,
// slice.group > 1, count once); without one the tensor is whole here and nothing is exchanged.
torch::Tensor select_top_k(const torch::Tensor& grad, int64_t k, const std::optional<ShardSlice>& slice,
                           const CommPtr& tp, int tp_rank);

struct SiftParam {
  OptimParam param;
  std::optional<ShardSlice> slice;
  int64_t full_numel = 0;  // of the whole tensor (k is taken of it)
};

// AdamW on the masked entries only. The mask is chosen by the selection passes (the trainer,
// from the first micro-batch) or else at the first clip_gradients/step from the gradients there.
// Once armed, each new gradient keeps only its masked entries (fp32, summed over backward
// passes) and the dense one is dropped as soon as autograd has accumulated it, so gradient
// memory also grows with rho; reductions over replicas act on those entries (gradient_of).
class SparseAdamW : public Optimizer {
 public:
  SparseAdamW(std::vector<SiftParam> params, double rho, const AdamWOptions& options, CommPtr tp, int tp_rank,
              CommPtr dp);
  ~SparseAdamW() override;
  // Selects the mask on the first call, gathers the masked gradients and clips them by the
  // norm of the masked gradients over the grid.
  double clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over) override;
  void step(double lr) override;
  void zero_grad() override;
  std::vector<StateTensor> state() override;
  void state_loaded() override;

  // This rank's parameters split into `passes` groups of about equal bytes, for selecting the
  // mask in that many backward passes, each with the dense gradients of one group only. Every
  // rank gets exactly `passes` groups (some may be empty), since each pass is collective over
  // the grid. Names in `pinned` go to the first group (a tied embedding: the two stages that
  // hold it reduce its gradient together, so in the same pass).
  std::vector<std::vector<size_t>> selection_groups(int passes, const std::vector<std::string>& pinned) const;
  // Selects the masks of parameters `which` from their (reduced) gradients and frees those.
  // Collective over TP (sliced tensors) and DP (the mask of DP rank 0 is sent to all).
  void select(const std::vector<size_t>& which);
  // After the masks of all parameters are selected: sparse state, and the gradient hooks.
  void arm();
  // The tensor holding p's gradient for sums over replicas: its masked entries once armed.
  torch::Tensor gradient_of(const torch::Tensor& p);

  bool selected() const { return selected_; }
  // This rank's flat indices (into its shard) of parameter i's mask, and the trained values.
  const torch::Tensor& indices(size_t i) const { return index_[i]; }
  const std::vector<std::optional<ShardSlice>>& slices() const { return slices_; }
  // Called by the hook after autograd accumulated parameter i's gradient.
  void absorb(size_t i);

 private:
  void select_from_dense();
  void gather_grads();

  double rho_;
  AdamWOptions options_;
  CommPtr tp_, dp_;
  int tp_rank_;
  bool selected_ = false, gathered_ = false;
  std::vector<std::optional<ShardSlice>> slices_;
  std::vector<int64_t> full_numel_;
  std::vector<torch::Tensor> index_, master_, exp_avg_, exp_avg_sq_, grad_;
  std::vector<torch::Tensor> masked_grad_;  // the hooks' sums, one per parameter
  // The accumulator's pointer type is LibTorch's own (shared_ptr in 1.13, intrusive_ptr in 2.x).
  using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>()));
  std::vector<std::pair<NodePtr, uintptr_t>> hooks_;
};

// Collective over the world: writes this run's increments to `path` (safetensors): per
// trained tensor NAME, "NAME.sift_index" (flat indices into the full tensor, int64, ascending)
// and "NAME.sift_delta" (trained - base, fp32), with the full shapes in the metadata. `base`
// is the model training started from; `skip` names a tensor not to write (a tied lm_head).
void save_increments(const std::string& path, const SparseAdamW& optimizer, const ProcessGrid& grid,
                     const CheckpointReader& base, const std::string& skip = "");

// Writes BASE + increments as a Hugging Face folder `out` (file-level, from the mapped base):
// UserError when a tensor is missing from the base, its shape differs, or an index is out of range.
void merge_increments(const std::string& base_dir, const std::string& increments, const std::string& out);

}  // namespace crash
