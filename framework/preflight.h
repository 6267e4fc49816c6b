// Checks a batch job runs before its stage (the preflight job): is the world the one the
// scheduler meant, do collectives give the right sums, does the model fit in memory.
// Each check returns this rank's problem ("" when none); agree_or_fail() makes it collective.
#pragma once
#include <torch/types.h>

#include <string>

#include "framework/config.h"
#include "parallel/comm.h"

namespace crash {

struct NodeLayout {
  std::string host;
  int local_rank = 0, local_size = 1;  // among the ranks on this host
};

// Collective over `world`: which ranks share this rank's host.
NodeLayout node_layout(Communicator& world);

// Collective: when any rank has a problem, every rank throws the same UserError naming the
// check and each failing node and rank (so the message is the same whichever rank prints it).
void agree_or_fail(Communicator& world, const NodeLayout& node, const std::string& check, const std::string& problem);

// The world against the launcher's task count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS; none: no check).
std::string check_world_size(int world_size);
// One rank per GPU: the ranks of a node must not outnumber its visible CUDA devices.
std::string check_gpus(const NodeLayout& node, int devices);
// A small allreduce on `comm` with tensors on `device`, checked against the known sum.
std::string check_allreduce(Communicator& comm, torch::Device device);

// Bytes of one rank's weights on a TP x PP grid: parameters x dtype bytes / (TP x PP).
int64_t weight_bytes_per_rank(const ModelConfig& config, torch::ScalarType dtype, int tp, int pp);
// MemAvailable of /proc/meminfo in bytes, -1 when unknown.
int64_t memory_available_bytes();
// The weights per rank against this node's available memory shared by its ranks.
std::string check_memory(const ModelConfig& config, torch::ScalarType dtype, int tp, int pp, const NodeLayout& node);

}  // namespace crash
