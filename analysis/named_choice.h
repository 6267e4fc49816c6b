// An option whose values are a few names (CKA method, clustering rule): one table serves both
// parsing the name and naming the value, so the two can never disagree.
#pragma once
#include <fmt/format.h>

#include <string>
#include <utility>
#include <vector>

#include "parallel/errors.h"

namespace crash {

template <class E>
using NamedChoices = std::vector<std::pair<const char*, E>>;

// "a, b or c": the names of a table, as an error message lists them.
template <class E>
std::string choice_names(const NamedChoices<E>& table) {
  std::string out;
  for (size_t i = 0; i < table.size(); ++i)
    out += (i == 0 ? "" : i + 1 == table.size() ? " or " : ", ") + std::string(table[i].first);
  return out;
}

// The value named `name`; otherwise a UserError: "OPTION: unknown WHAT 'NAME' (expected ...)".
template <class E>
E parse_choice(const NamedChoices<E>& table, const std::string& name, const char* option, const char* what) {
  for (const auto& [n, value] : table)
    if (name == n) return value;
  fail("{}: unknown {} '{}' (expected {})", option, what, name, choice_names(table));
}

template <class E>
std::string choice_name(const NamedChoices<E>& table, E value) {
  for (const auto& [n, v] : table)
    if (v == value) return n;
  return "?";
}

}  // namespace crash
