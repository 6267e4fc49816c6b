// The process world: MPI when launched by mpirun/srun, a single process otherwise.
#pragma once
#include <string>

namespace crash {

class World {
 public:
  // Initialises MPI (thread level MPI_THREAD_FUNNELED) when a launcher started this process.
  static World& init(int* argc, char*** argv);
  static World& get();
  ~World();

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool mpi() const { return mpi_; }
  // Ends every rank: used when this rank failed, so that no peer waits forever in a collective.
  [[noreturn]] void abort(int code);
  // Starts MPI in a process no launcher started (a one-rank world), for code that needs it.
  void require_mpi();

 private:
  World() = default;
  int rank_ = 0, size_ = 1;
  bool mpi_ = false;
};

// True when environment variables of an MPI launcher (Open MPI, PMIx, Slurm's srun) are present.
bool launched_by_mpi();

}  // namespace crash
