// libFuzzer target: JSON Lines task parsing (multiple choice, generation, text) on arbitrary
// bytes. UserError is the expected answer to bad input; every accepted example is checked.
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>

#include "framework/tasks.h"
#include "parallel/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const crash::Task task = crash::parse_task(in, "fuzz.jsonl");
    for (const auto& ex : task.examples) {
      if (task.kind != crash::TaskKind::MultipleChoice) continue;
      if (ex.golds.empty() || ex.gold != ex.golds.front()) std::abort();
      for (auto g : ex.golds)
        if (g < 0 || g >= static_cast<int64_t>(ex.choices.size())) std::abort();
    }
  } catch (const crash::UserError&) {
  }
  return 0;
}
