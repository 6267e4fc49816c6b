#include "framework/json_fields.h"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <vector>

namespace crash {

const char* json_type_name(const nlohmann::json& v) { return v.type_name(); }

namespace {
template <class T>
bool holds(const nlohmann::json& v);
template <>
bool holds<int64_t>(const nlohmann::json& v) {
  return v.is_number_integer();
}
template <>
bool holds<double>(const nlohmann::json& v) {
  return v.is_number();
}
template <>
bool holds<bool>(const nlohmann::json& v) {
  return v.is_boolean();
}
template <>
bool holds<std::string>(const nlohmann::json& v) {
  return v.is_string();
}
template <>
bool holds<nlohmann::json>(const nlohmann::json& v) {
  return v.is_object();
}
template <>
bool holds<std::vector<int64_t>>(const nlohmann::json& v) {
  return v.is_array() && std::all_of(v.begin(), v.end(), [](const auto& x) { return x.is_number_integer(); });
}
template <>
bool holds<std::vector<std::string>>(const nlohmann::json& v) {
  return v.is_array() && std::all_of(v.begin(), v.end(), [](const auto& x) { return x.is_string(); });
}

template <class T>
const char* expected_name();
template <>
const char* expected_name<int64_t>() {
  return "an integer";
}
template <>
const char* expected_name<double>() {
  return "a number";
}
template <>
const char* expected_name<bool>() {
  return "true or false";
}
template <>
const char* expected_name<std::string>() {
  return "a string";
}
template <>
const char* expected_name<nlohmann::json>() {
  return "an object";
}
template <>
const char* expected_name<std::vector<int64_t>>() {
  return "a list of integers";
}
template <>
const char* expected_name<std::vector<std::string>>() {
  return "a list of strings";
}
}  // namespace

template <class T>
T json_field(const nlohmann::json& j, const std::string& key, const std::string& source) {
  if (!j.is_object()) fail("{}: expected a JSON object, got {}", source, j.type_name());
  auto it = j.find(key);
  if (it == j.end()) fail("{}: missing field '{}'", source, key);
  if (!holds<T>(*it))
    fail("{}: field '{}' must be {}, got {} {}", source, key, expected_name<T>(), it->type_name(), it->dump());
  return it->template get<T>();
}

template int64_t json_field<int64_t>(const nlohmann::json&, const std::string&, const std::string&);
template double json_field<double>(const nlohmann::json&, const std::string&, const std::string&);
template bool json_field<bool>(const nlohmann::json&, const std::string&, const std::string&);
template std::string json_field<std::string>(const nlohmann::json&, const std::string&, const std::string&);
template nlohmann::json json_field<nlohmann::json>(const nlohmann::json&, const std::string&, const std::string&);
template std::vector<int64_t> json_field<std::vector<int64_t>>(const nlohmann::json&, const std::string&,
                                                               const std::string&);
template std::vector<std::string> json_field<std::vector<std::string>>(const nlohmann::json&, const std::string&,
                                                                       const std::string&);

void check_json_depth(std::string_view text, const std::string& source) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) fail("{}: JSON nested deeper than {} levels (at byte {})", source, kMaxJsonDepth, i);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

namespace {
// Errors name `source` as a file ("invalid JSON at byte N") or, with `line`, as one line of a
// JSON Lines file ("not valid JSON (column N)").
nlohmann::json parse_checked(std::string_view text, const std::string& source, bool line) {
  check_json_depth(text, source);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    if (line) fail("{}: not valid JSON (column {})", source, e.byte);
    fail("{}: invalid JSON at byte {}", source, e.byte);
  } catch (const nlohmann::json::exception& e) {  // a number too large for a double, ...
    fail("{}: {} JSON ({})", source, line ? "not valid" : "invalid", e.what());
  }
}
}  // namespace

nlohmann::json parse_json(std::string_view text, const std::string& source) {
  return parse_checked(text, source, /*line=*/false);
}

nlohmann::json parse_json_line(std::string_view line, const std::string& where) {
  return parse_checked(line, where, /*line=*/true);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open file", path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

nlohmann::json read_json_file(const std::string& path) { return parse_json(read_text_file(path), path); }

}  // namespace crash
