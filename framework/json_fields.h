// Typed access to JSON fields with errors that name the file, the field and what was expected.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

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

// Parses a JSON file, failing with the file name and the parser's position on bad syntax.
nlohmann::json read_json_file(const std::string& path);

}  // namespace crash
