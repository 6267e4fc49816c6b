// collect: every layer's hidden states on the first N examples, pooled per example, written
// collectively by all ranks into one HDF5 archive (analysis/archive.h). Resumable.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>

#include "analysis/archive.h"
#include "analysis/pooling.h"
#include "framework/token_input.h"
#include "framework/prepare.h"
#include "framework/distributed_lm.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

void collect_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "data", po::value<std::string>()->required(), "prepare's output folder, or JSON Lines with \"tokens\" (or \"text\", with the model's tokenizer.json)")(
      "out", po::value<std::string>()->required(), "output archive (.h5)")(
      "num-examples", po::value<int64_t>()->default_value(512), "first N examples")(
      "pooling", po::value<std::string>()->default_value("mean"), "mean, mean_weighted, last, max or none (all tokens)")(
      "store-dtype", po::value<std::string>()->default_value("float32"), "stored type: float32 or float16")(
      "block-size", po::value<int64_t>()->default_value(32), "examples per block (the unit of writes and of resume)")(
      "length-groups", po::value<int64_t>()->default_value(4),
      "forward passes per block, over examples sorted by length; each pass runs only its examples' own tokens "
      "(packed), so this sets pass size, not padding")(
      "micro-batches", po::value<int>()->default_value(1), "pipeline micro-batches per forward pass")(
      "padding", po::value<std::string>()->default_value("right"), "pad blocks on the 'left' or the 'right'")(
      "resume", po::bool_switch(), "finish an interrupted collection (OUT.partial)")(
      "overwrite", po::bool_switch(), "replace an existing output");
  add_grid_options(o);
}

namespace {

// The examples [first, first + n) sorted by length and cut into `groups` runs of near-equal
// size. Passes are packed (no padding reaches the model); a quarter of a 32-example block keeps
// the products' operands in cache (measured: 4 passes 37.7 s, 1 pass 42.6 s, 8 passes 40.7 s).
std::vector<std::vector<int64_t>> length_sorted_groups(const std::vector<std::vector<int64_t>>& seqs, int64_t first,
                                                       int64_t n, int64_t groups) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = first + i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return seqs[static_cast<size_t>(a)].size() < seqs[static_cast<size_t>(b)].size(); });
  groups = std::min(groups, n);
  std::vector<std::vector<int64_t>> out;
  for (int64_t g = 0, begin = 0; g < groups; ++g) {
    const int64_t end = (g + 1) * n / groups;
    out.emplace_back(order.begin() + begin, order.begin() + end);
    begin = end;
  }
  return out;
}

}  // namespace

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
  World& world = World::get();

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
  spec.text_attributes = {{"model", model_dir},          {"model_type", cfg.model_type}, {"data", data},
                          {"pooling", pooling},          {"padding", padding},           {"grid", grid->describe()},
                          {"compute_dtype", vm["dtype"].as<std::string>()},
                          {"tool_version", kVersion},    {"config", cfg.raw.dump()}};
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

  const int64_t blocks = spec.num_blocks(), dp = grid->dp();
  const int64_t rounds = (blocks + dp - 1) / dp;
  const int fail_after = std::getenv("CRASH_TEST_FAIL_AFTER_ROUNDS") ? std::atoi(std::getenv("CRASH_TEST_FAIL_AFTER_ROUNDS")) : -1;
  int64_t done_examples = 0, skipped = 0;
  for (int64_t b = 0; b < blocks; ++b)
    if (archive.blocks_done()[b]) skipped += std::min(block, N - b * block);
  if (skipped) spdlog::info("resuming: {} of {} examples already collected", skipped, N);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < rounds; ++r) {
    // Every rank agrees on what this round holds: block r * dp + dp_rank per DP replica.
    bool round_done = true;
    for (int64_t d = 0; d < dp; ++d)
      if (r * dp + d < blocks && !archive.blocks_done()[r * dp + d]) round_done = false;
    if (round_done) continue;
    const int64_t mine = r * dp + grid->dp_rank();
    std::vector<ActivationArchive::Piece> pieces;
    ActivationArchive::Ids ids;
    if (mine < blocks && !archive.blocks_done()[mine]) {
      const int64_t first = mine * block, n = std::min(block, N - first);
      // Per layer, each example's pooled row (or token rows) at its place in the block.
      std::map<int64_t, std::vector<torch::Tensor>> rows;
      for (const auto& group : length_sorted_groups(seqs, first, n, length_groups)) {
        std::vector<std::vector<int64_t>> group_seqs;
        std::vector<int64_t> lengths;
        for (int64_t i : group) {
          group_seqs.push_back(seqs[static_cast<size_t>(i)]);
          lengths.push_back(static_cast<int64_t>(group_seqs.back().size()));
        }
        const int64_t g = static_cast<int64_t>(group.size());
        auto batch = pad_batch(group_seqs, 0, group_seqs.size(), cfg.pad_token_id, left);
        // Packed: only the examples' own tokens go through the model, [N, d] per layer.
        auto result = model.forward(batch.ids, batch.mask, g % micro == 0 ? micro : 1, true, /*logits=*/false,
                                    /*packed=*/true);
        if (grid->tp_rank() != 0) continue;
        std::vector<int64_t> offsets{0};
        for (int64_t n_tokens : lengths) offsets.push_back(offsets.back() + n_tokens);
        for (auto& [l, h] : result.hidden) {
          auto values = spec.pooled ? pool_packed(h, offsets, pooling).split(1)
                                    : h.to(torch::kFloat32).split_with_sizes(lengths);
          auto& slots = rows[l];
          slots.resize(static_cast<size_t>(n));
          for (int64_t k = 0; k < g; ++k) slots[static_cast<size_t>(group[static_cast<size_t>(k)] - first)] = values[static_cast<size_t>(k)];
        }
      }
      if (grid->tp_rank() == 0) {
        for (auto& [l, slots] : rows) {
          ActivationArchive::Piece p;
          p.layer = l;
          p.row = spec.pooled ? first : spec.offsets[first];
          p.values = torch::cat(slots, 0);
          pieces.push_back(std::move(p));
        }
        if (grid->first_stage()) {
          ids.first = first;
          ids.block = mine;
          for (int64_t i = first; i < first + n; ++i) {
            ids.index.push_back(i);
            ids.hash.push_back(hashes[i]);
          }
        }
      }
    }
    archive.write_round(pieces, ids);
    if (fail_after >= 0 && r + 1 >= fail_after && world.rank() == world.size() - 1)
      throw std::runtime_error("failure injected by CRASH_TEST_FAIL_AFTER_ROUNDS");
    done_examples = 0;
    for (int64_t b = 0; b < blocks; ++b)
      if (archive.blocks_done()[b]) done_examples += std::min(block, N - b * block);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double rate = (done_examples - skipped) / std::max(secs, 1e-9);
    spdlog::info("collect: {}/{} examples, {:.1f} examples/s, {:.0f} s left", done_examples, N, rate,
                 rate > 0 ? (N - done_examples) / rate : 0.0);
  }
  archive.complete();
  spdlog::info("wrote {}", out_path);
  return 0;
}

}  // namespace crash
