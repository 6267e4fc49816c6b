// The MPI backend of Communicator, for CPU tensors.
#pragma once
#include <mpi.h>

#include "parallel/comm.h"

namespace crash {

// Wraps (and owns, when `owned`) an MPI communicator. Messages longer than max_chunk
// elements are split, since MPI counts are int.
CommPtr make_mpi_comm(MPI_Comm comm, bool owned, int64_t max_chunk = (int64_t(1) << 31) - 1);

}  // namespace crash
