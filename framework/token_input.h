// Token-id inputs: JSON Lines of {"tokens": [...]} and padding them into batches.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "framework/tokenizer.h"

namespace crash {

// Reads one sequence per line ({"tokens": [...]}), from a file or from every shard of a
// prepared folder, checking every id against the vocabulary and every length against
// max_length; errors name the file and line.
// With a tokenizer, {"text": ...} lines are accepted too (encoded with special tokens).
std::vector<std::vector<int64_t>> read_token_lines(const std::string& path, int64_t vocab_size, int64_t max_length,
                                                   const Tokenizer* tokenizer = nullptr);

// FNV-1a over the token ids (as int64 little-endian bytes): a stable id of an example's text,
// stored by prepare and by the activation archive.
uint64_t token_hash(const std::vector<int64_t>& tokens);

// The tokenizer.json of a model folder, when it has one.
std::optional<Tokenizer> model_tokenizer(const std::string& model_dir);

struct PaddedBatch {
  torch::Tensor ids;   // [B, T] int64
  torch::Tensor mask;  // [B, T] int64, 1 on tokens, 0 on padding
};

// Pads sequences [begin, end) to the longest one, on the left or the right.
PaddedBatch pad_batch(const std::vector<std::vector<int64_t>>& seqs, size_t begin, size_t end, int64_t pad_id,
                      bool left, int64_t length = 0);

}  // namespace crash
