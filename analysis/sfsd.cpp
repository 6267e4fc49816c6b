#include "analysis/sfsd.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>

#include "framework/models/family.h"
#include "framework/token_input.h"
#include "parallel/errors.h"
#include "parallel/progress.h"
#include "parallel/tensor_parallel.h"

namespace crash {

namespace {

// "…layers.7.self_attn.q_proj" -> 7; -1 when the name is not under a decoder layer.
int64_t layer_index(const std::string& name) {
  const auto at = name.find("layers.");
  if (at == std::string::npos) return -1;
  const auto digits = name.substr(at + 7);
  if (digits.empty() || !std::isdigit(static_cast<unsigned char>(digits[0]))) return -1;
  return std::stoll(digits);
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

std::vector<LinearInfo> decoder_linears(const CheckpointReader& ckpt) {
  const ModelConfig& c = ckpt.config();
  if (!c.sfsd_ranks.empty())
    fail("{}/config.json: the model is already factored ('crash_sfsd_ranks'); decompose the original model",
         ckpt.dir());
  const auto linears = c.family->layer_linears(c);
  std::vector<LinearInfo> out;
  for (const auto& name : ckpt.names()) {
    if (!ends_with(name, ".weight")) continue;
    const std::string module = name.substr(0, name.size() - 7);
    const int64_t layer = layer_index(module);
    if (layer < 0) continue;
    bool linear = false;
    for (const auto& n : linears) linear = linear || ends_with(module, "." + n);
    if (!linear) continue;
    const auto& shape = ckpt.info(name).shape;
    if (shape.size() != 2) fail("{}: tensor '{}' is not a matrix", ckpt.file_of(name), name);
    LinearInfo m;
    m.source = module;
    // Older OPT checkpoints name their tensors without the "model." prefix the model uses.
    m.name = module.rfind("model.", 0) != 0 ? "model." + module : module;
    m.layer = layer;
    m.out = shape[0];
    m.in = shape[1];
    m.bias = ckpt.contains(module + ".bias");
    out.push_back(m);
  }
  std::stable_sort(out.begin(), out.end(), [](const LinearInfo& a, const LinearInfo& b) { return a.layer < b.layer; });
  if (out.empty()) fail("{}: no decoder Linear found in the checkpoint", ckpt.dir());
  return out;
}

torch::Tensor OutputStats::covariance() const {
  auto mu = mean();
  auto c = sum_outer / count - torch::outer(mu, mu);
  return (c + c.t()) / 2;  // exactly symmetric for eigh
}

void accumulate(OutputStats& s, const torch::Tensor& y_in, const torch::Tensor& valid) {
  auto y = y_in.reshape({-1, y_in.size(-1)});
  if (valid.defined()) y = y.index_select(0, valid.nonzero().view(-1).to(y.device()));
  y = y.to(torch::kFloat64);
  if (s.sum.device() != y.device()) {
    s.sum = s.sum.to(y.device());
    s.sum_outer = s.sum_outer.to(y.device());
  }
  s.count += static_cast<double>(y.size(0));
  s.sum.add_(y.sum(0));
  s.sum_outer.addmm_(y.t(), y);
}

std::map<std::string, OutputStats> calibrate(DistributedLM& model, const std::vector<LinearInfo>& linears,
                                             const std::vector<std::vector<int64_t>>& examples, int64_t tokens,
                                             int64_t batch_size) {
  CausalLM& stage = model.stage();
  const ProcessGrid& grid = model.grid();
  std::map<std::string, OutputStats> stats;
  std::map<std::string, const LinearInfo*> wanted;
  for (const auto& m : linears) wanted[m.name] = &m;
  torch::Tensor valid;  // the current batch's non-padding tokens, flattened
  std::vector<std::function<void()>> detach;
  for (const auto& item : stage.named_modules()) {
    auto it = wanted.find(item.key());
    if (it == wanted.end()) continue;
    OutputStats& s = stats[item.key()];
    s.sum = torch::zeros({it->second->out}, torch::kFloat64);
    s.sum_outer = torch::zeros({it->second->out, it->second->out}, torch::kFloat64);
    LinearObserver observe = [&s, &valid](const torch::Tensor& y) { accumulate(s, y, valid); };
    if (auto* col = dynamic_cast<ColumnParallelLinearImpl*>(item.value().get())) {
      col->observer = observe;
      detach.push_back([col] { col->observer = nullptr; });
    } else if (auto* row = dynamic_cast<RowParallelLinearImpl*>(item.value().get())) {
      row->observer = observe;
      detach.push_back([row] { row->observer = nullptr; });
    }
  }
  // This DP rank's examples, cut to `tokens` (and the model's context); every rank of a
  // replica takes the same ones.
  tokens = std::min(tokens, stage.config().max_positions);
  std::vector<std::vector<int64_t>> mine;
  for (size_t i = static_cast<size_t>(grid.dp_rank()); i < examples.size(); i += static_cast<size_t>(grid.dp()))
    mine.emplace_back(examples[i].begin(),
                      examples[i].begin() + std::min<int64_t>(tokens, static_cast<int64_t>(examples[i].size())));
  const int64_t pad = stage.config().pad_token_id >= 0 ? stage.config().pad_token_id : 0;
  Progress progress(
      "SFSD calibration (this data-parallel share)",
      static_cast<int64_t>((mine.size() + static_cast<size_t>(batch_size) - 1) / static_cast<size_t>(batch_size)),
      "batches");
  try {
    for (size_t b = 0; b < mine.size(); b += static_cast<size_t>(batch_size)) {
      auto batch = pad_batch(mine, b, std::min(mine.size(), b + static_cast<size_t>(batch_size)), pad, /*left=*/false);
      valid = batch.mask.reshape({-1}) != 0;
      model.forward(batch.ids, batch.mask, 1, /*hidden_states=*/false, /*logits=*/false);
      progress.advance();
    }
    progress.finish();
  } catch (...) {
    for (auto& f : detach) f();
    throw;
  }
  for (auto& f : detach) f();
  for (auto& [name, s] : stats) {
    auto packed = torch::cat({torch::full({1}, s.count, torch::kFloat64), s.sum.cpu(), s.sum_outer.cpu().view(-1)});
    grid.dp_group()->allreduce(packed);
    const int64_t n = s.sum.size(0);
    s.count = packed[0].item<double>();
    s.sum = packed.narrow(0, 1, n).clone();
    s.sum_outer = packed.narrow(0, 1 + n, n * n).view({n, n}).clone();
  }
  return stats;
}

std::map<std::string, OutputStats> gather_stats(const ProcessGrid& grid, const std::vector<LinearInfo>& linears,
                                                std::map<std::string, OutputStats> local) {
  // Every DP and TP rank of a stage holds the same sums: the first of each contributes.
  const bool contributes = grid.dp_rank() == 0 && grid.tp_rank() == 0;
  std::map<std::string, OutputStats> out;
  for (const auto& m : linears) {
    auto packed = torch::zeros({1 + m.out + m.out * m.out}, torch::kFloat64);
    auto it = local.find(m.name);
    if (contributes && it != local.end())
      packed = torch::cat(
          {torch::full({1}, it->second.count, torch::kFloat64), it->second.sum, it->second.sum_outer.reshape({-1})});
    if (it != local.end()) local.erase(it);  // keep one module's sums at a time
    if (grid.world_size() > 1) grid.world()->allreduce(packed);
    if (grid.rank() != 0) continue;
    OutputStats s;
    s.count = packed[0].item<double>();
    s.sum = packed.narrow(0, 1, m.out).clone();
    s.sum_outer = packed.narrow(0, 1 + m.out, m.out * m.out).view({m.out, m.out}).clone();
    if (s.count <= 0) fail("SFSD calibration: module '{}' saw no tokens", m.name);
    out[m.name] = std::move(s);
  }
  return out;
}

SfsdFactors sfsd_factors(const torch::Tensor& weight, const torch::Tensor& bias, const OutputStats& stats,
                         int64_t rank) {
  const int64_t out = weight.size(0);
  if (rank < 1 || rank > out) fail("SFSD: rank {} outside [1, {}]", rank, out);
  auto [evals, evecs] = torch::linalg_eigh(stats.covariance(), "L");  // ascending
  SfsdFactors f;
  f.eigenvalues = evals.flip(0);
  auto v = evecs.narrow(1, out - rank, rank).flip(1);  // [out, r], largest first
  auto w = weight.to(torch::kFloat64);
  f.a = v.t().mm(w);
  f.b = v.contiguous();
  auto mu = stats.mean();
  auto b = bias.defined() ? bias.to(torch::kFloat64) : torch::zeros({out}, torch::kFloat64);
  // b' = V V^T b + (I - V V^T) mu = mu + V V^T (b - mu)
  f.bias = mu + v.mv(v.t().mv(b - mu));
  return f;
}

bool rank_saves(int64_t rank, const LinearInfo& m) { return rank * (m.in + m.out) < m.in * m.out; }

int64_t unit_rank(const LinearInfo& m, double fraction, RankUnit unit) {
  double r = 0;
  if (unit == RankUnit::kRatio) {
    // The epsilon keeps f min(in, out) that is an integer in exact arithmetic from rounding up.
    r = std::ceil(fraction * static_cast<double>(std::min(m.in, m.out)) - 1e-9);
  } else {
    const double kappa = static_cast<double>(m.in) * static_cast<double>(m.out) / static_cast<double>(m.in + m.out);
    r = std::floor(kappa * fraction);
  }
  return std::max<int64_t>(1, static_cast<int64_t>(r));
}

const char* rank_unit_name(RankUnit unit) { return unit == RankUnit::kRatio ? "ratio" : "budget"; }

std::map<std::string, int64_t> fixed_ranks(const std::vector<LinearInfo>& linears, double fraction, RankUnit unit) {
  std::map<std::string, int64_t> ranks;
  for (const auto& m : linears) {
    const int64_t r = unit_rank(m, fraction, unit);
    if (rank_saves(r, m)) ranks[m.name] = r;
  }
  return ranks;
}

std::map<std::string, int64_t> greedy_ranks(
    const std::vector<LinearInfo>& linears, const std::vector<double>& fractions,
    const std::function<bool(const std::map<std::string, int64_t>& ranks)>& accept, RankUnit unit) {
  std::vector<double> sorted = fractions;
  std::sort(sorted.begin(), sorted.end());
  std::map<std::string, int64_t> ranks;
  Progress progress("SFSD greedy search", static_cast<int64_t>(linears.size()), "modules");
  for (auto it = linears.rbegin(); it != linears.rend(); ++it) {
    const LinearInfo& m = *it;
    std::vector<int64_t> candidates;
    for (double f : sorted) {
      const int64_t r = unit_rank(m, f, unit);
      if (rank_saves(r, m) && (candidates.empty() || candidates.back() != r)) candidates.push_back(r);
    }
    for (int64_t r : candidates) {
      auto trial = ranks;
      trial[m.name] = r;
      if (accept(trial)) {
        ranks = std::move(trial);
        break;
      }
    }
    progress.advance(1, fmt::format("{} factored", ranks.size()));
  }
  progress.finish();
  return ranks;
}

std::vector<std::pair<std::string, torch::Tensor>> factored_tensors(const CheckpointReader& ckpt,
                                                                    const std::vector<LinearInfo>& linears,
                                                                    const std::map<std::string, OutputStats>& stats,
                                                                    const std::map<std::string, int64_t>& ranks,
                                                                    std::optional<torch::ScalarType> factor_dtype) {
  std::map<std::string, const LinearInfo*> replaced;  // checkpoint tensor -> module
  for (const auto& m : linears)
    if (ranks.count(m.name)) {
      replaced[m.source + ".weight"] = &m;
      replaced[m.source + ".bias"] = &m;
    }
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& name : ckpt.names()) {
    auto it = replaced.find(name);
    if (it == replaced.end()) {
      out.emplace_back(name, ckpt.view(name));
      continue;
    }
    const LinearInfo& m = *it->second;
    if (name != m.source + ".weight") continue;  // the bias goes with the weight
    auto w = ckpt.view(name);
    auto b = m.bias ? ckpt.view(m.source + ".bias") : torch::Tensor();
    auto st = stats.find(m.name);
    if (st == stats.end()) fail("SFSD: no calibration statistics for '{}'", m.name);
    auto f = sfsd_factors(w, b, st->second, ranks.at(m.name));
    const auto dtype = factor_dtype ? *factor_dtype : w.scalar_type();
    out.emplace_back(m.name + ".factor_a.weight", f.a.to(dtype));
    out.emplace_back(m.name + ".factor_b.weight", f.b.to(dtype));
    out.emplace_back(m.name + ".factor_b.bias", f.bias.to(dtype));
  }
  return out;
}

SfsdSummary sfsd_summary(const CheckpointReader& ckpt, const std::vector<LinearInfo>& linears,
                         const std::map<std::string, int64_t>& ranks) {
  const ModelConfig& c = ckpt.config();
  SfsdSummary s;
  for (const auto& name : ckpt.names()) {
    int64_t n = 1;
    for (auto d : ckpt.info(name).shape) n *= d;
    s.params_before += n;
    if (layer_index(name) >= 0) s.decoder_params_before += n;
  }
  // The LM head's products (its input width is word_embed_proj_dim, hidden_size but for OPT-350m).
  int64_t saved = 0, macs_before = c.vocab_size * c.word_embed_proj_dim, macs_after;
  macs_after = macs_before;
  s.modules = nlohmann::json::object();
  for (const auto& m : linears) {
    const int64_t before = m.in * m.out + (m.bias ? m.out : 0);
    auto it = ranks.find(m.name);
    const int64_t r = it == ranks.end() ? 0 : it->second;
    const int64_t after = r ? r * (m.in + m.out) + m.out : before;
    saved += before - after;
    // A layer shared by several slots (CRaSh share) runs once per slot.
    int64_t uses = 0;
    for (int64_t l = 0; l < c.num_layers; ++l) uses += c.storage_of(l) == m.layer ? 1 : 0;
    macs_before += uses * m.in * m.out;
    macs_after += uses * (r ? r * (m.in + m.out) : m.in * m.out);
    s.modules[m.name] = {{"rank", r ? nlohmann::json(r) : nlohmann::json(nullptr)},
                         {"in", m.in},
                         {"out", m.out},
                         {"params_before", before},
                         {"params_after", after}};
  }
  s.params_after = s.params_before - saved;
  s.decoder_params_after = s.decoder_params_before - saved;
  s.flops_before = 2 * macs_before;
  s.flops_after = 2 * macs_after;
  return s;
}

}  // namespace crash
