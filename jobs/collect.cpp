// collect: every layer's hidden states on the first N examples, pooled per example, written
// collectively by all ranks into one HDF5 archive (analysis/archive.h). Resumable.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "analysis/archive.h"
#include "analysis/collection.h"
#include "analysis/pooling.h"
#include "framework/distributed_lm.h"
#include "framework/prepare.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/version.h"
#include "parallel/errors.h"

namespace crash {

void collect_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "data", po::value<std::string>()->required(),
      "prepare's output folder, or JSON Lines with \"tokens\" (or \"text\", with the model's tokenizer.json)")(
      "out", po::value<std::string>()->required(), "output archive (.h5)")(
      "num-examples", po::value<int64_t>()->default_value(512), "first N examples")(
      "pooling", po::value<std::string>()->default_value("mean"),
      "mean, mean_weighted, last, max or none (all tokens)")(
      "store-dtype", po::value<std::string>()->default_value("float32"), "stored type: float32 or float16")(
      "block-size", po::value<int64_t>()->default_value(32), "examples per block (the unit of writes and of resume)")(
      "length-groups", po::value<int64_t>()->default_value(4),
      "forward passes per block, over examples sorted by length; each pass runs only its examples' own tokens "
      "(packed), so this sets pass size, not padding")("micro-batches", po::value<int>()->default_value(1),
                                                       "pipeline micro-batches per forward pass")(
      "padding", po::value<std::string>()->default_value("right"), "pad blocks on the 'left' or the 'right'")(
      "resume", po::bool_switch(), "finish an interrupted collection (OUT.partial)")("overwrite", po::bool_switch(),
                                                                                     "replace an existing output");
  add_grid_options(o);
}

int collect_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto data = vm["data"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const auto pooling = vm["pooling"].as<std::string>();
  const auto store = vm["store-dtype"].as<std::string>();
  const int64_t block = vm["block-size"].as<int64_t>();
  const int micro = vm["micro-batches"].as<int>();
  const auto padding = vm["padding"].as<std::string>();
  const bool left = padding_left(vm);
  check_pooling(pooling);
  if (store != "float32" && store != "float16") fail("--store-dtype: expected float32 or float16, got '{}'", store);
  if (block <= 0) fail("--block-size must be positive, got {}", block);
  if (micro <= 0) fail("--micro-batches must be positive, got {}", micro);
  const int64_t length_groups = vm["length-groups"].as<int64_t>();
  if (length_groups <= 0) fail("--length-groups must be positive, got {}", length_groups);
  if (vm["num-examples"].as<int64_t>() <= 0) fail("--num-examples must be positive");

  JobModel job_model(model_dir, grid_choice(vm));
  const ModelConfig& cfg = job_model.config();
  auto seqs = read_token_lines(data, cfg.vocab_size, cfg.max_positions, job_model.tokenizer());
  const int64_t N = std::min<int64_t>(vm["num-examples"].as<int64_t>(), static_cast<int64_t>(seqs.size()));
  seqs.resize(static_cast<size_t>(N));

  const auto grid = job_model.grid();
  ArchiveSpec spec;
  spec.num_examples = N;
  spec.block_size = block;
  spec.dtype = store;
  spec.pooled = pooling != "none";
  for (int64_t l = 0; l <= cfg.num_layers; ++l)
    spec.widths.push_back(l == cfg.num_layers ? cfg.word_embed_proj_dim : cfg.hidden_size);
  if (!spec.pooled) {
    spec.offsets = {0};
    for (const auto& s : seqs) spec.offsets.push_back(spec.offsets.back() + static_cast<int64_t>(s.size()));
  }
  spec.text_attributes = {{"model", model_dir},
                          {"model_type", cfg.model_type},
                          {"data", data},
                          {"pooling", pooling},
                          {"padding", padding},
                          {"grid", grid->describe()},
                          {"compute_dtype", vm["dtype"].as<std::string>()},
                          {"tool_version", kVersion},
                          {"config", cfg.raw.dump()}};
  if (std::filesystem::is_directory(data)) {
    auto manifest = read_manifest(data);
    spec.text_attributes["task"] = manifest.value("task", "");
    spec.text_attributes["tokenizer"] = manifest.value("tokenizer", "");
  }
  std::vector<uint64_t> hashes;
  for (const auto& s : seqs) hashes.push_back(token_hash(s));
  ActivationArchive archive(out_path, spec, grid->world(), vm["resume"].as<bool>(), vm["overwrite"].as<bool>());
  archive.check_hashes(hashes);

  DistributedLM& model = job_model.model();

  CollectSettings settings;
  settings.length_groups = length_groups;
  settings.micro_batches = micro;
  settings.pooling = pooling;
  settings.pad_left = left;
  if (const char* f = std::getenv("CRASH_TEST_FAIL_AFTER_ROUNDS")) settings.fail_after_rounds = std::atoi(f);
  collect_activations(model, archive, spec, seqs, settings);
  archive.complete();
  spdlog::info("wrote {}", out_path);
  return 0;
}

}  // namespace crash
