// A subcommand of `crash-hpc`: its options and the function that runs it.
#pragma once
#include <boost/program_options.hpp>
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

// Jobs, one source file each.
void forward_options(po::options_description& o);
int forward_run(const po::variables_map& vm);

}  // namespace crash
