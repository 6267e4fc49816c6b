#include "analysis/pruning.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <regex>
#include <sstream>

#include "framework/gather_outputs.h"
#include "framework/json_fields.h"
#include "framework/token_input.h"
#include "parallel/errors.h"

namespace crash {

namespace fs = std::filesystem;

std::vector<std::vector<int64_t>> parse_layer_groups(const std::string& text, const std::string& option) {
  static const std::regex item(R"(\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?)");
  std::vector<std::vector<int64_t>> out;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) {
    std::smatch m;
    if (!std::regex_match(part, m, item))
      fail("{}: expected layers like 3,5-7 (numbers and ranges A-B), got '{}'", option, text);
    const int64_t a = std::stoll(m[1].str()), b = m[2].matched ? std::stoll(m[2].str()) : a;
    if (b < a) fail("{}: the range {}-{} runs backwards", option, a, b);
    std::vector<int64_t> g(static_cast<size_t>(b - a + 1));
    std::iota(g.begin(), g.end(), a);
    out.push_back(g);
  }
  if (out.empty() || text.back() == ',') fail("{}: expected layers like 3,5-7, got '{}'", option, text);
  return out;
}

std::vector<int64_t> parse_layer_list(const std::string& text, const std::string& option) {
  std::vector<int64_t> out;
  for (const auto& g : parse_layer_groups(text, option)) out.insert(out.end(), g.begin(), g.end());
  return out;
}

int64_t layers_for_ratio(double ratio, int64_t L) {
  if (!(ratio > 0 && ratio < 1)) fail("--ratio {}: expected a fraction of the layers strictly between 0 and 1", ratio);
  const auto n = static_cast<int64_t>(std::nearbyint(ratio * static_cast<double>(L)));
  if (n < 1 || n >= L)
    fail("--ratio {} of {} layers rounds to {} layers; expected 1..{} (a ratio that removes some but not all)", ratio,
         L, n, L - 1);
  return n;
}

void check_importance_model(const ImportanceRecord& record, const std::string& file, const CheckpointReader& model) {
  const ModelConfig& c = model.config();
  if (record.num_layers != c.num_layers)
    fail("{}: the importance scores are for a {}-layer model ({}), but {} has {} layers", file, record.num_layers,
         record.model, model.dir(), c.num_layers);
  if (!record.model_type.empty() && record.model_type != c.model_type)
    fail("{}: the importance scores are for a {} model ({}), but {} is a {} model", file, record.model_type,
         record.model, model.dir(), c.model_type);
  // A copy of the model elsewhere matches; another model of the same shape does not.
  const auto recorded = fs::path(record.model) / "config.json";
  std::error_code ec;
  if (!record.model.empty() && fs::is_regular_file(recorded, ec) &&
      fs::weakly_canonical(record.model, ec) != fs::weakly_canonical(model.dir(), ec)) {
    nlohmann::json theirs;
    try {
      theirs = read_json_file(recorded.string());
    } catch (const UserError&) {
      return;
    }
    if (theirs != c.raw)
      fail("{}: the importance scores are for {}, whose config.json differs from {}'s", file, record.model,
           model.dir());
  }
}

namespace {

std::vector<double> values_of(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU, torch::kFloat64).contiguous();
  return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
}

nlohmann::json json_values(const std::vector<double>& v) {
  auto out = nlohmann::json::array();
  for (double x : v) out.push_back(std::isnan(x) ? nlohmann::json(nullptr) : nlohmann::json(x));
  return out;
}

}  // namespace

PruneChoice choose_from_importance(const ImportanceRecord& record, const std::string& file, const std::string& method,
                                   double ratio) {
  const int64_t L = record.num_layers;
  torch::Tensor scores;
  if (method == "block_influence")
    scores = record.block_influence;
  else if (method == "angular_distance")
    scores = record.angular_distance;
  else if (method == "cka_importance")
    scores = record.cka_importance;
  else if (method == "sleb")
    scores = record.sleb_order;
  else
    fail("--method: unknown method '{}' (expected block_influence, angular_distance, cka_importance or sleb)", method);
  if (!scores.defined())
    fail("{}: has no /{} (its methods: {}); run importance --methods {}", file, method,
         fmt::join(importance_methods(record), ", "), method == "cka_importance" ? "cka" : method);
  const int64_t n = layers_for_ratio(ratio, L);
  PruneChoice out;
  out.scores = {{"file", fs::absolute(file).string()}, {"method", method}};
  if (method == "angular_distance") {
    // d(l, n) for every start l: column n - 1 of the [L, L] matrix.
    auto d = values_of(scores.select(1, n - 1));
    int64_t best = -1;
    for (int64_t l = 0; l + n <= L; ++l)
      if (!std::isnan(d[static_cast<size_t>(l)]) &&
          (best < 0 || d[static_cast<size_t>(l)] < d[static_cast<size_t>(best)]))
        best = l;
    if (best < 0) fail("{}: /angular_distance has no block of {} layers with a score", file, n);
    for (int64_t l = best; l < best + n; ++l) out.removed.push_back(l);
    d.resize(static_cast<size_t>(L - n + 1));
    out.scores["block_size"] = n;
    out.scores["values"] = json_values(d);  // d(l, n), l = 0..L-n
    return out;
  }
  if (method == "sleb") {
    const auto order = values_of(scores);
    if (static_cast<int64_t>(order.size()) < n)
      fail("{}: /sleb_order removes {} layers, but --ratio {} asks for {}; run importance --ratio higher", file,
           order.size(), ratio, n);
    for (int64_t i = 0; i < n; ++i) out.removed.push_back(static_cast<int64_t>(order[static_cast<size_t>(i)]));
    std::sort(out.removed.begin(), out.removed.end());
    out.scores["order"] = json_values(order);
    out.scores["values"] = json_values(values_of(record.sleb_perplexity));
    return out;
  }
  const auto v = values_of(scores);
  std::vector<int64_t> idx;
  for (int64_t l = 0; l < L; ++l)
    if (!std::isnan(v[static_cast<size_t>(l)])) idx.push_back(l);
  if (static_cast<int64_t>(idx.size()) < n)
    fail("{}: /{} scores only {} layers, fewer than the {} to remove", file, method, idx.size(), n);
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int64_t a, int64_t b) { return v[static_cast<size_t>(a)] < v[static_cast<size_t>(b)]; });
  out.removed.assign(idx.begin(), idx.begin() + n);
  std::sort(out.removed.begin(), out.removed.end());
  out.scores["values"] = json_values(v);
  return out;
}

LacoResult laco_search(int64_t L, int64_t remove, int64_t merge_size, double threshold, int64_t interval,
                       const std::function<double(const EmulatorPlan&)>& similarity) {
  if (merge_size < 2) fail("--merge-size {}: a group needs at least 2 layers", merge_size);
  if (interval < 1) fail("--interval must be at least 1, got {}", interval);
  if (!(threshold >= -1 && threshold <= 1)) fail("--threshold {}: a cosine similarity, expected -1..1", threshold);
  LacoResult r;
  r.plan.mode = "merge";
  r.plan.full_layers = L;
  r.plan.bottom = r.plan.top = 0;
  for (int64_t l = 0; l < L; ++l) r.plan.slots.push_back({l, false, l, {}, {}});
  auto size = [&] { return static_cast<int64_t>(r.plan.slots.size()); };
  int64_t l = size() - merge_size;
  while (l >= 0 && r.removed < remove) {
    const int64_t count = std::min(merge_size, remove - r.removed + 1);
    auto candidate = merge_slots(r.plan, l, count);
    LacoStep step;
    const auto& slot = candidate.slots[static_cast<size_t>(l)];
    step.layers.push_back(slot.source);
    step.layers.insert(step.layers.end(), slot.merged.begin(), slot.merged.end());
    step.slots = count;
    step.similarity = similarity(candidate);
    step.accepted = step.similarity > threshold;
    r.steps.push_back(step);
    if (step.accepted) {
      r.plan = candidate;
      r.removed += count - 1;
      l -= interval;
      if (l + merge_size > size()) l = size() - merge_size;
    } else {
      l -= 1;
    }
  }
  return r;
}

SlebResult sleb_search(int64_t L, int64_t remove,
                       const std::function<double(const std::vector<int64_t>& removed)>& perplexity) {
  SlebResult r;
  r.base_perplexity = perplexity({});
  std::vector<int64_t> removed;
  while (static_cast<int64_t>(removed.size()) < remove) {
    int64_t best = -1;
    double best_ppl = std::numeric_limits<double>::infinity();
    for (int64_t l = 0; l < L; ++l) {
      if (std::find(removed.begin(), removed.end(), l) != removed.end()) continue;
      auto candidate = removed;
      candidate.push_back(l);
      std::sort(candidate.begin(), candidate.end());
      const double p = perplexity(candidate);
      if (best < 0 || p < best_ppl) {
        best = l;
        best_ppl = p;
      }
    }
    removed.push_back(best);
    r.order.push_back(best);
    r.perplexity.push_back(best_ppl);
  }
  return r;
}

double calibration_perplexity(DistributedLM& model, const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size) {
  double nll = 0, tokens = 0;
  for (size_t b = 0; b < seqs.size(); b += static_cast<size_t>(batch_size)) {
    const size_t e = std::min(seqs.size(), b + static_cast<size_t>(batch_size));
    const auto batch = pad_batch(seqs, b, e, model.config().pad_token_id, false);
    const auto targets = causal_targets(batch.ids, batch.mask);
    const auto lp = model.token_logprobs(batch.ids, batch.mask, targets, 1);
    nll -= lp.sum().item<double>();
    tokens += static_cast<double>((targets != -100).sum().item<int64_t>());
  }
  if (tokens == 0) fail("the calibration examples have no token to predict (each needs two tokens or more)");
  return std::exp(nll / tokens);
}

torch::Tensor last_token_states(DistributedLM& model, const std::vector<int64_t>& pp_layers,
                                const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size) {
  int64_t length = 0;
  for (const auto& s : seqs) length = std::max<int64_t>(length, static_cast<int64_t>(s.size()));
  const auto local = forward_share(model, seqs, length, batch_size, 1, false, true);
  const auto all = gather_outputs(model, pp_layers, local, static_cast<int64_t>(seqs.size()), length, true);
  if (all.hidden.empty()) return {};
  const auto& last = all.hidden.back();
  std::vector<int64_t> ends;
  for (const auto& s : seqs) ends.push_back(static_cast<int64_t>(s.size()) - 1);
  auto rows = torch::arange(static_cast<int64_t>(seqs.size()));
  return last.index({rows, torch::tensor(ends)}).to(torch::kFloat64);
}

torch::Tensor row_cosine(const torch::Tensor& a, const torch::Tensor& b) {
  const auto x = a.to(torch::kFloat64), y = b.to(torch::kFloat64);
  return (x * y).sum(1) / (x.norm(2, 1) * y.norm(2, 1));
}

}  // namespace crash
