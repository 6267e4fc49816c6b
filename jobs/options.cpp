#include <torch/torch.h>

#include <fstream>
#include <thread>

#include "jobs/job.h"
#include "parallel/errors.h"

namespace crash {

const std::vector<Job>& all_jobs() {
  static const std::vector<Job> jobs = {
      {"forward", "run a model on token ids and write logits and hidden states to HDF5", forward_options, forward_run},
  };
  return jobs;
}

po::options_description common_options() {
  po::options_description o("Common options");
  o.add_options()("help,h", "show this help")("config", po::value<std::string>(),
                                               "INI file with options (key = value); the command line overrides it")(
      "log-level", po::value<std::string>()->default_value("info"), "trace, debug, info, warn, error or off")(
      "log-all-ranks", po::bool_switch(), "log info messages from every rank, not only rank 0")(
      "threads", po::value<int>()->default_value(0), "torch threads per process (0: the cores available)");
  return o;
}

po::variables_map parse_job_options(const Job& job, const std::vector<std::string>& args, bool& help) {
  po::options_description all(std::string("crash-hpc ") + job.name + ": " + job.summary);
  po::options_description own("Options");
  job.add_options(own);
  all.add(own).add(common_options());
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).run(), vm);
    help = vm.count("help") != 0;
    if (help) {
      std::cout << "usage: crash-hpc " << job.name << " [options]\n\n" << all << "\n";
      return vm;
    }
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream in(path);
      if (!in) fail("{}: cannot open config file", path);
      try {
        po::store(po::parse_config_file(in, all), vm);
      } catch (const po::error& e) {
        fail("{}: {}", path, e.what());
      }
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fail("{}: {} (see crash-hpc {} --help)", job.name, e.what(), job.name);
  }
  return vm;
}

void apply_threads(const po::variables_map& vm) {
  int threads = vm["threads"].as<int>();
  if (threads < 0) fail("--threads must be 0 or positive, got {}", threads);
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
}

}  // namespace crash
