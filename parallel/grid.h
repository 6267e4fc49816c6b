// The DP x PP x TP process grid (Megatron / TensorRT-LLM layout): TP fastest, then PP, then DP:
//   tp = rank % TP,  pp = (rank / TP) % PP,  dp = rank / (TP * PP).
// GridLayout is the rank arithmetic alone (no communicator, testable anywhere); ProcessGrid
// adds the communicators of every group the model needs, as Megatron's parallel_state does.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace crash {

struct GridSizes {
  int tp = 1, pp = 1;
  std::string backend = "mpi";  // "mpi" (CPU tensors) or "nccl" (CUDA tensors, one GPU per rank)
};

// Where one rank sits in the grid.
struct GridCoords {
  int tp = 0, pp = 0, dp = 0;
};

// The rank arithmetic of a world of `world_size` ranks split as `sizes`.
class GridLayout {
 public:
  // The one check of the sizes against the world (and the backend against this build); throws
  // UserError before anything is loaded.
  GridLayout(int world_size, const GridSizes& sizes);

  int world_size() const { return world_size_; }
  const std::string& backend() const { return backend_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  GridCoords coords_of(int rank) const;
  int rank_of(int tp_rank, int pp_rank, int dp_rank) const { return tp_rank + tp_ * (pp_rank + pp_ * dp_rank); }
  int rank_of(const GridCoords& c) const { return rank_of(c.tp, c.pp, c.dp); }

  // Colours of the groups a rank belongs to (ranks of one colour form a group; -1: in none).
  // TP: the ranks of one stage of one replica; PP: one TP slice's stages; DP: the replicas of one
  // (stage, slice).
  int tp_color(int rank) const;
  int pp_color(int rank) const;
  int dp_color(int rank) const;
  // `size` consecutive TP ranks (key/value heads replicated over them under TP).
  int tp_block_color(int rank, int size) const;
  // First and last stage of one (replica, slice): a tied embedding's two copies. -1 for the middle
  // stages and when there is one stage.
  int embedding_color(int rank) const;

 private:
  int world_size_ = 1, tp_ = 1, pp_ = 1, dp_ = 1;
  std::string backend_;
};

class ProcessGrid {
 public:
  // Collective over the world: splits the sub-communicators of a layout of this world.
  static std::shared_ptr<ProcessGrid> create(const GridLayout& layout);
  // The same after checking `sizes` against the world.
  static std::shared_ptr<ProcessGrid> create(const GridSizes& sizes);

  const GridLayout& layout() const { return layout_; }
  int world_size() const { return layout_.world_size(); }
  int rank() const { return rank_; }
  int tp() const { return layout_.tp(); }
  int pp() const { return layout_.pp(); }
  int dp() const { return layout_.dp(); }
  int tp_rank() const { return coords_.tp; }
  int pp_rank() const { return coords_.pp; }
  int dp_rank() const { return coords_.dp; }
  int local_rank() const { return local_rank_; }  // rank on this node: picks the GPU
  bool first_stage() const { return coords_.pp == 0; }
  bool last_stage() const { return coords_.pp == layout_.pp() - 1; }
  int rank_of(int tp_rank, int pp_rank, int dp_rank) const { return layout_.rank_of(tp_rank, pp_rank, dp_rank); }

  const CommPtr& world() const { return world_; }
  const CommPtr& tp_group() const { return tp_comm_; }
  const CommPtr& pp_group() const { return pp_comm_; }
  const CommPtr& dp_group() const { return dp_comm_; }
  // The first and last stage of this rank's (replica, TP slice), which hold the two copies of a
  // tied embedding; nullptr on middle stages and with one stage. Made on first use: collective
  // over the world (every rank calls it, members or not).
  const CommPtr& embedding_group();
  // This rank's block of `size` consecutive TP ranks, which hold the same replicated key/value
  // heads; `size` divides TP. Made on first use for each size: collective over the world.
  const CommPtr& tp_block_group(int size);
  const std::string& backend() const { return layout_.backend(); }

  std::string describe() const;

 private:
  explicit ProcessGrid(const GridLayout& layout) : layout_(layout) {}
  // Ranks with the same colour form a group ordered by key; ranks passing colour < 0 get nullptr.
  // Collective over the world.
  CommPtr split(int color, int key) const;
  GridLayout layout_;
  GridCoords coords_;
  int rank_ = 0, local_rank_ = 0;
  CommPtr world_, tp_comm_, pp_comm_, dp_comm_;
  bool embedding_made_ = false;
  CommPtr embedding_comm_;
  std::map<int, CommPtr> tp_block_comms_;
};

}  // namespace crash
