// forward: run a model on token ids; write logits and every hidden state to HDF5.
// Runs on any DP x PP x TP grid; rank 0 collects the results and writes the file.
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>

#include "analysis/hdf5.h"
#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/gather_outputs.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/log.h"
#include "parallel/world.h"

namespace crash {

void forward_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "input", po::value<std::string>()->required(),
      "JSON Lines, one {\"tokens\": [...]} or {\"text\": ...} (with the model's tokenizer.json) per line")(
      "out", po::value<std::string>()->required(), "output HDF5 file")(
      "batch-size", po::value<int64_t>()->default_value(8), "sequences per forward pass (per data-parallel rank)")(
      "micro-batches", po::value<int>()->default_value(1), "pipeline micro-batches per batch")(
      "padding", po::value<std::string>()->default_value("right"), "pad batches on the 'left' or the 'right'")(
      "no-hidden-states", po::bool_switch(), "write logits only")("overwrite", po::bool_switch(),
                                                                  "replace an existing output file");
  add_grid_options(o);
}

int forward_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const auto padding = vm["padding"].as<std::string>();
  const bool left = padding_left(vm);
  const int64_t batch_size = vm["batch-size"].as<int64_t>();
  const int micro = vm["micro-batches"].as<int>();
  if (batch_size <= 0) fail("--batch-size must be positive, got {}", batch_size);
  if (micro <= 0 || batch_size % micro != 0) fail("--micro-batches {} must divide --batch-size {}", micro, batch_size);
  const bool hidden = !vm["no-hidden-states"].as<bool>();
  World& world = World::get();

  // Everything a user can get wrong is checked before any weight is read.
  std::unique_ptr<H5Writer> out;
  if (world.rank() == 0) out = std::make_unique<H5Writer>(out_path, vm["overwrite"].as<bool>());
  JobModel job_model(model_dir, grid_choice(vm));
  const ModelConfig& cfg = job_model.config();
  const DistributedOptions& options = job_model.choice().model;
  auto seqs = read_token_lines(vm["input"].as<std::string>(), cfg.vocab_size, cfg.max_positions, job_model.tokenizer());

  const auto grid = job_model.grid();
  DistributedLM& model = job_model.model();
  spdlog::info("{}: {} {} layers, {} parameters; {} sequences on {}", model_dir, cfg.model_type, cfg.num_layers,
               cfg.parameter_count(), seqs.size(), grid->describe());
  if (const char* f = std::getenv("CRASH_TEST_FAIL_RANK"); f && std::atoi(f) == world.rank())
    throw std::runtime_error("failure injected by CRASH_TEST_FAIL_RANK");

  // Each DP rank takes a contiguous share of the sequences, all padded to the longest one.
  int64_t longest = 0;
  for (const auto& s : seqs) longest = std::max<int64_t>(longest, static_cast<int64_t>(s.size()));
  const int64_t N = static_cast<int64_t>(seqs.size());
  const auto local = forward_share(model, seqs, longest, batch_size, micro, left, hidden);
  const auto all = gather_outputs(model, options.pp_layers, local, N, longest, hidden);
  const CommPtr& comm = grid->world();
  if (world.rank() == 0) {
    auto ids_all = pad_batch(seqs, 0, seqs.size(), cfg.pad_token_id, left, longest);
    out->write("input_ids", ids_all.ids);
    out->write("attention_mask", ids_all.mask);
    out->write("logits", all.logits);
    for (size_t l = 0; l < all.hidden.size(); ++l) out->write(fmt::format("hidden_states/{}", l), all.hidden[l]);
    out->attribute("/", "model", model_dir);
    out->attribute("/", "model_type", cfg.model_type);
    out->attribute("/", "dtype", vm["dtype"].as<std::string>());
    out->attribute("/", "padding", padding);
    out->attribute("/", "grid", grid->describe());
    out->attribute("/", "num_examples", N);
    out->attribute("/", "num_hidden_states", static_cast<int64_t>(all.hidden.size()));
    out->attribute("/", "tool_version", kVersion);
    out->commit();
    spdlog::info("wrote {}", out_path);
  }
  comm->barrier();
  spdlog::info("peak RSS {:.2f} GiB", peak_rss_bytes() / double(1 << 30));
  return 0;
}

}  // namespace crash
