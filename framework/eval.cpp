#include "framework/eval.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <regex>

#include "framework/json_fields.h"
#include "framework/prepare.h"
#include "framework/token_input.h"
#include "parallel/errors.h"
#include "parallel/progress.h"

namespace crash {

namespace {

constexpr int64_t kIgnore = -100;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// lm-eval's order: longest first, ties by the tokens themselves.
std::vector<size_t> longest_first(const std::vector<std::vector<int64_t>>& keys) {
  std::vector<size_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (keys[a].size() != keys[b].size()) return keys[a].size() > keys[b].size();
    return keys[a] < keys[b];
  });
  return order;
}

// Micro-batches that keep every pipeline stage busy when the rows split evenly.
int micro_batches(const DistributedLM& model, int64_t rows) {
  const int pp = model.grid().pp();
  return pp > 1 && rows % pp == 0 ? pp : 1;
}

int64_t pad_id(const ModelConfig& c) { return c.pad_token_id >= 0 ? c.pad_token_id : 0; }

// Collectives run on the model's device (CUDA tensors under NCCL); results come back to the CPU.
void on_device(DistributedLM& model, torch::Tensor& t, const std::function<void(torch::Tensor&)>& collective) {
  auto d = t.to(model.stage().parameters().front().device());
  collective(d);
  t.copy_(d.cpu());
}

// Sums a per-request tensor over the DP replicas (each filled only its own rows).
void gather_dp(DistributedLM& model, torch::Tensor& t) {
  if (model.grid().dp() > 1) on_device(model, t, [&](torch::Tensor& d) { model.grid().dp_group()->allreduce(d); });
}

struct Timer {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

// Per row of a batch: the sum of the target tokens' log-probabilities and whether each target
// is the argmax of its position (lm-eval's is_greedy: argmax of the float32 log-softmax, the
// first of equal maxima), from the full logits on the last stage; [n, 2] on every rank.
torch::Tensor greedy_scores(DistributedLM& model, const torch::Tensor& ids, const torch::Tensor& mask,
                            const torch::Tensor& targets, int64_t n) {
  auto out = torch::zeros({n, 2}, torch::kFloat64);
  auto result = model.forward(ids, mask, micro_batches(model, n), false, true);
  if (model.grid().last_stage()) {
    auto lp = torch::log_softmax(result.logits.to(torch::kFloat32), -1);
    auto best = lp.argmax(-1);
    auto o_a = out.accessor<double, 2>();
    auto t_a = targets.accessor<int64_t, 2>();
    auto b_a = best.accessor<int64_t, 2>();
    auto lp_a = lp.accessor<float, 3>();
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      bool all = true;
      for (int64_t t = 0; t < targets.size(1); ++t) {
        if (t_a[i][t] == kIgnore) continue;
        sum += lp_a[i][t][t_a[i][t]];
        all = all && b_a[i][t] == t_a[i][t];
      }
      o_a[i][0] = sum;
      o_a[i][1] = all ? 1.0 : 0.0;
    }
  }
  if (model.grid().pp() > 1)
    on_device(model, out, [&](torch::Tensor& d) { model.grid().pp_group()->broadcast(d, model.grid().pp() - 1); });
  return out;
}

TaskResult multiple_choice(DistributedLM& model, const PreparedTask& task, const EvalOptions& o) {
  const ModelConfig& c = model.stage().config();
  const int64_t max_length = c.max_positions;
  // One request per (example, choice).
  struct Request {
    size_t example, choice;
    std::vector<int64_t> input;
    int64_t scored;
  };
  std::vector<Request> requests;
  std::vector<std::vector<int64_t>> keys;
  for (size_t e = 0; e < task.examples.size(); ++e) {
    const auto& ex = task.examples[e];
    // An empty context conditions on BOS (lm-eval's prefix token).
    std::vector<int64_t> context = ex.context;
    if (context.empty()) context.push_back(c.bos_token_id >= 0 ? c.bos_token_id : c.eos_token_id);
    for (size_t k = 0; k < ex.continuations.size(); ++k) {
      const auto& cont = ex.continuations[k];
      if (cont.empty()) fail("{}: example {} choice {} has no continuation tokens", task.dir, ex.index, k);
      if (static_cast<int64_t>(cont.size()) > max_length)
        fail("{}: example {} choice {}: its {} continuation tokens exceed the model's context of {}", task.dir,
             ex.index, k, cont.size(), max_length);
      auto [input, scored] = loglikelihood_input(context, cont, max_length);
      std::vector<int64_t> key = context;
      key.insert(key.end(), cont.begin(), cont.end());
      keys.push_back(std::move(key));
      requests.push_back({e, k, std::move(input), scored});
    }
  }
  const auto order = longest_first(keys);
  const int64_t R = static_cast<int64_t>(requests.size()), B = o.batch_size;
  const int64_t batches = (R + B - 1) / B;
  const auto& grid = model.grid();
  auto ll = torch::zeros({R}, torch::kFloat64);
  auto ll_a = ll.accessor<double, 1>();
  auto greedy = torch::zeros({R}, torch::kFloat64);  // 1 where the choice is the greedy continuation
  auto greedy_a = greedy.accessor<double, 1>();
  Progress progress(task_name(task) + " (multiple choice)", batches, "batches");
  for (int64_t b = 0; b < batches; ++b) {
    if (b % grid.dp() != grid.dp_rank()) continue;
    const int64_t first = b * B, n = std::min(B, R - first);
    std::vector<std::vector<int64_t>> seqs;
    for (int64_t i = 0; i < n; ++i) seqs.push_back(requests[order[first + i]].input);
    auto batch = pad_batch(seqs, 0, seqs.size(), pad_id(c), /*left=*/false);
    // Target of position t is input token t + 1; the last `scored` positions predict the
    // continuation (its last token is the one the input dropped).
    auto targets = torch::full_like(batch.ids, kIgnore);
    auto t_a = targets.accessor<int64_t, 2>();
    for (int64_t i = 0; i < n; ++i) {
      const Request& r = requests[order[first + i]];
      const auto& cont = task.examples[r.example].continuations[r.choice];
      const int64_t L = static_cast<int64_t>(r.input.size());
      for (int64_t j = 0; j < r.scored; ++j) t_a[i][L - r.scored + j] = cont[cont.size() - r.scored + j];
    }
    if (task.multiple_target) {
      // lm-eval's exact_match needs to know whether every continuation token is the argmax
      // (is_greedy), so these tasks take the full logits; their prompts are short.
      auto scored = greedy_scores(model, batch.ids, batch.mask, targets, n);
      auto s_a = scored.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        ll_a[static_cast<int64_t>(order[first + i])] = s_a[i][0];
        greedy_a[static_cast<int64_t>(order[first + i])] = s_a[i][1];
      }
    } else {
      auto lp = model.token_logprobs(batch.ids, batch.mask, targets, micro_batches(model, n), kIgnore).sum(1);
      auto lp_a = lp.accessor<double, 1>();
      for (int64_t i = 0; i < n; ++i) ll_a[static_cast<int64_t>(order[first + i])] = lp_a[i];
    }
    progress.update(b + 1);  // b counts the batches of every replica
  }
  gather_dp(model, ll);
  if (task.multiple_target) gather_dp(model, greedy);
  progress.finish();
  ll_a = ll.accessor<double, 1>();
  greedy_a = greedy.accessor<double, 1>();

  TaskResult result;
  std::vector<double> acc, acc_norm, exact;
  int64_t q = 0;
  for (const auto& ex : task.examples) {
    const size_t K = ex.continuations.size();
    std::vector<double> scores(K);
    std::vector<bool> is_greedy(K);
    for (size_t k = 0; k < K; ++k, ++q) {
      scores[k] = ll_a[q];
      is_greedy[k] = greedy_a[q] > 0.5;
    }
    // np.argmax: the first of equal maxima.
    size_t pred = 0, pred_norm = 0;
    for (size_t k = 1; k < K; ++k) {
      if (scores[k] > scores[pred]) pred = k;
      if (scores[k] / static_cast<double>(ex.choice_chars[k]) >
          scores[pred_norm] / static_cast<double>(ex.choice_chars[pred_norm]))
        pred_norm = k;
    }
    auto is_gold = [&](size_t k) {
      return std::find(ex.golds.begin(), ex.golds.end(), static_cast<int64_t>(k)) != ex.golds.end();
    };
    acc.push_back(is_gold(pred) ? 1.0 : 0.0);
    acc_norm.push_back(is_gold(pred_norm) ? 1.0 : 0.0);
    nlohmann::json d = {{"index", ex.index}, {"logliks", scores}, {"pred", pred}, {"pred_norm", pred_norm}};
    if (task.multiple_target) {
      // lm-eval: exact_match = any gold choice is the greedy continuation.
      bool hit = false;
      for (auto g : ex.golds) hit = hit || is_greedy[static_cast<size_t>(g)];
      exact.push_back(hit ? 1.0 : 0.0);
      d["gold"] = ex.golds;
      d["greedy"] = is_greedy;
      d["exact_match"] = hit ? 1 : 0;
    } else {
      d["gold"] = ex.gold;
      d["acc"] = static_cast<int>(acc.back());
      d["acc_norm"] = static_cast<int>(acc_norm.back());
    }
    result.details.push_back(std::move(d));
  }
  auto mean = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); };
  // What lm-eval reports: acc and acc_norm for one gold, exact_match alone for several
  // (WebQuestions' metric list).
  if (task.multiple_target)
    result.metrics = {{"exact_match", mean(exact), mean_stderr(exact)}};
  else
    result.metrics = {{"acc", mean(acc), mean_stderr(acc)}, {"acc_norm", mean(acc_norm), mean_stderr(acc_norm)}};
  return result;
}

TaskResult generation(DistributedLM& model, const PreparedTask& task, const EvalOptions& o, const Tokenizer* tok) {
  if (!tok) fail("{}: a generation task needs the model's tokenizer.json to decode answers", task.dir);
  const ModelConfig& c = model.stage().config();
  const int64_t max_new = o.max_new_tokens;
  // lm-eval keeps the last max_length - max_gen_toks context tokens.
  const int64_t max_context = c.max_positions - max_new;
  if (max_context <= 0)
    fail("--max-new-tokens {} leaves no room for a context in the model's {} positions", max_new, c.max_positions);
  std::vector<int64_t> stop = o.stop_ids.empty() ? c.eos_token_ids : o.stop_ids;
  if (auto eos = tok->eos_id()) stop.push_back(*eos);  // lm-eval also stops at the tokenizer's EOS text
  const int64_t N = static_cast<int64_t>(task.examples.size());
  std::vector<std::vector<int64_t>> contexts;
  for (const auto& ex : task.examples) {
    auto ctx = ex.context;
    if (static_cast<int64_t>(ctx.size()) > max_context) ctx.erase(ctx.begin(), ctx.end() - max_context);
    contexts.push_back(std::move(ctx));
  }
  const auto order = longest_first(contexts);
  const int64_t B = o.batch_size, batches = (N + B - 1) / B;
  const auto& grid = model.grid();
  // Generated ids + 1 (0: none), so that summing over DP gathers them.
  auto generated = torch::zeros({N, max_new}, torch::kInt64);
  auto g_a = generated.accessor<int64_t, 2>();
  Progress progress(task_name(task) + " (generation)", batches, "batches");
  for (int64_t b = 0; b < batches; ++b) {
    if (b % grid.dp() != grid.dp_rank()) continue;
    const int64_t first = b * B, n = std::min(B, N - first);
    std::vector<std::vector<int64_t>> seqs, out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) seqs.push_back(contexts[order[first + i]]);
    // Greedy decoding by repeated forwards of right-padded rows: every family's default
    // positions are then those of an unpadded sequence, on any grid. A finished row leaves the
    // batch (each row's logits depend on its own tokens alone).
    std::vector<int64_t> active(static_cast<size_t>(n));
    std::iota(active.begin(), active.end(), 0);
    for (int64_t step = 0; step < max_new && !active.empty(); ++step) {
      std::vector<std::vector<int64_t>> rows;
      for (int64_t i : active) rows.push_back(seqs[i]);
      const int64_t m = static_cast<int64_t>(active.size());
      auto batch = pad_batch(rows, 0, rows.size(), pad_id(c), /*left=*/false);
      auto result = model.forward(batch.ids, batch.mask, micro_batches(model, m), false, true);
      auto next = torch::zeros({m}, torch::kInt64);
      if (grid.last_stage()) {
        auto n_a = next.accessor<int64_t, 1>();
        for (int64_t r = 0; r < m; ++r)
          n_a[r] = result.logits[r][static_cast<int64_t>(rows[r].size()) - 1].argmax().item<int64_t>();
      }
      if (grid.pp() > 1)
        on_device(model, next, [&](torch::Tensor& d) { grid.pp_group()->broadcast(d, grid.pp() - 1); });
      auto n_a = next.accessor<int64_t, 1>();
      std::vector<int64_t> still;
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = active[r];
        out[i].push_back(n_a[r]);
        seqs[i].push_back(n_a[r]);
        const bool stopped = std::find(stop.begin(), stop.end(), n_a[r]) != stop.end() ||
                             tok->decode(out[i], true).find('\n') != std::string::npos;
        if (!stopped) still.push_back(i);
      }
      active = std::move(still);
    }
    for (int64_t i = 0; i < n; ++i)
      for (size_t j = 0; j < out[i].size(); ++j)
        g_a[static_cast<int64_t>(order[first + i])][static_cast<int64_t>(j)] = out[i][j] + 1;
    progress.update(b + 1);
  }
  gather_dp(model, generated);
  progress.finish();
  g_a = generated.accessor<int64_t, 2>();

  TaskResult result;
  std::vector<double> em;
  for (int64_t e = 0; e < N; ++e) {
    const auto& ex = task.examples[e];
    std::vector<int64_t> ids;
    for (int64_t j = 0; j < max_new && g_a[e][j] > 0; ++j) ids.push_back(g_a[e][j] - 1);
    // As lm-eval: decoded without special tokens, cut at the first stop sequence.
    std::string text = tok->decode(ids, true);
    text = text.substr(0, text.find('\n'));
    const std::string norm = normalize_answer(text);
    bool hit = false;
    for (const auto& a : ex.answers) hit = hit || normalize_answer(a) == norm;
    em.push_back(hit ? 1.0 : 0.0);
    result.details.push_back({{"index", ex.index}, {"generation", text}, {"exact_match", hit ? 1 : 0}});
  }
  result.metrics = {{"exact_match", std::accumulate(em.begin(), em.end(), 0.0) / em.size(), mean_stderr(em)}};
  return result;
}

TaskResult perplexity(DistributedLM& model, const PreparedTask& task, const EvalOptions& o) {
  const ModelConfig& c = model.stage().config();
  const int64_t N = static_cast<int64_t>(task.examples.size());
  std::vector<std::vector<int64_t>> windows;
  for (const auto& ex : task.examples) {
    if (static_cast<int64_t>(ex.tokens.size()) > c.max_positions)
      fail("{}: example {} has {} tokens, more than the model's {} positions (prepare with a smaller --window)",
           task.dir, ex.index, ex.tokens.size(), c.max_positions);
    windows.push_back(ex.tokens);
  }
  const auto order = longest_first(windows);
  const int64_t B = o.batch_size, batches = (N + B - 1) / B;
  const auto& grid = model.grid();
  auto sums = torch::zeros({N, 2}, torch::kFloat64);  // log-likelihood, scored tokens
  auto s_a = sums.accessor<double, 2>();
  Progress progress(task_name(task) + " (perplexity)", batches, "batches");
  for (int64_t b = 0; b < batches; ++b) {
    if (b % grid.dp() != grid.dp_rank()) continue;
    const int64_t first = b * B, n = std::min(B, N - first);
    std::vector<std::vector<int64_t>> seqs;
    for (int64_t i = 0; i < n; ++i) seqs.push_back(windows[order[first + i]]);
    auto batch = pad_batch(seqs, 0, seqs.size(), pad_id(c), /*left=*/false);
    auto targets = causal_targets(batch.ids, batch.mask, kIgnore);
    auto lp = model.token_logprobs(batch.ids, batch.mask, targets, micro_batches(model, n), kIgnore).sum(1);
    auto count = (targets != kIgnore).sum(1);
    for (int64_t i = 0; i < n; ++i) {
      s_a[static_cast<int64_t>(order[first + i])][0] = lp[i].item<double>();
      s_a[static_cast<int64_t>(order[first + i])][1] = static_cast<double>(count[i].item<int64_t>());
    }
    progress.update(b + 1);
  }
  gather_dp(model, sums);
  progress.finish();
  s_a = sums.accessor<double, 2>();
  TaskResult result;
  double ll = 0, tokens = 0;
  for (int64_t e = 0; e < N; ++e) {
    ll += s_a[e][0];
    tokens += s_a[e][1];
    result.details.push_back(
        {{"index", task.examples[e].index}, {"tokens", static_cast<int64_t>(s_a[e][1])}, {"nll", -s_a[e][0]}});
  }
  const double nll = -ll / std::max(tokens, 1.0);
  result.metrics = {
      {"nll", nll, kNaN}, {"perplexity", std::exp(nll), kNaN}, {"bits_per_token", nll / std::log(2.0), kNaN}};
  return result;
}

}  // namespace

std::pair<std::vector<int64_t>, int64_t> loglikelihood_input(const std::vector<int64_t>& context,
                                                             const std::vector<int64_t>& continuation,
                                                             int64_t max_length) {
  std::vector<int64_t> whole = context;
  whole.insert(whole.end(), continuation.begin(), continuation.end());
  const size_t keep = std::min(whole.size(), static_cast<size_t>(max_length + 1));
  std::vector<int64_t> input(whole.end() - static_cast<std::ptrdiff_t>(keep), whole.end() - 1);
  return {input, std::min<int64_t>(static_cast<int64_t>(continuation.size()), static_cast<int64_t>(input.size()))};
}

std::string normalize_answer(const std::string& text) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = text.find_first_not_of(ws);
  std::string s = b == std::string::npos ? "" : text.substr(b, text.find_last_not_of(ws) - b + 1);
  static const std::regex articles("\\b(?:The |the |An |A |The |a |an )");
  s = std::regex_replace(s, articles, "");
  std::string out;
  for (char ch : s) {
    if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
    if (static_cast<unsigned char>(ch) < 128 && std::ispunct(static_cast<unsigned char>(ch))) continue;
    out.push_back(ch);
  }
  return out;
}

double mean_stderr(const std::vector<double>& v) {
  const size_t n = v.size();
  if (n < 2) return kNaN;
  const double mu = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double ss = 0;
  for (double x : v) ss += (x - mu) * (x - mu);
  return std::sqrt(ss / (n - 1)) / std::sqrt(static_cast<double>(n));
}

void check_task_tokenizer(const PreparedTask& task, const std::string& model_dir) {
  const auto mine = std::filesystem::path(model_dir) / "tokenizer.json";
  const std::string theirs = task.manifest.value("tokenizer", "");
  if (theirs.empty() || !std::filesystem::exists(mine)) return;
  if (!std::filesystem::exists(theirs)) {
    spdlog::warn("{}: cannot check the tokenizer it was prepared with ({} is gone)", task.dir, theirs);
    return;
  }
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  if (slurp(theirs) != slurp(mine.string()))
    fail("{}: prepared with tokenizer {}, which differs from the model's {} (prepare it again with --tokenizer {})",
         task.dir, theirs, mine.string(), model_dir);
}

std::vector<int64_t> generation_stop_ids(const std::string& model_dir, const ModelConfig& c) {
  const auto path = (std::filesystem::path(model_dir) / "generation_config.json").string();
  if (!std::filesystem::exists(path)) return c.eos_token_ids;
  const auto j = read_json_file(path);
  if (!j.contains("eos_token_id") || j.at("eos_token_id").is_null()) return c.eos_token_ids;
  if (j.at("eos_token_id").is_array()) return json_field<std::vector<int64_t>>(j, "eos_token_id", path);
  return {json_field<int64_t>(j, "eos_token_id", path)};
}

std::string task_name(const PreparedTask& task) {
  auto p = std::filesystem::path(task.dir);
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

TaskResult evaluate_task(DistributedLM& model, const PreparedTask& task, const EvalOptions& options,
                         const Tokenizer* tokenizer) {
  if (options.batch_size <= 0) fail("--batch-size must be positive, got {}", options.batch_size);
  if (options.max_new_tokens <= 0) fail("--max-new-tokens must be positive, got {}", options.max_new_tokens);
  Timer timer;
  TaskResult result;
  if (task.kind == "multiple_choice")
    result = multiple_choice(model, task, options);
  else if (task.kind == "generation")
    result = generation(model, task, options, tokenizer);
  else
    result = perplexity(model, task, options);
  result.task = task_name(task);
  result.kind = task.kind;
  result.num_examples = static_cast<int64_t>(task.examples.size());
  const double s = timer.seconds();
  spdlog::info("{}: {} examples in {:.2f} s ({:.1f} examples/s)", result.task, result.num_examples, s,
               result.num_examples / std::max(s, 1e-9));
  return result;
}

nlohmann::json TaskResult::to_json() const {
  nlohmann::json m = nlohmann::json::object();
  for (const auto& x : metrics) {
    nlohmann::json v = {{"value", x.value}, {"stderr", nullptr}};
    if (!std::isnan(x.stderr_)) v["stderr"] = x.stderr_;
    m[x.name] = v;
  }
  return {{"task", task}, {"kind", kind}, {"num_examples", num_examples}, {"metrics", m}};
}

std::string results_table(const std::vector<TaskResult>& results) {
  std::vector<std::array<std::string, 7>> rows = {{"Task", "Kind", "N", "Metric", "Value", "", "Stderr"}};
  for (const auto& r : results)
    for (size_t i = 0; i < r.metrics.size(); ++i) {
      const auto& m = r.metrics[i];
      const bool first = i == 0;
      rows.push_back({first ? r.task : "", first ? r.kind : "", first ? std::to_string(r.num_examples) : "", m.name,
                      fmt::format("{:.4f}", m.value), std::isnan(m.stderr_) ? "" : "±",
                      std::isnan(m.stderr_) ? "" : fmt::format("{:.4f}", m.stderr_)});
    }
  std::array<size_t, 7> width{3, 3, 3, 3, 3, 3, 3};  // "---" at least, for markdown
  for (const auto& row : rows)
    for (size_t j = 0; j < 7; ++j) width[j] = std::max(width[j], static_cast<size_t>(utf8_length(row[j])));
  std::string out;
  auto line = [&](const std::array<std::string, 7>& row) {
    out += "|";
    for (size_t j = 0; j < 7; ++j) {
      const std::string pad(width[j] - static_cast<size_t>(utf8_length(row[j])), ' ');
      const bool right = j == 2 || j == 4 || j == 6;
      out += right ? pad + row[j] : row[j] + pad;
      out += "|";
    }
    out += "\n";
  };
  line(rows[0]);
  out += "|";
  for (size_t j = 0; j < 7; ++j) {
    const bool right = j == 2 || j == 4 || j == 6;
    out += std::string(width[j] - (right ? 1 : 0), '-') + (right ? ":" : "") + "|";
  }
  out += "\n";
  for (size_t i = 1; i < rows.size(); ++i) line(rows[i]);
  return out;
}

}  // namespace crash
