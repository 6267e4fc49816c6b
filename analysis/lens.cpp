#include "analysis/lens.h"

#include <algorithm>
#include <limits>

#include "parallel/errors.h"
#include "parallel/pipeline.h"
#include "parallel/tags.h"

namespace crash {

torch::Tensor vocab_parallel_log_softmax(const torch::Tensor& z, const CommPtr& tp) {
  auto rows = z.sizes().vec();
  rows.pop_back();
  auto max = z.size(-1) > 0 ? z.amax(-1).contiguous()
                            : torch::full(rows, -std::numeric_limits<double>::infinity(), z.options());
  tp->allreduce(max, ReduceOp::Max);
  auto shifted = z - max.unsqueeze(-1);
  auto sum = shifted.exp().sum(-1).contiguous();
  tp->allreduce(sum, ReduceOp::Sum);
  return shifted - sum.log().unsqueeze(-1);
}

torch::Tensor vocab_parallel_argmax(const torch::Tensor& z, int64_t vocab_start, const CommPtr& tp) {
  auto rows = z.sizes().vec();
  rows.pop_back();
  const auto f64 = z.options().dtype(torch::kFloat64);
  const double inf = std::numeric_limits<double>::infinity();
  torch::Tensor value, index;
  if (z.size(-1) > 0) {
    index = z.argmax(-1);
    value = z.gather(-1, index.unsqueeze(-1)).squeeze(-1).to(torch::kFloat64).contiguous();
    index = index.to(torch::kFloat64) + static_cast<double>(vocab_start);
  } else {
    value = torch::full(rows, -inf, f64);
    index = torch::full(rows, inf, f64);
  }
  auto best = value.clone();
  tp->allreduce(best, ReduceOp::Max);
  // Among the ranks holding the maximum, the lowest column wins (argmax's first occurrence).
  auto candidate = torch::where(value == best, index, torch::full_like(index, inf)).contiguous();
  tp->allreduce(candidate, ReduceOp::Min);
  return candidate;
}

LogitLens::LogitLens(DistributedLM& model, const std::vector<int64_t>& pp_layers, int64_t chunk_tokens)
    : model_(model) {
  const ModelConfig& c = model.stage().config();
  L_ = c.num_layers;
  const ProcessGrid& g = model.grid();
  auto stages = split_layers(L_, g.pp(), pp_layers);
  source_stage_.assign(static_cast<size_t>(L_ + 1), 0);
  for (int s = 0; s < g.pp(); ++s)
    for (int64_t l = stages[s].first; l < stages[s].second; ++l) source_stage_[static_cast<size_t>(l + 1)] = s;
  // Per token the chunk holds L+1 rows of logits, log-probabilities and probabilities (fp64).
  const int64_t per_token = (L_ + 1) * std::max<int64_t>(1, model.stage().local_vocab()) * 8 * 3;
  chunk_ = chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(1, (int64_t(256) << 20) / per_token);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64).device(model.stage().parameters().front().device());
  neg_entropy_ = torch::zeros({L_ + 1}, f64);
  cross_ = torch::zeros({L_ + 1, L_ + 1}, f64);
  mix_ = torch::zeros({L_ + 1, L_ + 1}, f64);
  nll_ = torch::zeros({L_ + 1}, f64);
  counts_ = torch::zeros({L_ + 3}, f64);
}

void LogitLens::add(const torch::Tensor& ids, const torch::Tensor& mask) {
  torch::InferenceMode guard;
  auto out = model_.forward(ids, mask, 1, /*hidden_states=*/true, /*logits=*/false);
  const ProcessGrid& g = model_.grid();
  CausalLM& m = model_.stage();
  const auto device = m.parameters().front().device();
  const int last = g.pp() - 1;
  if (!g.last_stage()) {
    // Earlier stages hand their hidden states to the last one, which holds the head.
    for (auto& [l, h] : out.hidden) g.pp_group()->send(h.to(device).contiguous(), last, tag(MpiTag::kLensHidden, l));
    g.pp_group()->wait_sends();
    return;
  }
  std::vector<torch::Tensor> hidden(static_cast<size_t>(L_ + 1));
  const auto dtype = m.parameters().front().scalar_type();
  for (int64_t l = 0; l <= L_; ++l) {
    auto it = out.hidden.find(l);
    if (it != out.hidden.end()) {
      hidden[l] = it->second.to(device);
    } else {
      hidden[l] = torch::empty({ids.size(0), ids.size(1), m.config().hidden_size},
                               torch::TensorOptions().dtype(dtype).device(device));
      g.pp_group()->recv(hidden[l], source_stage_[static_cast<size_t>(l)], tag(MpiTag::kLensHidden, l));
    }
    hidden[l] = hidden[l].reshape({-1, hidden[l].size(-1)});
  }
  // Non-padding tokens only, in chunks of chunk_ tokens.
  auto tokens = (mask.reshape({-1}) != 0).nonzero().squeeze(1).to(device);
  auto targets = causal_targets(ids, mask).reshape({-1}).to(device).index_select(0, tokens);
  for (int64_t b = 0; b < tokens.size(0); b += chunk_) {
    const int64_t n = std::min(chunk_, tokens.size(0) - b);
    auto rows = tokens.narrow(0, b, n);
    std::vector<torch::Tensor> part;
    for (auto& h : hidden) part.push_back(h.index_select(0, rows));
    accumulate(part, targets.narrow(0, b, n));
  }
}

void LogitLens::accumulate(const std::vector<torch::Tensor>& hidden, const torch::Tensor& targets) {
  CausalLM& m = model_.stage();
  const ProcessGrid& g = model_.grid();
  const int64_t start = m.vocab_start();
  // Columns past the real vocabulary are padding: dropped (a rank may hold none).
  const int64_t valid = std::clamp<int64_t>(m.config().vocab_size - start, 0, m.local_vocab());
  std::vector<torch::Tensor> logits;
  for (int64_t l = 0; l <= L_; ++l) {
    auto h = l < L_ ? m.finish(hidden[l]) : hidden[l];  // h_L is already finished
    logits.push_back(m.head_local(h).narrow(-1, 0, valid).to(torch::kFloat64));
  }
  auto z = torch::stack(logits, 1);  // [n, L+1, valid]
  auto logp = vocab_parallel_log_softmax(z, g.tp_group());
  auto p = logp.exp();
  // Sums over this rank's columns; the TP parts add up in result().
  neg_entropy_ += (p * logp).sum(torch::IntArrayRef{0, 2});
  cross_ += torch::bmm(p, logp.transpose(1, 2)).sum(0);  // [i][j]: sum p_i log p_j
  for (int64_t i = 0; i < L_; ++i) {
    auto mix = 0.5 * (p.narrow(1, i, 1) + p.narrow(1, i + 1, L_ - i));  // [n, L-i, valid]
    mix_[i].narrow(0, i + 1, L_ - i) += torch::xlogy(mix, mix).sum(torch::IntArrayRef{0, 2});
  }
  auto has_target = targets != -100;
  auto local = targets - start;
  auto here = has_target.logical_and(local >= 0).logical_and(local < valid);
  if (valid > 0) {
    auto index = local.masked_fill(here.logical_not(), 0).view({-1, 1, 1}).expand({-1, L_ + 1, 1});
    auto picked = logp.gather(2, index).squeeze(2) * here.unsqueeze(1).to(torch::kFloat64);
    nll_ -= picked.sum(0);
  }
  auto top = vocab_parallel_argmax(z, start, g.tp_group());  // [n, L+1]
  if (g.tp_rank() == 0) {
    counts_.narrow(0, 0, L_ + 1) += (top == top.narrow(1, L_, 1)).to(torch::kFloat64).sum(0);
    counts_[L_ + 1] += static_cast<double>(targets.size(0));
    counts_[L_ + 2] += has_target.sum().to(torch::kFloat64);
  }
}

LensResult LogitLens::result() {
  torch::InferenceMode guard;
  // One sum over the world: TP ranks add their vocabulary parts, DP ranks their tokens;
  // ranks off the last stage add zeros.
  auto all = torch::cat({neg_entropy_, cross_.flatten(), mix_.flatten(), nll_, counts_}).contiguous();
  model_.grid().world()->allreduce(all);
  all = all.cpu();
  const int64_t n = L_ + 1;
  int64_t at = 0;
  auto take = [&](int64_t count) {
    auto t = all.narrow(0, at, count);
    at += count;
    return t;
  };
  auto neg_entropy = take(n), cross = take(n * n).view({n, n}), mix = take(n * n).view({n, n}), nll = take(n),
       counts = take(n + 2);
  LensResult r;
  r.num_tokens = static_cast<int64_t>(counts[n].item<double>());
  r.num_targets = static_cast<int64_t>(counts[n + 1].item<double>());
  if (r.num_tokens == 0) fail("logit lens: the data holds no token");
  const double tokens = static_cast<double>(r.num_tokens);
  r.kl = (neg_entropy.unsqueeze(1) - cross) / tokens;
  mix = mix + mix.t();  // the upper triangle was accumulated
  r.js = (0.5 * (neg_entropy.unsqueeze(1) + neg_entropy.unsqueeze(0)) - mix) / tokens;
  r.kl.fill_diagonal_(0.0);
  r.js.fill_diagonal_(0.0);
  r.top1_agreement = counts.narrow(0, 0, n) / tokens;
  r.lens_loss = r.num_targets > 0 ? nll / static_cast<double>(r.num_targets)
                                  : torch::full({n}, std::numeric_limits<double>::quiet_NaN(), all.options());
  return r;
}

}  // namespace crash
