// emulate: a CRaSh emulator (uniform, remove or share) as an HF folder plus crash_plan.json, or
// a pruned model of the layer-pruning baselines (prune: layers removed by name or by an
// importance file's scores; merge: LaCo's layer collapse), optionally checked on calibration
// examples by the cosine similarity of its final hidden states to the full model's.
#include <spdlog/spdlog.h>

#include <filesystem>

#include "analysis/importance_file.h"
#include "analysis/pruning.h"
#include "framework/checkpoint.h"
#include "framework/emulator.h"
#include "framework/prepared.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

void emulate_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "the full model (Hugging Face folder)")(
      "mode", po::value<std::string>()->required(), "uniform, remove, share, prune or merge")(
      "clusters", po::value<std::string>(), "the cluster job's clusters.json (remove, share; uniform: sets --keep)")(
      "keep", po::value<int64_t>(), "uniform: middle layers kept (default: as many as clusters)")(
      "adapters", po::value<std::string>()->default_value("2,2"), "trainable layers at the bottom and the top: A,B")(
      "out", po::value<std::string>()->required(), "output folder")(
      "overwrite", po::bool_switch(), "replace an existing output")("remove", po::value<std::string>(),
                                                                    "prune: the layers to remove, e.g. 3,5-7")(
      "from-importance", po::value<std::string>(), "prune: the importance job's file to choose the layers from")(
      "method", po::value<std::string>(),
      "prune --from-importance: block_influence, angular_distance, cka_importance or sleb")(
      "ratio", po::value<double>(), "prune --from-importance: remove round(RATIO * layers)")(
      "merge", po::value<std::string>(), "merge: contiguous groups collapsed into their first layer, e.g. 4-6,9-10")(
      "train-last", po::value<int64_t>()->default_value(0),
      "prune, merge: the last K layers train when healing (0: none; train --train-all trains everything)")(
      "calibration", po::value<std::string>(),
      "prune, merge: a prepared task; report the cosine similarity of the final hidden states (last token) of the "
      "pruned and the full model on its examples")("calibration-examples", po::value<int64_t>()->default_value(16),
                                                   "examples of --calibration used")(
      "batch-size", po::value<int64_t>()->default_value(8), "calibration sequences per forward pass")(
      "merge-size", po::value<int64_t>()->default_value(4),
      "merge without --merge (LaCo's search): layers collapsed per try")(
      "threshold", po::value<double>()->default_value(0.45),
      "LaCo's search: keep a merge while the calibration cosine similarity stays above this (0.45: LaCo's "
      "reference setting for Llama-2)")("interval", po::value<int64_t>()->default_value(1),
                                        "LaCo's search: layers to step down after a kept merge");
  add_grid_options(o);
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
  if (mode != "remove" && mode != "share")
    fail("--mode: expected uniform, remove, share, prune or merge, got '{}'", mode);
  if (clusters.empty()) fail("--mode {} needs --clusters (the cluster job's output)", mode);
  return mode == "remove" ? plan_remove(layers, a, b, clusters) : plan_share(layers, a, b, clusters);
}

namespace {

bool is_pruning(const std::string& mode) { return mode == "prune" || mode == "merge"; }

// The pruned model's plan, with where its layers came from.
EmulatorPlan pruning_plan(const po::variables_map& vm, const CheckpointReader& full) {
  const auto mode = vm["mode"].as<std::string>();
  const int64_t L = full.config().num_layers, train_last = vm["train-last"].as<int64_t>();
  if (!vm["adapters"].defaulted()) fail("--adapters is for emulators; a {} model takes --train-last K", mode);
  for (const char* o : {"clusters", "keep"})
    if (vm.count(o)) fail("--{} is for emulators, not --mode {}", o, mode);
  const bool by_importance = vm.count("from-importance") != 0;
  if (mode == "merge" && vm.count("ratio"))
    fail("--ratio with --merge GROUPS: the groups say what goes (--ratio is for LaCo's search, without --merge)");
  for (const char* o : {"method", "ratio"})
    if (vm.count(o) && !by_importance) fail("--{} goes with --from-importance", o);
  EmulatorPlan plan;
  if (mode == "merge") {
    if (!vm.count("merge"))
      fail("--mode merge needs --merge GROUPS (e.g. 4-6,9-10), or --calibration and --ratio for LaCo's search");
    for (const char* o : {"remove", "from-importance"})
      if (vm.count(o)) fail("--{} is for --mode prune", o);
    const auto groups = parse_layer_groups(vm["merge"].as<std::string>(), "--merge");
    plan = plan_merge(L, groups, train_last);
    int64_t removed = 0;
    for (const auto& g : groups) removed += static_cast<int64_t>(g.size()) - 1;
    plan.pruning = {{"method", "laco"},
                    {"reference", "LaCo (Yang et al. 2024, arXiv 2402.11187)"},
                    {"merged_groups", groups},
                    {"removed_count", removed},
                    {"norms",
                     "kept from each group's first layer, as LaCo's reference code merges only the "
                     "attention and MLP projections"}};
    return plan;
  }
  if (vm.count("merge")) fail("--merge is for --mode merge");
  if (vm.count("remove") == by_importance)
    fail("--mode prune needs either --remove LAYERS or --from-importance FILE --method M --ratio R");
  if (!by_importance) {
    const auto removed = parse_layer_list(vm["remove"].as<std::string>(), "--remove");
    plan = plan_prune(L, removed, train_last);
    auto sorted = removed;
    std::sort(sorted.begin(), sorted.end());
    plan.pruning = {{"method", "remove"}, {"removed", sorted}};
    return plan;
  }
  if (!vm.count("method") || !vm.count("ratio")) fail("--from-importance needs --method and --ratio");
  const auto file = vm["from-importance"].as<std::string>();
  const auto method = vm["method"].as<std::string>();
  const auto record = read_importance_file(file);
  check_importance_model(record, file, full);
  const auto choice = choose_from_importance(record, file, method, vm["ratio"].as<double>());
  plan = plan_prune(L, choice.removed, train_last);
  plan.pruning = {
      {"method", method}, {"ratio", vm["ratio"].as<double>()}, {"removed", choice.removed}, {"scores", choice.scores}};
  return plan;
}

// The calibration examples' tokens (their last max_positions).
std::vector<std::vector<int64_t>> calibration_seqs(const po::variables_map& vm, const ModelConfig& cfg) {
  const auto dir = vm["calibration"].as<std::string>();
  const int64_t n = vm["calibration-examples"].as<int64_t>();
  if (n < 1) fail("--calibration-examples must be positive, got {}", n);
  if (vm["batch-size"].as<int64_t>() < 1) fail("--batch-size must be positive, got {}", vm["batch-size"].as<int64_t>());
  const auto task = read_prepared(dir, n, cfg.vocab_size);
  std::vector<std::vector<int64_t>> seqs;
  for (const auto& e : task.examples) {
    if (e.tokens.empty()) continue;
    auto t = e.tokens;
    if (static_cast<int64_t>(t.size()) > cfg.max_positions) t.erase(t.begin(), t.end() - cfg.max_positions);
    seqs.push_back(t);
  }
  if (seqs.empty()) fail("{}: no calibration examples with tokens", dir);
  return seqs;
}

// --calibration: the pruned model's final hidden states against the full model's, on the grid.
nlohmann::json calibration_check(const po::variables_map& vm, const std::string& full_dir, const std::string& out) {
  GridChoice choice = grid_choice(vm);
  choice.model.pp_layers.clear();  // the two models differ in depth: balanced stages for both
  JobModel full(full_dir, choice);
  JobModel pruned(out, choice, full.grid());
  const auto dir = vm["calibration"].as<std::string>();
  const int64_t batch = vm["batch-size"].as<int64_t>();
  const auto seqs = calibration_seqs(vm, full.config());
  const auto a = last_token_states(full.model(), choice.model.pp_layers, seqs, batch);
  const auto b = last_token_states(pruned.model(), choice.model.pp_layers, seqs, batch);
  if (World::get().rank() != 0) return {};
  const auto cos = row_cosine(a, b);
  std::vector<double> per(cos.data_ptr<double>(), cos.data_ptr<double>() + cos.numel());
  return {{"task", std::filesystem::absolute(dir).string()},
          {"num_examples", seqs.size()},
          {"hidden_state", "final (after the final norm), each example's last token"},
          {"mean_cosine", cos.mean().item<double>()},
          {"min_cosine", cos.min().item<double>()},
          {"cosine", per}};
}

// LaCo's search: every candidate is written next to the output and run on the grid against the
// full model's final hidden states.
EmulatorPlan laco_plan(const po::variables_map& vm, const std::string& full_dir, const std::string& out) {
  for (const char* o : {"remove", "from-importance", "method"})
    if (vm.count(o)) fail("--{} is for --mode prune", o);
  if (!vm.count("calibration") || !vm.count("ratio"))
    fail("--mode merge without --merge runs LaCo's search: it needs --calibration DIR and --ratio R");
  if (!vm["adapters"].defaulted()) fail("--adapters is for emulators; a merge model takes --train-last K");
  GridChoice choice = grid_choice(vm);
  choice.model.pp_layers.clear();
  JobModel full(full_dir, choice);
  const ModelConfig& cfg = full.config();
  const int64_t L = cfg.num_layers, remove = layers_for_ratio(vm["ratio"].as<double>(), L);
  const auto seqs = calibration_seqs(vm, cfg);
  const int64_t batch = vm["batch-size"].as<int64_t>();
  const auto reference = last_token_states(full.model(), {}, seqs, batch);
  const bool rank0 = World::get().rank() == 0;
  const std::string candidate_dir = out + ".laco-candidate";
  auto similarity = [&](const EmulatorPlan& candidate) {
    if (rank0) write_emulator_folder(full.checkpoint(), candidate, candidate_dir);
    full.grid()->world()->barrier();
    JobModel merged(candidate_dir, choice, full.grid());
    const auto states = last_token_states(merged.model(), {}, seqs, batch);
    auto s = torch::zeros({1}, torch::kFloat64);
    if (rank0) s[0] = row_cosine(reference, states).mean().item<double>();
    full.grid()->world()->broadcast(s, 0);
    return s.item<double>();
  };
  const auto result = laco_search(L, remove, vm["merge-size"].as<int64_t>(), vm["threshold"].as<double>(),
                                  vm["interval"].as<int64_t>(), similarity);
  if (rank0) std::filesystem::remove_all(candidate_dir);
  EmulatorPlan plan = result.plan;
  train_top(plan, vm["train-last"].as<int64_t>());
  nlohmann::json steps = nlohmann::json::array(), groups = nlohmann::json::array();
  for (const auto& st : result.steps) {
    steps.push_back(
        {{"layers", st.layers}, {"slots", st.slots}, {"similarity", st.similarity}, {"accepted", st.accepted}});
    spdlog::info("LaCo: layers {} as one: similarity {:.6f} -> {}", fmt::join(st.layers, ","), st.similarity,
                 st.accepted ? "merged" : "rejected");
  }
  for (const auto& slot : plan.slots)
    if (!slot.merged.empty()) {
      std::vector<int64_t> g = {slot.source};
      g.insert(g.end(), slot.merged.begin(), slot.merged.end());
      groups.push_back(g);
    }
  if (result.removed < remove)
    spdlog::warn("LaCo: only {} of the {} layers asked for could be merged above --threshold {}", result.removed,
                 remove, vm["threshold"].as<double>());
  plan.pruning = {{"method", "laco"},
                  {"reference", "LaCo (Yang et al. 2024, arXiv 2402.11187), Algorithm 1"},
                  {"search",
                   {{"ratio", vm["ratio"].as<double>()},
                    {"target_removed", remove},
                    {"merge_size", vm["merge-size"].as<int64_t>()},
                    {"threshold", vm["threshold"].as<double>()},
                    {"interval", vm["interval"].as<int64_t>()},
                    {"compared_with", "the full model (final hidden state, last token, mean cosine)"},
                    {"steps", steps}}},
                  {"merged_groups", groups},
                  {"removed_count", result.removed},
                  {"norms",
                   "kept from each group's first layer, as LaCo's reference code merges only the attention "
                   "and MLP projections"}};
  return plan;
}

int pruning_run(const po::variables_map& vm) {
  const auto out = vm["out"].as<std::string>();
  const auto full_dir = vm["model"].as<std::string>();
  EmulatorPlan plan;
  const bool search = vm["mode"].as<std::string>() == "merge" && !vm.count("merge");
  if (search) plan = laco_plan(vm, full_dir, out);
  run_on_rank0([&] {
    CheckpointReader full(full_dir);
    if (!search) plan = pruning_plan(vm, full);
    plan.source_model = std::filesystem::absolute(full_dir).string();
    if (vm.count("calibration")) read_prepared(vm["calibration"].as<std::string>(), 1, full.config().vocab_size);
    write_emulator_folder(full, plan, out);
    spdlog::info("{}: {} of {} layers kept ({}), {} trainable -> {}", plan.mode, plan.slots.size(), plan.full_layers,
                 plan.pruning.value("method", ""), plan.trainable_slots().size(), out);
  });
  if (!vm.count("calibration")) return 0;
  const auto check = calibration_check(vm, full_dir, out);
  if (World::get().rank() == 0) {
    plan.pruning["calibration"] = check;
    write_plan(out, plan);
    spdlog::info(
        "calibration: cosine similarity of the final hidden states to the full model's: mean {:.6f}, min "
        "{:.6f} over {} examples",
        check["mean_cosine"].get<double>(), check["min_cosine"].get<double>(), check["num_examples"].get<int64_t>());
  }
  return 0;
}

}  // namespace

int emulate_run(const po::variables_map& vm) {
  const auto out = vm["out"].as<std::string>();
  if (std::filesystem::exists(out) && !vm["overwrite"].as<bool>())
    fail("{}: output exists (pass --overwrite to replace it)", out);
  if (is_pruning(vm["mode"].as<std::string>())) return pruning_run(vm);
  for (const char* o : {"remove", "from-importance", "method", "ratio", "merge", "calibration"})
    if (vm.count(o)) fail("--{} is for --mode prune or merge", o);
  if (!vm["train-last"].defaulted()) fail("--train-last is for --mode prune or merge; emulators take --adapters A,B");
  return run_on_rank0([&] {
    CheckpointReader full(vm["model"].as<std::string>());
    const EmulatorPlan plan = emulator_plan(vm, full.config().num_layers);
    write_emulator_folder(full, plan, out);
    spdlog::info("{} emulator: {} slots ({} trainable, {} stored) from {} layers -> {}", plan.mode, plan.slots.size(),
                 plan.trainable_slots().size(), CheckpointReader(out).config().stored_layers(), plan.full_layers, out);
  });
}

}  // namespace crash
