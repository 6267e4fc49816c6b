// The MPI backend of Communicator, for CPU tensors.
#pragma once
#include <mpi.h>

#include "parallel/comm.h"

namespace crash {

// Wraps (and owns, when `owned`) an MPI communicator. Messages longer than max_chunk
// elements are split, since MPI counts are int.
CommPtr make_mpi_comm(MPI_Comm comm, bool owned, int64_t max_chunk = (int64_t(1) << 31) - 1);

}  // namespace crash

namespace crash {

// The MPI communicator under a Communicator (for libraries that take one, such as parallel
// HDF5): MPI_COMM_SELF for a one-process local communicator.
MPI_Comm mpi_handle(const Communicator& comm);

}  // namespace crash
