// merge: writes a base model plus SIFT increments (train --save-increments) as a Hugging Face
// folder (framework/sift.h).
#include "framework/sift.h"
#include "jobs/job.h"

namespace crash {

void merge_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(),
                  "base Hugging Face model folder (the one SIFT trained from)")(
      "increments", po::value<std::string>()->required(), "increments file written by train --save-increments")(
      "out", po::value<std::string>()->required(), "output Hugging Face folder");
}

int merge_run(const po::variables_map& vm) {
  return run_on_rank0([&] {
    merge_increments(vm["model"].as<std::string>(), vm["increments"].as<std::string>(), vm["out"].as<std::string>());
  });
}

}  // namespace crash
