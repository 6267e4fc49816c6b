// preflight: what each batch script runs first (srun crash-hpc preflight ...), so a job with a
// wrong launch, a broken network or file system, or too little memory fails in seconds, naming
// the node and the check, instead of hours later.
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <filesystem>

#include "analysis/hdf5_check.h"
#include "framework/preflight.h"
#include "jobs/job.h"
#include "parallel/comm_nccl.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

void preflight_options(po::options_description& o) {
  o.add_options()("out", po::value<std::string>()->default_value("."),
                  "output folder the stage will write (checked through parallel HDF5)")(
      "model", po::value<std::string>()->default_value(""),
      "model folder the stage will load (memory check; none: skipped)");
  add_grid_options(o, "dtype the stage holds the weights in");
}

int preflight_run(const po::variables_map& vm) {
  const GridChoice choice = grid_choice(vm);
  const GridSizes& sizes = choice.sizes;
  const auto dtype = choice.model.dtype;
  const std::string model = vm["model"].as<std::string>();
  auto grid = ProcessGrid::create(GridSizes{1, 1, "mpi"});
  auto& world = *grid->world();
  const auto node = node_layout(world);
  auto check = [&](const std::string& name, const std::string& problem) {
    agree_or_fail(world, node, name, problem);
    spdlog::info("preflight: {} ok", name);
  };

  check("world size", check_world_size(world.size()));
  std::string grid_problem;
  try {
    GridLayout(world.size(), sizes);
  } catch (const UserError& e) {
    grid_problem = e.what();
  }
  check("grid", grid_problem);
  const int devices = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  check("one rank per GPU", check_gpus(node, devices));
  check("MPI allreduce", check_allreduce(world, torch::kCPU));
  if (nccl_compiled() && devices > 0) {
    // tp = pp = 1: the data-parallel group is every rank, over NCCL (the GPU is the local rank).
    auto nccl = ProcessGrid::create(GridSizes{1, 1, "nccl"});
    check("NCCL allreduce", check_allreduce(*nccl->dp_group(), torch::Device(torch::kCUDA, nccl->local_rank())));
  }
  check("parallel HDF5 in " + vm["out"].as<std::string>(),
        check_parallel_hdf5(vm["out"].as<std::string>(), grid->world()));
  if (!model.empty()) {
    std::string problem;
    try {
      const auto config = ModelConfig::load((std::filesystem::path(model) / "config.json").string());
      problem = check_memory(config, dtype, sizes.tp, sizes.pp, node);
      spdlog::info("preflight: {} holds {:.3f} GiB of weights per rank (tp {} x pp {})", model,
                   weight_bytes_per_rank(config, dtype, sizes.tp, sizes.pp) / 1073741824.0, sizes.tp, sizes.pp);
    } catch (const UserError& e) {
      problem = e.what();
    }
    check("memory per rank", problem);
  }
  spdlog::info("preflight: {} ranks on {} ok", world.size(), node.host);
  return 0;
}

}  // namespace crash
