// Examples of a prepared folder (framework/prepare.h) with every field the later jobs use:
// the tokens collection runs on, and for multiple choice the context, the continuation of
// each choice, the gold index and the choices' lengths in characters; for generation the
// answers. Training, evaluation and the analyses read tasks through this.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace crash {

struct PreparedExample {
  int64_t index = 0;  // position in the task file
  uint64_t hash = 0;  // token_hash(tokens)
  std::vector<int64_t> tokens;
  std::vector<int64_t> context;                     // multiple choice, generation
  std::vector<std::vector<int64_t>> continuations;  // multiple choice, one per choice
  int64_t gold = -1;                                // the (first) gold choice: `tokens` end with its continuation
  std::vector<int64_t> golds;                       // every gold choice ({gold} unless the task lists several)
  std::vector<int64_t> choice_chars;                // multiple choice: each choice's length in characters
  std::vector<std::string> answers;                 // generation
};

struct PreparedTask {
  std::string dir;
  std::string kind;              // "multiple_choice", "generation" or "text" (task_kind_name)
  bool multiple_target = false;  // multiple choice with "gold" lists (Task::multiple_target)
  nlohmann::json manifest;
  std::vector<PreparedExample> examples;
};

// Reads the first `limit` examples (all when negative) of a prepared folder, checking every
// line's fields (errors name the shard and line) and, when vocab_size > 0, every token id.
PreparedTask read_prepared(const std::string& dir, int64_t limit = -1, int64_t vocab_size = 0);

}  // namespace crash
