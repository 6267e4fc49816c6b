// Task data in JSON Lines (docs/architecture.md section 5), one example a line:
//   multiple choice  {"context": ..., "choices": [...], "gold": i}, or "gold": [i, j, ...] for
//                    several accepted choices (lm-eval's multiple targets, e.g. WebQuestions)
//   generation       {"context": ..., "answers": [...]}
//   language model   {"text": ...}
// Prompts are already rendered with lm-eval's templates (see docs/tasks.md and
// examples/export_tasks.py); this reader checks the shape of every line.
#pragma once
#include <cstdint>
#include <istream>
#include <string>
#include <vector>

namespace crash {

enum class TaskKind { MultipleChoice, Generation, Text };
const char* task_kind_name(TaskKind k);

struct TaskExample {
  int64_t index = 0;  // position among the file's examples: the stable id other files join on
  std::string context;
  std::vector<std::string> choices;  // multiple choice
  int64_t gold = -1;                 // the (first) gold choice
  std::vector<int64_t> golds;        // every gold choice: {gold} unless "gold" is a list
  std::vector<std::string> answers;  // generation
  std::string text;                  // language model
};

struct Task {
  std::string path;
  TaskKind kind = TaskKind::Text;
  // Multiple choice whose lines give "gold" as a list (all lines alike): scored by lm-eval's
  // multiple-target rules (exact_match: any gold choice is the greedy continuation).
  bool multiple_target = false;
  std::vector<TaskExample> examples;
};

// Reads the first `limit` examples (all when negative). Errors name the file and line.
Task read_task(const std::string& path, int64_t limit = -1);
// The same from a stream; `path` names it in errors (the fuzz target feeds bytes here).
Task parse_task(std::istream& in, const std::string& path, int64_t limit = -1);

}  // namespace crash
