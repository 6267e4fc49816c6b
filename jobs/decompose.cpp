// decompose: SFSD feature-space low-rank decomposition (analysis/sfsd.h), on any grid.
// Calibrates every decoder Linear's output statistics, picks ranks (--ratio, --budget or
// --search greedy), writes the factored model as an HF folder with sfsd_ranks.json, and reports
// parameters, FLOPs per token and metrics before and after (log and sfsd_report.json).
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>

#include "analysis/sfsd.h"
#include "analysis/sfsd_search.h"
#include "framework/atomic_file.h"
#include "framework/eval.h"
#include "framework/models/family.h"
#include "framework/prepared.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace fs = std::filesystem;

namespace crash {

void decompose_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "data", po::value<std::vector<std::string>>()->required()->composing(),
      "prepared calibration task (repeat to mix several)")("out", po::value<std::string>()->required(),
                                                           "output model folder")(
      "num-examples", po::value<int64_t>()->default_value(512), "calibration examples, mixed from the tasks")(
      "tokens", po::value<int64_t>()->default_value(128), "first tokens of each calibration example")(
      "ratio", po::value<double>(), "keep ceil(F min(in, out)) directions of each module, F in (0, 1]")(
      "budget", po::value<double>(),
      "SFSD's budget B in (0, 1]: keep int(B in out / (in + out)) directions, about B x the weight's parameters")(
      "search", po::value<std::string>()->default_value(""), "rank search: greedy")(
      "val-data", po::value<std::string>()->default_value(""), "greedy search: prepared validation task")(
      "val-examples", po::value<int64_t>()->default_value(-1), "greedy search: first N validation examples")(
      "tolerance", po::value<double>()->default_value(0.02),
      "greedy search: largest metric loss accepted (accuracy points as a fraction, or relative perplexity)")(
      "candidates", po::value<std::string>()->default_value("0.05,0.1,0.2,0.3,0.5,0.7"),
      "greedy search: candidate fractions, tried small to large (each a --ratio or a --budget, see --candidate-unit)")(
      "candidate-unit", po::value<std::string>()->default_value("ratio"),
      "greedy search: the candidates are ratios (ceil(f min(in, out))) or budgets (int(f in out / (in + out)))")(
      "eval-data", po::value<std::vector<std::string>>()->composing(),
      "prepared task evaluated before and after (repeatable, optional)")(
      "batch-size", po::value<int64_t>()->default_value(8), "rows per forward pass")(
      "overwrite", po::bool_switch(), "replace an existing output folder");
  add_grid_options(o, "compute dtype: float32, float64 (factors then saved in float64), bfloat16 or float16");
}

namespace {

nlohmann::json evaluate_all(const std::string& dir, const std::shared_ptr<ProcessGrid>& grid, const GridChoice& choice,
                            const std::vector<PreparedTask>& tasks, int64_t batch) {
  nlohmann::json out = nlohmann::json::array();
  if (tasks.empty()) return out;
  JobModel job_model(dir, choice, grid);
  DistributedLM& model = job_model.model();
  model.stage().eval();
  EvalOptions options;
  options.batch_size = batch;
  options.stop_ids = generation_stop_ids(dir, job_model.config());
  for (const auto& t : tasks) out.push_back(evaluate_task(model, t, options, job_model.tokenizer()).to_json());
  return out;
}

}  // namespace

int decompose_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto data = vm["data"].as<std::vector<std::string>>();
  const auto out_dir = vm["out"].as<std::string>();
  const int64_t num_examples = vm["num-examples"].as<int64_t>();
  const int64_t tokens = vm["tokens"].as<int64_t>();
  const int64_t batch = vm["batch-size"].as<int64_t>();
  const std::string search = vm["search"].as<std::string>();
  const bool has_ratio = vm.count("ratio") != 0, has_budget = vm.count("budget") != 0;
  const double ratio = has_ratio ? vm["ratio"].as<double>() : 0.0;
  const double budget = has_budget ? vm["budget"].as<double>() : 0.0;
  const auto eval_dirs =
      vm.count("eval-data") ? vm["eval-data"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (num_examples <= 0) fail("--num-examples must be positive, got {}", num_examples);
  if (tokens < 2) fail("--tokens must be at least 2, got {}", tokens);
  if (batch <= 0) fail("--batch-size must be positive, got {}", batch);
  if (has_ratio && has_budget) fail("--ratio and --budget exclude each other: give one");
  if ((has_ratio || has_budget) && !search.empty())
    fail("{} and --search exclude each other: give one", has_ratio ? "--ratio" : "--budget");
  if (!has_ratio && !has_budget && search.empty())
    fail("give --ratio F (fraction of each module's rank), --budget B (SFSD's parameter budget) or --search greedy");
  if (has_ratio && !(ratio > 0.0 && ratio <= 1.0)) fail("--ratio must be in (0, 1], got {}", ratio);
  if (has_budget && !(budget > 0.0 && budget <= 1.0)) fail("--budget must be in (0, 1], got {}", budget);
  if (!search.empty() && search != "greedy") fail("--search: unknown method '{}' (expected greedy)", search);
  const bool greedy = search == "greedy";
  const auto val_dir = vm["val-data"].as<std::string>();
  const double tolerance = vm["tolerance"].as<double>();
  if (greedy && val_dir.empty()) fail("--search greedy needs --val-data (a prepared validation task)");
  if (greedy && !(tolerance >= 0.0)) fail("--tolerance must be non-negative, got {}", tolerance);
  const auto fractions = greedy ? parse_fractions(vm["candidates"].as<std::string>()) : std::vector<double>{};
  const std::string unit_text = vm["candidate-unit"].as<std::string>();
  if (unit_text != "ratio" && unit_text != "budget")
    fail("--candidate-unit: unknown unit '{}' (expected ratio or budget)", unit_text);
  const RankUnit candidate_unit = unit_text == "budget" ? RankUnit::kBudget : RankUnit::kRatio;
  if (fs::exists(out_dir) && !vm["overwrite"].as<bool>())
    fail("{}: output exists (pass --overwrite to replace it)", out_dir);

  // float64 is accepted here (exact references); the other types as every job parses them.
  JobModel job_model(model_dir, grid_choice(vm, /*allow_float64=*/true));
  const CheckpointReader& ckpt = job_model.checkpoint();
  const ModelConfig& cfg = job_model.config();
  const GridChoice& choice = job_model.choice();
  const bool fp64 = choice.model.dtype == torch::kFloat64;
  const auto linears = decoder_linears(ckpt);

  // Calibration examples: round robin over the tasks until --num-examples.
  std::vector<std::vector<std::vector<int64_t>>> per_task;
  for (const auto& dir : data) {
    auto task = read_prepared(dir, num_examples, cfg.vocab_size);
    check_task_tokenizer(task, model_dir);
    if (task.examples.empty()) fail("{}: no examples", dir);
    per_task.emplace_back();
    for (auto& e : task.examples) per_task.back().push_back(std::move(e.tokens));
  }
  const auto examples = mix_round_robin(per_task, num_examples);
  std::vector<PreparedTask> eval_tasks;
  for (const auto& dir : eval_dirs) {
    eval_tasks.push_back(read_prepared(dir, -1, cfg.vocab_size));
    check_task_tokenizer(eval_tasks.back(), model_dir);
  }

  std::vector<PreparedTask> val_task;
  if (greedy) {
    val_task.push_back(read_prepared(val_dir, vm["val-examples"].as<int64_t>(), cfg.vocab_size));
    check_task_tokenizer(val_task.back(), model_dir);
    if (val_task.back().kind == "generation")
      fail("{}: the greedy search scores multiple choice or text tasks", val_dir);
  }

  const auto grid = job_model.grid();
  spdlog::info("decompose: {} calibration examples x {} tokens, {} decoder Linears, grid {}", examples.size(), tokens,
               linears.size(), grid->describe());
  const auto before = evaluate_all(model_dir, grid, choice, eval_tasks, batch);

  std::map<std::string, OutputStats> stats;
  {
    // Loaded for the calibration alone, and freed before candidates are evaluated.
    DistributedLM model(ckpt, grid, choice.model);
    model.stage().eval();
    const auto t0 = std::chrono::steady_clock::now();
    auto local = calibrate(model, linears, examples, tokens, batch);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats = gather_stats(*grid, linears, std::move(local));
    if (grid->rank() == 0 && !stats.empty())
      spdlog::info("calibration: {:.0f} tokens in {:.2f} s ({:.0f} tokens/s)", stats.begin()->second.count, secs,
                   stats.begin()->second.count / secs);
  }

  // Writes a rank plan's factored model (rank 0) for every rank to load.
  const std::optional<torch::ScalarType> factor_dtype =
      fp64 ? std::optional<torch::ScalarType>(torch::kFloat64) : std::nullopt;
  auto write_plan = [&](const std::string& dir, const std::map<std::string, int64_t>& plan) {
    if (grid->rank() == 0) {
      SaveOptions save;
      save.copy_files = hf_folder_paths(model_dir);
      save.extra_files["sfsd_ranks.json"] = sfsd_summary(ckpt, linears, plan).modules.dump(2) + "\n";
      save_hf_folder(dir, cfg, factored_tensors(ckpt, linears, stats, plan, factor_dtype), save,
                     {{"crash_sfsd_ranks", plan}});
    }
    grid->world()->barrier();
  };

  std::map<std::string, int64_t> ranks;
  nlohmann::json search_log = nlohmann::json::array();
  if (greedy) {
    const auto [reference, larger_better] =
        headline_metric(evaluate_all(model_dir, grid, choice, val_task, batch).at(0));
    spdlog::info("greedy search: reference {} {:.6g}, tolerance {}", larger_better ? "metric" : "perplexity", reference,
                 tolerance);
    const std::string candidate = out_dir + ".sfsd-candidate";
    ranks = greedy_ranks(
        linears, fractions,
        [&](const std::map<std::string, int64_t>& plan) {
          write_plan(candidate, plan);
          const double value = headline_metric(evaluate_all(candidate, grid, choice, val_task, batch).at(0)).value;
          const bool ok = within_tolerance(value, reference, larger_better, tolerance);
          const auto summary = sfsd_summary(ckpt, linears, plan);
          spdlog::info("  {} modules factored, decoder parameters {}: metric {:.6g} -> {}", plan.size(),
                       summary.decoder_params_after, value, ok ? "accepted" : "rejected");
          search_log.push_back({{"ranks", plan}, {"metric", value}, {"accepted", ok}});
          return ok;
        },
        candidate_unit);
    if (grid->rank() == 0) fs::remove_all(candidate);
  } else {
    ranks = has_ratio ? fixed_ranks(linears, ratio, RankUnit::kRatio) : fixed_ranks(linears, budget, RankUnit::kBudget);
  }
  const auto summary = sfsd_summary(ckpt, linears, ranks);
  write_plan(out_dir, ranks);
  const auto after = evaluate_all(out_dir, grid, choice, eval_tasks, batch);

  if (grid->rank() != 0) return 0;
  const double dec_kept = double(summary.decoder_params_after) / double(summary.decoder_params_before);
  spdlog::info("parameters {} -> {} (decoder {} -> {}, {:.1f}% removed), FLOPs/token {} -> {}", summary.params_before,
               summary.params_after, summary.decoder_params_before, summary.decoder_params_after,
               100.0 * (1.0 - dec_kept), summary.flops_before, summary.flops_after);
  for (size_t i = 0; i < before.size(); ++i)
    spdlog::info("{}: before {} after {}", before[i]["task"].get<std::string>(), before[i]["metrics"].dump(),
                 after[i]["metrics"].dump());
  nlohmann::json report = {
      {"model", model_dir},
      {"out", out_dir},
      {"grid", grid->describe()},
      {"method", greedy      ? "greedy"
                 : has_ratio ? "ratio"
                             : "budget"},
      {"ratio", has_ratio ? nlohmann::json(ratio) : nlohmann::json(nullptr)},
      {"budget", has_budget ? nlohmann::json(budget) : nlohmann::json(nullptr)},
      {"candidate_unit", greedy ? nlohmann::json(rank_unit_name(candidate_unit)) : nlohmann::json(nullptr)},
      {"tolerance", greedy ? nlohmann::json(tolerance) : nlohmann::json(nullptr)},
      {"search", search_log},
      {"num_examples", examples.size()},
      {"tokens", tokens},
      {"calibration_tokens", stats.empty() ? 0.0 : stats.begin()->second.count},
      {"factored_modules", ranks.size()},
      {"params_before", summary.params_before},
      {"params_after", summary.params_after},
      {"decoder_params_before", summary.decoder_params_before},
      {"decoder_params_after", summary.decoder_params_after},
      {"decoder_compression", 1.0 - dec_kept},
      {"flops_per_token_before", summary.flops_before},
      {"flops_per_token_after", summary.flops_after},
      {"metrics_before", before},
      {"metrics_after", after},
      {"tool_version", kVersion}};
  write_atomic((fs::path(out_dir) / "sfsd_report.json").string(), report.dump(2) + "\n");
  spdlog::info("wrote {}", out_dir);
  return 0;
}

}  // namespace crash
