// pipeline --study pruning: the layer-pruning baselines that followed CRaSh, on one model, data
// and step budget, at each compression ratio:
//   uniform, remove, share   CRaSh's emulators with as many layers kept (clusters of the middle)
//   shortgpt                 the lowest Block Influence (Men et al. 2024)
//   angular                  the contiguous block of the smallest angular distance (Gromov et al. 2024)
//   sleb                     SLEB's greedy removal by calibration perplexity (Song et al. 2024)
//   laco                     LaCo's layer merging with its calibration check (Yang et al. 2024)
// Each pruned model is evaluated, healed by fine-tuning (the last layers and the head, every
// parameter, as --healing says) and evaluated again. WORK/pruning_study.{md,json} hold the table,
// WORK/pruning_study.png accuracy against kept parameters.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "analysis/pruning.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/emulator.h"
#include "framework/json_fields.h"
#include "jobs/pipeline_stages.h"
#include "jobs/plot.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kPruningMethods = {"uniform", "remove", "share", "shortgpt", "angular", "sleb", "laco"};

// The importance score each importance-based method removes by.
std::string importance_method(const std::string& m) {
  if (m == "shortgpt") return "block_influence";
  if (m == "angular") return "angular_distance";
  return m;  // sleb
}

std::vector<double> parse_ratios(const std::string& text) {
  std::vector<double> out;
  for (const auto& item : split_list(text)) {
    double r = 0;
    size_t used = 0;
    try {
      r = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || !(r > 0 && r < 1))
      fail("--ratio: expected fractions in (0, 1) like 0.25,0.5, got '{}'", item);
    if (std::find(out.begin(), out.end(), r) != out.end()) fail("--ratio: {} is given twice", item);
    out.push_back(r);
  }
  if (out.empty()) fail("--ratio: give at least one compression ratio, e.g. 0.25,0.5");
  return out;
}

std::vector<std::string> study_methods(const po::variables_map& vm) {
  auto methods = split_list(vm["pruning-methods"].as<std::string>());
  for (const auto& m : methods)
    if (std::find(kPruningMethods.begin(), kPruningMethods.end(), m) == kPruningMethods.end())
      fail("--pruning-methods: unknown method '{}' (uniform, remove, share, shortgpt, angular, sleb, laco)", m);
  if (methods.empty()) fail("--pruning-methods: name at least one method");
  return methods;
}

bool crash_mode(const std::string& m) { return m == "uniform" || m == "remove" || m == "share"; }

std::string ratio_label(double r) { return fmt::format("r{:g}", std::round(r * 1000) / 10); }

// Parameters stored in a model folder (shared layers once), as Hugging Face counts them.
int64_t stored_parameters(const std::string& dir) { return CheckpointReader(dir).config().parameter_count(); }

// One row of the table, from the eval results of the pruned and the healed model.
nlohmann::json study_row(const Study& st, const std::string& method, double ratio, const std::string& dir,
                         const std::string& setting, int64_t full_params, nlohmann::json& metrics) {
  const auto cfg = CheckpointReader(dir).config();
  nlohmann::json row = {{"method", method},
                        {"ratio", ratio},
                        {"layers", cfg.num_layers},
                        {"stored_layers", cfg.stored_layers()},
                        {"parameters", cfg.parameter_count()},
                        {"kept_fraction", static_cast<double>(cfg.parameter_count()) / full_params}};
  if (auto plan = read_plan(dir)) {
    std::vector<int64_t> sources;
    for (const auto& s : plan->slots) sources.push_back(s.source);
    row["source_layers"] = sources;
    row["storage"] = plan->storage();
    if (!plan->pruning.is_null()) row["pruning"] = plan->pruning;
  }
  for (const char* stage : {"pruned", "healed"}) {
    const auto path = (st.work / "eval" / (setting + "-" + stage + ".json")).string();
    const auto results = read_json_file(path);
    for (const auto& t : st.eval_tasks) {
      std::string metric;
      auto v = main_metric(results, task_name(t), metric);
      if (!v) fail("{}: no result for task '{}'", path, task_name(t));
      row[stage][task_name(t)] = *v;
      metrics[task_name(t)] = metric;
    }
  }
  return row;
}

std::string metric_cell(const nlohmann::json& v) {
  return v.is_number() ? fmt::format("{:.4f}", v.get<double>()) : "-";
}

// WORK/pruning_study.{md,json}, printed on rank 0, and the figure.
void write_study_table(const Study& st, const nlohmann::json& study) {
  const auto& metrics = study["metrics"];
  std::string header = "| Method | Ratio | Layers | Params kept |", rule = "|---|---|---|---|";
  for (const auto& t : st.eval_tasks) {
    const auto name = task_name(t);
    const auto metric = metrics[name].get<std::string>();
    header += fmt::format(" {} {} pruned | {} {} healed |", name, metric, name, metric);
    rule += "---|---|";
  }
  std::string table = header + "\n" + rule + "\n";
  const auto& full = study["full"];
  std::string line = fmt::format("| full | 0 | {} | 100.0% |", full["layers"].get<int64_t>());
  for (const auto& t : st.eval_tasks) {
    const auto v = metric_cell(full["scores"][task_name(t)]);
    line += fmt::format(" {} | {} |", v, v);
  }
  table += line + "\n";
  for (const auto& row : study["rows"]) {
    line = fmt::format("| {} | {:g} | {} | {:.1f}% |", row["method"].get<std::string>(), row["ratio"].get<double>(),
                       row["layers"].get<int64_t>(), 100 * row["kept_fraction"].get<double>());
    for (const auto& t : st.eval_tasks)
      line +=
          fmt::format(" {} | {} |", metric_cell(row["pruned"][task_name(t)]), metric_cell(row["healed"][task_name(t)]));
    table += line + "\n";
  }
  const std::string md = (st.work / "pruning_study.md").string(), json = (st.work / "pruning_study.json").string();
  write_atomic(md, table);
  write_atomic(json, study.dump(2) + "\n");
  std::printf("\nLayer-pruning study (%s; healing: %s)\n\n%s\n", md.c_str(),
              study["healing"].get<std::string>().c_str(), table.c_str());
  std::fflush(stdout);
}

}  // namespace

void pruning_study_options(po::options_description& o) {
  o.add_options()("ratio", po::value<std::string>()->default_value("0.25,0.5"),
                  "--study pruning: compression ratios, the fraction of decoder layers removed (comma-separated)")(
      "pruning-methods", po::value<std::string>()->default_value("uniform,remove,share,shortgpt,angular,sleb,laco"),
      "--study pruning: the methods compared")("healing", po::value<std::string>()->default_value("last-layers"),
                                               "--study pruning: last-layers (the last --heal-layers layers, the final "
                                               "norm and the LM head), full (every parameter) or lora (LoRA of "
                                               "--lora-rank on every linear of every layer)")(
      "heal-layers", po::value<int64_t>()->default_value(2), "--study pruning, --healing last-layers: layers trained")(
      "importance-examples", po::value<int64_t>()->default_value(64),
      "--study pruning: examples of the token-level collection that Block Influence and angular distance read")(
      "calibration-examples", po::value<int64_t>()->default_value(32),
      "--study pruning: calibration examples of SLEB and LaCo (from the collection task)")(
      "laco-threshold", po::value<double>()->default_value(0.45),
      "--study pruning: LaCo keeps a merge while the calibration cosine similarity stays above this")(
      "laco-merge-size", po::value<int64_t>()->default_value(4), "--study pruning: layers LaCo collapses per try");
}

void check_pruning_study_options(const po::variables_map& vm) {
  const auto ratios = parse_ratios(vm["ratio"].as<std::string>());
  const auto methods = study_methods(vm);
  const auto healing = vm["healing"].as<std::string>();
  if (healing != "last-layers" && healing != "full" && healing != "lora")
    fail("--healing: unknown choice '{}' (last-layers, full or lora)", healing);
  for (const char* o : {"heal-layers", "importance-examples", "calibration-examples", "laco-merge-size"})
    if (vm[o].as<int64_t>() < 1) fail("--{} must be positive, got {}", o, vm[o].as<int64_t>());
  const int64_t L = CheckpointReader(vm["model"].as<std::string>()).config().num_layers;
  const auto [a, b] = parse_adapters(vm["adapters"].as<std::string>());
  for (double r : ratios) {
    const int64_t n = layers_for_ratio(r, L);
    if (healing == "last-layers" && vm["heal-layers"].as<int64_t>() > L - n)
      fail("--heal-layers {}: at --ratio {:g} the pruned model has {} layers", vm["heal-layers"].as<int64_t>(), r,
           L - n);
    const bool crash = std::any_of(methods.begin(), methods.end(), crash_mode);
    if (crash && L - n - a - b < 1)
      fail(
          "--ratio {:g} removes {} of {} layers: CRaSh's emulators keep {} adapter layers and need at least one "
          "middle layer (lower the ratio or --adapters)",
          r, n, L, a + b);
  }
}

void run_pruning_study(const Study& st, const std::string& cka) {
  const auto& vm = st.vm;
  const fs::path& work = st.work;
  const auto str = [](int64_t v) { return std::to_string(v); };
  const auto ratios = parse_ratios(vm["ratio"].as<std::string>());
  const auto methods = study_methods(vm);
  const auto healing = vm["healing"].as<std::string>();
  const bool plot = vm["plot"].as<bool>();
  const int64_t L = CheckpointReader(st.model).config().num_layers;
  const auto [a, b] = parse_adapters(vm["adapters"].as<std::string>());
  const std::string calibration = st.prepared(st.collect_task);
  const std::string calibration_examples = str(vm["calibration-examples"].as<int64_t>());
  auto uses = [&](const std::string& m) { return std::find(methods.begin(), methods.end(), m) != methods.end(); };

  // Layer importance: every score the chosen methods use, and CRaSh's 1 - adjacent CKA beside them.
  const std::string importance = (work / "importance.h5").string();
  std::vector<std::string> scores = {"cka"};
  std::vector<std::string> importance_args = {"--cka", cka, "--model", st.model, "--out", importance};
  if (uses("shortgpt") || uses("angular")) {
    const std::string tokens = (work / "activations_tokens.h5").string();
    std::vector<std::string> args = {
        "--model",   st.model, "--data",         st.prepared(st.collect_task),
        "--out",     tokens,   "--num-examples", str(vm["importance-examples"].as<int64_t>()),
        "--pooling", "none"};
    if (fs::exists(tokens + ".partial")) args.push_back("--resume");
    st.stage.run("collect tokens", "collect", tokens, args, true);
    importance_args.insert(importance_args.end(), {"--archive", tokens});
    if (uses("shortgpt")) scores.push_back("block_influence");
    if (uses("angular")) scores.push_back("angular_distance");
  }
  if (uses("sleb")) {
    scores.push_back("sleb");
    // SLEB's order up to the largest ratio serves every smaller one: it removes one layer at a time.
    importance_args.insert(importance_args.end(),
                           {"--calibration", calibration, "--calibration-examples", calibration_examples, "--ratio",
                            fmt::format("{}", *std::max_element(ratios.begin(), ratios.end()))});
  }
  std::string joined;
  for (const auto& s : scores) joined += (joined.empty() ? "" : ",") + s;
  importance_args.insert(importance_args.end(), {"--methods", joined});
  if (plot) importance_args.push_back("--plot");
  st.stage.run("importance", "importance", importance, importance_args, true);

  st.evaluate(st.model, "full");
  const int64_t full_params = stored_parameters(st.model);
  nlohmann::json metrics = nlohmann::json::object(), rows = nlohmann::json::array();
  for (double r : ratios) {
    const std::string label = ratio_label(r);
    const int64_t removed = layers_for_ratio(r, L);
    const std::string clusters = (work / "pruning" / ("clusters-" + label + ".json")).string();
    std::error_code ec;
    fs::create_directories(work / "pruning", ec);
    if (uses("remove") || uses("share"))
      st.stage.run("cluster " + label, "cluster", clusters,
                   {"--cka", cka, "--k", str(L - removed - a - b), "--method", vm["cluster-method"].as<std::string>(),
                    "--layers", fmt::format("{}:{}", a, L - b), "--out", clusters},
                   false);
    for (const auto& m : methods) {
      const std::string name = m + "-" + label;
      const fs::path dir = work / "pruning" / name;
      fs::create_directories(dir, ec);
      const std::string pruned = (dir / "model").string();
      std::vector<std::string> args = {"--model", st.model, "--out", pruned};
      bool grid = false;
      if (m == "uniform") {
        args.insert(args.end(), {"--mode", "uniform", "--keep", str(L - removed - a - b), "--adapters",
                                 vm["adapters"].as<std::string>()});
      } else if (crash_mode(m)) {
        args.insert(args.end(), {"--mode", m, "--clusters", clusters, "--adapters", vm["adapters"].as<std::string>()});
      } else if (m == "laco") {
        // LaCo's search runs its candidates on the grid.
        args.insert(args.end(), {"--mode", "merge", "--calibration", calibration, "--calibration-examples",
                                 calibration_examples, "--ratio", fmt::format("{}", r), "--threshold",
                                 fmt::format("{}", vm["laco-threshold"].as<double>()), "--merge-size",
                                 str(vm["laco-merge-size"].as<int64_t>())});
        grid = true;
      } else {
        args.insert(args.end(), {"--mode", "prune", "--from-importance", importance, "--method", importance_method(m),
                                 "--ratio", fmt::format("{}", r)});
      }
      st.stage.run("emulate " + name, "emulate", pruned, args, grid);
      st.evaluate(pruned, name + "-pruned");
      std::vector<std::string> heal;
      if (healing == "full") {
        heal = {"--train-all"};
      } else if (healing == "lora") {
        heal = st.lora_args();
        heal.push_back("--train-all");
      } else {
        heal = {"--train-last", str(vm["heal-layers"].as<int64_t>()), "--train-head"};
      }
      const std::string healed = st.fine_tune(name, pruned, (dir / "heal").string(), heal);
      st.evaluate(healed, name + "-healed");
      if (World::get().rank() == 0) rows.push_back(study_row(st, m, r, pruned, name, full_params, metrics));
    }
  }
  if (World::get().rank() != 0) return;
  nlohmann::json study = {
      {"format", "crash-hpc pruning study 1"},
      {"model", fs::absolute(st.model).string()},
      {"healing", healing == "full" ? "full fine-tuning"
                  : healing == "lora"
                      ? fmt::format("LoRA of rank {} on every linear layer", vm["lora-rank"].as<int64_t>())
                      : fmt::format("last {} layers, final norm and LM head", vm["heal-layers"].as<int64_t>())},
      {"steps", vm["steps"].as<int64_t>()},
      {"ratios", ratios},
      {"methods", methods},
      {"tasks", nlohmann::json::array()},
      {"importance", importance},
      {"rows", rows}};
  const auto full_cfg = CheckpointReader(st.model).config();
  study["full"] = {{"layers", full_cfg.num_layers}, {"parameters", full_params}};
  const auto full_results = read_json_file((work / "eval" / "full.json").string());
  for (const auto& t : st.eval_tasks) {
    std::string metric;
    auto v = main_metric(full_results, task_name(t), metric);
    if (!v) fail("{}: no result for task '{}'", (work / "eval" / "full.json").string(), task_name(t));
    study["full"]["scores"][task_name(t)] = *v;
    metrics[task_name(t)] = metric;
    study["tasks"].push_back(task_name(t));
  }
  study["metrics"] = metrics;
  write_study_table(st, study);
  const std::string figure = (work / "pruning_study.png").string();
  if (run_plot_script({(work / "pruning_study.json").string(), "--out", figure}))
    std::printf("figure: %s\n", figure.c_str());
}

}  // namespace crash
