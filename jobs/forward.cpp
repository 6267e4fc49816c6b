// forward: run a model on token ids; write logits and every hidden state to HDF5.
// Runs on any DP x PP x TP grid; rank 0 collects the results and writes the file.
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>

#include "analysis/hdf5.h"
#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
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
      "no-hidden-states", po::bool_switch(), "write logits only")(
      "overwrite", po::bool_switch(), "replace an existing output file");
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
  const int64_t N = static_cast<int64_t>(seqs.size()), dp = grid->dp();
  auto share = [&](int64_t d) { return std::make_pair(N * d / dp, N * (d + 1) / dp); };
  auto [begin, end] = share(grid->dp_rank());
  std::vector<torch::Tensor> logits;
  std::map<int64_t, std::vector<torch::Tensor>> states;
  for (int64_t b = begin; b < end; b += batch_size) {
    const int64_t e = std::min(end, b + batch_size);
    auto batch = pad_batch(seqs, static_cast<size_t>(b), static_cast<size_t>(e), cfg.pad_token_id, left, longest);
    const int m = (e - b) % micro == 0 ? micro : 1;  // a short last batch goes in one piece
    auto result = model.forward(batch.ids, batch.mask, m, hidden);
    if (result.logits.defined()) logits.push_back(result.logits.to(torch::kFloat32));
    for (auto& [l, h] : result.hidden) states[l].push_back(h.to(torch::kFloat32));
    spdlog::info("forward: {}/{} sequences of this data-parallel share", e - begin, end - begin);
  }

  // Rank 0 gathers: logits from each DP share's last stage, hidden states from their stages.
  const int64_t L = cfg.num_layers;
  const auto stages = split_layers(L, grid->pp(), options.pp_layers);
  auto stage_of = [&](int64_t l) {  // hidden_states[l] is made by the stage that runs layer l - 1
    for (int s = 0; s < grid->pp(); ++s)
      if (l == 0 ? stages[s].first == 0 : (l - 1 >= stages[s].first && l - 1 < stages[s].second)) return s;
    return grid->pp() - 1;
  };
  const CommPtr& comm = grid->world();
  const int logits_tag = static_cast<int>(L + 1);
  if (grid->tp_rank() == 0 && grid->rank() != 0 && (begin < end)) {
    if (grid->last_stage()) comm->send(torch::cat(logits), 0, logits_tag);
    for (auto& [l, parts] : states) comm->send(torch::cat(parts), 0, static_cast<int>(l));
    comm->wait_sends();
  }
  if (world.rank() == 0) {
    auto ids_all = pad_batch(seqs, 0, seqs.size(), cfg.pad_token_id, left, longest);
    std::vector<torch::Tensor> all_logits;
    std::vector<std::vector<torch::Tensor>> all_states(hidden ? static_cast<size_t>(L + 1) : 0);
    for (int64_t d = 0; d < dp; ++d) {
      auto [b, e] = share(d);
      if (b == e) continue;
      auto receive = [&](int stage, int tag, int64_t width, std::vector<torch::Tensor>& local) {
        const int src = grid->rank_of(0, stage, static_cast<int>(d));
        if (src == 0) return torch::cat(local);
        auto t = torch::empty({e - b, longest, width}, torch::kFloat32);
        comm->recv(t, src, tag);
        return t;
      };
      all_logits.push_back(receive(grid->pp() - 1, logits_tag, cfg.vocab_size, logits));
      for (int64_t l = 0; l <= L && hidden; ++l) {
        const int64_t width = l == L ? cfg.word_embed_proj_dim : cfg.hidden_size;
        all_states[l].push_back(receive(stage_of(l), static_cast<int>(l), width, states[l]));
      }
    }
    out->write("input_ids", ids_all.ids);
    out->write("attention_mask", ids_all.mask);
    out->write("logits", torch::cat(all_logits));
    for (size_t l = 0; l < all_states.size(); ++l) out->write(fmt::format("hidden_states/{}", l), torch::cat(all_states[l]));
    out->attribute("/", "model", model_dir);
    out->attribute("/", "model_type", cfg.model_type);
    out->attribute("/", "dtype", vm["dtype"].as<std::string>());
    out->attribute("/", "padding", padding);
    out->attribute("/", "grid", grid->describe());
    out->attribute("/", "num_examples", N);
    out->attribute("/", "num_hidden_states", static_cast<int64_t>(all_states.size()));
    out->attribute("/", "tool_version", kVersion);
    out->commit();
    spdlog::info("wrote {}", out_path);
  }
  comm->barrier();
  spdlog::info("peak RSS {:.2f} GiB", peak_rss_bytes() / double(1 << 30));
  return 0;
}

}  // namespace crash
