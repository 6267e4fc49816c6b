#include "analysis/landscape.h"

#include <algorithm>
#include <map>

#include "framework/token_input.h"
#include "parallel/errors.h"
#include "parallel/progress.h"

namespace crash {

void check_same_architecture(const CheckpointReader& base, const CheckpointReader& other) {
  const ModelConfig &a = base.config(), &b = other.config();
  auto differ = [&](const char* field, const auto& x, const auto& y) {
    if (x != y)
      fail("{}: not the architecture of {}: config field {} is {} there and {} here", other.dir(), base.dir(), field, x,
           y);
  };
  differ("model_type", a.model_type, b.model_type);
  differ("vocab_size", a.vocab_size, b.vocab_size);
  differ("hidden_size", a.hidden_size, b.hidden_size);
  differ("intermediate_size", a.intermediate_size, b.intermediate_size);
  differ("num_hidden_layers", a.num_layers, b.num_layers);
  differ("num_attention_heads", a.num_heads, b.num_heads);
  differ("num_key_value_heads", a.num_kv_heads, b.num_kv_heads);
  differ("head_dim", a.head_dim, b.head_dim);
  differ("word_embed_proj_dim", a.word_embed_proj_dim, b.word_embed_proj_dim);
  differ("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
  differ("do_layer_norm_before", a.pre_norm, b.pre_norm);
  differ("final layer norm", a.final_norm, b.final_norm);
  differ("enable_bias", a.linear_bias, b.linear_bias);
  differ("layer_norm_elementwise_affine", a.norm_affine, b.norm_affine);
  differ("attention_bias", a.attention_bias, b.attention_bias);
  differ("mlp_bias", a.mlp_bias, b.mlp_bias);
}

std::vector<double> linspace(double lo, double hi, int64_t n) {
  std::vector<double> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(n == 1 ? lo : lo + (hi - lo) * static_cast<double>(i) / (n - 1));
  return out;
}

LossLandscape::LossLandscape(DistributedLM& model, const std::vector<const CheckpointReader*>& others,
                             const DistributedOptions& options)
    : model_(model) {
  torch::NoGradGuard no_grad;
  CausalLM& m = model.stage();
  const auto device = m.parameters().front().device();
  std::vector<std::string> names;
  for (const auto& item : m.named_parameters()) {
    names.push_back(item.key());
    params_.push_back(item.value());
    base_.push_back(item.value().detach().clone());
  }
  for (const CheckpointReader* ckpt : others) {
    // The same shard of another checkpoint: same stage, same TP slices, same names.
    auto stage = load_model(*ckpt, ModelShard{m.first_layer(), m.end_layer(), m.tp(), options.dtype}, options.dtype);
    std::map<std::string, torch::Tensor> loaded;
    for (const auto& item : stage->named_parameters()) loaded[item.key()] = item.value().detach();
    std::vector<torch::Tensor> tensors;
    for (size_t i = 0; i < names.size(); ++i) {
      auto it = loaded.find(names[i]);
      if (it == loaded.end() || !it->second.sizes().equals(params_[i].sizes()))
        fail("{}: parameter {} does not match the first model's", ckpt->dir(), names[i]);
      tensors.push_back(it->second.to(device));
    }
    others_.push_back(std::move(tensors));
  }
}

void LossLandscape::set_point(const std::vector<double>& coefs) {
  if (coefs.size() != others_.size())
    fail("landscape: {} coefficients for {} directions", coefs.size(), others_.size());
  torch::NoGradGuard no_grad;
  // Pieces of at most 16M elements, so the fp64 temporaries stay small next to the model.
  constexpr int64_t kPiece = 1 << 24;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto target = params_[i].view({-1});
    auto base = base_[i].view({-1});
    for (int64_t at = 0; at < target.numel(); at += kPiece) {
      const int64_t n = std::min(kPiece, target.numel() - at);
      auto b = base.narrow(0, at, n).to(torch::kFloat64);
      auto value = b.clone();
      for (size_t k = 0; k < others_.size(); ++k)
        value += coefs[k] * (others_[k][i].view({-1}).narrow(0, at, n).to(torch::kFloat64) - b);
      target.narrow(0, at, n).copy_(value);
    }
  }
}

std::pair<double, int64_t> LossLandscape::loss_sum(const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size,
                                                   int64_t pad_id) {
  double sum = 0;
  int64_t count = 0;
  for (size_t b = 0; b < seqs.size(); b += static_cast<size_t>(batch_size)) {
    const size_t e = std::min(seqs.size(), b + static_cast<size_t>(batch_size));
    auto batch = pad_batch(seqs, b, e, pad_id, /*left=*/false);
    auto targets = causal_targets(batch.ids, batch.mask);
    count += (targets != -100).sum().item<int64_t>();
    // Vocabulary-parallel log-probabilities of the targets (0 where ignored), on every rank.
    sum -= model_.token_logprobs(batch.ids, batch.mask, targets, 1).sum().item<double>();
  }
  return {sum, count};
}

std::vector<double> LossLandscape::evaluate(const std::vector<std::vector<double>>& points,
                                            const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size,
                                            int64_t pad_id) {
  const ProcessGrid& g = model_.grid();
  const auto device = params_.front().device();
  const int64_t n = static_cast<int64_t>(points.size()), dp = g.dp();
  const int64_t mine = (n - g.dp_rank() + dp - 1) / dp;
  auto losses = torch::zeros({n}, torch::TensorOptions().dtype(torch::kFloat64));
  Progress progress("landscape (this replica)", mine, "points");
  for (int64_t p = g.dp_rank(); p < n; p += dp) {
    set_point(points[p]);
    auto [sum, count] = loss_sum(seqs, batch_size, pad_id);
    if (count == 0) fail("landscape: the data holds no target token (every example is shorter than 2 tokens)");
    // One rank of the replica reports the point.
    if (g.tp_rank() == 0 && g.pp_rank() == 0) losses[p] = sum / static_cast<double>(count);
    progress.advance(1, fmt::format("loss {:.5f}", sum / static_cast<double>(count)));
  }
  progress.finish();
  auto all = losses.to(device);
  g.world()->allreduce(all);
  all = all.cpu();
  return std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + n);
}

}  // namespace crash
