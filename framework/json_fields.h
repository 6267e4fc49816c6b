// Typed access to JSON fields with errors that name the file, the field and what was expected.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "parallel/errors.h"

namespace crash {

const char* json_type_name(const nlohmann::json& v);

// Reads an existing field as T, or fails naming `source`, `key` and the expected type.
template <class T>
T json_field(const nlohmann::json& j, const std::string& key, const std::string& source);

template <class T>
T json_field_or(const nlohmann::json& j, const std::string& key, T fallback, const std::string& source) {
  if (!j.contains(key) || j.at(key).is_null()) return fallback;
  return json_field<T>(j, key, source);
}

// nlohmann copies and dumps documents recursively: one nested 100000 deep overflows the stack.
// Fails naming `source` when `text` nests arrays and objects deeper than any real file does.
constexpr int kMaxJsonDepth = 512;
void check_json_depth(std::string_view text, const std::string& source);

// Parses JSON text (depth checked), failing with `source` and the parser's position.
nlohmann::json parse_json(std::string_view text, const std::string& source);
// The same for one line of a JSON Lines file; `where` ("file:line") names it in errors.
nlohmann::json parse_json_line(std::string_view line, const std::string& where);
std::string read_text_file(const std::string& path);
// Parses a JSON file (depth checked), failing with the file name and the parser's position on bad syntax.
nlohmann::json read_json_file(const std::string& path);

}  // namespace crash
