// A subcommand of `crash-hpc`: its options and the function that runs it.
#pragma once
#include <boost/program_options.hpp>
#include <torch/types.h>

#include "framework/distributed_lm.h"
#include "parallel/grid.h"
#include <functional>
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

// --adapters A,B: trainable layers at the bottom and the top of an emulator.
std::pair<int64_t, int64_t> parse_adapters(const std::string& text);
// Runs `work` on rank 0 alone (file work that needs no grid); the other ranks wait for it.
int run_on_rank0(const std::function<void()>& work);

// Jobs, one source file each.
void forward_options(po::options_description& o);
int forward_run(const po::variables_map& vm);
void prepare_options(po::options_description& o);
int prepare_run(const po::variables_map& vm);
void collect_options(po::options_description& o);
int collect_run(const po::variables_map& vm);
void similarity_options(po::options_description& o);
int similarity_run(const po::variables_map& vm);
void cluster_options(po::options_description& o);
int cluster_run(const po::variables_map& vm);
void train_options(po::options_description& o);
int train_run(const po::variables_map& vm);
void merge_options(po::options_description& o);
int merge_run(const po::variables_map& vm);
void lens_options(po::options_description& o);
int lens_run(const po::variables_map& vm);
void landscape_options(po::options_description& o);
int landscape_run(const po::variables_map& vm);

void emulate_options(po::options_description& o);
int emulate_run(const po::variables_map& vm);
void plugin_options(po::options_description& o);
int plugin_run(const po::variables_map& vm);
void eval_options(po::options_description& o);
int eval_run(const po::variables_map& vm);
void pipeline_options(po::options_description& o);
int pipeline_run(const po::variables_map& vm);
void decompose_options(po::options_description& o);
int decompose_run(const po::variables_map& vm);
void preflight_options(po::options_description& o);
int preflight_run(const po::variables_map& vm);

}  // namespace crash
