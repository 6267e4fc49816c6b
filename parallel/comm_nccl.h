// The NCCL backend of Communicator, for CUDA tensors. Compiled when CMake finds the CUDA
// toolkit and NCCL (CRASH_WITH_NCCL).
#pragma once
#include <mpi.h>

#include "parallel/comm.h"

namespace crash {

// True when this build has the NCCL backend.
bool nccl_compiled();

// An NCCL communicator over the ranks of `comm` on CUDA device `device`: rank 0 of `comm`
// creates the unique id and sends it with MPI_Bcast. Operations run on the communicator's own
// stream, ordered after torch's current stream and before what torch queues next.
CommPtr make_nccl_comm(MPI_Comm comm, int device);

}  // namespace crash
