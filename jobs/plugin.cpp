// plugin: the full model with an emulator's tuned adapter layers copied back in (CRaSh plug-in),
// and its embeddings, final norm and head when they were trained too (train --train-all).
#include <spdlog/spdlog.h>

#include <filesystem>

#include "framework/checkpoint.h"
#include "framework/emulator.h"
#include "jobs/job.h"
#include "parallel/errors.h"

namespace crash {

void plugin_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "the full model (Hugging Face folder)")(
      "emulator", po::value<std::string>()->required(), "the fine-tuned emulator (folder with crash_plan.json)")(
      "out", po::value<std::string>()->required(), "output folder: the plugged-in model")(
      "overwrite", po::bool_switch(), "replace an existing output");
}

int plugin_run(const po::variables_map& vm) {
  const auto out = vm["out"].as<std::string>();
  const auto emu_dir = vm["emulator"].as<std::string>();
  if (std::filesystem::exists(out) && !vm["overwrite"].as<bool>())
    fail("{}: output exists (pass --overwrite to replace it)", out);
  return run_on_rank0([&] {
    CheckpointReader full(vm["model"].as<std::string>());
    CheckpointReader emulator(emu_dir);
    auto plan = read_plan(emu_dir);
    if (!plan) fail("{}: no crash_plan.json (not an emulator made by the emulate job)", emu_dir);
    const auto carried = write_plugin_folder(full, emulator, *plan, out);
    spdlog::info("plugged {} tuned layers of {} into {} -> {}", plan->trainable_slots().size(), emu_dir, full.dir(),
                 out);
    if (!carried.empty()) spdlog::info("carried the emulator's trained {} as well", fmt::join(carried, ", "));
  });
}

}  // namespace crash
