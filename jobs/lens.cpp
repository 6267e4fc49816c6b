// lens: the logit lens of a model on the first N examples of a task (analysis/lens.h), on any
// DP x PP x TP grid; rank 0 writes the divergence matrices and per-layer figures to HDF5.
#include <spdlog/spdlog.h>

#include "analysis/hdf5.h"
#include "analysis/lens.h"
#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/progress.h"
#include "parallel/world.h"

namespace crash {

void lens_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "data", po::value<std::string>()->required(),
      "prepare's output folder, or JSON Lines with \"tokens\" (or \"text\", with the model's tokenizer.json)")(
      "out", po::value<std::string>()->required(), "output HDF5 file")(
      "num-examples", po::value<int64_t>()->default_value(128), "first N examples")(
      "batch-size", po::value<int64_t>()->default_value(8), "examples per forward pass (per data-parallel rank)")(
      "chunk-tokens", po::value<int64_t>()->default_value(0),
      "tokens whose distributions are held at once on the last stage (0: about 256 MiB worth)")(
      "plot", po::bool_switch(), "also draw the two matrices (OUT with the extension .png)")(
      "overwrite", po::bool_switch(), "replace an existing output file");
  add_grid_options(o);
}

int lens_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto data = vm["data"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const int64_t batch_size = vm["batch-size"].as<int64_t>();
  const int64_t chunk = vm["chunk-tokens"].as<int64_t>();
  if (batch_size <= 0) fail("--batch-size must be positive, got {}", batch_size);
  if (chunk < 0) fail("--chunk-tokens must be 0 or positive, got {}", chunk);
  if (vm["num-examples"].as<int64_t>() <= 0) fail("--num-examples must be positive");
  World& world = World::get();

  std::unique_ptr<H5Writer> out;
  if (world.rank() == 0) out = std::make_unique<H5Writer>(out_path, vm["overwrite"].as<bool>());
  JobModel job_model(model_dir, grid_choice(vm));
  const ModelConfig& cfg = job_model.config();
  auto seqs = read_token_lines(data, cfg.vocab_size, cfg.max_positions, job_model.tokenizer());
  if (seqs.empty()) fail("{}: no examples", data);
  const int64_t N = std::min<int64_t>(vm["num-examples"].as<int64_t>(), static_cast<int64_t>(seqs.size()));
  seqs.resize(static_cast<size_t>(N));

  const auto grid = job_model.grid();
  LogitLens lens(job_model.model(), job_model.choice().model.pp_layers, chunk);
  spdlog::info("lens: {} ({} layers) on {} examples of {}, {}", model_dir, cfg.num_layers, N, data, grid->describe());

  // Each DP replica takes a contiguous share of the examples.
  const int64_t dp = grid->dp(), begin = N * grid->dp_rank() / dp, end = N * (grid->dp_rank() + 1) / dp;
  Progress progress("lens (this data-parallel share)", end - begin, "examples");
  for (int64_t b = begin; b < end; b += batch_size) {
    const int64_t e = std::min(end, b + batch_size);
    auto batch = pad_batch(seqs, static_cast<size_t>(b), static_cast<size_t>(e), cfg.pad_token_id, /*left=*/false);
    lens.add(batch.ids, batch.mask);
    progress.update(e - begin);
  }
  progress.finish();
  LensResult r = lens.result();

  if (world.rank() == 0) {
    out->write("kl", r.kl);
    out->write("js", r.js);
    out->write("top1_agreement", r.top1_agreement);
    out->write("lens_loss", r.lens_loss);
    out->attribute("/", "model", model_dir);
    out->attribute("/", "model_type", cfg.model_type);
    out->attribute("/", "data", data);
    out->attribute("/", "num_examples", N);
    out->attribute("/", "num_tokens", r.num_tokens);
    out->attribute("/", "num_targets", r.num_targets);
    out->attribute("/", "units", "nats");
    out->attribute("/", "grid", grid->describe());
    out->attribute("/", "compute_dtype", vm["dtype"].as<std::string>());
    out->attribute("/", "tool_version", kVersion);
    out->commit();
    spdlog::info("wrote {}: {} tokens, lens loss {:.4f} (first hidden state) .. {:.4f} (last)", out_path, r.num_tokens,
                 r.lens_loss[0].item<double>(), r.lens_loss[cfg.num_layers].item<double>());
  }
  if (vm["plot"].as<bool>()) run_plot_script({out_path, "--out", plot_path(out_path)});  // rank 0 draws
  grid->world()->barrier();
  return 0;
}

}  // namespace crash
