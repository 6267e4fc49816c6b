// The preflight's file check: a folder writable through parallel HDF5 by every rank.
#pragma once
#include <string>

#include "parallel/comm.h"

namespace crash {

// Collective over `comm`: creates a tiny archive in `folder` (created if missing), each rank
// writing its row, reads every row back, deletes it. Returns this rank's problem ("" if none).
std::string check_parallel_hdf5(const std::string& folder, const CommPtr& comm);

}  // namespace crash
