#include "parallel/world.h"

#include <mpi.h>

#include <cstdlib>
#include <memory>

namespace crash {

namespace {
std::unique_ptr<World> g_world;
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_STEP_ID"})
    if (std::getenv(v)) return true;
  return false;
}

World& World::init(int* argc, char*** argv) {
  if (g_world) return *g_world;
  g_world.reset(new World());
  if (launched_by_mpi()) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_world->rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &g_world->size_);
    g_world->mpi_ = true;
  }
  return *g_world;
}

void World::require_mpi() {
  if (mpi_) return;
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  mpi_ = true;
}

World& World::get() {
  if (!g_world) g_world.reset(new World());
  return *g_world;
}

World::~World() {
  int finalized = 0;
  if (mpi_ && (MPI_Finalized(&finalized), !finalized)) MPI_Finalize();
}

void World::abort(int code) {
  if (mpi_) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace crash
