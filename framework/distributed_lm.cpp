#include "framework/distributed_lm.h"

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>

#include "framework/atomic_file.h"
#include "framework/models/family.h"
#include "parallel/errors.h"
#include "parallel/log.h"

namespace crash {

void validate_model_grid(const ModelConfig& c, const GridLayout& s, const std::vector<int64_t>& pp_layers) {
  if (c.num_heads % s.tp() != 0)
    fail("tensor parallelism: {} attention heads do not split over --tp {}", c.num_heads, s.tp());
  if (c.num_kv_heads % s.tp() != 0 && s.tp() % c.num_kv_heads != 0)
    fail(
        "tensor parallelism: {} key/value heads neither split over --tp {} nor replicate evenly (tp must divide or be "
        "a multiple of them)",
        c.num_kv_heads, s.tp());
  if (c.intermediate_size % s.tp() != 0)
    fail("tensor parallelism: the MLP width {} does not split over --tp {}", c.intermediate_size, s.tp());
  split_layers(c.num_layers, s.pp(), pp_layers);  // layers >= pp, explicit split adds up
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
    : grid_(std::move(grid)), source_dir_(ckpt.dir()) {
  const ModelConfig& c = ckpt.config();
  validate_model_grid(c, grid_->layout(), options.pp_layers);
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
  // Every rank takes part in making the groups, as MPI requires.
  const int group = c.num_kv_heads % grid_->tp() == 0 ? 1 : grid_->tp() / static_cast<int>(c.num_kv_heads);
  if (group > 1) {
    kv_group_ = grid_->tp_block_group(group);
    auto slices = stage_->parameter_slices();
    for (const auto& item : stage_->named_parameters())
      if (slices.count(item.key()) && slices.at(item.key()).group > 1) kv_replicated_.push_back(item.value());
  }
  // A tied embedding lives on the first stage and, as lm_head, on the last: their gradients add.
  if (c.tie_word_embeddings && grid_->pp() > 1) {
    embedding_group_ = grid_->embedding_group();
    for (const auto& item : stage_->named_parameters())
      if (item.key() == "lm_head.weight" || item.key() == c.embedding_name()) tied_embedding_ = item.value();
  }
}

torch::Device DistributedLM::device() const {
  // With NCCL each rank drives the GPU of its node-local rank.
  return grid_->backend() == "nccl" ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(grid_->local_rank()))
                                    : torch::Device(torch::kCPU);
}

namespace {

struct MicroBatches {
  std::vector<torch::Tensor> ids, mask, positions;       // packed: ids and positions [1, N]
  std::vector<TokenPacking> packing;                     // packed passes only
  std::vector<std::shared_ptr<DropoutContext>> dropout;  // training passes with dropout only
  Recompute recompute = Recompute::None;                 // training passes only
  MicroBatches(const CausalLM& model, const torch::Tensor& ids_all, const torch::Tensor& mask_all, int n,
               bool packed = false) {
    if (n < 1 || ids_all.size(0) % n != 0) fail("{} rows do not split into {} micro-batches", ids_all.size(0), n);
    ids = ids_all.to(model.parameters().front().device()).chunk(n, 0);
    mask = mask_all.to(model.parameters().front().device()).chunk(n, 0);
    for (int m = 0; m < n; ++m) positions.push_back(model.default_positions(mask[m], ids[m].size(1)));
    if (!packed) return;
    for (int m = 0; m < n; ++m) {
      packing.push_back(TokenPacking::of(mask[m]));
      ids[m] = packing.back().pack(ids[m].unsqueeze(-1)).squeeze(-1);
      positions[m] = packing.back().pack(positions[m].unsqueeze(-1)).squeeze(-1);
    }
  }
  AttentionContext context(const CausalLM& m, int i) const {
    auto ctx =
        packing.empty() ? m.attention_context(mask[i], positions[i]) : m.attention_context(packing[i], positions[i]);
    if (!dropout.empty()) ctx.dropout = dropout[static_cast<size_t>(i)];
    ctx.recompute_attention = recompute == Recompute::Selective;
    return ctx;
  }
};

// The embedding, the stage's layers and the activation buffers, shared by inference and
// training; `on_hidden` (if set) sees each hidden state the stage makes (HF index, tensor).
StageStep stage_step(CausalLM& m, const MicroBatches& mb, torch::Device device,
                     std::function<void(int64_t, const torch::Tensor&)> on_hidden, bool force_graph = false) {
  StageStep step;
  const auto dtype = m.parameters().front().scalar_type();
  step.input = [&m, &mb, on_hidden, force_graph](int i) {
    auto h = m.embed(mb.ids[i], mb.positions[i]);
    if (on_hidden) on_hidden(0, h);
    // A first stage whose parameters are all frozen makes no graph, but the schedule's
    // backward needs one.
    if (force_graph && !h.requires_grad()) h.requires_grad_(true);
    return h;
  };
  step.empty_activation = [&m, &mb, dtype, device](int i) {
    return torch::empty({mb.ids[i].size(0), mb.ids[i].size(1), m.config().hidden_size},
                        torch::TensorOptions().dtype(dtype).device(device));
  };
  step.run = [&m, &mb, on_hidden](const torch::Tensor& x, int i) {
    auto ctx = mb.context(m, i);
    std::shared_ptr<const AttentionContext> held;
    auto h = x;
    for (int64_t l = m.first_layer(); l < m.end_layer(); ++l) {
      if (mb.recompute == Recompute::Full && torch::GradMode::is_enabled()) {
        // The closure outlives this call (backward runs it again): it holds the context.
        if (!held) held = std::make_shared<const AttentionContext>(ctx);
        h = recomputed(
            [&m, l, held](const std::vector<torch::Tensor>& x) { return m.run_layer(l, x[0], *held, nullptr); }, {h});
      } else {
        h = m.run_layer(l, h, ctx, nullptr);
      }
      // The last layer's output is reported after the final norm, as HF does.
      if (on_hidden && l + 1 < m.config().num_layers) on_hidden(l + 1, h);
    }
    return h;
  };
  return step;
}

}  // namespace

DistributedLM::Output DistributedLM::forward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                                             bool want_hidden, bool want_logits, bool packed, bool vocab_parallel) {
  torch::InferenceMode guard;
  CausalLM& m = *stage_;
  MicroBatches mb(m, ids, mask, micro_batches, packed);
  std::vector<torch::Tensor> logits;
  std::map<int64_t, std::vector<torch::Tensor>> hidden;
  const int64_t L = m.config().num_layers;
  std::function<void(int64_t, const torch::Tensor&)> keep;
  if (want_hidden) keep = [&hidden](int64_t l, const torch::Tensor& h) { hidden[l].push_back(h); };
  StageStep step = stage_step(m, mb, device(), keep);
  step.output = [&](const torch::Tensor& y, int) {
    auto h = m.finish(y);
    if (want_hidden) hidden[L].push_back(h);
    if (want_logits) logits.push_back(vocab_parallel ? m.head_local(h) : m.head(h));
  };
  run_forward(grid_->pp_group(), micro_batches, step);
  Output out;
  // One micro-batch: no copy of the [B, T, V] logits.
  // Packed micro-batches [1, N_i, ..] join along the tokens into [N, ..].
  const int64_t dim = packed ? 1 : 0;
  auto join = [&](const std::vector<torch::Tensor>& parts) {
    auto t = parts.size() == 1 ? parts.front() : torch::cat(parts, dim);
    return (packed ? t.squeeze(0) : t).cpu();
  };
  if (!logits.empty()) out.logits = join(logits);
  for (auto& [l, parts] : hidden) out.hidden[l] = join(parts);
  return out;
}

torch::Tensor DistributedLM::token_logprobs(const torch::Tensor& ids, const torch::Tensor& mask,
                                            const torch::Tensor& targets, int micro_batches, int64_t ignore_index) {
  torch::InferenceMode guard;
  CausalLM& m = *stage_;
  MicroBatches mb(m, ids, mask, micro_batches);
  auto target_parts = targets.to(device()).chunk(micro_batches, 0);
  auto out = torch::zeros(ids.sizes(), torch::TensorOptions().dtype(torch::kFloat64).device(device()));
  auto out_parts = out.chunk(micro_batches, 0);
  StageStep step = stage_step(m, mb, device(), nullptr);
  step.output = [&](const torch::Tensor& y, int i) {
    auto local = m.head_local(m.finish(y)).to(torch::kFloat32);
    auto t = target_parts[static_cast<size_t>(i)];
    auto nll = vocab_parallel_cross_entropy(local.reshape({-1, local.size(-1)}), t.reshape({-1}), m.vocab_start(),
                                            m.config().vocab_size, m.tp(), ignore_index);
    out_parts[static_cast<size_t>(i)].copy_(nll.neg().reshape(t.sizes()));
  };
  run_forward(grid_->pp_group(), micro_batches, step);
  grid_->pp_group()->broadcast(out, grid_->pp() - 1);
  return out.cpu();
}

namespace {

// The targets of each micro-batch: the labels given, else next tokens without padding.
std::vector<torch::Tensor> micro_targets(const MicroBatches& mb, const torch::Tensor& labels, int micro_batches) {
  if (!labels.defined()) {
    std::vector<torch::Tensor> out;
    for (size_t i = 0; i < mb.ids.size(); ++i) out.push_back(causal_targets(mb.ids[i], mb.mask[i]));
    return out;
  }
  return labels.to(mb.ids.front().device()).chunk(micro_batches, 0);
}

}  // namespace

double DistributedLM::forward_backward(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                                       bool sync, const torch::Tensor& labels, double total_tokens,
                                       const Distillation* kd, const Dropout* dropout) {
  CausalLM& m = *stage_;
  if (labels.defined() && labels.sizes() != ids.sizes())
    fail("labels of shape {} do not match the batch's {}", fmt::join(labels.sizes(), "x"), fmt::join(ids.sizes(), "x"));
  MicroBatches mb(m, ids, mask, micro_batches);
  mb.recompute = recompute_;
  // Every training pass carries the masks' key: dropout inside a layer (LoRA's) may need it.
  if (dropout) {
    const int64_t rows = ids.size(0) / micro_batches;
    for (int i = 0; i < micro_batches; ++i) {
      auto d = DropoutContext::padded(mb.mask[static_cast<size_t>(i)], dropout->first_slot + i * rows);
      d->hidden = dropout->hidden;
      d->attention = dropout->attention;
      d->seed = dropout->seed;
      d->step = dropout->step;
      mb.dropout.push_back(std::move(d));
    }
  }
  auto targets = micro_targets(mb, labels, micro_batches);
  // The loss is a mean over every target token of the global batch, whatever the grid.
  double total = total_tokens;
  if (total <= 0) {
    auto count = ((labels.defined() ? labels : causal_targets(ids, mask)) != -100)
                     .sum()
                     .to(torch::kFloat64)
                     .reshape({1})
                     .to(device());
    grid_->dp_group()->allreduce(count);
    total = std::max(1.0, count.item<double>());
  }
  std::vector<torch::Tensor> teacher;
  if (kd && grid_->last_stage()) {
    if (!kd->teacher_logits.defined() || kd->teacher_logits.size(0) != ids.size(0) ||
        kd->teacher_logits.size(1) != ids.size(1) || kd->teacher_logits.size(2) != m.local_vocab())
      fail("knowledge distillation: the teacher's logits do not match the batch and this rank's vocabulary columns");
    teacher = kd->teacher_logits.to(device()).chunk(micro_batches, 0);
  }
  const auto params = m.parameters();
  const bool frozen =
      std::none_of(params.begin(), params.end(), [](const torch::Tensor& p) { return p.requires_grad(); });
  StageStep step = stage_step(m, mb, device(), nullptr, /*force_graph=*/frozen);
  step.loss = [&](const torch::Tensor& y, int i) {
    auto local = m.head_local(m.finish(y));
    auto& t = targets[static_cast<size_t>(i)];
    auto losses = vocab_parallel_cross_entropy(local.reshape({-1, local.size(-1)}), t.reshape({-1}), m.vocab_start(),
                                               m.config().vocab_size, m.tp());
    if (!kd) return losses.sum() / total;
    // The KL term over the vocabulary-parallel columns of both models (no gather), at target
    // positions only.
    const double T = kd->temperature;
    auto keep = (t.reshape({-1}) != -100).nonzero().squeeze(1);
    auto student = local.reshape({-1, local.size(-1)}).index_select(0, keep);
    auto teach = teacher[static_cast<size_t>(i)].reshape({-1, local.size(-1)}).index_select(0, keep);
    auto kl = vocab_parallel_kl_divergence(student, teach, T, m.vocab_start(), m.config().vocab_size, m.tp()).sum();
    return ((1 - kd->alpha) * losses.sum() + kd->alpha * T * T * kl) / total;
  };
  double loss = run_1f1b(grid_->pp_group(), micro_batches, step);
  if (sync) sync_gradients();
  // Every rank reports the global loss: summed over DP on the last stage, sent down the pipeline.
  auto value = torch::full({1}, loss, torch::TensorOptions().dtype(torch::kFloat64).device(device()));
  grid_->dp_group()->allreduce(value);
  grid_->pp_group()->broadcast(value, grid_->pp() - 1);
  return value.item<double>();
}

double DistributedLM::evaluate_loss(const torch::Tensor& ids, const torch::Tensor& mask, int micro_batches,
                                    const torch::Tensor& labels, double* tokens) {
  torch::NoGradGuard no_grad;
  CausalLM& m = *stage_;
  if (labels.defined() && labels.sizes() != ids.sizes())
    fail("labels of shape {} do not match the batch's {}", fmt::join(labels.sizes(), "x"), fmt::join(ids.sizes(), "x"));
  MicroBatches mb(m, ids, mask, micro_batches);
  auto targets = micro_targets(mb, labels, micro_batches);
  // [loss sum, target count], summed over DP on the last stage and sent down the pipeline.
  auto sums = torch::zeros({2}, torch::TensorOptions().dtype(torch::kFloat64).device(device()));
  for (auto& t : targets) sums[1] += (t != -100).sum().to(torch::kFloat64);
  StageStep step = stage_step(m, mb, device(), nullptr);
  step.output = [&](const torch::Tensor& y, int i) {
    auto local = m.head_local(m.finish(y));
    auto& t = targets[static_cast<size_t>(i)];
    auto losses = vocab_parallel_cross_entropy(local.reshape({-1, local.size(-1)}), t.reshape({-1}), m.vocab_start(),
                                               m.config().vocab_size, m.tp());
    sums[0] += losses.sum().to(torch::kFloat64);
  };
  run_forward(grid_->pp_group(), micro_batches, step);
  grid_->dp_group()->allreduce(sums);
  grid_->pp_group()->broadcast(sums, grid_->pp() - 1);
  const double count = sums[1].item<double>();
  if (tokens) *tokens = count;
  return sums[0].item<double>() / std::max(1.0, count);
}

void DistributedLM::sync_gradients() {
  auto grad_of = [this](const torch::Tensor& p) {
    if (gradient_source_) return gradient_source_(p);
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    return p.grad();
  };
  if (kv_group_)
    for (auto& p : kv_replicated_) {
      if (!p.requires_grad()) continue;
      auto g = grad_of(p);
      kv_group_->allreduce(g);
    }
  if (embedding_group_ && tied_embedding_.defined() && tied_embedding_.requires_grad()) {
    auto g = grad_of(tied_embedding_);
    embedding_group_->allreduce(g);
  }
  if (grid_->dp() == 1 || !dp_gradient_sum_) return;
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
    if (!p.requires_grad()) continue;
    auto g = grad_of(p);
    if (!bucket.empty() && g.scalar_type() != bucket.front().scalar_type()) flush();
    bucket.push_back(g);
    bytes += g.numel() * g.element_size();
    if (bytes >= kBucketBytes) flush();
  }
  flush();
}

void DistributedLM::set_trainable(const std::function<bool(const std::string& name)>& trains) {
  const ModelConfig& c = stage_->config();
  for (auto& item : stage_->named_parameters()) {
    const bool tied_head = item.key() == "lm_head.weight" && c.tie_word_embeddings;
    const bool on = trains(tied_head ? c.embedding_name() : item.key());
    item.value().requires_grad_(on);
    if (!on) item.value().mutable_grad() = torch::Tensor();
  }
}

std::vector<DistributedLM::TrainParam> DistributedLM::trainable() const {
  const ModelConfig& c = stage_->config();
  const auto slices = stage_->parameter_slices();
  std::vector<TrainParam> out;
  for (const auto& item : stage_->named_parameters()) {
    if (!item.value().requires_grad()) continue;
    TrainParam p{item.key(), item.value(), std::nullopt, true};
    auto it = slices.find(item.key());
    if (it != slices.end()) p.slice = it->second;
    // Each distinct value counts once in the norm: whole tensors on TP rank 0, replicated
    // key/value heads on the first rank of their group, a tied embedding on the first stage.
    const int tp = grid_->tp_rank();
    if (!p.slice)
      p.in_norm = tp == 0;
    else if (p.slice->group > 1)
      p.in_norm = tp % p.slice->group == 0;
    if (item.key() == "lm_head.weight" && c.tie_word_embeddings && !grid_->first_stage()) p.in_norm = false;
    out.push_back(std::move(p));
  }
  return out;
}

void DistributedLM::save_model(const std::string& dir) {
  namespace fs = std::filesystem;
  const ModelConfig& c = stage_->config();
  const CommPtr& world = grid_->world();
  StagedDir staged(dir, grid_->rank() == 0);
  const fs::path& tmp = staged.path();
  world->barrier();
  // What Hugging Face stores (tied and shared weights once), assembled across the TP group.
  std::set<std::string> stored;
  for (const auto& [name, t] : stage_->hf_state())
    if (!(name == "lm_head.weight" && c.tie_word_embeddings)) stored.insert(name);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [name, t] : stage_->gather_tp_state(false))  // collective over TP
    if (stored.count(name)) tensors.emplace_back(name, t.cpu());
  const int pp = grid_->pp();
  auto file_of = [pp](int stage) {
    return pp == 1 ? std::string("model.safetensors")
                   : fmt::format("model-{:05d}-of-{:05d}.safetensors", stage + 1, pp);
  };
  if (grid_->dp_rank() == 0 && grid_->tp_rank() == 0)
    write_safetensors((tmp / file_of(grid_->pp_rank())).string(), tensors, {{"format", "pt"}});
  world->barrier();
  if (grid_->rank() == 0) {
    if (pp > 1) {
      nlohmann::json weight_map = nlohmann::json::object();
      uint64_t total = 0;
      for (int s = 0; s < pp; ++s) {
        SafetensorsFile f((tmp / file_of(s)).string());
        for (const auto& [name, info] : f.tensors()) {
          weight_map[name] = file_of(s);
          total += info.end - info.begin;
        }
      }
      std::ofstream((tmp / "model.safetensors.index.json").string())
          << nlohmann::json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
    }
    std::ofstream out((tmp / "config.json").string());
    out << c.raw.dump(2) << "\n";
    out.close();
    if (!out) fail("{}: cannot write config.json", tmp.string());
    std::error_code ec;
    for (const auto& extra : hf_folder_paths(source_dir_, {"crash_plan.json"})) {
      const fs::path from = extra;
      if (fs::exists(from)) fs::copy_file(from, tmp / from.filename(), fs::copy_options::overwrite_existing, ec);
      if (ec) fail("{}: cannot copy into {} ({})", from.string(), tmp.string(), ec.message());
    }
    staged.commit();
  }
  world->barrier();
}

}  // namespace crash
