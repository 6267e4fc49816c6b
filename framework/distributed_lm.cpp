#include "framework/distributed_lm.h"

#include <spdlog/spdlog.h>

#include <chrono>

#include "parallel/errors.h"
#include "parallel/log.h"

namespace crash {

void validate_model_grid(const ModelConfig& c, int world_size, const GridSizes& s, const std::vector<int64_t>& pp_layers) {
  validate_grid(world_size, s);
  if (c.num_heads % s.tp != 0)
    fail("tensor parallelism: {} attention heads do not split over --tp {}", c.num_heads, s.tp);
  if (c.num_kv_heads % s.tp != 0 && s.tp % c.num_kv_heads != 0)
    fail("tensor parallelism: {} key/value heads neither split over --tp {} nor replicate evenly (tp must divide or be "
         "a multiple of them)",
         c.num_kv_heads, s.tp);
  if (c.intermediate_size % s.tp != 0)
    fail("tensor parallelism: the MLP width {} does not split over --tp {}", c.intermediate_size, s.tp);
  split_layers(c.num_layers, s.pp, pp_layers);  // layers >= pp, explicit split adds up
}

torch::Tensor causal_targets(const torch::Tensor& ids, const torch::Tensor& mask, int64_t ignore_index) {
  auto targets = torch::full_like(ids, ignore_index);
  const int64_t T = ids.size(1);
  if (T < 2) return targets;
  auto valid = (mask.narrow(1, 1, T - 1) != 0).logical_and(mask.narrow(1, 0, T - 1) != 0);
  targets.narrow(1, 0, T - 1).copy_(ids.narrow(1, 1, T - 1).masked_fill(valid.logical_not(), ignore_index));
  return targets;
}

DistributedLM::DistributedLM(const CheckpointReader& ckpt, std::shared_ptr<ProcessGrid> grid,
                             const DistributedOptions& options)
    : grid_(std::move(grid)) {
  const ModelConfig& c = ckpt.config();
  GridSizes sizes{grid_->tp(), grid_->pp()};
  validate_model_grid(c, grid_->world_size(), sizes, options.pp_layers);
  auto stages = split_layers(c.num_layers, grid_->pp(), options.pp_layers);
  auto [first, end] = stages[static_cast<size_t>(grid_->pp_rank())];
  const auto t0 = std::chrono::steady_clock::now();
  stage_ = load_model(ckpt, ModelShard{first, end, grid_->tp_group()}, options.dtype);
  stage_->to(device());
  spdlog::info("stage {} (layers {}-{}), tp rank {}: loaded in {:.1f} s, peak RSS {:.2f} GiB", grid_->pp_rank(), first,
               end - 1, grid_->tp_rank(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
               peak_rss_bytes() / double(1 << 30));
  stage_->train();

  // Key/value heads replicated over `group` TP ranks: their gradients are summed in that group.
  // Every rank takes part in the split, as MPI requires.
  const int group = c.num_kv_heads % grid_->tp() == 0 ? 1 : grid_->tp() / static_cast<int>(c.num_kv_heads);
  if (group > 1) {
    const int color = (grid_->dp_rank() * grid_->pp() + grid_->pp_rank()) * grid_->tp() + grid_->tp_rank() / group;
    kv_group_ = grid_->split(color, grid_->tp_rank());
    auto slices = stage_->parameter_slices();
    for (const auto& item : stage_->named_parameters())
      if (slices.count(item.key()) && slices.at(item.key()).group > 1) kv_replicated_.push_back(item.value());
  }
  // A tied embedding lives on the first stage and, as lm_head, on the last: their gradients add.
  if (c.tie_word_embeddings && grid_->pp() > 1) {
    const bool member = grid_->first_stage() || grid_->last_stage();
    embedding_group_ = grid_->split(member ? grid_->dp_rank() * grid_->tp() + grid_->tp_rank() : -1, grid_->pp_rank());
    for (const auto& item : stage_->named_parameters())
      if (item.key() == "lm_head.weight" || item.key().find("embed_tokens.weight") != std::string::npos)
        tied_embedding_ = item.value();
  }
}

torch::Device DistributedLM::device() const {
  // With NCCL each rank drives the GPU of its node-local rank.
  return grid_->backend() == "nccl" ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(grid_->local_rank()))
                                    : torch::Device(torch::kCPU);
}

namespace {

struct MicroBatches {
  std::vector<torch::Tensor> ids, mask, positions;
  MicroBatches(const CausalLM& model, const torch::Tensor& ids_all, const torch::Tensor& mask_all, int n) {
    if (n < 1 || ids_all.size(0) % n != 0)
      fail("{} rows do not split into {} micro-batches", ids_all.size(0), n);
    ids = ids_all.to(model.parameters().front().device()).chunk(n, 0);
    mask = mask_all.to(model.parameters().front().device()).chunk(n, 0);
    for (int m = 0; m < n; ++m) positions.push_back(model.default_positions(mask[m], ids[m].size(1)));
  }
};

// The embedding, the stage's layers and the activation buffers, shared by inference and
// training; `on_hidden` (if set) sees each hidden state the stage makes (HF index, tensor).
StageStep stage_step(CausalLM& m, const MicroBatches& mb, torch::Device device,
                     std::function<void(int64_t, const torch::Tensor&)> on_hidden) {
  StageStep step;
  const auto dtype = m.parameters().front().scalar_type();
  step.input = [&m, &mb, on_hidden](int i) {
    auto h = m.embed(mb.ids[i], mb.positions[i]);
    if (on_hidden) on_hidden(0, h);
    return h;
  };
  step.empty_activation = [&m, &mb, dtype, device](int i) {
    return torch::empty({mb.ids[i].size(0), mb.ids[i].size(1), m.config().hidden_size},
                        torch::TensorOptions().dtype(dtype).device(device));
  };
  step.run = [&m, &mb, on_hidden](const torch::Tensor& x, int i) {
    auto ctx = m.attention_context(mb.mask[i], mb.positions[i]);
    auto h = x;
    for (int64_t l = m.first_layer(); l < m.end_layer(); ++l) {
      h = m.run_layer(l, h, ctx, nullptr);
      // The last layer's output is reported after the final norm, as HF does.
      if (on_hidden && l + 1 < m.config().num_layers) on_hidden(l + 1, h);
    }
    return h;
  };
  return step;
}

}  // namespace

DistributedLM::Output DistributedLM::forward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                                             bool want_hidden, bool want_logits) {
  torch::InferenceMode guard;
  CausalLM& m = *stage_;
  MicroBatches mb(m, ids, mask, micro_batches);
  std::vector<torch::Tensor> logits;
  std::map<int64_t, std::vector<torch::Tensor>> hidden;
  const int64_t L = m.config().num_layers;
  std::function<void(int64_t, const torch::Tensor&)> keep;
  if (want_hidden) keep = [&hidden](int64_t l, const torch::Tensor& h) { hidden[l].push_back(h); };
  StageStep step = stage_step(m, mb, device(), keep);
  step.output = [&](const torch::Tensor& y, int) {
    auto h = m.finish(y);
    if (want_hidden) hidden[L].push_back(h);
    if (want_logits) logits.push_back(m.head(h));
  };
  run_forward(grid_->pp_group(), micro_batches, step);
  Output out;
  if (!logits.empty()) out.logits = torch::cat(logits, 0).cpu();
  for (auto& [l, parts] : hidden) out.hidden[l] = torch::cat(parts, 0).cpu();
  return out;
}

double DistributedLM::forward_backward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                                       bool sync) {
  CausalLM& m = *stage_;
  MicroBatches mb(m, ids, mask, micro_batches);
  // The loss is a mean over every target token of the global batch, whatever the grid.
  auto count = (causal_targets(ids, mask) != -100).sum().to(torch::kFloat64).reshape({1}).to(device());
  grid_->dp_group()->allreduce(count);
  const double total = std::max(1.0, count.item<double>());
  StageStep step = stage_step(m, mb, device(), nullptr);
  step.loss = [&](const torch::Tensor& y, int i) {
    auto local = m.head_local(m.finish(y));
    auto targets = causal_targets(mb.ids[i], mb.mask[i]);
    auto losses = vocab_parallel_cross_entropy(local.reshape({-1, local.size(-1)}), targets.reshape({-1}),
                                               m.vocab_start(), m.config().vocab_size, m.tp());
    return losses.sum() / total;
  };
  double loss = run_1f1b(grid_->pp_group(), micro_batches, step);
  if (sync) sync_gradients();
  // Every rank reports the global loss: summed over DP on the last stage, sent down the pipeline.
  auto value = torch::full({1}, loss, torch::TensorOptions().dtype(torch::kFloat64).device(device()));
  grid_->dp_group()->allreduce(value);
  grid_->pp_group()->broadcast(value, grid_->pp() - 1);
  return value.item<double>();
}

void DistributedLM::sync_gradients() {
  auto grad_of = [](const torch::Tensor& p) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    return p.grad();
  };
  if (kv_group_)
    for (auto& p : kv_replicated_) {
      auto g = grad_of(p);
      kv_group_->allreduce(g);
    }
  if (embedding_group_ && tied_embedding_.defined()) {
    auto g = grad_of(tied_embedding_);
    embedding_group_->allreduce(g);
  }
  if (grid_->dp() == 1) return;
  // Buckets of about 25 MB: one allreduce each instead of one per parameter.
  constexpr int64_t kBucketBytes = 25 << 20;
  std::vector<torch::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<torch::Tensor> flat;
    for (auto& g : bucket) flat.push_back(g.reshape({-1}));
    auto joined = torch::cat(flat);
    grid_->dp_group()->allreduce(joined);
    int64_t offset = 0;
    for (auto& g : bucket) {
      g.copy_(joined.narrow(0, offset, g.numel()).view_as(g));
      offset += g.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (auto& p : stage_->parameters()) {
    auto g = grad_of(p);
    if (!bucket.empty() && g.scalar_type() != bucket.front().scalar_type()) flush();
    bucket.push_back(g);
    bytes += g.numel() * g.element_size();
    if (bytes >= kBucketBytes) flush();
  }
  flush();
}

}  // namespace crash
