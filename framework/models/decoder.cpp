#include "framework/models/decoder.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <limits>

#include "framework/checkpoint.h"
#include "framework/models/blocks.h"
#include "framework/models/family.h"
#include "framework/models/onednn.h"
#include "parallel/errors.h"

namespace crash {

CausalLM::CausalLM(ModelConfig config, ModelShard shard)
    : config_(std::move(config)),
      first_(shard.first_layer),
      end_(shard.end_layer < 0 ? config_.num_layers : shard.end_layer),
      tp_(shard.tp ? shard.tp : make_local_comm()),
      dtype_(shard.dtype) {
  if (first_ < 0 || first_ >= end_ || end_ > config_.num_layers)
    fail("model shard: layers [{}, {}) are not a non-empty range of the model's {} layers", first_, end_,
         config_.num_layers);
}

torch::Tensor CausalLM::generation_positions(const torch::Tensor& mask_all, int64_t new_tokens) const {
  auto pos = mask_all.to(torch::kInt64).cumsum(1) - 1;
  pos.masked_fill_(mask_all == 0, 1);
  return pos.narrow(1, mask_all.size(1) - new_tokens, new_tokens);
}

AttentionContext CausalLM::attention_context(const torch::Tensor& mask_all, const torch::Tensor& positions) const {
  const int64_t Tq = positions.size(1), Tk = mask_all.size(1), past = Tk - Tq;
  auto dev = mask_all.device();
  auto query_index = torch::arange(past, Tk, torch::TensorOptions().dtype(torch::kInt64).device(dev)).view({Tq, 1});
  auto key_index = torch::arange(0, Tk, torch::TensorOptions().dtype(torch::kInt64).device(dev)).view({1, Tk});
  auto keys = mask_all.view({-1, 1, 1, Tk}) != 0;
  auto additive = [&](const torch::Tensor& allowed) {
    return torch::zeros(allowed.sizes(), torch::TensorOptions().dtype(torch::kFloat32).device(dev))
        .masked_fill_(allowed.logical_not(), std::numeric_limits<float>::lowest());
  };
  AttentionContext ctx = base_context(positions);
  ctx.bias = additive((key_index <= query_index).view({1, 1, Tq, Tk}).logical_and(keys));
  // HF's sliding-window overlay on cache positions: key k is kept for query q while k > q - window.
  // A left-padded or packed row's real tokens are contiguous, so this counts real tokens.
  if (windowed(Tk, ctx)) {
    const int64_t w = config_.sliding_window;
    auto band = (key_index <= query_index).logical_and(key_index > query_index - w);
    ctx.window_bias = additive(band.view({1, 1, Tq, Tk}).logical_and(keys));
  }
  return ctx;
}

AttentionContext CausalLM::base_context(const torch::Tensor& positions) const {
  AttentionContext ctx;
  bool any = false;
  for (int64_t l = 0; l < config_.num_layers; ++l) any |= config_.slides(l);
  if (any)
    for (int64_t l = 0; l < config_.num_layers; ++l) ctx.sliding.push_back(config_.slides(l));
  ctx.scale = config_.attention_scale;
  ctx.softcap = config_.attention_softcap;
  auto dtype = parameters().empty() ? torch::kFloat32 : parameters().front().scalar_type();
  if (auto inv_freq = rotary_inv_freq(); inv_freq.defined())
    std::tie(ctx.cos, ctx.sin) = rotary_tables(inv_freq, positions, dtype);
  if (auto inv_freq = sliding_rotary_inv_freq(); inv_freq.defined() && any)
    std::tie(ctx.sliding_cos, ctx.sliding_sin) = rotary_tables(inv_freq, positions, dtype);
  return ctx;
}

bool CausalLM::windowed(int64_t keys, const AttentionContext& ctx) const {
  return !ctx.sliding.empty() && config_.sliding_window < keys;
}

TokenPacking TokenPacking::of(const torch::Tensor& mask) {
  TokenPacking p;
  auto m = mask.to(torch::kCPU).to(torch::kBool).contiguous();
  p.index = m.view({-1}).nonzero().squeeze(1).to(mask.device());
  auto lengths = m.sum(1).to(torch::kInt64).contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  p.row_offsets.assign(1, 0);
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    p.row_offsets.push_back(p.row_offsets.back() + len[b]);
    p.longest = std::max(p.longest, len[b]);
  }
  return p;
}

torch::Tensor TokenPacking::pack(const torch::Tensor& padded) const {
  auto flat = padded.flatten(0, 1);
  return flat.index_select(0, index.to(flat.device())).unsqueeze(0);
}

AttentionContext CausalLM::attention_context(const TokenPacking& packing, const torch::Tensor& positions) const {
  AttentionContext ctx = base_context(positions);
  const int64_t T = packing.longest;
  auto dev = positions.device();
  ctx.bias = torch::full({T, T}, std::numeric_limits<float>::lowest(),
                         torch::TensorOptions().dtype(torch::kFloat32).device(dev))
                 .triu_(1);
  // Every row narrows the same band: its tokens sit at offsets 0.. of it.
  if (windowed(T, ctx)) {
    auto far =
        torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool).device(dev)).tril_(-config_.sliding_window);
    ctx.window_bias = ctx.bias.masked_fill(far, std::numeric_limits<float>::lowest());
  }
  ctx.row_offsets = packing.row_offsets;
  return ctx;
}

ForwardOutput CausalLM::forward(const torch::Tensor& ids, const torch::Tensor& mask_in, bool want_hidden,
                                const torch::Tensor& positions_in) {
  if (!has_embedding() || !has_head())
    fail("CausalLM::forward needs the whole model; a pipeline stage runs its layers");
  auto mask = mask_in.defined() ? mask_in : torch::ones_like(ids);
  auto positions = positions_in.defined() ? positions_in : default_positions(mask, ids.size(1));
  ForwardOutput out;
  auto ctx = attention_context(mask, positions);
  auto h = embed(ids, positions);
  if (want_hidden) out.hidden_states.push_back(h);
  for (int64_t l = first_; l < end_; ++l) {
    h = run_layer(l, h, ctx, nullptr);
    if (want_hidden && l + 1 < end_) out.hidden_states.push_back(h);
  }
  h = finish(h);
  if (want_hidden) out.hidden_states.push_back(h);
  out.logits = head(h);
  return out;
}

torch::Tensor CausalLM::generate(const torch::Tensor& ids, const torch::Tensor& mask_in, int64_t max_new_tokens,
                                 int64_t eos_id, int64_t pad_id) {
  if (!has_embedding() || !has_head()) fail("CausalLM::generate needs the whole model");
  torch::InferenceMode guard;
  KVCache cache;
  cache.layers.resize(static_cast<size_t>(end_ - first_));
  cache.mask = mask_in.defined() ? mask_in.to(torch::kInt64) : torch::ones_like(ids);
  auto tokens = ids;
  auto step_ids = ids;
  auto finished = torch::zeros({ids.size(0)}, torch::TensorOptions().dtype(torch::kBool).device(ids.device()));
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    const int64_t n = step_ids.size(1);
    auto positions = generation_positions(cache.mask, n);
    auto ctx = attention_context(cache.mask, positions);
    auto h = embed(step_ids, positions);
    for (int64_t l = first_; l < end_; ++l) h = run_layer(l, h, ctx, &cache.layers[l - first_]);
    auto logits = head(finish(h.narrow(1, n - 1, 1))).squeeze(1);
    auto next = logits.argmax(-1);
    if (pad_id >= 0) next = torch::where(finished, torch::full_like(next, pad_id), next);
    if (eos_id >= 0) finished = finished.logical_or(next == eos_id);
    tokens = torch::cat({tokens, next.unsqueeze(1)}, 1);
    cache.mask = torch::cat({cache.mask, torch::ones({ids.size(0), 1}, cache.mask.options())}, 1);
    step_ids = next.unsqueeze(1);
    if (eos_id >= 0 && finished.all().item<bool>()) break;
  }
  return tokens;
}

int64_t CausalLM::local_vocab() const { return padded_vocab(config_.vocab_size, tp_->size()) / tp_->size(); }

torch::Tensor CausalLM::head(const torch::Tensor& h) {
  return gather_from_tp(head_local(h), tp_).narrow(-1, 0, config_.vocab_size);
}

std::map<std::string, ShardSlice> CausalLM::parameter_slices() const {
  std::map<std::string, ShardSlice> out;
  for (const auto& item : named_modules()) {
    auto* tpm = dynamic_cast<const TensorParallelModule*>(item.value().get());
    if (!tpm) continue;
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      auto slice = tpm->slice_of(p.key());
      if (slice) out[item.key().empty() ? p.key() : item.key() + "." + p.key()] = *slice;
    }
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> CausalLM::gather_tp_state(bool grads) const {
  auto slices = parameter_slices();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : named_parameters()) {
    torch::Tensor t = grads ? item.value().grad() : item.value();
    if (!t.defined()) t = torch::zeros_like(item.value());
    auto it = slices.find(item.key());
    out.emplace_back(item.key(), it == slices.end() ? t.detach().clone() : gather_shards(t.detach(), it->second, tp_));
  }
  return out;
}

void CausalLM::load(const CheckpointReader& ckpt) {
  torch::NoGradGuard no_grad;
  const std::string config_file = ckpt.dir() + "/config.json";
  const auto slices = parameter_slices();
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor param = item.value();
    std::string source = name;
    if (!ckpt.contains(source)) {
      // Older OPT checkpoints were saved from the base model, without the "model." prefix.
      if (name.rfind("model.", 0) == 0 && ckpt.contains(name.substr(6))) source = name.substr(6);
      // A last pipeline stage of a tied model holds its own copy of the embedding.
      else if (name == "lm_head.weight" && config_.tie_word_embeddings)
        source = config_.embedding_name();
    }
    if (!ckpt.contains(source))
      fail("{}: checkpoint has no tensor '{}', which {} requires", ckpt.dir(), name, config_file);
    const TensorInfo& info = ckpt.info(source);
    auto slice_it = slices.find(name);
    std::vector<int64_t> expected = param.sizes().vec();
    if (slice_it != slices.end()) expected[slice_it->second.dim] = slice_it->second.full;
    if (info.shape != expected)
      fail("{}: tensor '{}' has shape {} but {} implies {}", ckpt.file_of(source), source, fmt::join(info.shape, "x"),
           config_file, fmt::join(expected, "x"));
    if (!at::isFloatingType(scalar_type_of(info.dtype, ckpt.file_of(source))))
      fail("{}: tensor '{}' is {}, expected a floating-point type", ckpt.file_of(source), source, info.dtype);
    if (slice_it == slices.end()) {
      param.copy_(ckpt.view(source));
      ckpt.drop_pages(source);
      continue;
    }
    // Only this rank's rows or columns are read from the mapped file; padding rows stay zero.
    const ShardSlice& s = slice_it->second;
    const int64_t avail = std::max<int64_t>(0, std::min(s.length, s.full - s.start));
    if (avail > 0) param.narrow(s.dim, 0, avail).copy_(ckpt.view(source).narrow(s.dim, s.start, avail));
    if (avail < s.length) param.narrow(s.dim, avail, s.length - avail).zero_();
    ckpt.drop_pages(source);  // the copy is made: the mapped pages need not stay resident
  }
}

std::vector<std::pair<std::string, torch::Tensor>> CausalLM::hf_state() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& item : named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

namespace {

// The decoder layer a module name is under ("model.layers.3.mlp.up_proj" -> 3), or -1.
int64_t layer_of(const std::string& name) {
  const std::string key = "layers.";
  const auto at = name.find(key);
  if (at == std::string::npos) return -1;
  size_t end = 0;
  try {
    return std::stoll(name.substr(at + key.size()), &end);
  } catch (const std::exception&) {
    return -1;
  }
}

// SFSD: the Linears config.json names in "crash_sfsd_ranks" become two factors.
void apply_sfsd_ranks(CausalLM& model, const ModelConfig& config) {
  if (config.sfsd_ranks.empty()) return;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : model.named_modules()) modules[item.key()] = item.value();
  for (const auto& [name, rank] : config.sfsd_ranks) {
    auto it = modules.find(name);
    if (it == modules.end()) {
      const int64_t layer = layer_of(name);
      const bool elsewhere =
          layer >= 0 && layer < config.num_layers && (layer < model.first_layer() || layer >= model.end_layer());
      if (elsewhere) continue;  // another pipeline stage's layer
      fail("config.json: 'crash_sfsd_ranks' names '{}', which is not a module of this {} model", name,
           config.model_type);
    }
    if (auto* col = dynamic_cast<ColumnParallelLinearImpl*>(it->second.get())) {
      col->make_low_rank(rank);
    } else if (auto* row = dynamic_cast<RowParallelLinearImpl*>(it->second.get())) {
      row->make_low_rank(rank);
    } else {
      fail("config.json: 'crash_sfsd_ranks' names '{}', which is not a decoder Linear", name);
    }
  }
}

}  // namespace

std::shared_ptr<CausalLM> build_model(const ModelConfig& config, const ModelShard& shard) {
  install_onednn_kernels();
  if (!config.family) fail("build_model: the config names no model family (read it with ModelConfig::from_json)");
  auto model = config.family->build(config, shard);
  apply_sfsd_ranks(*model, config);
  return model;
}

std::shared_ptr<CausalLM> load_model(const CheckpointReader& checkpoint, const ModelShard& shard_in,
                                     torch::ScalarType dtype) {
  ModelShard shard = shard_in;
  shard.dtype = dtype;
  std::shared_ptr<CausalLM> model;
  {
    SkipParameterInit skip;  // load() overwrites every parameter or fails
    model = build_model(checkpoint.config(), shard);
  }
  model->to(dtype);  // small pieces built outside place()
  model->load(checkpoint);
  model->eval();
  return model;
}

}  // namespace crash
