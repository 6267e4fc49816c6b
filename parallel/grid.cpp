#include "parallel/grid.h"

#include <fmt/format.h>
#include <torch/cuda.h>
#include <mpi.h>

#include "parallel/comm_mpi.h"
#include "parallel/comm_nccl.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

void validate_grid(int world_size, const GridSizes& s) {
  if (s.tp < 1) fail("--tp must be at least 1, got {}", s.tp);
  if (s.pp < 1) fail("--pp must be at least 1, got {}", s.pp);
  if (s.backend != "mpi" && s.backend != "nccl") fail("--backend: expected 'mpi' or 'nccl', got '{}'", s.backend);
  if (s.backend == "nccl" && !nccl_compiled())
    fail("--backend nccl: this build has no NCCL (CUDA toolkit or NCCL were not found when it was configured)");
  if (s.backend == "nccl" && !torch::cuda::is_available())
    fail("--backend nccl: no CUDA device for LibTorch here (a CPU-only LibTorch, or no GPU visible)");
  if (world_size % (s.tp * s.pp) != 0)
    fail("world size {} is not divisible by tp x pp = {} x {} (data parallelism takes what remains)", world_size, s.tp,
         s.pp);
}

std::shared_ptr<ProcessGrid> ProcessGrid::create(const GridSizes& sizes) {
  World& world = World::get();
  validate_grid(world.size(), sizes);
  std::shared_ptr<ProcessGrid> g(new ProcessGrid());
  g->world_size_ = world.size();
  g->rank_ = world.rank();
  g->tp_ = sizes.tp;
  g->pp_ = sizes.pp;
  g->dp_ = world.size() / (sizes.tp * sizes.pp);
  g->tp_rank_ = g->rank_ % g->tp_;
  g->pp_rank_ = (g->rank_ / g->tp_) % g->pp_;
  g->dp_rank_ = g->rank_ / (g->tp_ * g->pp_);
  g->backend_ = sizes.backend;
  if (!world.mpi() && sizes.backend == "mpi") {
    g->world_ = g->tp_comm_ = g->pp_comm_ = g->dp_comm_ = make_local_comm();
    return g;
  }
  world.require_mpi();  // NCCL's id travels over MPI, even on one rank
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g->rank_, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &g->local_rank_);
  MPI_Comm_free(&node);
  // Model traffic (TP, PP, DP) goes over NCCL when asked; the world stays on MPI for control.
  auto group = [&](int color, int key) {
    MPI_Comm c;
    MPI_Comm_split(MPI_COMM_WORLD, color, key, &c);
    if (sizes.backend == "mpi") return make_mpi_comm(c, true);
    auto comm = make_nccl_comm(c, g->local_rank_);
    MPI_Comm_free(&c);
    return comm;
  };
  g->world_ = make_mpi_comm(MPI_COMM_WORLD, false);
  g->tp_comm_ = group(g->dp_rank_ * g->pp_ + g->pp_rank_, g->tp_rank_);
  g->pp_comm_ = group(g->dp_rank_ * g->tp_ + g->tp_rank_, g->pp_rank_);
  g->dp_comm_ = group(g->pp_rank_ * g->tp_ + g->tp_rank_, g->dp_rank_);
  return g;
}

CommPtr ProcessGrid::split(int color, int key) const {
  if (!World::get().mpi()) return color < 0 ? nullptr : make_local_comm();
  MPI_Comm comm;
  MPI_Comm_split(MPI_COMM_WORLD, color < 0 ? MPI_UNDEFINED : color, key, &comm);
  if (comm == MPI_COMM_NULL) return nullptr;
  return make_mpi_comm(comm, true);
}

std::string ProcessGrid::describe() const {
  return fmt::format("world {} = dp {} x pp {} x tp {}", world_size_, dp_, pp_, tp_);
}

}  // namespace crash
