// libFuzzer target: crash_plan.json parsing (EmulatorPlan::from_json) on arbitrary bytes, then
// the accessors the trainer and plug-in use. Accepted plans are checked for the invariants
// those callers rely on (slots name layers of the full model and stored_as names a slot).
#include <cstdint>
#include <cstdlib>
#include <string>

#include "framework/emulator.h"
#include "framework/json_fields.h"
#include "parallel/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto j = crash::parse_json(std::string(reinterpret_cast<const char*>(data), size), "crash_plan.json");
    const auto plan = crash::EmulatorPlan::from_json(j, "crash_plan.json");
    const auto n = static_cast<int64_t>(plan.slots.size());
    for (const auto& s : plan.slots)
      if (s.source < 0 || s.source >= plan.full_layers || s.stored_as < 0 || s.stored_as >= n) std::abort();
    plan.trainable_slots();
    plan.storage();
    // The plan written back must read back the same.
    const auto again = crash::EmulatorPlan::from_json(crash::parse_json(plan.to_json().dump(), "again"), "again");
    if (again.slots.size() != plan.slots.size()) std::abort();
  } catch (const crash::UserError&) {
  }
  return 0;
}
