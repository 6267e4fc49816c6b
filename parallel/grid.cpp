#include "parallel/grid.h"

#include <fmt/format.h>
#include <mpi.h>
#include <torch/cuda.h>

#include "parallel/comm_mpi.h"
#include "parallel/comm_nccl.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

GridLayout::GridLayout(int world_size, const GridSizes& s)
    : world_size_(world_size), tp_(s.tp), pp_(s.pp), backend_(s.backend) {
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
  dp_ = world_size / (s.tp * s.pp);
}

GridCoords GridLayout::coords_of(int rank) const { return {rank % tp_, (rank / tp_) % pp_, rank / (tp_ * pp_)}; }

int GridLayout::tp_color(int rank) const {
  const auto c = coords_of(rank);
  return c.dp * pp_ + c.pp;
}

int GridLayout::pp_color(int rank) const {
  const auto c = coords_of(rank);
  return c.dp * tp_ + c.tp;
}

int GridLayout::dp_color(int rank) const {
  const auto c = coords_of(rank);
  return c.pp * tp_ + c.tp;
}

int GridLayout::tp_block_color(int rank, int size) const {
  const auto c = coords_of(rank);
  return (c.dp * pp_ + c.pp) * tp_ + c.tp / size;
}

int GridLayout::embedding_color(int rank) const {
  const auto c = coords_of(rank);
  if (pp_ < 2 || (c.pp != 0 && c.pp != pp_ - 1)) return -1;
  return c.dp * tp_ + c.tp;
}

std::shared_ptr<ProcessGrid> ProcessGrid::create(const GridSizes& sizes) {
  return create(GridLayout(World::get().size(), sizes));
}

std::shared_ptr<ProcessGrid> ProcessGrid::create(const GridLayout& layout) {
  World& world = World::get();
  if (layout.world_size() != world.size())
    throw std::logic_error(
        fmt::format("a grid laid out for {} ranks, made in a world of {}", layout.world_size(), world.size()));
  std::shared_ptr<ProcessGrid> g(new ProcessGrid(layout));
  g->rank_ = world.rank();
  g->coords_ = layout.coords_of(g->rank_);
  const std::string& backend = layout.backend();
  if (!world.mpi() && backend == "mpi") {
    g->world_ = g->tp_comm_ = g->pp_comm_ = g->dp_comm_ = make_local_comm();
    return g;
  }
  world.require_mpi();  // NCCL's id travels over MPI, even on one rank
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g->rank_, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &g->local_rank_);
  MPI_Comm_free(&node);
  const GridLayout& l = g->layout_;
  g->world_ = make_mpi_comm(MPI_COMM_WORLD, false);
  g->tp_comm_ = g->split(l.tp_color(g->rank_), g->coords_.tp);
  g->pp_comm_ = g->split(l.pp_color(g->rank_), g->coords_.pp);
  g->dp_comm_ = g->split(l.dp_color(g->rank_), g->coords_.dp);
  return g;
}

const CommPtr& ProcessGrid::embedding_group() {
  if (!embedding_made_) {
    embedding_comm_ = split(layout_.embedding_color(rank_), coords_.pp);
    embedding_made_ = true;
  }
  return embedding_comm_;
}

const CommPtr& ProcessGrid::tp_block_group(int size) {
  if (size < 1 || layout_.tp() % size != 0)
    throw std::logic_error(fmt::format("tp_block_group: {} does not divide tp {}", size, layout_.tp()));
  auto it = tp_block_comms_.find(size);
  if (it == tp_block_comms_.end())
    it = tp_block_comms_.emplace(size, split(layout_.tp_block_color(rank_, size), coords_.tp)).first;
  return it->second;
}

CommPtr ProcessGrid::split(int color, int key) const {
  if (!World::get().mpi()) return color < 0 ? nullptr : make_local_comm();
  MPI_Comm comm;
  MPI_Comm_split(MPI_COMM_WORLD, color < 0 ? MPI_UNDEFINED : color, key, &comm);
  if (comm == MPI_COMM_NULL) return nullptr;
  // Model traffic goes over NCCL when asked; the world stays on MPI for control.
  if (backend() == "mpi") return make_mpi_comm(comm, true);
  auto nccl = make_nccl_comm(comm, local_rank_);
  MPI_Comm_free(&comm);
  return nccl;
}

std::string ProcessGrid::describe() const {
  return fmt::format("world {} = dp {} x pp {} x tp {}", layout_.world_size(), layout_.dp(), layout_.pp(),
                     layout_.tp());
}

}  // namespace crash
