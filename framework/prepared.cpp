#include "framework/prepared.h"

#include <fstream>

#include "framework/json_fields.h"
#include "framework/prepare.h"
#include "parallel/errors.h"

namespace crash {

namespace {

std::vector<int64_t> ids_of(const nlohmann::json& list, const std::string& key, int64_t vocab_size,
                            const std::string& where) {
  if (!list.is_array()) fail("{}: \"{}\" must be a list of token ids", where, key);
  std::vector<int64_t> ids;
  for (const auto& t : list) {
    if (!t.is_number_integer()) fail("{}: \"{}\" must hold integers, got {}", where, key, t.dump());
    const int64_t id = t.get<int64_t>();
    if (id < 0 || (vocab_size > 0 && id >= vocab_size))
      fail("{}: token id {} in \"{}\" is outside the vocabulary [0, {})", where, id, key, vocab_size);
    ids.push_back(id);
  }
  return ids;
}

std::vector<int64_t> id_list(const nlohmann::json& j, const std::string& key, int64_t vocab_size,
                             const std::string& where) {
  if (!j.contains(key)) fail("{}: missing field \"{}\" (a list of token ids)", where, key);
  return ids_of(j.at(key), key, vocab_size, where);
}

PreparedExample parse_line(const nlohmann::json& j, const std::string& kind, int64_t vocab_size,
                           const std::string& where) {
  if (!j.is_object()) fail("{}: expected a JSON object", where);
  PreparedExample e;
  e.index = json_field<int64_t>(j, "index", where);
  const auto hash = json_field<std::string>(j, "hash", where);
  try {
    size_t used = 0;
    // stoull alone takes a sign and a 0x prefix ("-1" would wrap): hex digits only.
    if (hash.empty() || hash.size() > 16 || hash.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      throw std::invalid_argument(hash);
    e.hash = std::stoull(hash, &used, 16);
    if (used != hash.size()) throw std::invalid_argument(hash);
  } catch (const std::exception&) {
    fail("{}: \"hash\" must be 16 hex digits, got '{}'", where, hash);
  }
  e.tokens = id_list(j, "tokens", vocab_size, where);
  if (e.tokens.empty()) fail("{}: \"tokens\" is empty", where);
  if (kind == "multiple_choice") {
    e.context = id_list(j, "context", vocab_size, where);
    if (!j.contains("continuations") || !j["continuations"].is_array() || j["continuations"].empty())
      fail("{}: missing field \"continuations\" (a list of token-id lists)", where);
    for (size_t c = 0; c < j["continuations"].size(); ++c)
      e.continuations.push_back(ids_of(j["continuations"][c], "continuations", vocab_size, where));
    if (!j.contains("gold")) fail("{}: missing field \"gold\"", where);
    e.golds = j["gold"].is_array() ? json_field<std::vector<int64_t>>(j, "gold", where)
                                   : std::vector<int64_t>{json_field<int64_t>(j, "gold", where)};
    if (e.golds.empty()) fail("{}: \"gold\" lists no choice", where);
    for (auto g : e.golds)
      if (g < 0 || g >= static_cast<int64_t>(e.continuations.size()))
        fail("{}: \"gold\" {} is not a choice index [0, {})", where, g, e.continuations.size());
    e.gold = e.golds.front();
    e.choice_chars = json_field<std::vector<int64_t>>(j, "choice_chars", where);
    if (e.choice_chars.size() != e.continuations.size())
      fail("{}: \"choice_chars\" has {} entries for {} choices", where, e.choice_chars.size(), e.continuations.size());
    for (auto n : e.choice_chars)
      if (n <= 0) fail("{}: \"choice_chars\" must be positive (acc_norm divides by them)", where);
  } else if (kind == "generation") {
    e.context = id_list(j, "context", vocab_size, where);
    e.answers = json_field<std::vector<std::string>>(j, "answers", where);
  }
  return e;
}

}  // namespace

PreparedTask read_prepared(const std::string& dir, int64_t limit, int64_t vocab_size) {
  PreparedTask task;
  task.dir = dir;
  task.manifest = read_manifest(dir);
  const std::string mpath = dir + "/manifest.json";
  task.kind = json_field<std::string>(task.manifest, "kind", mpath);
  if (task.kind != "multiple_choice" && task.kind != "generation" && task.kind != "text")
    fail("{}: unknown kind '{}' (expected multiple_choice, generation or text)", mpath, task.kind);
  for (const auto& shard : task.manifest["shards"]) {
    const auto path = shard.get<std::string>();
    std::ifstream in(path);
    if (!in) fail("{}: cannot open shard", path);
    std::string line;
    for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
      if (limit >= 0 && static_cast<int64_t>(task.examples.size()) >= limit) return task;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = fmt::format("{}:{}", path, lineno);
      auto j = parse_json_line(line, where);
      const bool listed = j.is_object() && j.contains("gold") && j["gold"].is_array();
      if (task.examples.empty())
        task.multiple_target = listed;
      else if (listed != task.multiple_target)
        fail("{}: \"gold\" is {} here but {} on the first line", where, listed ? "a list" : "one index",
             task.multiple_target ? "a list" : "one index");
      task.examples.push_back(parse_line(j, task.kind, vocab_size, where));
    }
  }
  if (task.examples.empty()) fail("{}: no examples", dir);
  return task;
}

}  // namespace crash
