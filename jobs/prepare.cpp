// prepare: tokenize a task (or a text file) once into shards every later job reads.
#include <spdlog/spdlog.h>

#include "framework/prepare.h"
#include "jobs/job.h"
#include "parallel/errors.h"

namespace crash {

void prepare_options(po::options_description& o) {
  o.add_options()("task", po::value<std::string>()->required(), "task JSON Lines, or a .txt file of text")(
      "tokenizer", po::value<std::string>()->required(), "tokenizer.json, or a model folder holding one")(
      "out", po::value<std::string>()->required(), "output folder")("limit", po::value<int64_t>()->default_value(-1),
                                                                    "first N examples only")(
      "window", po::value<int64_t>()->default_value(512), "tokens per example of text (language modelling)")(
      "overwrite", po::bool_switch(), "replace an existing output folder");
}

int prepare_run(const po::variables_map& vm) {
  PrepareOptions options;
  options.limit = vm["limit"].as<int64_t>();
  options.window = vm["window"].as<int64_t>();
  options.overwrite = vm["overwrite"].as<bool>();
  // One writer (the work is small); under mpirun the other ranks wait for the folder.
  return run_on_rank0([&] {
    auto manifest = prepare_task(vm["task"].as<std::string>(), vm["tokenizer"].as<std::string>(),
                                 vm["out"].as<std::string>(), options);
    spdlog::info("prepared {} {} examples ({} tokens) in {}", manifest["num_examples"].get<int64_t>(),
                 manifest["kind"].get<std::string>(), manifest["num_tokens"].get<int64_t>(),
                 vm["out"].as<std::string>());
  });
}

}  // namespace crash
