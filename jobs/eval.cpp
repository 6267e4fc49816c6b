// eval: lm-eval-style evaluation of a model on prepared tasks (framework/eval.h), on any grid.
// Rank 0 prints the table and writes the results (and per-example details) atomically.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>

#include "framework/atomic_file.h"
#include "framework/eval.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/log.h"
#include "parallel/world.h"

namespace fs = std::filesystem;

namespace crash {

void eval_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "data", po::value<std::vector<std::string>>()->required()->composing(),
      "prepare's output folder (repeat for several tasks)")("out", po::value<std::string>()->required(),
                                                            "results (.json)")(
      "details", po::value<std::string>()->default_value(""), "per-example scores (.jsonl), optional")(
      "num-examples", po::value<int64_t>()->default_value(-1), "first N examples of each task (all when negative)")(
      "batch-size", po::value<int64_t>()->default_value(8), "rows per forward pass")(
      "max-new-tokens", po::value<int64_t>()->default_value(32), "generation: most tokens generated")(
      "overwrite", po::bool_switch(), "replace existing outputs");
  add_grid_options(o);
}

int eval_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto data = vm["data"].as<std::vector<std::string>>();
  const auto out_path = vm["out"].as<std::string>();
  const auto details_path = vm["details"].as<std::string>();
  const bool overwrite = vm["overwrite"].as<bool>();
  EvalOptions options;
  options.batch_size = vm["batch-size"].as<int64_t>();
  options.max_new_tokens = vm["max-new-tokens"].as<int64_t>();
  const int64_t limit = vm["num-examples"].as<int64_t>();
  if (options.batch_size <= 0) fail("--batch-size must be positive, got {}", options.batch_size);
  if (options.max_new_tokens <= 0) fail("--max-new-tokens must be positive, got {}", options.max_new_tokens);
  if (limit == 0) fail("--num-examples must be positive (or negative for all)");
  for (const auto& p : {out_path, details_path})
    if (!p.empty() && fs::exists(p) && !overwrite) fail("{}: output exists (pass --overwrite to replace it)", p);

  JobModel job_model(model_dir, grid_choice(vm));
  const ModelConfig& cfg = job_model.config();
  options.stop_ids = generation_stop_ids(model_dir, cfg);
  std::vector<PreparedTask> tasks;
  for (const auto& dir : data) {
    tasks.push_back(read_prepared(dir, limit, cfg.vocab_size));
    check_task_tokenizer(tasks.back(), model_dir);
    if (tasks.back().kind == "generation" && options.max_new_tokens >= cfg.max_positions)
      fail("--max-new-tokens {} leaves no room for a context in the model's {} positions", options.max_new_tokens,
           cfg.max_positions);
  }

  const auto grid = job_model.grid();
  DistributedLM& model = job_model.model();
  model.stage().eval();
  std::vector<TaskResult> results;
  for (const auto& task : tasks) results.push_back(evaluate_task(model, task, options, job_model.tokenizer()));

  if (World::get().rank() != 0) return 0;
  // Under the pipeline the table belongs to the stage's log; the pipeline prints its own.
  if (logging_to_file())
    spdlog::info("results:\n{}", results_table(results));
  else
    std::cout << results_table(results) << std::flush;
  nlohmann::json j = {{"model", model_dir},
                      {"grid", grid->describe()},
                      {"dtype", vm["dtype"].as<std::string>()},
                      {"batch_size", options.batch_size},
                      {"max_new_tokens", options.max_new_tokens},
                      {"tool_version", kVersion},
                      {"results", nlohmann::json::array()}};
  for (size_t i = 0; i < results.size(); ++i) {
    auto r = results[i].to_json();
    r["data"] = fs::absolute(data[i]).string();
    j["results"].push_back(r);
  }
  if (!details_path.empty()) {
    std::string lines;
    for (const auto& r : results)
      for (auto d : r.details) {
        d["task"] = r.task;
        lines += d.dump() + "\n";
      }
    write_atomic(details_path, lines);
  }
  write_atomic(out_path, j.dump(2) + "\n");
  spdlog::info("wrote {}", out_path);
  return 0;
}

}  // namespace crash
