#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "jobs/job.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

const std::vector<Job>& all_jobs() {
  static const std::vector<Job> jobs = {
      {"forward", "run a model on token ids and write logits and hidden states to HDF5", forward_options, forward_run},
      {"prepare", "tokenize a task or text file once into shards the other jobs read", prepare_options, prepare_run},
      {"collect", "every layer's hidden states on N examples, pooled, into one HDF5 archive", collect_options,
       collect_run},
      {"similarity", "linear CKA (exact or unbiased minibatch) between every pair of layers of activation archives",
       similarity_options, similarity_run},
      {"importance",
       "layer importance for pruning: Block Influence, angular distance of blocks, 1 - adjacent CKA, SLEB (HDF5, "
       "--plot)",
       importance_options, importance_run},
      {"cluster", "group decoder layers into K clusters from a CKA matrix (CRaSh's adjacent rule, optimal, average)",
       cluster_options, cluster_run},
      {"train", "fine-tune a model (an emulator's adapters) on any grid, with checkpoints that resume exactly",
       train_options, train_run},
      {"merge", "a base model plus SIFT increments (train --save-increments) as a Hugging Face folder", merge_options,
       merge_run},
      {"lens", "logit lens: per-layer next-token distributions, their KL/JS divergences, agreement and loss",
       lens_options, lens_run},
      {"landscape", "loss along the line between two checkpoints or on the plane through three", landscape_options,
       landscape_run},
      {"emulate",
       "a CRaSh emulator (uniform, remove, share) or a pruned (prune) or LaCo-merged (merge) model as an HF folder",
       emulate_options, emulate_run},
      {"plugin", "the full model with an emulator's tuned adapter layers plugged back in", plugin_options, plugin_run},
      {"eval",
       "lm-eval-style evaluation: multiple choice (acc, acc_norm; several golds: exact_match), generation (exact "
       "match), perplexity",
       eval_options, eval_run},
      {"pipeline", "the CRaSh study end to end: collect, similarity, cluster, emulate, train, plug in, evaluate",
       pipeline_options, pipeline_run},
      {"decompose", "SFSD: factor each decoder Linear by the top eigenvectors of its outputs' covariance (HF folder)",
       decompose_options, decompose_run},
      {"preflight", "checks a batch job's launch, collectives, parallel HDF5 and memory before its stage runs",
       preflight_options, preflight_run},
      {"report", "one self-contained HTML page of a pipeline run: tables, figures, settings, time and memory",
       report_options, report_run},
  };
  return jobs;
}

int run_on_rank0(const std::function<void()>& work) {
  auto world = ProcessGrid::create(GridSizes{})->world();
  if (world->rank() == 0) work();
  world->barrier();
  return 0;
}

po::options_description common_options() {
  po::options_description o("Common options");
  o.add_options()("help,h", "show this help")("config", po::value<std::string>(),
                                              "INI file with options (key = value); the command line overrides it")(
      "log-level", po::value<std::string>()->default_value("info"), "trace, debug, info, warn, error or off")(
      "log-all-ranks", po::bool_switch(), "log info messages from every rank, not only rank 0")(
      "threads", po::value<int>()->default_value(0), "torch threads per process (0: the cores available)");
  return o;
}

po::variables_map parse_job_options(const Job& job, const std::vector<std::string>& args, bool& help) {
  po::options_description all(std::string("crash-hpc ") + job.name + ": " + job.summary);
  po::options_description own("Options");
  job.add_options(own);
  all.add(own).add(common_options());
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).run(), vm);
    help = vm.count("help") != 0;
    if (help) {
      std::cout << "usage: crash-hpc " << job.name << " [options]\n\n" << all << "\n";
      return vm;
    }
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream in(path);
      if (!in) fail("{}: cannot open config file", path);
      try {
        po::store(po::parse_config_file(in, all), vm);
      } catch (const po::error& e) {
        fail("{}: {}", path, e.what());
      }
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fail("{}: {} (see crash-hpc {} --help)", job.name, e.what(), job.name);
  }
  return vm;
}

void add_grid_options(po::options_description& o, const char* dtype_help) {
  o.add_options()("tp", po::value<int>()->default_value(1), "tensor-parallel ranks per model replica")(
      "pp", po::value<int>()->default_value(1), "pipeline stages per model replica (data parallelism: the rest)")(
      "pp-layers", po::value<std::string>()->default_value(""), "layers per stage, e.g. 5,7 (default: balanced)")(
      "backend", po::value<std::string>()->default_value("mpi"),
      "communication: mpi (CPU) or nccl (CUDA, one GPU per rank)")(
      "dtype", po::value<std::string>()->default_value("float32"), dtype_help);
}

std::vector<std::string> grid_option_names() {
  po::options_description o;
  add_grid_options(o);
  std::vector<std::string> names;
  for (const auto& option : o.options()) names.push_back(option->long_name());
  return names;
}

namespace {

std::vector<int64_t> pp_layer_counts(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      fail("--pp-layers: '{}' is not a whole number (expected a list like 5,7)", item);
    }
  }
  return out;
}

}  // namespace

torch::ScalarType parse_dtype(const std::string& name, bool allow_float64) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  if (allow_float64 && (name == "float64" || name == "fp64")) return torch::kFloat64;
  fail("--dtype: unknown type '{}' (expected float32, {}bfloat16 or float16)", name, allow_float64 ? "float64, " : "");
}

GridChoice grid_choice(const po::variables_map& vm, bool allow_float64) {
  GridChoice c;
  c.sizes = {vm["tp"].as<int>(), vm["pp"].as<int>(), vm["backend"].as<std::string>()};
  c.dtype = vm["dtype"].as<std::string>();
  c.model.dtype = parse_dtype(c.dtype, allow_float64);
  c.model.pp_layers = pp_layer_counts(vm["pp-layers"].as<std::string>());
  return c;
}

bool padding_left(const po::variables_map& vm) {
  const auto padding = vm["padding"].as<std::string>();
  if (padding != "left" && padding != "right") fail("--padding: expected 'left' or 'right', got '{}'", padding);
  return padding == "left";
}

nlohmann::json options_json(const po::variables_map& vm) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, v] : vm) {
    const auto& a = v.value();
    if (const auto* x = boost::any_cast<std::string>(&a))
      out[name] = *x;
    else if (const auto* x = boost::any_cast<int64_t>(&a))
      out[name] = *x;
    else if (const auto* x = boost::any_cast<int>(&a))
      out[name] = *x;
    else if (const auto* x = boost::any_cast<double>(&a))
      out[name] = *x;
    else if (const auto* x = boost::any_cast<bool>(&a))
      out[name] = *x;
    else if (const auto* x = boost::any_cast<std::vector<std::string>>(&a))
      out[name] = *x;
    else if (!a.empty())
      out[name] = "(set)";
  }
  return out;
}

void apply_threads(const po::variables_map& vm) {
  int threads = vm["threads"].as<int>();
  if (threads < 0) fail("--threads must be 0 or positive, got {}", threads);
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
}

}  // namespace crash
