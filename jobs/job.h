// A subcommand of `crash-hpc`: its options and the function that runs it.
#pragma once
#include <boost/program_options.hpp>
#include <torch/types.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include "framework/distributed_lm.h"
#include "parallel/grid.h"

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
// Every option's value as JSON (numbers, switches, text, lists), for records of a run's settings.
nlohmann::json options_json(const po::variables_map& vm);
// Sets the torch thread count from --threads (0: all cores of this process).
void apply_threads(const po::variables_map& vm);

// --tp, --pp, --pp-layers, --backend and --dtype, shared by the jobs that run a model on a grid.
constexpr const char* kComputeDtypeHelp = "compute dtype: float32, bfloat16 or float16";
void add_grid_options(po::options_description& o, const char* dtype_help = kComputeDtypeHelp);
// Their names: the pipeline hands their values on to its stages.
std::vector<std::string> grid_option_names();
// The values of those options: the grid's sizes and what the model is built with.
struct GridChoice {
  GridSizes sizes;
  DistributedOptions model;  // --dtype, --pp-layers
  std::string dtype;         // --dtype as given (recorded in outputs)
};
// `allow_float64`: --dtype float64 too (exact references; decompose).
GridChoice grid_choice(const po::variables_map& vm, bool allow_float64 = false);
torch::ScalarType parse_dtype(const std::string& name, bool allow_float64 = false);
// --padding: true for "left", false for "right"; anything else is a user error.
bool padding_left(const po::variables_map& vm);

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
void importance_options(po::options_description& o);
int importance_run(const po::variables_map& vm);
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
void report_options(po::options_description& o);
int report_run(const po::variables_map& vm);
// The report of a pipeline's work folder as `page` (report.cpp), for pipeline --report: 0 when
// written, 2 when the work folder lacks what it needs (analysis/report.py said what).
int write_report(const std::string& work, const std::string& page, const std::string& title);
// LibTorch's version, "1.13.0".
std::string torch_version();

}  // namespace crash
