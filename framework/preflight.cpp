#include "framework/preflight.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "parallel/errors.h"

namespace crash {

namespace {

// A string in a fixed-size byte tensor, so every rank sends the same shape to allgather.
constexpr int64_t kText = 512;

torch::Tensor text_tensor(const std::string& s) {
  auto t = torch::zeros({1, kText}, torch::kUInt8);
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), std::min<size_t>(s.size(), kText - 1));
  return t;
}

std::vector<std::string> gather_text(Communicator& world, const std::string& s) {
  auto all = world.allgather(text_tensor(s), 0).contiguous();
  std::vector<std::string> out;
  for (int64_t r = 0; r < all.size(0); ++r) out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<uint8_t>()));
  return out;
}

std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024 * 1024)); }

}  // namespace

NodeLayout node_layout(Communicator& world) {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  NodeLayout node;
  node.host = name;
  const auto hosts = gather_text(world, node.host);
  node.local_size = 0;
  for (int r = 0; r < static_cast<int>(hosts.size()); ++r) {
    if (hosts[r] != node.host) continue;
    if (r == world.rank()) node.local_rank = node.local_size;
    ++node.local_size;
  }
  return node;
}

void agree_or_fail(Communicator& world, const NodeLayout& node, const std::string& check, const std::string& problem) {
  const auto problems =
      gather_text(world, problem.empty() ? "" : fmt::format("node {} rank {}: {}", node.host, world.rank(), problem));
  std::string all;
  for (const auto& p : problems)
    if (!p.empty()) all += (all.empty() ? "" : "; ") + p;
  if (!all.empty()) fail("preflight check '{}' failed on {}", check, all);
}

std::string check_world_size(int world_size) {
  const char* name = std::getenv("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
  const char* value = std::getenv(name);
  if (!value) return "";
  char* end = nullptr;
  const long tasks = std::strtol(value, &end, 10);
  if (end == value || *end) return fmt::format("{}='{}' is not a number", name, value);
  if (tasks != world_size)
    return fmt::format("MPI world size {} but {}={} (was srun given --mpi=pmix? do the MPI libraries match?)",
                       world_size, name, tasks);
  return "";
}

std::string check_gpus(const NodeLayout& node, int devices) {
  if (devices <= 0 || node.local_size <= devices) return "";
  return fmt::format(
      "{} ranks on this node but {} visible CUDA devices (one rank per GPU: ask --ntasks-per-node <= --gpus-per-node)",
      node.local_size, devices);
}

std::string check_allreduce(Communicator& comm, torch::Device device) {
  const int64_t n = comm.size();
  auto t =
      torch::full({1024}, static_cast<double>(comm.rank() + 1), torch::TensorOptions(torch::kFloat64).device(device));
  comm.allreduce(t);
  const double want = static_cast<double>(n * (n + 1) / 2);
  const double lo = t.min().item<double>(), hi = t.max().item<double>();
  if (lo != want || hi != want)
    return fmt::format("{} allreduce over {} ranks gave {}..{}, expected {}", comm.backend(), n, lo, hi, want);
  return "";
}

int64_t weight_bytes_per_rank(const ModelConfig& config, torch::ScalarType dtype, int tp, int pp) {
  const int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
  return config.parameter_count() * bytes / (static_cast<int64_t>(tp) * pp);
}

int64_t memory_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream s(line);
    std::string key;
    int64_t kib = 0;
    if (s >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

std::string check_memory(const ModelConfig& config, torch::ScalarType dtype, int tp, int pp, const NodeLayout& node) {
  const int64_t need = weight_bytes_per_rank(config, dtype, tp, pp);
  const int64_t available = memory_available_bytes();
  if (available < 0) return "";
  const double per_rank = static_cast<double>(available) / node.local_size;
  if (static_cast<double>(need) > per_rank)
    return fmt::format(
        "the weights need {} per rank ({} parameters, {} bytes each, / tp {} x pp {}) but {} ranks share {} available "
        "({} each)",
        gib(need), config.parameter_count(), c10::elementSize(dtype), tp, pp, node.local_size, gib(available),
        gib(per_rank));
  return "";
}

}  // namespace crash
