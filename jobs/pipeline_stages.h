// The stages of the pipeline job, shared by its studies (CRaSh in pipeline.cpp, layer pruning in
// study_pruning.cpp): each stage is a job of crash-hpc run in this process, skipped when its
// complete output exists, logged to WORK/logs/LABEL.log and recorded in WORK/logs/stages.jsonl.
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "jobs/job.h"
#include "parallel/comm.h"

namespace crash {

class StageRunner {
 public:
  StageRunner(const po::variables_map& vm, const std::filesystem::path& work);
  // Runs the job `name` with `args` (plus the pipeline's grid options when `grid`, and its
  // common ones), unless `output` exists already.
  void run(const std::string& label, const std::string& name, const std::string& output, std::vector<std::string> args,
           bool grid);

 private:
  void append(const nlohmann::json& record) const;

  const po::variables_map& vm_;
  std::filesystem::path logs_;
  // All ranks, in a communicator of the pipeline's own (tp = pp = 1: the DP group is the world):
  // its reductions can never be matched with a job's collectives on MPI_COMM_WORLD while rank 0
  // still runs a serial stage (cluster, the writes of similarity).
  CommPtr world_;
};

// What every study of the pipeline shares: the options, the work folder, the prepared tasks and
// the stages that evaluate and fine-tune a model.
struct Study {
  const po::variables_map& vm;
  std::filesystem::path work;
  StageRunner& stage;
  std::string model, train_task, collect_task;
  std::vector<std::string> eval_tasks;

  // WORK/prepared/<task>: the tokenized task.
  std::string prepared(const std::string& task) const;
  // The prepared validation task, or the training task without one.
  std::string validation_data() const;
  // Evaluates `dir` on every eval task into WORK/eval/<setting>.json.
  void evaluate(const std::string& dir, const std::string& setting) const;
  // Fine-tunes `dir` into `out` with the pipeline's schedule (resuming a crashed run) plus
  // `extra` train options; returns the tuned model's folder.
  std::string fine_tune(const std::string& label, const std::string& dir, const std::string& out,
                        const std::vector<std::string>& extra) const;
  // The train options of --tuning full|lora|sift (what trains the chosen parameters).
  std::vector<std::string> tuning_args() const;
  // LoRA of --lora-rank on every linear layer the model's family has.
  std::vector<std::string> lora_args() const;
};

std::string task_name(const std::string& path);
std::vector<std::string> split_list(const std::string& text);
// The metric a task is judged by in the study tables (acc, exact_match or perplexity), from one
// eval job's results.
std::optional<double> main_metric(const nlohmann::json& results, const std::string& task, std::string& metric);

// pipeline --study pruning (study_pruning.cpp): options and the study after the shared stages.
void pruning_study_options(po::options_description& o);
void check_pruning_study_options(const po::variables_map& vm);
void run_pruning_study(const Study& study, const std::string& cka);

}  // namespace crash
