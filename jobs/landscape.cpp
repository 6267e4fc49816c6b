// landscape: the loss along the line between two checkpoints, or on the plane through three
// (analysis/landscape.h), on any DP x PP x TP grid; rank 0 writes the losses to HDF5.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cmath>

#include "analysis/hdf5.h"
#include "analysis/landscape.h"
#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

namespace {

// "LO:HI" with LO < HI.
std::pair<double, double> parse_range(const std::string& text) {
  const auto colon = text.find(':');
  double lo = 0, hi = 0;
  try {
    if (colon == std::string::npos) throw std::invalid_argument(text);
    size_t used_lo = 0, used_hi = 0;
    const std::string a = text.substr(0, colon), b = text.substr(colon + 1);
    lo = std::stod(a, &used_lo);
    hi = std::stod(b, &used_hi);
    if (used_lo != a.size() || used_hi != b.size()) throw std::invalid_argument(text);
  } catch (const std::exception&) {
    fail("--range: '{}' is not LO:HI (two numbers, for example -4:4)", text);
  }
  if (!(lo < hi) || !std::isfinite(lo) || !std::isfinite(hi)) fail("--range: expected LO < HI, got '{}'", text);
  return {lo, hi};
}

}  // namespace

void landscape_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(),
                  "Hugging Face model folder: theta_A (theta_0 of a plane)")(
      "model-b", po::value<std::string>()->required(), "model folder of the same architecture: theta_B (theta_1)")(
      "model-c", po::value<std::string>(), "a third one, theta_2: a plane instead of a line")(
      "data", po::value<std::string>()->required(),
      "prepare's output folder, or JSON Lines with \"tokens\" (or \"text\", with the model's tokenizer.json)")(
      "out", po::value<std::string>()->required(), "output HDF5 file")(
      "num-examples", po::value<int64_t>()->default_value(128), "first N examples")(
      "batch-size", po::value<int64_t>()->default_value(8), "examples per forward pass")(
      "points", po::value<int64_t>()->default_value(25), "line: number of alpha values")(
      "grid", po::value<int64_t>()->default_value(50), "plane: N x N points")(
      "range", po::value<std::string>()->default_value(""),
      "LO:HI of alpha (line, default 0:1) or of a and b (plane, default -4:4)")(
      "plot", po::bool_switch(), "also draw the landscape (OUT with the extension .png)")(
      "overwrite", po::bool_switch(), "replace an existing output file");
  add_grid_options(o);
}

int landscape_run(const po::variables_map& vm) {
  const bool plane = vm.count("model-c") != 0;
  std::vector<std::string> dirs = {vm["model"].as<std::string>(), vm["model-b"].as<std::string>()};
  if (plane) dirs.push_back(vm["model-c"].as<std::string>());
  const auto data = vm["data"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const int64_t batch_size = vm["batch-size"].as<int64_t>();
  if (batch_size <= 0) fail("--batch-size must be positive, got {}", batch_size);
  if (vm["num-examples"].as<int64_t>() <= 0) fail("--num-examples must be positive");
  if (plane && !vm["points"].defaulted()) fail("--points sets a line; a plane (--model-c) takes --grid");
  if (!plane && !vm["grid"].defaulted()) fail("--grid sets a plane, which needs --model-c");
  const int64_t n = plane ? vm["grid"].as<int64_t>() : vm["points"].as<int64_t>();
  if (n <= 0) fail("--{} must be positive, got {}", plane ? "grid" : "points", n);
  const auto range_text = vm["range"].as<std::string>();
  const auto [lo, hi] = parse_range(range_text.empty() ? (plane ? "-4:4" : "0:1") : range_text);
  World& world = World::get();

  std::unique_ptr<H5Writer> out;
  if (world.rank() == 0) out = std::make_unique<H5Writer>(out_path, vm["overwrite"].as<bool>());
  JobModel job_model(dirs[0], grid_choice(vm));
  std::vector<std::unique_ptr<CheckpointReader>> others;
  for (size_t k = 1; k < dirs.size(); ++k) {
    others.push_back(std::make_unique<CheckpointReader>(dirs[k]));
    check_same_architecture(job_model.checkpoint(), *others.back());
  }
  const ModelConfig& cfg = job_model.config();
  auto seqs = read_token_lines(data, cfg.vocab_size, cfg.max_positions, job_model.tokenizer());
  const int64_t N = std::min<int64_t>(vm["num-examples"].as<int64_t>(), static_cast<int64_t>(seqs.size()));
  seqs.resize(static_cast<size_t>(N));
  int64_t targets = 0;
  for (const auto& s : seqs) targets += std::max<int64_t>(0, static_cast<int64_t>(s.size()) - 1);
  if (targets == 0) fail("{}: no example has two tokens or more, so there is no next token to score", data);

  const auto grid = job_model.grid();
  std::vector<const CheckpointReader*> ends;
  for (const auto& c : others) ends.push_back(c.get());
  LossLandscape landscape(job_model.model(), ends, job_model.choice().model);

  const auto axis = linspace(lo, hi, n);
  std::vector<std::vector<double>> points;
  for (double a : axis) {
    if (!plane)
      points.push_back({a});
    else
      for (double b : axis) points.push_back({a, b});
  }
  spdlog::info("landscape: {} of {} points over [{}, {}], {} examples ({} targets), {}", plane ? "plane" : "line",
               points.size(), lo, hi, N, targets, grid->describe());
  auto losses = landscape.evaluate(points, seqs, batch_size, cfg.pad_token_id);

  if (world.rank() == 0) {
    auto axis_t = torch::tensor(axis, torch::kFloat64);
    auto loss_t = torch::tensor(losses, torch::kFloat64);
    if (plane) {
      out->write("a", axis_t);
      out->write("b", axis_t);
      out->write("loss", loss_t.view({n, n}));
    } else {
      out->write("alpha", axis_t);
      out->write("loss", loss_t);
    }
    out->attribute("/", "kind", plane ? "plane" : "line");
    out->attribute("/", "models", nlohmann::json(dirs).dump());  // a JSON list
    out->attribute("/", "data", data);
    out->attribute("/", "num_examples", N);
    out->attribute("/", "num_targets", targets);
    out->attribute("/", "grid", grid->describe());
    out->attribute("/", "compute_dtype", vm["dtype"].as<std::string>());
    out->attribute("/", "tool_version", kVersion);
    out->commit();
    spdlog::info("wrote {}", out_path);
  }
  if (vm["plot"].as<bool>()) run_plot_script({out_path, "--out", plot_path(out_path)});  // rank 0 draws
  grid->world()->barrier();
  return 0;
}

}  // namespace crash
