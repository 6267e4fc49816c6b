// A subcommand of `crash-hpc`: its options and the function that runs it.
#pragma once
#include <boost/program_options.hpp>
#include <torch/types.h>

#include "framework/distributed_lm.h"
#include "parallel/grid.h"
#include <string>
#include <vector>

namespace crash {

namespace po = boost::program_options;

struct Job {
  const char* name;
  const char* summary;
  void (*add_options)(po::options_description& options);
  int (*run)(const po::variables_map& options);
};

const std::vector<Job>& all_jobs();

// Options every job accepts: --help, --config, --log-level, --threads.
po::options_description common_options();
// Parses the command line, then the INI file of --config (the command line wins).
po::variables_map parse_job_options(const Job& job, const std::vector<std::string>& args, bool& help);
// Sets the torch thread count from --threads (0: all cores of this process).
void apply_threads(const po::variables_map& vm);

// --tp, --pp and --pp-layers, shared by the jobs that run a model on a grid.
void add_grid_options(po::options_description& o);
GridSizes grid_sizes(const po::variables_map& vm);
std::vector<int64_t> pp_layer_counts(const po::variables_map& vm);
torch::ScalarType parse_dtype(const std::string& name);
// --padding: true for "left", false for "right"; anything else is a user error.
bool padding_left(const po::variables_map& vm);
// Checks --tp/--pp/--pp-layers against the model before any weight is read, and returns the
// options (--dtype, --pp-layers) a DistributedLM of this job is built with.
DistributedOptions grid_plan(const po::variables_map& vm, const ModelConfig& config);

// Jobs, one source file each.
void forward_options(po::options_description& o);
int forward_run(const po::variables_map& vm);
void prepare_options(po::options_description& o);
int prepare_run(const po::variables_map& vm);
void collect_options(po::options_description& o);
int collect_run(const po::variables_map& vm);

}  // namespace crash
