// The DP x PP x TP process grid (Megatron / TensorRT-LLM layout): TP fastest, then PP, then DP:
//   tp = rank % TP,  pp = (rank / TP) % PP,  dp = rank / (TP * PP).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace crash {

struct GridSizes {
  int tp = 1, pp = 1;
  std::string backend = "mpi";  // "mpi" (CPU tensors) or "nccl" (CUDA tensors, one GPU per rank)
};

// Checks the sizes against the world before anything is loaded; throws UserError.
void validate_grid(int world_size, const GridSizes& sizes);

class ProcessGrid {
 public:
  // Collective over the world: splits the sub-communicators.
  static std::shared_ptr<ProcessGrid> create(const GridSizes& sizes);

  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int tp_rank() const { return tp_rank_; }
  int pp_rank() const { return pp_rank_; }
  int dp_rank() const { return dp_rank_; }
  int local_rank() const { return local_rank_; }  // rank on this node: picks the GPU
  bool first_stage() const { return pp_rank_ == 0; }
  bool last_stage() const { return pp_rank_ == pp_ - 1; }
  int rank_of(int tp_rank, int pp_rank, int dp_rank) const { return tp_rank + tp_ * (pp_rank + pp_ * dp_rank); }

  const CommPtr& world() const { return world_; }
  const CommPtr& tp_group() const { return tp_comm_; }
  const CommPtr& pp_group() const { return pp_comm_; }
  const CommPtr& dp_group() const { return dp_comm_; }
  // Ranks with the same color form a group ordered by key; ranks passing color < 0 get nullptr.
  // Collective over the world.
  CommPtr split(int color, int key) const;
  const std::string& backend() const { return backend_; }

  std::string describe() const;

 private:
  ProcessGrid() = default;
  int world_size_ = 1, rank_ = 0, tp_ = 1, pp_ = 1, dp_ = 1;
  int tp_rank_ = 0, pp_rank_ = 0, dp_rank_ = 0, local_rank_ = 0;
  std::string backend_ = "mpi";
  CommPtr world_, tp_comm_, pp_comm_, dp_comm_;
};

}  // namespace crash
