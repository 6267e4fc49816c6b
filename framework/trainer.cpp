#include "framework/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <set>

#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/emulator.h"
#include "framework/optim.h"
#include "framework/prepared.h"
#include "framework/sift.h"
#include "framework/token_input.h"
#include "framework/train_checkpoint.h"
#include "parallel/errors.h"
#include "parallel/progress.h"
#include "parallel/stop_signal.h"
#include "parallel/world.h"

namespace crash {

namespace fs = std::filesystem;

TrainData read_train_data(const std::string& path, const ModelConfig& cfg, const Tokenizer* tokenizer) {
  TrainData data;
  data.path = path;
  if (!fs::exists(path)) fail("{}: training data not found", path);
  if (fs::is_directory(path)) {
    auto task = read_prepared(path, -1, cfg.vocab_size);
    data.kind = task.kind;
    if (task.kind == "generation")
      fail("{}: a generation task has no target tokens to train on; prepare a multiple-choice or text task", path);
    for (const auto& e : task.examples) {
      TrainExample x{e.tokens, 1};
      if (task.kind == "multiple_choice") {
        const auto& gold = e.continuations[static_cast<size_t>(e.gold)];
        x.loss_from = static_cast<int64_t>(e.tokens.size() - std::min(gold.size(), e.tokens.size()));
      }
      data.examples.push_back(std::move(x));
    }
  } else {
    data.kind = "tokens";
    for (auto& t : read_token_lines(path, cfg.vocab_size, std::numeric_limits<int64_t>::max(), tokenizer))
      data.examples.push_back({std::move(t), 1});
  }
  if (data.examples.empty()) fail("{}: no examples", path);
  uint64_t h = 1469598103934665603ull;
  for (auto& x : data.examples) {
    // Longer than the model's context: keep the last tokens (targets sit at the end).
    const auto n = static_cast<int64_t>(x.tokens.size());
    if (n > cfg.max_positions) {
      const int64_t cut = n - cfg.max_positions;
      x.tokens.erase(x.tokens.begin(), x.tokens.begin() + cut);
      x.loss_from = std::max<int64_t>(1, x.loss_from - cut);
    }
    x.loss_from = std::max<int64_t>(1, x.loss_from);
    h = (h ^ token_hash(x.tokens)) * 1099511628211ull;
    h = (h ^ static_cast<uint64_t>(x.loss_from)) * 1099511628211ull;
  }
  data.hash = h;
  return data;
}

TrainBatch make_batch(const TrainData& data, const std::vector<int64_t>& rows, int64_t length, int64_t pad_id) {
  const auto B = static_cast<int64_t>(rows.size());
  TrainBatch b{torch::full({B, length}, std::max<int64_t>(pad_id, 0), torch::kInt64),
               torch::zeros({B, length}, torch::kInt64), torch::full({B, length}, -100, torch::kInt64)};
  auto ids = b.ids.accessor<int64_t, 2>();
  auto mask = b.mask.accessor<int64_t, 2>();
  auto labels = b.labels.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    // A filler row (a DP rank with fewer validation rows than the others) is one masked token.
    if (rows[static_cast<size_t>(r)] < 0) continue;
    const TrainExample& x = data.examples[static_cast<size_t>(rows[static_cast<size_t>(r)])];
    const auto n = static_cast<int64_t>(x.tokens.size());
    for (int64_t t = 0; t < n; ++t) {
      ids[r][t] = x.tokens[static_cast<size_t>(t)];
      mask[r][t] = 1;
      // Position t predicts token t + 1.
      if (t + 1 < n && t + 1 >= x.loss_from) labels[r][t] = x.tokens[static_cast<size_t>(t + 1)];
    }
  }
  return b;
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  // Fisher-Yates with the engine's raw output (std::shuffle and the distributions differ
  // between standard libraries; mt19937_64 does not).
  std::mt19937_64 rng(seed * 1000003ull + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(order[static_cast<size_t>(i)], order[rng() % static_cast<uint64_t>(i + 1)]);
  return order;
}

std::pair<double, double> train_dropout(const TrainOptions& o, const ModelConfig& cfg) {
  return {o.dropout.value_or(cfg.dropout), cfg.attention_dropout};
}

namespace {

// Options that shape the loss sequence: a checkpoint resumes only with the same ones.
nlohmann::json schedule_options(const TrainOptions& o, const ModelConfig& cfg) {
  nlohmann::json j = {{"steps", o.steps},
                      {"batch_size", o.batch_size},
                      {"grad_accum", o.grad_accum},
                      {"lr", o.lr},
                      {"warmup", o.warmup},
                      {"weight_decay", o.weight_decay},
                      {"clip", o.clip},
                      {"seed", o.seed},
                      {"train_all", o.train_all},
                      {"dtype", std::string(c10::toString(o.dtype))},
                      {"beta1", o.beta1},
                      {"beta2", o.beta2},
                      {"eps", o.eps},
                      {"distill_from", o.distill_from},
                      {"kd_alpha", o.kd_alpha},
                      {"kd_temperature", o.kd_temperature}};
  // Only SIFT runs carry the key, so dense checkpoints written before it still resume.
  if (o.sparse_increment > 0) j["sparse_increment"] = o.sparse_increment;
  // Likewise only runs with dropout carry its rates.
  const auto [hidden, attention] = train_dropout(o, cfg);
  if (hidden > 0 || attention > 0) {
    j["dropout"] = hidden;
    j["attention_dropout"] = attention;
  }
  return j;
}

void check_options(const TrainOptions& o, int world_size) {
  if (o.steps <= 0) fail("--steps must be positive, got {}", o.steps);
  if (o.batch_size <= 0) fail("--batch-size must be positive, got {}", o.batch_size);
  if (o.micro_batches <= 0) fail("--micro-batches must be positive, got {}", o.micro_batches);
  if (o.grad_accum <= 0) fail("--grad-accum must be positive, got {}", o.grad_accum);
  if (o.lr < 0) fail("--lr must not be negative, got {}", o.lr);
  if (o.warmup < 0) fail("--warmup must not be negative, got {}", o.warmup);
  if (o.weight_decay < 0) fail("--weight-decay must not be negative, got {}", o.weight_decay);
  if (o.eval_every < 0 || o.save_every < 0) fail("--eval-every and --save-every must not be negative");
  if (o.resume && o.overwrite) fail("--resume and --overwrite exclude each other");
  if (o.dropout && !(*o.dropout >= 0 && *o.dropout < 1)) fail("--dropout must be in [0, 1), got {}", *o.dropout);
  if (o.sparse_increment < 0 || o.sparse_increment > 1 || std::isnan(o.sparse_increment))
    fail("--sparse-increment must be in (0, 1], got {}", o.sparse_increment);
  if (!o.save_increments.empty() && o.sparse_increment <= 0)
    fail("--save-increments {}: needs --sparse-increment (only SIFT trains increments)", o.save_increments);
  if (!o.distill_from.empty()) {
    if (o.kd_alpha < 0 || o.kd_alpha > 1) fail("--kd-alpha must be in [0, 1], got {}", o.kd_alpha);
    if (o.kd_temperature <= 0) fail("--kd-temperature must be positive, got {}", o.kd_temperature);
  }
  const int dp = world_size / (o.grid.tp * o.grid.pp);
  const int64_t per_pass = static_cast<int64_t>(o.grad_accum) * dp;
  if (o.batch_size % per_pass != 0)
    fail("--batch-size {} does not split into --grad-accum {} passes over {} data-parallel ranks", o.batch_size,
         o.grad_accum, dp);
  if ((o.batch_size / per_pass) % o.micro_batches != 0)
    fail("each rank's {} rows per pass do not split into --micro-batches {}", o.batch_size / per_pass, o.micro_batches);
}

// Which parameters train: the emulator plan's adapter layers, or all of them.
std::function<bool(const std::string&)> trainable_rule(const TrainOptions& o, const ModelConfig& cfg) {
  if (o.train_all) return [](const std::string&) { return true; };
  auto plan = read_plan(o.model);
  if (!plan)
    fail("{}: no crash_plan.json, so no adapter layers are known; pass --train-all to train every parameter", o.model);
  if (static_cast<int64_t>(plan->slots.size()) != cfg.num_layers)
    fail("{}/crash_plan.json: {} slots but config.json has {} layers", o.model, plan->slots.size(), cfg.num_layers);
  auto slots = plan->trainable_slots();
  if (slots.empty())
    fail("{}/crash_plan.json: the plan has no trainable (adapter) layers; pass --train-all to train every parameter",
         o.model);
  std::set<int64_t> layers(slots.begin(), slots.end());
  return [layers](const std::string& name) {
    auto l = layer_of_parameter(name);
    return l && layers.count(*l) != 0;
  };
}

// Rank 0 appends JSON lines and flushes each, so a killed run leaves whole lines.
class TrainLog {
 public:
  TrainLog(const std::string& path, bool active, int64_t keep_through_step) : active_(active) {
    if (!active_) return;
    std::vector<std::string> kept;
    if (keep_through_step > 0) {
      std::ifstream in(path);
      std::string line;
      while (std::getline(in, line)) {
        try {
          auto j = nlohmann::json::parse(line);
          if (j.value("step", int64_t(0)) <= keep_through_step) kept.push_back(line);
        } catch (const nlohmann::json::exception&) {
        }
      }
    }
    out_.open(path, std::ios::trunc);
    if (!out_) fail("{}: cannot write", path);
    for (auto& l : kept) out_ << l << "\n";
    out_.flush();
  }
  void write(const nlohmann::json& j) {
    if (!active_) return;
    out_ << j.dump() << "\n";
    out_.flush();
  }

 private:
  bool active_;
  std::ofstream out_;
};

}  // namespace

TrainSummary train(const TrainOptions& o) {
  install_stop_handlers();  // before anything slow: a signal during loading is not fatal
  World& world = World::get();
  CheckpointReader ckpt(o.model);
  const ModelConfig& cfg = ckpt.config();
  auto grid = ProcessGrid::create(o.grid);
  // The student and the teacher are checked against the grid before any data or weight is read.
  validate_model_grid(cfg, grid->layout(), o.pp_layers);
  check_options(o, world.size());
  auto trains = trainable_rule(o, cfg);
  std::optional<CheckpointReader> teacher_ckpt;
  if (!o.distill_from.empty()) {
    teacher_ckpt.emplace(o.distill_from);
    const ModelConfig& tc = teacher_ckpt->config();
    if (tc.vocab_size != cfg.vocab_size)
      fail("--distill-from {}: vocabulary of {} tokens, but the student's has {}", o.distill_from, tc.vocab_size,
           cfg.vocab_size);
    validate_model_grid(tc, grid->layout());
  }

  const auto tokenizer = model_tokenizer(o.model);
  const Tokenizer* tok = tokenizer ? &*tokenizer : nullptr;
  const TrainData data = read_train_data(o.data, cfg, tok);
  std::optional<TrainData> val;
  if (!o.val_data.empty()) val = read_train_data(o.val_data, cfg, tok);

  // The output folder: a new run needs it empty (or --overwrite); --resume needs a checkpoint.
  const fs::path out(o.out), ckpt_root = out / "checkpoints";
  std::optional<std::string> resume_from;
  if (o.resume) {
    resume_from = latest_train_checkpoint(ckpt_root.string());
    if (!resume_from)
      fail("{}: no complete checkpoint to resume from (run without --resume to start)", ckpt_root.string());
  } else if (fs::exists(out) && !fs::is_empty(out) && !o.overwrite) {
    fail("{}: already exists; pass --resume to continue it or --overwrite to replace it", o.out);
  }
  nlohmann::json manifest;
  if (resume_from) {
    manifest = read_train_manifest(*resume_from);
    const std::string mpath = *resume_from + "/manifest.json";
    const auto& t = manifest["trainer"];
    const auto want = schedule_options(o, cfg);
    for (const auto& [key, value] : want.items())
      if (!t["options"].contains(key) || t["options"][key] != value)
        fail("{}: written with {} = {}, but this run has {} (resume with the same options)", mpath, key,
             t["options"].value(key, nlohmann::json()).dump(), value.dump());
    if (t["data_hash"].get<std::string>() != fmt::format("{:016x}", data.hash))
      fail("{}: the training data {} differs from the data this checkpoint was trained on", mpath, o.data);
    if (t["model_config"] != cfg.raw) fail("{}: written for another model than {}", mpath, o.model);
  }

  if (o.overwrite && grid->rank() == 0) {
    std::error_code ec;
    fs::remove_all(out, ec);
  }
  grid->world()->barrier();
  if (grid->rank() == 0) fs::create_directories(ckpt_root);
  grid->world()->barrier();

  DistributedOptions dopts;
  dopts.dtype = o.dtype;
  dopts.pp_layers = o.pp_layers;
  DistributedLM model(ckpt, grid, dopts);
  model.set_trainable(trains);
  // The teacher of knowledge distillation: the full model on the same grid, inference only.
  std::unique_ptr<DistributedLM> teacher;
  if (teacher_ckpt) {
    DistributedOptions topts;
    topts.dtype = o.dtype;
    teacher = std::make_unique<DistributedLM>(*teacher_ckpt, grid, topts);
    teacher->set_trainable([](const std::string&) { return false; });
  }
  auto params = model.trainable();
  {
    auto count = torch::full({1}, static_cast<double>(params.size()), torch::kFloat64);
    grid->world()->allreduce(count);
    if (count.item<double>() == 0) fail("{}: no parameter trains", o.model);
  }
  std::vector<OptimParam> oparams;
  SliceMap slices;
  int64_t trained_numel = 0;
  for (auto& p : params) {
    oparams.push_back({p.name, p.tensor, p.in_norm});
    slices[p.name] = p.slice;
    if (p.in_norm) trained_numel += p.tensor.numel();
  }
  AdamWOptions aopts;
  aopts.beta1 = o.beta1;
  aopts.beta2 = o.beta2;
  aopts.eps = o.eps;
  aopts.weight_decay = o.weight_decay;
  std::unique_ptr<Optimizer> optimizer;
  SparseAdamW* sift = nullptr;
  if (o.sparse_increment > 0) {
    std::vector<SiftParam> sp;
    for (size_t i = 0; i < oparams.size(); ++i) {
      const auto& slice = slices[oparams[i].name];
      const int64_t n = oparams[i].param.numel();
      sp.push_back({oparams[i], slice, slice ? n / slice->length * slice->full : n});
    }
    auto s = std::make_unique<SparseAdamW>(sp, o.sparse_increment, aopts, grid->tp_group(), grid->tp_rank(),
                                           grid->dp_group());
    sift = s.get();
    optimizer = std::move(s);
  } else {
    optimizer = std::make_unique<AdamW>(oparams, aopts);
  }
  const std::vector<CommPtr> norm_groups = {grid->tp_group(), grid->pp_group()};
  {
    auto n = torch::full({1}, static_cast<double>(trained_numel), torch::kFloat64);
    grid->tp_group()->allreduce(n);
    grid->pp_group()->allreduce(n);
    spdlog::info("training {} parameters of {} on {}", static_cast<int64_t>(n.item<double>()), o.model,
                 grid->describe());
  }
  const std::string tied = cfg.tie_word_embeddings ? cfg.embedding_name() : "";

  const auto rates = train_dropout(o, cfg);
  const double hidden_dropout = rates.first, attention_dropout = rates.second;
  spdlog::info("dropout {} on residual branches, {} on attention probabilities{}", hidden_dropout, attention_dropout,
               o.dropout ? " (--dropout)" : " (config.json)");

  // SIFT's reductions act on the masked entries it keeps once the mask exists.
  if (sift) model.set_gradient_source([sift](const torch::Tensor& p) { return sift->gradient_of(p); });

  int64_t start = 0, best_step = -1;
  double best_val = std::numeric_limits<double>::infinity();
  if (resume_from) {
    load_train_checkpoint(*resume_from, *grid, *optimizer, slices, tied);
    start = manifest["step"].get<int64_t>();
    const auto& t = manifest["trainer"];
    if (!t["best_val"].is_null()) best_val = t["best_val"].get<double>();
    best_step = t.value("best_step", int64_t(-1));
    spdlog::info("resuming from {} (step {}, written on tp {} pp {} dp {})", *resume_from, start,
                 manifest["grid"]["tp"].get<int>(), manifest["grid"]["pp"].get<int>(),
                 manifest["grid"]["dp"].get<int>());
  }
  TrainLog log((out / "train_log.jsonl").string(), grid->rank() == 0, start);

  const int64_t N = static_cast<int64_t>(data.examples.size());
  const int64_t B = o.batch_size, K = o.grad_accum, dp = grid->dp();
  const int64_t per_rank = B / (K * dp);
  const int64_t pad = cfg.pad_token_id;
  std::map<int64_t, std::vector<int64_t>> orders;  // epoch -> order (the last two are kept)
  auto example_at = [&](int64_t position) {
    const int64_t epoch = position / N;
    auto it = orders.find(epoch);
    if (it == orders.end()) {
      while (orders.size() > 1) orders.erase(orders.begin());
      it = orders.emplace(epoch, epoch_order(N, o.seed, epoch)).first;
    }
    return it->second[static_cast<size_t>(position % N)];
  };

  auto validate = [&]() {
    double sum = 0, tokens = 0;
    const auto& v = val->examples;
    const int64_t n = static_cast<int64_t>(v.size());
    for (int64_t first = 0; first < n; first += B) {
      const int64_t count = std::min(B, n - first);
      // Every DP rank takes the same number of rows (fillers past the end), micro-batch aligned.
      int64_t mine = (count + dp - 1) / dp;
      mine = (mine + o.micro_batches - 1) / o.micro_batches * o.micro_batches;
      std::vector<int64_t> rows;
      int64_t length = 1;
      for (int64_t i = first; i < first + count; ++i)
        length = std::max<int64_t>(length, static_cast<int64_t>(v[static_cast<size_t>(i)].tokens.size()));
      for (int64_t r = 0; r < mine; ++r) {
        const int64_t i = first + grid->dp_rank() * mine + r;
        rows.push_back(i < first + count ? i : -1);
      }
      auto batch = make_batch(*val, rows, length, pad);
      double t = 0;
      const double loss = model.evaluate_loss(batch.ids, batch.mask, o.micro_batches, batch.labels, &t);
      sum += loss * t;
      tokens += t;
    }
    return sum / std::max(1.0, tokens);
  };

  auto trainer_state = [&](int64_t step) {
    return nlohmann::json{
        {"step", step},           {"options", schedule_options(o, cfg)},
        {"data", o.data},         {"data_hash", fmt::format("{:016x}", data.hash)},
        {"data_examples", N},     {"data_position", step * B},
        {"epoch", step * B / N},  {"order", "mt19937_64(seed * 1000003 + epoch) Fisher-Yates per epoch"},
        {"val_data", o.val_data}, {"best_val", std::isfinite(best_val) ? nlohmann::json(best_val) : nlohmann::json()},
        {"best_step", best_step}, {"model", o.model},
        {"model_config", cfg.raw}};
  };

  TrainSummary summary;
  const auto run_start = std::chrono::steady_clock::now();
  double tokens_done = 0, last_loss = 0;
  int64_t ran = 0;
  // Sums over the steps since the last log line: its loss is their mean, its rate their tokens/s.
  struct {
    double loss = 0, tokens = 0, seconds = 0;
    int64_t steps = 0;
  } interval;
  for (int64_t step = start; step < o.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    optimizer->zero_grad();
    std::vector<int64_t> rows(static_cast<size_t>(B));
    int64_t length = 1;
    double targets = 0, tokens = 0;
    for (int64_t i = 0; i < B; ++i) {
      rows[static_cast<size_t>(i)] = example_at(step * B + i);
      const auto& x = data.examples[static_cast<size_t>(rows[static_cast<size_t>(i)])];
      const auto n = static_cast<int64_t>(x.tokens.size());
      length = std::max(length, n);
      targets += static_cast<double>(std::max<int64_t>(0, n - x.loss_from));
      tokens += static_cast<double>(n);
    }
    auto slice_batch = [&](int64_t k) {
      const auto first = rows.begin() + k * (B / K) + grid->dp_rank() * per_rank;
      return make_batch(data, std::vector<int64_t>(first, first + per_rank), length, pad);
    };
    // Pass k's rows hold the step's slots from k * (B / K) + dp_rank * per_rank on: the
    // dropout masks follow the example's slot, not the rank that runs it.
    auto dropout_of = [&](int64_t k) {
      return DistributedLM::Dropout{hidden_dropout, attention_dropout, o.seed, step,
                                    k * (B / K) + grid->dp_rank() * per_rank};
    };
    if (sift && !sift->selected()) {
      // The mask, from the first micro-batch's gradient, in passes that each compute the dense
      // gradients of a part of the parameters only (the rest frozen for that pass).
      auto first = slice_batch(0);
      const auto groups = sift->selection_groups(o.sift_selection_passes, {tied, "lm_head.weight"});
      const auto& ps = optimizer->params();
      for (const auto& group : groups) {
        for (const auto& p : ps) p.param.requires_grad_(false);
        for (size_t i : group) ps[i].param.requires_grad_(true);
        const auto drop = dropout_of(0);
        model.forward_backward(first.ids, first.mask, o.micro_batches, true, first.labels, std::max(1.0, targets),
                               nullptr, &drop);
        sift->select(group);
      }
      for (const auto& p : ps) p.param.requires_grad_(true);
      sift->arm();
      spdlog::info("SIFT: mask selected in {} passes over the first micro-batch", groups.size());
    }
    double loss = 0;
    for (int64_t k = 0; k < K; ++k) {
      auto batch = slice_batch(k);
      std::optional<DistributedLM::Distillation> kd;
      if (teacher)
        kd = DistributedLM::Distillation{teacher->forward(batch.ids, batch.mask, o.micro_batches, false).logits,
                                         o.kd_alpha, o.kd_temperature};
      const auto drop = dropout_of(k);
      loss += model.forward_backward(batch.ids, batch.mask, o.micro_batches, k == K - 1, batch.labels,
                                     std::max(1.0, targets), kd ? &*kd : nullptr, &drop);
    }
    const double norm = optimizer->clip_gradients(o.clip, norm_groups);
    const double lr = linear_schedule(o.lr, step, o.warmup, o.steps);
    optimizer->step(lr);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens_done += tokens;
    ++ran;
    last_loss = loss;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
    log.write({{"step", step + 1},
               {"loss", loss},
               {"lr", lr},
               {"grad_norm", norm},
               {"tokens", tokens},
               {"tokens_per_s", tokens / seconds},
               {"seconds", seconds},
               {"dropout", hidden_dropout},
               {"attention_dropout", attention_dropout}});
    interval.loss += loss;
    interval.tokens += tokens;
    interval.seconds += seconds;
    ++interval.steps;
    if ((step + 1) % o.log_interval == 0 || ran == 1 || step + 1 == o.steps) {
      spdlog::info("step {}/{}: loss {:.4f}, lr {:.3g}, grad norm {:.3f}, {:.0f} tokens/s, {} left", step + 1, o.steps,
                   interval.loss / interval.steps, lr, norm, interval.tokens / interval.seconds,
                   duration_text(elapsed / ran * (o.steps - step - 1)));
      interval = {};
    }

    const bool last = step + 1 == o.steps;
    if (val && ((o.eval_every > 0 && (step + 1) % o.eval_every == 0) || last)) {
      const double v = validate();
      const bool better = v < best_val;
      if (better) {
        best_val = v;
        best_step = step + 1;
        model.save_model((out / "model").string());
      }
      log.write({{"step", step + 1}, {"val_loss", v}, {"best", better}});
      spdlog::info("step {}: validation loss {:.4f}{}", step + 1, v, better ? " (best so far, saved)" : "");
    }
    if (last && !val) model.save_model((out / "model").string());
    const bool save = (o.save_every > 0 && (step + 1) % o.save_every == 0) || last;
    // SIGUSR1/SIGTERM (a batch job near its time limit): every rank stops after the same step
    // with a checkpoint, and --resume continues exactly from it.
    const bool stop = !last && stop_agreed(*grid->world());
    if (save || stop)
      save_train_checkpoint(ckpt_root.string(), step + 1, *grid, *optimizer, slices, trainer_state(step + 1),
                            o.keep_checkpoints);
    if (stop)
      throw StopRequested(
          fmt::format("stopped by a signal after step {} of {}; checkpoint in {} (run again with --resume)", step + 1,
                      o.steps, ckpt_root.string()));
    if (o.stop_after > 0 && ran >= o.stop_after) break;
  }
  if (sift && !o.save_increments.empty() && start + ran == o.steps)
    save_increments(o.save_increments, *sift, *grid, ckpt, cfg.tie_word_embeddings ? "lm_head.weight" : "");
  {
    // Optimiser memory (moments, masters, SIFT's indices) of this rank: what SIFT shrinks.
    int64_t bytes = 0;
    for (const auto& s : optimizer->state())
      if (s.kind != "param") bytes += s.value.numel() * static_cast<int64_t>(s.value.element_size());
    spdlog::info("optimizer state: {} bytes on rank {}", bytes, grid->rank());
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  summary.steps = ran;
  summary.last_loss = last_loss;
  summary.best_val = best_val;
  summary.tokens_per_second = total > 0 ? tokens_done / total : 0;
  spdlog::info("trained {} steps in {}: {:.0f} tokens/s; model in {}", ran, duration_text(total),
               summary.tokens_per_second, (out / "model").string());
  return summary;
}

}  // namespace crash
