// Tokenized task shards, made once by the `prepare` job and read by every later job (no job
// re-tokenizes). A prepared folder holds manifest.json and shard-NNNNN.jsonl files, one line
// an example:
//   {"index": i, "hash": "<16 hex>", "tokens": [...], ...}
// `tokens` is what collection runs on: the context and the gold continuation (multiple
// choice), the context (generation), or one window of text (language modelling). Multiple
// choice lines add "context", "continuations" (split as lm-eval splits them), "gold" (an
// index, or the task's list of gold indices) and "choice_chars" (each choice's length in
// characters, for acc_norm).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "framework/tokenizer.h"

namespace crash {

struct PrepareOptions {
  int64_t limit = -1;    // first examples only (all when negative)
  int64_t window = 512;  // tokens per language-modelling example
  int64_t examples_per_shard = 10000;
  bool overwrite = false;
};

// lm-eval's split of a context and a continuation into tokens: trailing spaces of the context
// move to the continuation, whose tokens are those of encode(context + continuation) after
// the first len(encode(context)). No special tokens.
std::pair<std::vector<int64_t>, std::vector<int64_t>> split_context_continuation(const Tokenizer& tok,
                                                                                 const std::string& context,
                                                                                 const std::string& continuation);

// Reads a task (JSON Lines, or plain text for language modelling when the file ends in .txt)
// and writes the prepared folder `out` (assembled as out.tmp, renamed when complete).
// Returns the manifest.
nlohmann::json prepare_task(const std::string& task_path, const std::string& tokenizer_path, const std::string& out,
                            const PrepareOptions& options);

// The manifest of a prepared folder, checked; shard paths made absolute.
nlohmann::json read_manifest(const std::string& dir);

// Number of Unicode code points of UTF-8 text.
int64_t utf8_length(const std::string& text);

}  // namespace crash
