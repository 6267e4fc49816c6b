#include "framework/tasks.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/json_fields.h"
#include "parallel/errors.h"

namespace crash {

const char* task_kind_name(TaskKind k) {
  switch (k) {
    case TaskKind::MultipleChoice: return "multiple_choice";
    case TaskKind::Generation: return "generation";
    default: return "text";
  }
}

namespace {

std::vector<std::string> strings(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = j.at(key);
  if (!v.is_array() || v.empty()) fail("{}: \"{}\" must be a non-empty list of strings", where, key);
  std::vector<std::string> out;
  for (const auto& s : v) {
    if (!s.is_string()) fail("{}: \"{}\" must hold strings, got {}", where, key, s.dump());
    out.push_back(s.get<std::string>());
  }
  return out;
}

std::string string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.at(key).is_string()) fail("{}: \"{}\" must be a string", where, key);
  return j.at(key).get<std::string>();
}

// "gold": one choice index, or a non-empty list of distinct ones.
std::vector<int64_t> golds(const nlohmann::json& g, size_t choices, const std::string& where) {
  std::vector<int64_t> out;
  if (g.is_number_integer()) {
    out.push_back(g.get<int64_t>());
  } else if (g.is_array() && !g.empty()) {
    for (const auto& x : g) {
      if (!x.is_number_integer()) fail("{}: \"gold\" must list choice indices, got {}", where, x.dump());
      out.push_back(x.get<int64_t>());
    }
  } else {
    fail("{}: \"gold\" must be a choice index or a non-empty list of them, got {}", where, g.dump());
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] < 0 || out[i] >= static_cast<int64_t>(choices))
      fail("{}: \"gold\" {} is not the index of one of the {} choices", where, out[i], choices);
    for (size_t k = 0; k < i; ++k)
      if (out[k] == out[i]) fail("{}: \"gold\" lists choice {} twice", where, out[i]);
  }
  return out;
}

}  // namespace

Task read_task(const std::string& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open task file", path);
  return parse_task(in, path, limit);
}

Task parse_task(std::istream& in, const std::string& path, int64_t limit) {
  Task task;
  task.path = path;
  std::string line;
  bool kind_known = false;
  for (int64_t lineno = 1; std::getline(in, line) && (limit < 0 || static_cast<int64_t>(task.examples.size()) < limit);
       ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, lineno);
    nlohmann::json j = parse_json_line(line, where);
    if (!j.is_object()) fail("{}: expected a JSON object", where);
    for (auto& [key, value] : j.items())
      if (key != "context" && key != "choices" && key != "gold" && key != "answers" && key != "text" && key != "meta")
        fail("{}: unknown field \"{}\" (expected context, choices, gold, answers, text or meta)", where, key);
    TaskKind kind;
    bool listed = false;  // "gold" given as a list
    TaskExample ex;
    ex.index = static_cast<int64_t>(task.examples.size());
    if (j.contains("choices")) {
      kind = TaskKind::MultipleChoice;
      if (!j.contains("context") || !j.contains("gold"))
        fail("{}: a multiple-choice line needs context, choices and gold", where);
      ex.context = string_field(j, "context", where);
      ex.choices = strings(j, "choices", where);
      ex.golds = golds(j["gold"], ex.choices.size(), where);
      ex.gold = ex.golds.front();
      listed = j["gold"].is_array();
    } else if (j.contains("answers")) {
      kind = TaskKind::Generation;
      if (!j.contains("context")) fail("{}: a generation line needs context and answers", where);
      ex.context = string_field(j, "context", where);
      ex.answers = strings(j, "answers", where);
    } else if (j.contains("text")) {
      kind = TaskKind::Text;
      ex.text = string_field(j, "text", where);
    } else {
      fail("{}: expected {{\"context\", \"choices\", \"gold\"}}, {{\"context\", \"answers\"}} or {{\"text\"}}", where);
    }
    if (!kind_known) {
      task.kind = kind;
      task.multiple_target = listed;
      kind_known = true;
    } else if (kind != task.kind) {
      fail("{}: a {} line in a {} task", where, task_kind_name(kind), task_kind_name(task.kind));
    } else if (listed != task.multiple_target) {
      // lm-eval too decides from the first document whether a task has several targets.
      fail("{}: \"gold\" is {} here but {} on the first line (give one index on every line or a list on every line)",
           where, listed ? "a list" : "one index", task.multiple_target ? "a list" : "one index");
    }
    task.examples.push_back(std::move(ex));
  }
  if (task.examples.empty()) fail("{}: no examples", path);
  return task;
}

}  // namespace crash
