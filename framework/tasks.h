// Task data in JSON Lines (docs/architecture.md section 5), one example a line:
//   multiple choice  {"context": ..., "choices": [...], "gold": i}
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
  int64_t gold = -1;
  std::vector<std::string> answers;  // generation
  std::string text;                  // language model
};

struct Task {
  std::string path;
  TaskKind kind = TaskKind::Text;
  std::vector<TaskExample> examples;
};

// Reads the first `limit` examples (all when negative). Errors name the file and line.
Task read_task(const std::string& path, int64_t limit = -1);
// The same from a stream; `path` names it in errors (the fuzz target feeds bytes here).
Task parse_task(std::istream& in, const std::string& path, int64_t limit = -1);

}  // namespace crash
