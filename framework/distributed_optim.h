// The distributed optimiser (ZeRO stage 1, as Megatron-LM's --use-distributed-optimizer): the
// fp32 master weights and AdamW moments of this rank's trainable parameters are sharded over
// the data-parallel ranks of its (TP, PP) position. The gradients, left unsummed over DP by the
// model, are flattened into one buffer (padded to a multiple of DP), reduce-scattered so that
// each DP rank holds the sum of its contiguous 1/DP range, clipped by the same global norm as
// the replicated optimiser, stepped with the same AdamW arithmetic, and the updated parameters
// all-gathered. The numbers are those of AdamW; only where the state lives changes.
#pragma once
#include <vector>

#include "framework/optim.h"
#include "parallel/comm.h"

namespace crash {

class DistributedAdamW : public Optimizer {
 public:
  // `dp`: the data-parallel group; its ranks hold the same parameter list (the same layout).
  // The model must not sum gradients over `dp` itself (DistributedLM::set_dp_gradient_sum).
  DistributedAdamW(std::vector<OptimParam> params, const AdamWOptions& options, CommPtr dp);
  void step(double lr) override;
  // Reduce-scatters the gradients (once per step), then measures and clips the owned range.
  double clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over) override;
  // The parameters whole; masters and moments as flat pieces of each parameter (StateTensor::
  // flat_start): a checkpoint holds every DP rank's pieces, and loads on any DP size.
  std::vector<StateTensor> state() override;

  // Elements of the flattened buffer this rank owns (padding included), and where they start.
  int64_t shard_size() const { return shard_; }
  int64_t shard_begin() const { return begin_; }

 private:
  void reduce_gradients();

  // The part of parameter `param` this rank owns: its elements [start, start + length) of the
  // flattened parameter are elements [offset, offset + length) of the shard.
  struct Segment {
    size_t param;
    int64_t start, length, offset;
  };

  AdamWOptions options_;
  CommPtr dp_;
  torch::ScalarType dtype_ = torch::kFloat32;
  std::vector<int64_t> flat_offset_;  // where each parameter starts in the flattened buffer
  int64_t total_ = 0, shard_ = 0, begin_ = 0;
  std::vector<Segment> segments_;
  bool own_master_ = true;  // fp32 parameters are their own master: the owned range is stepped in place
  torch::Tensor master_, exp_avg_, exp_avg_sq_;  // fp32, shard_ elements
  // With DP > 1 the gradients are views of one flat buffer (Megatron's contiguous grad buffer):
  // backward accumulates into it, and it is reduce-scattered without a copy.
  torch::Tensor grad_buffer_;
  torch::Tensor grad_;  // this rank's summed range, the parameters' dtype
  std::vector<bool> has_grad_;
};

}  // namespace crash
