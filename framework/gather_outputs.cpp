#include "framework/gather_outputs.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "framework/token_input.h"
#include "parallel/pipeline.h"
#include "parallel/tags.h"

namespace crash {

std::pair<int64_t, int64_t> dp_share(int64_t n, int64_t dp, int64_t d) { return {n * d / dp, n * (d + 1) / dp}; }

int hidden_state_stage(const std::vector<std::pair<int64_t, int64_t>>& stages, int64_t l) {
  const int pp = static_cast<int>(stages.size());
  for (int s = 0; s < pp; ++s)
    if (l == 0 ? stages[s].first == 0 : (l - 1 >= stages[s].first && l - 1 < stages[s].second)) return s;
  return pp - 1;
}

ShareOutputs forward_share(DistributedLM& model, const std::vector<std::vector<int64_t>>& seqs, int64_t length,
                           int64_t batch_size, int micro_batches, bool left, bool hidden_states) {
  const ProcessGrid& grid = model.grid();
  const auto [begin, end] = dp_share(static_cast<int64_t>(seqs.size()), grid.dp(), grid.dp_rank());
  ShareOutputs out;
  for (int64_t b = begin; b < end; b += batch_size) {
    const int64_t e = std::min(end, b + batch_size);
    auto batch =
        pad_batch(seqs, static_cast<size_t>(b), static_cast<size_t>(e), model.config().pad_token_id, left, length);
    const int m = (e - b) % micro_batches == 0 ? micro_batches : 1;  // a short last batch goes in one piece
    auto result = model.forward(batch.ids, batch.mask, m, hidden_states);
    if (result.logits.defined()) out.logits.push_back(result.logits.to(torch::kFloat32));
    for (auto& [l, h] : result.hidden) out.hidden[l].push_back(h.to(torch::kFloat32));
    spdlog::info("forward: {}/{} sequences of this data-parallel share", e - begin, end - begin);
  }
  return out;
}

GatheredOutputs gather_outputs(const DistributedLM& model, const std::vector<int64_t>& pp_layers,
                               const ShareOutputs& local, int64_t num_sequences, int64_t length, bool hidden_states) {
  const ProcessGrid& grid = model.grid();
  const ModelConfig& cfg = model.config();
  const int64_t L = cfg.num_layers, N = num_sequences, dp = grid.dp();
  const auto stages = split_layers(L, grid.pp(), pp_layers);
  const CommPtr& comm = grid.world();
  const auto [begin, end] = dp_share(N, dp, grid.dp_rank());
  if (grid.tp_rank() == 0 && grid.rank() != 0 && begin < end) {
    if (grid.last_stage()) comm->send(torch::cat(local.logits), 0, tag(MpiTag::kGatherLogits, 0));
    for (auto& [l, parts] : local.hidden) comm->send(torch::cat(parts), 0, tag(MpiTag::kGatherHidden, l));
    comm->wait_sends();
  }
  GatheredOutputs out;
  if (grid.rank() != 0) return out;
  std::vector<torch::Tensor> logits;
  std::vector<std::vector<torch::Tensor>> states(hidden_states ? static_cast<size_t>(L + 1) : 0);
  for (int64_t d = 0; d < dp; ++d) {
    const auto [b, e] = dp_share(N, dp, d);
    if (b == e) continue;
    // Rank 0's own share is at hand; the others' come from the rank that made them.
    auto receive = [&](int stage, int message_tag, int64_t width, const std::vector<torch::Tensor>& own) {
      const int src = grid.rank_of(0, stage, static_cast<int>(d));
      if (src == 0) return torch::cat(own);
      auto t = torch::empty({e - b, length, width}, torch::kFloat32);
      comm->recv(t, src, message_tag);
      return t;
    };
    logits.push_back(receive(grid.pp() - 1, tag(MpiTag::kGatherLogits, 0), cfg.vocab_size, local.logits));
    for (int64_t l = 0; l <= L && hidden_states; ++l) {
      const int64_t width = l == L ? cfg.word_embed_proj_dim : cfg.hidden_size;
      static const std::vector<torch::Tensor> none;
      const auto own = local.hidden.find(l);
      const auto& parts = own == local.hidden.end() ? none : own->second;
      states[static_cast<size_t>(l)].push_back(
          receive(hidden_state_stage(stages, l), tag(MpiTag::kGatherHidden, l), width, parts));
    }
  }
  out.logits = torch::cat(logits);
  for (auto& parts : states) out.hidden.push_back(torch::cat(parts));
  return out;
}

}  // namespace crash
