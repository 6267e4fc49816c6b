// emulate: a CRaSh emulator (uniform, remove or share) as an HF folder plus crash_plan.json.
#include <spdlog/spdlog.h>

#include <filesystem>

#include "framework/checkpoint.h"
#include "framework/emulator.h"
#include "jobs/job.h"
#include "parallel/errors.h"

namespace crash {

void emulate_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "the full model (Hugging Face folder)")(
      "mode", po::value<std::string>()->required(), "uniform, remove or share")(
      "clusters", po::value<std::string>(), "the cluster job's clusters.json (remove, share; uniform: sets --keep)")(
      "keep", po::value<int64_t>(), "uniform: middle layers kept (default: as many as clusters)")(
      "adapters", po::value<std::string>()->default_value("2,2"), "trainable layers at the bottom and the top: A,B")(
      "out", po::value<std::string>()->required(), "output folder")("overwrite", po::bool_switch(),
                                                                    "replace an existing output");
}

std::pair<int64_t, int64_t> parse_adapters(const std::string& text) {
  int64_t a = -1, b = -1;
  char comma = 0, extra = 0;
  if (std::sscanf(text.c_str(), "%ld %c %ld %c", &a, &comma, &b, &extra) != 3 || comma != ',' || a < 0 || b < 0)
    fail("--adapters: expected two non-negative counts A,B (bottom, top), got '{}'", text);
  return {a, b};
}

EmulatorPlan emulator_plan(const po::variables_map& vm, int64_t layers) {
  const auto mode = vm["mode"].as<std::string>();
  const auto [a, b] = parse_adapters(vm["adapters"].as<std::string>());
  std::vector<std::vector<int64_t>> clusters;
  if (vm.count("clusters")) clusters = read_clusters(vm["clusters"].as<std::string>());
  if (mode == "uniform") {
    if (!vm.count("keep") && clusters.empty()) fail("--mode uniform needs --keep N or --clusters (to keep as many)");
    const int64_t keep = vm.count("keep") ? vm["keep"].as<int64_t>() : static_cast<int64_t>(clusters.size());
    return plan_uniform(layers, a, b, keep);
  }
  if (mode != "remove" && mode != "share") fail("--mode: expected uniform, remove or share, got '{}'", mode);
  if (clusters.empty()) fail("--mode {} needs --clusters (the cluster job's output)", mode);
  return mode == "remove" ? plan_remove(layers, a, b, clusters) : plan_share(layers, a, b, clusters);
}

int emulate_run(const po::variables_map& vm) {
  const auto out = vm["out"].as<std::string>();
  if (std::filesystem::exists(out) && !vm["overwrite"].as<bool>())
    fail("{}: output exists (pass --overwrite to replace it)", out);
  return run_on_rank0([&] {
    CheckpointReader full(vm["model"].as<std::string>());
    const EmulatorPlan plan = emulator_plan(vm, full.config().num_layers);
    write_emulator_folder(full, plan, out);
    spdlog::info("{} emulator: {} slots ({} trainable, {} stored) from {} layers -> {}", plan.mode, plan.slots.size(),
                 plan.trainable_slots().size(), CheckpointReader(out).config().stored_layers(), plan.full_layers, out);
  });
}

}  // namespace crash
