// Evaluation with lm-eval's semantics (lm-evaluation-harness 0.4, HFLM), on any grid:
//   multiple choice  per choice the sum of the continuation tokens' log-probabilities given the
//                    context; acc = argmax sum == gold, acc_norm = argmax sum / choice characters
//                    == gold; stderr = sample standard deviation (ddof 1) / sqrt(n).
//                    Several golds (lm-eval's multiple targets, WebQuestions): exact_match = any
//                    gold choice is the greedy continuation (every token the argmax), the only
//                    metric lm-eval reports for them
//   generation       (free generation, not lm-eval's WebQuestions) greedy decoding until a stop
//                    id (generation_stop_ids: every EOS id HF's generate() stops at, and the
//                    tokenizer's EOS), a newline or max_new_tokens, decoded with the
//                    model's tokenizer and cut at the first newline; exact_match against any
//                    answer after normalisation (normalize_answer)
//   text             token-level perplexity over every non-first token of each window
// Requests are sorted longest first (as lm-eval does), batched, and the batches dealt out to
// the DP replicas; the results are summed over DP so every rank ends with all of them.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "framework/distributed_lm.h"
#include "framework/prepared.h"
#include "framework/tokenizer.h"

namespace crash {

struct EvalOptions {
  int64_t batch_size = 8;       // rows per forward
  int64_t max_new_tokens = 32;  // generation
  // Generation ends at any of these (and at the tokenizer's EOS); empty: the config's eos ids.
  std::vector<int64_t> stop_ids;
};

// The ids HF's generate() stops at for the model in `model_dir`: generation_config.json's
// eos_token_id (one or a list) where the folder has one, else config.json's.
std::vector<int64_t> generation_stop_ids(const std::string& model_dir, const ModelConfig& c);

struct Metric {
  std::string name;
  double value = 0;
  double stderr_ = 0;  // NaN where none is defined (written as null)
};

struct TaskResult {
  std::string task;  // the prepared folder's name
  std::string kind;  // multiple_choice, generation or text
  int64_t num_examples = 0;
  std::vector<Metric> metrics;
  // One object per example, in the task's order: multiple choice {index, gold, logliks, pred,
  // pred_norm, acc, acc_norm}, with several golds {index, gold: [...], logliks, greedy: [...],
  // pred, pred_norm, exact_match}, generation {index, generation, exact_match}, text {index,
  // tokens, nll}.
  std::vector<nlohmann::json> details;

  nlohmann::json to_json() const;  // {task, kind, num_examples, metrics: {name: {value, stderr}}}
};

// Evaluates one prepared task with a loaded model. Collective over the model's grid; every
// rank returns the whole result. The tokenizer decodes generations (generation tasks only).
TaskResult evaluate_task(DistributedLM& model, const PreparedTask& task, const EvalOptions& options,
                         const Tokenizer* tokenizer = nullptr);

// Fails unless the task was prepared with the model's tokenizer: the manifest's tokenizer.json
// must have the same contents as the model folder's (when both files are there).
void check_task_tokenizer(const PreparedTask& task, const std::string& model_dir);

// The task's name: its prepared folder's name.
std::string task_name(const PreparedTask& task);

// lm-eval's request input: context + continuation without its last token, keeping the last
// `max_length` tokens; returns (input, number of scored positions at its end).
std::pair<std::vector<int64_t>, int64_t> loglikelihood_input(const std::vector<int64_t>& context,
                                                             const std::vector<int64_t>& continuation,
                                                             int64_t max_length);

// Answer normalisation before exact match: surrounding whitespace stripped, then lm-eval's
// exact_match with nq_open's options: the articles regex \b(?:The |the |An |A |a |an ) removed,
// lower case (ASCII), ASCII punctuation (Python's string.punctuation) removed.
std::string normalize_answer(const std::string& text);

// lm-eval's stderr of a mean: sample standard deviation (ddof 1) / sqrt(n); NaN for n < 2.
double mean_stderr(const std::vector<double>& values);

// An lm-eval-like markdown table of the results.
std::string results_table(const std::vector<TaskResult>& results);

}  // namespace crash
