#include "framework/token_input.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/json_fields.h"
#include "framework/prepare.h"
#include "parallel/errors.h"

namespace crash {

uint64_t token_hash(const std::vector<int64_t>& tokens) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t t : tokens)
    for (int b = 0; b < 8; ++b) {
      h ^= static_cast<uint64_t>(t >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  return h;
}

std::optional<Tokenizer> model_tokenizer(const std::string& model_dir) {
  const auto path = std::filesystem::path(model_dir) / "tokenizer.json";
  if (!std::filesystem::exists(path)) return std::nullopt;
  return Tokenizer::load(path.string());
}

namespace {

void read_file_lines(const std::string& path, int64_t vocab_size, int64_t max_length, const Tokenizer* tok,
                     std::vector<std::vector<int64_t>>& out) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open input file", path);
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    check_json_depth(line, fmt::format("{}:{}", path, lineno));
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      fail("{}:{}: not valid JSON (column {})", path, lineno, e.byte);
    } catch (const nlohmann::json::exception& e) {  // a number too large for a double, ...
      fail("{}:{}: not valid JSON ({})", path, lineno, e.what());
    }
    if (!j.is_object()) fail("{}:{}: expected a JSON object", path, lineno);
    if (j.contains("text") && !j.contains("tokens")) {
      if (!tok)
        fail("{}:{}: \"text\" inputs need a tokenizer.json in the model folder; give \"tokens\" instead", path, lineno);
      if (!j["text"].is_string()) fail("{}:{}: \"text\" must be a string", path, lineno);
      j["tokens"] = tok->encode(j["text"].get<std::string>(), true);
    }
    if (!j.contains("tokens") || !j["tokens"].is_array())
      fail("{}:{}: missing field \"tokens\" (a list of token ids)", path, lineno);
    std::vector<int64_t> seq;
    for (const auto& t : j["tokens"]) {
      if (!t.is_number_integer()) fail("{}:{}: \"tokens\" must hold integers, got {}", path, lineno, t.dump());
      int64_t id = t.get<int64_t>();
      if (id < 0 || id >= vocab_size)
        fail("{}:{}: token id {} is outside the vocabulary [0, {})", path, lineno, id, vocab_size);
      seq.push_back(id);
    }
    if (seq.empty()) fail("{}:{}: \"tokens\" is empty", path, lineno);
    if (static_cast<int64_t>(seq.size()) > max_length)
      fail("{}:{}: {} tokens exceed the model's context of {}", path, lineno, seq.size(), max_length);
    out.push_back(std::move(seq));
  }
}

}  // namespace

std::vector<std::vector<int64_t>> read_token_lines(const std::string& path, int64_t vocab_size, int64_t max_length,
                                                   const Tokenizer* tok) {
  std::vector<std::vector<int64_t>> out;
  if (std::filesystem::is_directory(path)) {
    const auto manifest = read_manifest(path);
    for (const auto& shard : manifest["shards"])
      read_file_lines(shard.get<std::string>(), vocab_size, max_length, tok, out);
  } else {
    read_file_lines(path, vocab_size, max_length, tok, out);
  }
  if (out.empty()) fail("{}: no input lines", path);
  return out;
}

PaddedBatch pad_batch(const std::vector<std::vector<int64_t>>& seqs, size_t begin, size_t end, int64_t pad_id,
                      bool left, int64_t length) {
  int64_t T = length;
  for (size_t i = begin; i < end; ++i) T = std::max<int64_t>(T, static_cast<int64_t>(seqs[i].size()));
  const int64_t B = static_cast<int64_t>(end - begin);
  PaddedBatch b{torch::full({B, T}, std::max<int64_t>(pad_id, 0), torch::kInt64), torch::zeros({B, T}, torch::kInt64)};
  auto ids = b.ids.accessor<int64_t, 2>();
  auto mask = b.mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    const auto& s = seqs[begin + static_cast<size_t>(r)];
    const int64_t n = static_cast<int64_t>(s.size()), offset = left ? T - n : 0;
    for (int64_t i = 0; i < n; ++i) {
      ids[r][offset + i] = s[static_cast<size_t>(i)];
      mask[r][offset + i] = 1;
    }
  }
  return b;
}

}  // namespace crash
