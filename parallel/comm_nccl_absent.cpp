// The build without CUDA/NCCL: asking for the NCCL backend is a user error.
#include "parallel/comm_nccl.h"
#include "parallel/errors.h"

namespace crash {

bool nccl_compiled() { return false; }

CommPtr make_nccl_comm(MPI_Comm, int) {
  fail("--backend nccl: this build has no NCCL (CUDA toolkit or NCCL were not found when it was configured)");
}

}  // namespace crash
