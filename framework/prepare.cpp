#include "framework/prepare.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "framework/atomic_file.h"
#include "framework/json_fields.h"
#include "framework/tasks.h"
#include "framework/token_input.h"
#include "parallel/errors.h"

namespace fs = std::filesystem;

namespace crash {

int64_t utf8_length(const std::string& text) {
  int64_t n = 0;
  for (unsigned char c : text) n += (c & 0xC0) != 0x80;
  return n;
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> split_context_continuation(const Tokenizer& tok,
                                                                                 const std::string& context_in,
                                                                                 const std::string& continuation_in) {
  std::string context = context_in, continuation = continuation_in;
  const size_t end = context.find_last_not_of(' ');
  const size_t spaces = end == std::string::npos ? context.size() : context.size() - end - 1;
  if (spaces > 0) {
    continuation = context.substr(context.size() - spaces) + continuation;
    context.resize(context.size() - spaces);
  }
  auto whole = tok.encode(context + continuation, false);
  auto ctx = tok.encode(context, false);
  const size_t n = std::min(ctx.size(), whole.size());
  return {std::vector<int64_t>(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(n)),
          std::vector<int64_t>(whole.begin() + static_cast<std::ptrdiff_t>(n), whole.end())};
}

namespace {

std::string hex_hash(const std::vector<int64_t>& tokens) { return fmt::format("{:016x}", token_hash(tokens)); }

std::vector<std::string> text_documents(const std::string& path, int64_t limit) {
  if (path.size() > 4 && path.substr(path.size() - 4) == ".txt") {
    std::ifstream in(path);
    if (!in) fail("{}: cannot open text file", path);
    std::stringstream s;
    s << in.rdbuf();
    return {s.str()};
  }
  Task task = read_task(path, limit);
  if (task.kind != TaskKind::Text) fail("{}: expected a language-modelling task here", path);
  std::vector<std::string> out;
  for (auto& e : task.examples) out.push_back(e.text);
  return out;
}

}  // namespace

nlohmann::json prepare_task(const std::string& task_path, const std::string& tokenizer_path_in, const std::string& out,
                            const PrepareOptions& options) {
  if (fs::exists(out) && !options.overwrite) fail("{}: output exists (pass --overwrite to replace it)", out);
  std::string tokenizer_path = tokenizer_path_in;
  if (fs::is_directory(tokenizer_path)) tokenizer_path = (fs::path(tokenizer_path) / "tokenizer.json").string();
  if (!fs::exists(tokenizer_path)) fail("{}: no tokenizer.json", tokenizer_path_in);
  if (options.window < 2) fail("--window must be at least 2, got {}", options.window);
  Tokenizer tok = Tokenizer::load(tokenizer_path);

  const bool text_task = task_path.size() > 4 && task_path.substr(task_path.size() - 4) == ".txt";
  std::vector<nlohmann::json> lines;
  std::string kind = "text";
  if (!text_task) {
    // Peek at the kind without tokenizing twice: read_task checks every line's shape.
    Task task = read_task(task_path, options.limit);
    kind = task_kind_name(task.kind);
    for (const auto& e : task.examples) {
      nlohmann::json j;
      j["index"] = e.index;
      if (task.kind == TaskKind::MultipleChoice) {
        std::vector<std::vector<int64_t>> conts;
        std::vector<int64_t> ctx, chars;
        for (const auto& choice : e.choices) {
          auto [c, cont] = split_context_continuation(tok, e.context, choice);
          ctx = c;
          conts.push_back(cont);
          // lm-eval divides by the choice's length without its target delimiter (a leading space).
          chars.push_back(utf8_length(choice.rfind(' ', 0) == 0 ? choice.substr(1) : choice));
        }
        std::vector<int64_t> tokens = ctx;
        tokens.insert(tokens.end(), conts[static_cast<size_t>(e.gold)].begin(),
                      conts[static_cast<size_t>(e.gold)].end());
        j["tokens"] = tokens;
        j["context"] = ctx;
        j["continuations"] = conts;
        j["gold"] = task.multiple_target ? nlohmann::json(e.golds) : nlohmann::json(e.gold);
        j["choice_chars"] = chars;
      } else if (task.kind == TaskKind::Generation) {
        auto ctx = tok.encode(e.context, true);
        j["tokens"] = ctx;
        j["context"] = ctx;
        j["answers"] = e.answers;
      } else {
        continue;  // text tasks go through the windowing below
      }
      if (j["tokens"].empty()) fail("{}: example {} has no tokens", task_path, e.index);
      j["hash"] = hex_hash(j["tokens"].get<std::vector<int64_t>>());
      lines.push_back(std::move(j));
    }
  }
  if (kind == "text") {
    // Documents are tokenized with the tokenizer's special tokens and cut into windows.
    int64_t index = 0;
    for (const auto& doc : text_documents(task_path, options.limit)) {
      auto ids = tok.encode(doc, true);
      for (size_t s = 0; s < ids.size(); s += static_cast<size_t>(options.window)) {
        std::vector<int64_t> w(ids.begin() + static_cast<std::ptrdiff_t>(s),
                               ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), s + options.window)));
        if (w.size() < 2) continue;
        lines.push_back({{"index", index++}, {"hash", hex_hash(w)}, {"tokens", w}});
        if (options.limit >= 0 && index >= options.limit) break;
      }
    }
  }
  if (lines.empty()) fail("{}: nothing to prepare", task_path);

  StagedDir staged(out);
  const fs::path& tmp = staged.path();
  std::vector<std::string> shards;
  for (size_t s = 0; s < lines.size(); s += static_cast<size_t>(options.examples_per_shard)) {
    std::string name = fmt::format("shard-{:05d}.jsonl", shards.size());
    std::ofstream f(tmp / name);
    for (size_t i = s; i < std::min(lines.size(), s + options.examples_per_shard); ++i) f << lines[i].dump() << "\n";
    if (!f) fail("{}: write failed (disk full?)", (tmp / name).string());
    shards.push_back(name);
  }
  int64_t tokens = 0;
  for (const auto& l : lines) tokens += static_cast<int64_t>(l["tokens"].size());
  nlohmann::json manifest = {{"format", "crash-hpc prepared task 1"},
                             {"task", fs::absolute(task_path).string()},
                             {"kind", kind},
                             {"tokenizer", fs::absolute(tokenizer_path).string()},
                             {"num_examples", lines.size()},
                             {"num_tokens", tokens},
                             {"window", options.window},
                             {"shards", shards}};
  std::ofstream(tmp / "manifest.json") << manifest.dump(2) << "\n";
  staged.commit();
  return manifest;
}

nlohmann::json read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  if (!fs::exists(path)) fail("{}: not a prepared folder (no manifest.json)", dir);
  auto m = read_json_file(path);
  if (!m.contains("shards") || !m["shards"].is_array()) fail("{}: missing field 'shards'", path);
  for (auto& s : m["shards"]) {
    if (!s.is_string()) fail("{}: 'shards' must list file names", path);
    auto p = fs::path(dir) / s.get<std::string>();
    if (!fs::exists(p)) fail("{}: shard '{}' is missing", path, s.get<std::string>());
    s = p.string();
  }
  return m;
}

}  // namespace crash
