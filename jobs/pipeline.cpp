// pipeline: the CRaSh study end to end, one stage after another in this run:
//   prepare -> collect -> similarity -> cluster -> for each of uniform, remove, share:
//   emulate -> eval (emulator zero-shot) -> train -> eval (fine-tuned) -> plugin -> eval (plug-in)
// and the CRaSh table; optionally the logit lens of the full model, the loss landscape between the
// full model and each plug-in, and the run's report (report.html). Every stage is the job of the same name; a stage
// whose complete output exists is skipped (outputs appear only when complete), so a crashed pipeline resumes. The
// terminal gets one line per stage; each stage's full log is WORK/logs/STAGE.log.
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <unistd.h>

#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/json_fields.h"
#include "framework/lora.h"
#include "jobs/job.h"
#include "jobs/pipeline_stages.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/grid.h"
#include "parallel/log.h"
#include "parallel/progress.h"
#include "parallel/world.h"

namespace crash {

namespace fs = std::filesystem;

void pipeline_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(),
                  "the full model (Hugging Face folder with tokenizer.json)")(
      "train-task", po::value<std::string>()->required(), "fine-tuning data (task JSON Lines)")(
      "valid-task", po::value<std::string>(), "validation data for fine-tuning (keeps the best step)")(
      "eval-task", po::value<std::vector<std::string>>()->composing()->required(),
      "task to evaluate (JSON Lines; repeat for several)")(
      "collect-task", po::value<std::string>(), "data the representations are collected on (default: --train-task)")(
      "work", po::value<std::string>()->required(), "output folder of every stage")(
      "num-examples", po::value<int64_t>()->default_value(512), "examples collected for the similarity analysis")(
      "pooling", po::value<std::string>()->default_value("mean"), "pooling of collected hidden states")(
      "k", po::value<int64_t>()->default_value(4), "clusters of the middle layers")(
      "cluster-method", po::value<std::string>()->default_value("adjacent"), "adjacent (CRaSh) or optimal")(
      "adapters", po::value<std::string>()->default_value("2,2"), "trainable layers at the bottom and the top: A,B")(
      "modes", po::value<std::string>()->default_value("uniform,remove,share"), "emulators to build")(
      "steps", po::value<int64_t>()->default_value(200), "fine-tuning steps")(
      "lr", po::value<double>()->default_value(1e-4), "peak learning rate")(
      "warmup", po::value<int64_t>()->default_value(20), "warm-up steps")(
      "batch-size", po::value<int64_t>()->default_value(16), "examples per optimiser step")(
      "eval-every", po::value<int64_t>()->default_value(0), "validation every N steps (0: only at the end)")(
      "seed", po::value<int64_t>()->default_value(1234), "fine-tuning seed")(
      "save-every", po::value<int64_t>()->default_value(50),
      "fine-tuning checkpoint every N steps (a crash resumes there)")(
      "eval-batch-size", po::value<int64_t>()->default_value(16), "evaluation batch size")(
      "eval-examples", po::value<int64_t>()->default_value(-1), "first N examples of each evaluation task (all: -1)")(
      "plot", po::bool_switch(), "PNG plots of the similarity and the clusters (and of the lens and landscapes)")(
      "lens", po::bool_switch(), "logit lens of the full model on the collection data")(
      "landscape", po::bool_switch(),
      "loss along the line from the full model to each plug-in, on the validation data (or the training data)")(
      "figure-examples", po::value<int64_t>()->default_value(32), "examples of the lens and the landscapes")(
      "report", po::bool_switch(), "write WORK/report.html at the end (crash-hpc report)")(
      "study", po::value<std::string>()->default_value("crash"),
      "crash: the CRaSh study (emulators, fine-tuning, plug-ins); pruning: the layer-pruning baselines side by side, "
      "before and after healing")("tuning", po::value<std::string>()->default_value("full"),
                                  "how fine-tuning trains the chosen layers: full (dense AdamW), lora (LoRA "
                                  "of --lora-rank on every linear) or sift (sparse increments, --sift-density)")(
      "lora-rank", po::value<int64_t>()->default_value(8), "--tuning lora, --healing lora: the adapters' rank")(
      "sift-density", po::value<double>()->default_value(0.05), "--tuning sift: the entries of each tensor trained");
  pruning_study_options(o);
  add_grid_options(o, "compute dtype of collection, training and evaluation");
}

namespace {

std::string option_text(const po::variable_value& v) {
  if (const auto* i = boost::any_cast<int>(&v.value())) return std::to_string(*i);
  if (const auto* s = boost::any_cast<std::string>(&v.value())) return *s;
  return "(set)";
}

}  // namespace

// Each stage prints one line on rank 0 (its time and the peak memory of the busiest rank), logs in
// full to WORK/logs/LABEL.log and appends its record (settings, time, memory) to
// WORK/logs/stages.jsonl, which the report reads.
StageRunner::StageRunner(const po::variables_map& vm, const fs::path& work)
    : vm_(vm), logs_(work / "logs"), world_(ProcessGrid::create(GridSizes{})->dp_group()) {
  std::error_code ec;
  fs::create_directories(logs_, ec);
  if (ec) fail("{}: cannot create the log folder ({})", logs_.string(), ec.message());
}

void StageRunner::run(const std::string& label, const std::string& name, const std::string& output,
                      std::vector<std::string> args, bool grid) {
  const bool rank0 = world_->rank() == 0;
  nlohmann::json record = {{"stage", label}, {"job", name}, {"output", output}, {"args", args}};
  // Rank 0 decides for all: a serial stage of rank 0 (cluster) can write its output before a
  // slower rank looks, which would then skip the stage the others run.
  auto done = torch::tensor({fs::exists(output) ? 1.0 : 0.0}, torch::kFloat64);
  world_->broadcast(done, 0);
  if (done.item<double>() > 0.5) {
    if (rank0) std::printf("pipeline: %-32s skipped (%s exists)\n", label.c_str(), output.c_str());
    record["status"] = "skipped";
    append(record);
    return;
  }
  const Job* job = nullptr;
  for (const auto& j : all_jobs())
    if (name == j.name) job = &j;
  if (!job) fail("pipeline: this build has no '{}' job", name);
  bool help = false;
  auto stage_vm = parse_job_options(*job, args, help);
  // The stage runs with the pipeline's own values of the grid and common options.
  std::vector<std::string> inherited = {"log-level", "threads"};
  if (grid) {
    const auto names = grid_option_names();
    inherited.insert(inherited.end(), names.begin(), names.end());
    for (const auto& key : names)
      if (vm_.count(key)) record["grid"][key] = option_text(vm_[key]);
  }
  for (const auto& key : inherited) {
    stage_vm.erase(key);
    stage_vm.emplace(key, vm_[key]);
  }
  std::string file_name = label;
  std::replace(file_name.begin(), file_name.end(), ' ', '-');
  const fs::path log = logs_ / (file_name + ".log");
  std::fflush(stdout);
  reset_peak_rss();
  const auto t0 = std::chrono::steady_clock::now();
  {
    LogToFile to_file(rank0 ? log.string() : "");
    spdlog::info("pipeline stage {}: crash-hpc {} {}", label, name, fmt::join(args, " "));
    job->run(stage_vm);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto peak = torch::tensor({static_cast<double>(peak_rss_since_reset())}, torch::kFloat64);
  world_->allreduce(peak, ReduceOp::Max);
  const double peak_bytes = peak.item<double>();
  if (rank0) {
    std::printf("pipeline: %-32s %9s  peak %6.0f MiB\n", label.c_str(), duration_text(seconds).c_str(),
                peak_bytes / (1 << 20));
    std::fflush(stdout);
  }
  record.update({{"status", "ran"},
                 {"seconds", seconds},
                 {"peak_rss_bytes", static_cast<int64_t>(peak_bytes)},
                 {"ranks", world_->size()},
                 {"log", fs::relative(log, logs_.parent_path()).string()}});
  append(record);
}

void StageRunner::append(const nlohmann::json& record) const {
  if (world_->rank() != 0) return;
  std::ofstream out(logs_ / "stages.jsonl", std::ios::app);
  out << record.dump() << "\n";
  if (!out) fail("{}: cannot append the stage record", (logs_ / "stages.jsonl").string());
}

std::string task_name(const std::string& path) { return fs::path(path).stem().string(); }

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

std::optional<double> main_metric(const nlohmann::json& results, const std::string& task, std::string& metric) {
  if (!results.contains("results") || !results["results"].is_array()) return std::nullopt;
  for (const auto& r : results["results"]) {
    if (r.value("task", "") != task || !r.contains("metrics")) continue;
    for (const char* name : {"acc", "exact_match", "perplexity"})
      if (r["metrics"].contains(name) && r["metrics"][name]["value"].is_number()) {
        metric = name;
        return r["metrics"][name]["value"].get<double>();
      }
  }
  return std::nullopt;
}

namespace {

// WORK/run.json: who ran this pipeline with what (versions, settings, grid, ranks, when), for the
// report. Each run of the pipeline (a resume too) rewrites it.
void write_run_record(const po::variables_map& vm, const fs::path& work) {
  const World& world = World::get();
  if (world.rank() != 0) return;
  char host[256] = "";
  gethostname(host, sizeof(host) - 1);
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char started[64];
  std::strftime(started, sizeof(started), "%Y-%m-%dT%H:%M:%S%z", std::localtime(&now));
  nlohmann::json run = {{"format", "crash-hpc run 1"},
                        {"tool_version", kVersion},
                        {"torch_version", torch_version()},
                        {"torch_threads", torch::get_num_threads()},
                        {"started", started},
                        {"host", host},
                        {"ranks", world.size()},
                        {"cwd", fs::current_path().string()},
                        {"options", options_json(vm)}};
  write_atomic((work / "run.json").string(), run.dump(2) + "\n");
}

// The CRaSh table (Full zero-shot, Emulator zero-shot, Emulator fine-tuned, Plug-in per task
// and emulator) as crash_table.md and crash_table.json in the work folder, printed on rank 0.
void write_crash_table(const fs::path& work, const std::vector<std::string>& modes,
                       const std::vector<std::string>& eval_tasks) {
  if (World::get().rank() != 0) return;
  auto load = [&](const std::string& setting) {
    return read_json_file((work / "eval" / (setting + ".json")).string());
  };
  const auto full = load("full");
  const char* columns[] = {"emulator-zero-shot", "emulator-fine-tuned", "plugin"};
  std::string table =
      "| Task | Metric | Emulator | Full zero-shot | Emulator zero-shot | Emulator fine-tuned | Plug-in |\n"
      "|---|---|---|---|---|---|---|\n";
  nlohmann::json summary = nlohmann::json::object();
  for (const auto& path : eval_tasks) {
    const std::string task = task_name(path);
    std::string metric;
    const auto base = main_metric(full, task, metric);
    if (!base) fail("{}: no result for task '{}'", (work / "eval" / "full.json").string(), task);
    for (const auto& mode : modes) {
      std::string row = fmt::format("| {} | {} | {} | {:.4f} |", task, metric, mode, *base);
      summary[task][mode]["full-zero-shot"] = *base;
      for (const char* column : columns) {
        std::string m;
        auto v = main_metric(load(mode + "-" + column), task, m);
        if (!v) fail("{}: no result for task '{}'", (work / "eval" / (mode + "-" + column + ".json")).string(), task);
        row += fmt::format(" {:.4f} |", *v);
        summary[task][mode][column] = *v;
      }
      summary[task]["metric"] = metric;
      table += row + "\n";
    }
  }
  write_atomic((work / "crash_table.md").string(), table);
  write_atomic((work / "crash_table.json").string(), summary.dump(2) + "\n");
  std::printf("\nCRaSh results (%s)\n\n%s\n", (work / "crash_table.md").c_str(), table.c_str());
  std::fflush(stdout);
}

}  // namespace

std::string Study::prepared(const std::string& task) const { return (work / "prepared" / task_name(task)).string(); }

std::string Study::validation_data() const {
  return prepared(vm.count("valid-task") ? vm["valid-task"].as<std::string>() : train_task);
}

void Study::evaluate(const std::string& dir, const std::string& setting) const {
  const auto str = [](int64_t v) { return std::to_string(v); };
  std::vector<std::string> args = {"--model", dir, "--out", (work / "eval" / (setting + ".json")).string(),
                                   "--batch-size", str(vm["eval-batch-size"].as<int64_t>()), "--num-examples",
                                   str(vm["eval-examples"].as<int64_t>()), "--details",
                                   (work / "eval" / (setting + ".details.jsonl")).string(),
                                   // The stage runs when the results are missing: details of a run that
                                   // stopped before writing them are stale.
                                   "--overwrite"};
  for (const auto& t : eval_tasks) args.insert(args.end(), {"--data", prepared(t)});
  stage.run("eval " + setting, "eval", args[3], args, true);
}

std::vector<std::string> Study::lora_args() const {
  const ModelConfig cfg = CheckpointReader(model).config();
  std::string targets;
  for (const char* t : {"q", "k", "v", "o", "gate", "up", "down"})
    if (!lora_module(cfg, t).empty()) targets += (targets.empty() ? "" : ",") + std::string(t);
  return {"--lora-rank", std::to_string(vm["lora-rank"].as<int64_t>()), "--lora-targets", targets};
}

std::vector<std::string> Study::tuning_args() const {
  const auto tuning = vm["tuning"].as<std::string>();
  if (tuning == "sift") return {"--sparse-increment", fmt::format("{}", vm["sift-density"].as<double>())};
  if (tuning == "lora") return lora_args();
  return {};
}

std::string Study::fine_tune(const std::string& label, const std::string& dir, const std::string& out,
                             const std::vector<std::string>& extra) const {
  const auto str = [](int64_t v) { return std::to_string(v); };
  std::vector<std::string> args = {"--model",      dir,
                                   "--data",       prepared(train_task),
                                   "--out",        out,
                                   "--steps",      str(vm["steps"].as<int64_t>()),
                                   "--lr",         fmt::format("{}", vm["lr"].as<double>()),
                                   "--warmup",     str(vm["warmup"].as<int64_t>()),
                                   "--batch-size", str(vm["batch-size"].as<int64_t>()),
                                   "--seed",       str(vm["seed"].as<int64_t>()),
                                   "--save-every", str(vm["save-every"].as<int64_t>())};
  if (vm.count("valid-task")) {
    args.insert(args.end(), {"--val-data", prepared(vm["valid-task"].as<std::string>())});
    if (vm["eval-every"].as<int64_t>() > 0)
      args.insert(args.end(), {"--eval-every", str(vm["eval-every"].as<int64_t>())});
  }
  args.insert(args.end(), extra.begin(), extra.end());
  // A crashed fine-tuning resumes from its newest checkpoint; one that left none starts over.
  if (fs::exists(fs::path(out) / "checkpoints") && !fs::is_empty(fs::path(out) / "checkpoints"))
    args.push_back("--resume");
  else if (fs::exists(out))
    args.push_back("--overwrite");
  // train writes model/ at every new best validation loss, so model/ alone does not say the
  // fine-tuning finished: the stage is done once this marker, written after it returns, exists.
  const std::string finished = (fs::path(out) / "finished").string();
  stage.run("train " + label, "train", finished, args, true);
  if (World::get().rank() == 0 && !fs::exists(finished))
    write_atomic(finished, fmt::format("{} steps of {}\n", vm["steps"].as<int64_t>(), label));
  return (fs::path(out) / "model").string();
}

namespace {

void write_report_page(const fs::path& work) {
  if (World::get().rank() != 0) return;
  const std::string page = (work / "report.html").string();
  // The study's results are complete by now: a report that cannot be drawn is a warning.
  bool written = false;
  try {
    written = write_report(work.string(), page, "") == 0;
  } catch (const UserError& e) {
    spdlog::warn("{}", e.what());
  }
  if (written)
    std::printf("report: %s\n", page.c_str());
  else
    spdlog::warn("no report; run crash-hpc report --work {} once that is fixed", work.string());
}

// The CRaSh study after the similarity: clusters, then per emulator emulate -> eval -> train ->
// eval -> plugin -> eval (and the landscape), and the CRaSh table.
void run_crash_study(const Study& st, const std::string& cka, const std::vector<std::string>& modes) {
  const auto& vm = st.vm;
  const fs::path& work = st.work;
  const auto str = [](int64_t v) { return std::to_string(v); };
  const auto [bottom, top] = parse_adapters(vm["adapters"].as<std::string>());
  const std::string clusters = (work / "clusters.json").string();
  std::vector<std::string> plot;
  if (vm["plot"].as<bool>()) plot.push_back("--plot");
  const int64_t L = CheckpointReader(st.model).config().num_layers;
  std::vector<std::string> cluster_args = {"--cka",    cka,
                                           "--k",      str(vm["k"].as<int64_t>()),
                                           "--method", vm["cluster-method"].as<std::string>(),
                                           "--layers", fmt::format("{}:{}", bottom, L - top),
                                           "--out",    clusters};
  cluster_args.insert(cluster_args.end(), plot.begin(), plot.end());
  st.stage.run("cluster", "cluster", clusters, cluster_args, false);
  const std::string figure_examples = str(vm["figure-examples"].as<int64_t>());
  if (vm["lens"].as<bool>()) {
    std::vector<std::string> lens_args = {
        "--model",        st.model,       "--data", st.prepared(st.collect_task), "--out", (work / "lens.h5").string(),
        "--num-examples", figure_examples};
    lens_args.insert(lens_args.end(), plot.begin(), plot.end());
    st.stage.run("lens", "lens", lens_args[5], lens_args, true);
  }
  st.evaluate(st.model, "full");
  for (const auto& mode : modes) {
    const fs::path dir = work / mode;
    std::error_code ec;
    fs::create_directories(dir, ec);
    const std::string emulator = (dir / "emulator").string(), plugged = (dir / "plugin").string();
    st.stage.run("emulate " + mode, "emulate", emulator,
                 {"--model", st.model, "--mode", mode, "--clusters", clusters, "--adapters",
                  vm["adapters"].as<std::string>(), "--out", emulator},
                 false);
    st.evaluate(emulator, mode + "-emulator-zero-shot");
    const std::string tuned = st.fine_tune(mode, emulator, (dir / "train").string(), st.tuning_args());
    st.evaluate(tuned, mode + "-emulator-fine-tuned");
    st.stage.run("plugin " + mode, "plugin", plugged, {"--model", st.model, "--emulator", tuned, "--out", plugged},
                 false);
    st.evaluate(plugged, mode + "-plugin");
    if (vm["landscape"].as<bool>()) {
      std::vector<std::string> args = {"--model",        st.model,
                                       "--model-b",      plugged,
                                       "--data",         st.validation_data(),
                                       "--out",          (dir / "landscape.h5").string(),
                                       "--num-examples", figure_examples,
                                       "--points",       "11",
                                       "--range",        "-0.25:1.25"};
      args.insert(args.end(), plot.begin(), plot.end());
      st.stage.run("landscape " + mode, "landscape", args[7], args, true);
    }
  }
  write_crash_table(work, modes, st.eval_tasks);
}

}  // namespace

int pipeline_run(const po::variables_map& vm) {
  const std::string model = vm["model"].as<std::string>();
  const fs::path work = vm["work"].as<std::string>();
  const std::string study_name = vm["study"].as<std::string>();
  if (study_name != "crash" && study_name != "pruning")
    fail("--study: unknown study '{}' (crash or pruning)", study_name);
  const auto modes = split_list(vm["modes"].as<std::string>());
  for (const auto& m : modes)
    if (m != "uniform" && m != "remove" && m != "share")
      fail("--modes: unknown emulator '{}' (uniform, remove, share)", m);
  if (modes.empty()) fail("--modes: name at least one of uniform, remove, share");
  const auto tuning = vm["tuning"].as<std::string>();
  if (tuning != "full" && tuning != "lora" && tuning != "sift")
    fail("--tuning: unknown choice '{}' (full, lora or sift)", tuning);
  if (vm["lora-rank"].as<int64_t>() < 1) fail("--lora-rank must be positive, got {}", vm["lora-rank"].as<int64_t>());
  const double density = vm["sift-density"].as<double>();
  if (!(density > 0 && density <= 1)) fail("--sift-density must be in (0, 1], got {}", density);
  if (study_name == "pruning") check_pruning_study_options(vm);
  if (!fs::exists(fs::path(model) / "tokenizer.json")) fail("{}: the pipeline needs the model's tokenizer.json", model);
  const auto eval_tasks = vm["eval-task"].as<std::vector<std::string>>();
  for (const auto& t : eval_tasks)
    if (!fs::exists(t)) fail("--eval-task: {} does not exist", t);
  const std::string train_task = vm["train-task"].as<std::string>();
  const std::string collect_task = vm.count("collect-task") ? vm["collect-task"].as<std::string>() : train_task;
  parse_adapters(vm["adapters"].as<std::string>());
  std::error_code ec;
  fs::create_directories(work / "prepared", ec);
  fs::create_directories(work / "eval", ec);
  if (ec) fail("{}: cannot create the work folder ({})", work.string(), ec.message());
  StageRunner stage(vm, work);
  write_run_record(vm, work);
  const Study st{vm, work, stage, model, train_task, collect_task, eval_tasks};
  auto str = [](auto v) { return std::to_string(v); };

  // Tokenize every task once.
  std::vector<std::string> tasks = {train_task, collect_task};
  if (vm.count("valid-task")) tasks.push_back(vm["valid-task"].as<std::string>());
  tasks.insert(tasks.end(), eval_tasks.begin(), eval_tasks.end());
  for (size_t i = 0; i < tasks.size(); ++i)  // each task once (the collection task is often the training task)
    if (std::find(tasks.begin(), tasks.begin() + i, tasks[i]) != tasks.begin() + i) tasks.erase(tasks.begin() + i--);
  // Text is cut into windows the model can take (prepare's default, 512, may exceed its positions).
  const int64_t window = std::min<int64_t>(512, CheckpointReader(model).config().max_positions);
  for (const auto& t : tasks)
    stage.run("prepare " + task_name(t), "prepare", st.prepared(t),
              {"--task", t, "--tokenizer", model, "--out", st.prepared(t), "--window", str(window)}, false);

  // Representations and their similarity.
  const std::string archive = (work / "activations.h5").string(), cka = (work / "cka.h5").string();
  std::vector<std::string> collect_args = {"--model",        model,
                                           "--data",         st.prepared(collect_task),
                                           "--out",          archive,
                                           "--num-examples", str(vm["num-examples"].as<int64_t>()),
                                           "--pooling",      vm["pooling"].as<std::string>()};
  if (fs::exists(archive + ".partial")) collect_args.push_back("--resume");
  stage.run("collect", "collect", archive, collect_args, true);
  std::vector<std::string> sim_args = {"--archive", archive, "--out", cka};
  if (vm["plot"].as<bool>()) sim_args.push_back("--plot");
  stage.run("similarity", "similarity", cka, sim_args, false);

  if (study_name == "pruning")
    run_pruning_study(st, cka);
  else
    run_crash_study(st, cka, modes);
  if (vm["report"].as<bool>()) write_report_page(work);
  return 0;
}

}  // namespace crash
