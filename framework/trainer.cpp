#include "framework/trainer.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <torch/cuda.h>

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
#include "framework/distributed_optim.h"
#include "framework/emulator.h"
#include "framework/optim.h"
#include "framework/prepared.h"
#include "framework/recompute.h"
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
                      {"train_head", o.train_head},
                      {"dtype", std::string(c10::toString(o.dtype))},
                      {"beta1", o.beta1},
                      {"beta2", o.beta2},
                      {"eps", o.eps},
                      {"distill_from", o.distill_from},
                      {"kd_alpha", o.kd_alpha},
                      {"kd_temperature", o.kd_temperature}};
  if (o.train_last) j["train_last"] = *o.train_last;
  // Only SIFT runs carry the key, so dense checkpoints written before it still resume.
  if (o.sparse_increment) j["sparse_increment"] = *o.sparse_increment;
  if (o.lora.active())
    j["lora"] = {{"rank", *o.lora.rank},
                 {"alpha", o.lora.lora_alpha()},
                 {"targets", o.lora.target_names()},
                 {"dropout", o.lora.dropout.value_or(0.0)}};
  // Likewise only runs with dropout carry its rates.
  const auto [hidden, attention] = train_dropout(o, cfg);
  if (hidden > 0 || attention > 0) {
    j["dropout"] = hidden;
    j["attention_dropout"] = attention;
  }
  return j;
}

}  // namespace

void check_train_options(const TrainOptions& o, int world_size, const ModelConfig* config) {
  if (o.steps <= 0) fail("--steps must be positive, got {}", o.steps);
  if (o.batch_size <= 0) fail("--batch-size must be positive, got {}", o.batch_size);
  if (o.micro_batches <= 0) fail("--micro-batches must be positive, got {}", o.micro_batches);
  if (o.grad_accum <= 0) fail("--grad-accum must be positive, got {}", o.grad_accum);
  if (o.lr < 0) fail("--lr must not be negative, got {}", o.lr);
  if (o.warmup < 0) fail("--warmup must not be negative, got {}", o.warmup);
  if (o.weight_decay < 0) fail("--weight-decay must not be negative, got {}", o.weight_decay);
  if (o.eval_every < 0 || o.save_every < 0) fail("--eval-every and --save-every must not be negative");
  if (o.log_interval <= 0) fail("--log-interval must be positive, got {}", o.log_interval);
  if (o.keep_checkpoints < 1) fail("--keep-checkpoints must be at least 1");
  if (o.resume && o.overwrite) fail("--resume and --overwrite exclude each other");
  if (o.train_all && (o.train_last || o.train_head))
    fail("--train-all trains every parameter: it excludes --train-last and --train-head");
  if (o.train_last && *o.train_last < 0) fail("--train-last must not be negative, got {}", *o.train_last);
  if (o.dropout && !(*o.dropout >= 0 && *o.dropout < 1)) fail("--dropout must be in [0, 1), got {}", *o.dropout);
  if (o.sparse_increment && !(*o.sparse_increment > 0 && *o.sparse_increment <= 1))
    fail("--sparse-increment must be in (0, 1], got {}", *o.sparse_increment);
  if (o.sift_selection_passes < 1) fail("--sift-selection-passes must be at least 1, got {}", o.sift_selection_passes);
  if (!o.save_increments.empty() && !o.sparse_increment)
    fail("--save-increments {}: needs --sparse-increment (only SIFT trains increments)", o.save_increments);
  parse_recompute(o.recompute);
  if (o.distributed_optimizer && o.sparse_increment)
    fail("--distributed-optimizer shards dense AdamW state; SIFT (--sparse-increment) keeps its own sparse state");
  check_lora_options(o.lora, config);
  if (o.lora.active() && o.sparse_increment) fail("--lora-rank and --sparse-increment exclude each other");
  if (o.lora.active() && o.train_head)
    fail("--lora-rank trains the adapters only: --train-head (a dense head) does not go with it");
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

namespace {

// The final norm and the LM head, as --train-head names them: every parameter outside the
// decoder layers but the embeddings, and the token embedding where the head is tied to it.
bool is_head_parameter(const std::string& name, const ModelConfig& cfg) {
  if (layer_of_parameter(name)) return false;
  if (name == cfg.embedding_name()) return cfg.tie_word_embeddings;
  return name.find("embed") == std::string::npos;
}

// Which parameters train: the emulator plan's adapter layers (or --train-last K of the model's),
// plus the head with --train-head; or all of them.
std::function<bool(const std::string&)> trainable_rule(const TrainOptions& o, const ModelConfig& cfg) {
  if (o.train_all) return [](const std::string&) { return true; };
  std::set<int64_t> layers;
  if (o.train_last) {
    if (*o.train_last > cfg.num_layers) fail("--train-last {}: the model has {} layers", *o.train_last, cfg.num_layers);
    for (int64_t l = cfg.num_layers - *o.train_last; l < cfg.num_layers; ++l) layers.insert(l);
    // Shared slots have no weights of their own: the slot they use trains instead.
    const auto storage = cfg.shared_layers;
    for (int64_t l : std::set<int64_t>(layers))
      if (l < static_cast<int64_t>(storage.size())) layers.insert(storage[static_cast<size_t>(l)]);
  } else {
    auto plan = read_plan(o.model);
    if (!plan)
      fail(
          "{}: no crash_plan.json, so no adapter layers are known; pass --train-all to train every parameter, or "
          "--train-last K",
          o.model);
    if (static_cast<int64_t>(plan->slots.size()) != cfg.num_layers)
      fail("{}/crash_plan.json: {} slots but config.json has {} layers", o.model, plan->slots.size(), cfg.num_layers);
    auto slots = plan->trainable_slots();
    layers.insert(slots.begin(), slots.end());
  }
  if (layers.empty() && !o.train_head)
    fail(
        "{}: no trainable layer (the plan has no adapter layers, or --train-last 0); pass --train-all, --train-last K "
        "or --train-head",
        o.model);
  const bool head = o.train_head;
  return [layers, head, cfg](const std::string& name) {
    auto l = layer_of_parameter(name);
    if (l) return layers.count(*l) != 0;
    return head && is_head_parameter(name, cfg);
  };
}

}  // namespace

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

Trainer::Trainer(const TrainOptions& options) : o_(options), best_val_(std::numeric_limits<double>::infinity()) {
  install_stop_handlers();  // before anything slow: a signal during loading is not fatal
  ckpt_ = std::make_unique<CheckpointReader>(o_.model);
  const ModelConfig& cfg = ckpt_->config();
  grid_ = ProcessGrid::create(o_.grid);
  // The student and the teacher are checked against the grid before any data or weight is read.
  validate_model_grid(cfg, grid_->layout(), o_.pp_layers);
  check_train_options(o_, World::get().size(), &cfg);
  trains_ = trainable_rule(o_, cfg);
  if (!o_.distill_from.empty()) {
    teacher_ckpt_ = std::make_unique<CheckpointReader>(o_.distill_from);
    const ModelConfig& tc = teacher_ckpt_->config();
    if (tc.vocab_size != cfg.vocab_size)
      fail("--distill-from {}: vocabulary of {} tokens, but the student's has {}", o_.distill_from, tc.vocab_size,
           cfg.vocab_size);
    validate_model_grid(tc, grid_->layout());
  }
  tokenizer_ = model_tokenizer(o_.model);
  const Tokenizer* tok = tokenizer_ ? &*tokenizer_ : nullptr;
  data_ = read_train_data(o_.data, cfg, tok);
  if (!o_.val_data.empty()) val_ = read_train_data(o_.val_data, cfg, tok);

  check_resume();
  load_model();
  set_up_optimizer();
  restore();
  log_ = std::make_unique<TrainLog>((fs::path(out_) / "train_log.jsonl").string(), grid_->rank() == 0, start_);
}

Trainer::~Trainer() = default;

void Trainer::check_resume() {
  const ModelConfig& cfg = ckpt_->config();
  const fs::path out(o_.out);
  out_ = out.string();
  ckpt_root_ = (out / "checkpoints").string();
  if (o_.resume) {
    resume_from_ = latest_train_checkpoint(ckpt_root_);
    if (!resume_from_) fail("{}: no complete checkpoint to resume from (run without --resume to start)", ckpt_root_);
  } else if (fs::exists(out) && !fs::is_empty(out) && !o_.overwrite) {
    fail("{}: already exists; pass --resume to continue it or --overwrite to replace it", o_.out);
  }
  if (resume_from_) {
    manifest_ = read_train_manifest(*resume_from_);
    const std::string mpath = *resume_from_ + "/manifest.json";
    const auto& t = manifest_["trainer"];
    const auto want = schedule_options(o_, cfg);
    for (const auto& [key, value] : want.items())
      if (!t["options"].contains(key) || t["options"][key] != value)
        fail("{}: written with {} = {}, but this run has {} (resume with the same options)", mpath, key,
             t["options"].value(key, nlohmann::json()).dump(), value.dump());
    if (t["data_hash"].get<std::string>() != fmt::format("{:016x}", data_.hash))
      fail("{}: the training data {} differs from the data this checkpoint was trained on", mpath, o_.data);
    if (t["model_config"] != cfg.raw) fail("{}: written for another model than {}", mpath, o_.model);
  }

  if (o_.overwrite && grid_->rank() == 0) {
    std::error_code ec;
    fs::remove_all(out, ec);
  }
  grid_->world()->barrier();
  if (grid_->rank() == 0) fs::create_directories(ckpt_root_);
  grid_->world()->barrier();
}

void Trainer::load_model() {
  const ModelConfig& cfg = ckpt_->config();
  DistributedOptions dopts;
  dopts.dtype = o_.dtype;
  dopts.pp_layers = o_.pp_layers;
  model_ = std::make_unique<DistributedLM>(*ckpt_, grid_, dopts);
  model_->set_trainable(trains_);
  if (o_.lora.active()) {
    // Only A and B train; they sit on the linears of the layers that would have trained.
    model_->set_trainable([](const std::string&) { return false; });
    lora_ = std::make_unique<LoraAdapters>(model_->stage(), *grid_, o_.lora, trains_, o_.seed);
    if (!o_.lora.init.empty()) lora_->load_peft(o_.lora.init);
    spdlog::info("LoRA rank {}, alpha {} on {} linear layers of this stage{}", *o_.lora.rank, o_.lora.lora_alpha(),
                 lora_->modules().size(), o_.lora.init.empty() ? "" : " from " + o_.lora.init);
  }
  model_->set_recompute(parse_recompute(o_.recompute));
  // The teacher of knowledge distillation: the full model on the same grid, inference only.
  if (teacher_ckpt_) {
    DistributedOptions topts;
    topts.dtype = o_.dtype;
    teacher_ = std::make_unique<DistributedLM>(*teacher_ckpt_, grid_, topts);
    teacher_->set_trainable([](const std::string&) { return false; });
  }
  tied_ = cfg.tie_word_embeddings ? cfg.embedding_name() : "";
  std::tie(hidden_dropout_, attention_dropout_) = train_dropout(o_, cfg);
  if (model_->recompute() != Recompute::None)
    spdlog::info("activation recomputation: {}", recompute_name(model_->recompute()));
  spdlog::info("dropout {} on residual branches, {} on attention probabilities{}", hidden_dropout_, attention_dropout_,
               o_.dropout ? " (--dropout)" : " (config.json)");
}

void Trainer::set_up_optimizer() {
  auto params = model_->trainable();
  {
    auto count = torch::full({1}, static_cast<double>(params.size()), torch::kFloat64);
    grid_->world()->allreduce(count);
    if (count.item<double>() == 0) fail("{}: no parameter trains", o_.model);
  }
  std::vector<OptimParam> oparams;
  int64_t trained_numel = 0;
  for (auto& p : params) {
    oparams.push_back({p.name, p.tensor, p.in_norm});
    slices_[p.name] = p.slice;
    if (p.in_norm) trained_numel += p.tensor.numel();
  }
  AdamWOptions aopts;
  aopts.beta1 = o_.beta1;
  aopts.beta2 = o_.beta2;
  aopts.eps = o_.eps;
  aopts.weight_decay = o_.weight_decay;
  if (o_.sparse_increment) {
    std::vector<SiftParam> sp;
    for (size_t i = 0; i < oparams.size(); ++i) {
      const auto& slice = slices_[oparams[i].name];
      const int64_t n = oparams[i].param.numel();
      sp.push_back({oparams[i], slice, slice ? n / slice->length * slice->full : n});
    }
    auto s = std::make_unique<SparseAdamW>(sp, *o_.sparse_increment, aopts, grid_->tp_group(), grid_->tp_rank(),
                                           grid_->dp_group());
    sift_ = s.get();
    optimizer_ = std::move(s);
    // SIFT's reductions act on the masked entries it keeps once the mask exists.
    SparseAdamW* sift = sift_;
    model_->set_gradient_source([sift](const torch::Tensor& p) { return sift->gradient_of(p); });
  } else if (o_.distributed_optimizer) {
    optimizer_ = std::make_unique<DistributedAdamW>(oparams, aopts, grid_->dp_group());
    model_->set_dp_gradient_sum(false);
  } else {
    optimizer_ = std::make_unique<AdamW>(oparams, aopts);
  }
  optimizer_bytes_ = state_bytes(*optimizer_);
  spdlog::info("optimizer state at set-up: {} bytes on rank {}{}", optimizer_bytes_, grid_->rank(),
               o_.distributed_optimizer ? fmt::format(" (sharded over {} DP ranks)", grid_->dp()) : "");
  norm_groups_ = {grid_->tp_group(), grid_->pp_group()};
  auto n = torch::full({1}, static_cast<double>(trained_numel), torch::kFloat64);
  grid_->tp_group()->allreduce(n);
  grid_->pp_group()->allreduce(n);
  spdlog::info("training {} parameters of {} on {}", static_cast<int64_t>(n.item<double>()), o_.model,
               grid_->describe());
}

void Trainer::restore() {
  if (!resume_from_) return;
  load_train_checkpoint(*resume_from_, *grid_, *optimizer_, slices_, tied_);
  start_ = manifest_["step"].get<int64_t>();
  const auto& t = manifest_["trainer"];
  if (!t["best_val"].is_null()) best_val_ = t["best_val"].get<double>();
  best_step_ = t.value("best_step", int64_t(-1));
  spdlog::info("resuming from {} (step {}, written on tp {} pp {} dp {})", *resume_from_, start_,
               manifest_["grid"]["tp"].get<int>(), manifest_["grid"]["pp"].get<int>(),
               manifest_["grid"]["dp"].get<int>());
}

int64_t Trainer::example_at(int64_t position) {
  const int64_t N = static_cast<int64_t>(data_.examples.size());
  const int64_t epoch = position / N;
  auto it = orders_.find(epoch);
  if (it == orders_.end()) {
    while (orders_.size() > 1) orders_.erase(orders_.begin());
    it = orders_.emplace(epoch, epoch_order(N, o_.seed, epoch)).first;
  }
  return it->second[static_cast<size_t>(position % N)];
}

Trainer::StepRows Trainer::step_rows(int64_t step) {
  const int64_t B = o_.batch_size;
  StepRows s;
  s.rows.resize(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    s.rows[static_cast<size_t>(i)] = example_at(step * B + i);
    const auto& x = data_.examples[static_cast<size_t>(s.rows[static_cast<size_t>(i)])];
    const auto n = static_cast<int64_t>(x.tokens.size());
    s.length = std::max(s.length, n);
    s.targets += static_cast<double>(std::max<int64_t>(0, n - x.loss_from));
    s.tokens += static_cast<double>(n);
  }
  return s;
}

TrainBatch Trainer::pass_batch(const StepRows& s, int64_t k) const {
  const int64_t B = o_.batch_size, K = o_.grad_accum, per_rank = B / (K * grid_->dp());
  const auto first = s.rows.begin() + k * (B / K) + grid_->dp_rank() * per_rank;
  return make_batch(data_, std::vector<int64_t>(first, first + per_rank), s.length, ckpt_->config().pad_token_id);
}

DistributedLM::Dropout Trainer::pass_dropout(int64_t step, int64_t k) const {
  // Pass k's rows hold the step's slots from k * (B / K) + dp_rank * per_rank on: the
  // dropout masks follow the example's slot, not the rank that runs it.
  const int64_t B = o_.batch_size, K = o_.grad_accum, per_rank = B / (K * grid_->dp());
  return DistributedLM::Dropout{hidden_dropout_, attention_dropout_, o_.seed, step,
                                k * (B / K) + grid_->dp_rank() * per_rank};
}

void Trainer::select_sift_mask(int64_t step, const StepRows& s) {
  auto first = pass_batch(s, 0);
  const auto groups = sift_->selection_groups(o_.sift_selection_passes, {tied_, "lm_head.weight"});
  const auto& ps = optimizer_->params();
  for (const auto& group : groups) {
    for (const auto& p : ps) p.param.requires_grad_(false);
    for (size_t i : group) ps[i].param.requires_grad_(true);
    const auto drop = pass_dropout(step, 0);
    model_->forward_backward(first.ids, first.mask, o_.micro_batches, true, first.labels, std::max(1.0, s.targets),
                             nullptr, &drop);
    sift_->select(group);
  }
  for (const auto& p : ps) p.param.requires_grad_(true);
  sift_->arm();
  spdlog::info("SIFT: mask selected in {} passes over the first micro-batch", groups.size());
}

Trainer::StepResult Trainer::train_step(int64_t step) {
  const auto t0 = std::chrono::steady_clock::now();
  optimizer_->zero_grad();
  const StepRows s = step_rows(step);
  if (sift_ && !sift_->selected()) select_sift_mask(step, s);
  StepResult r;
  const int64_t K = o_.grad_accum;
  for (int64_t k = 0; k < K; ++k) {
    auto batch = pass_batch(s, k);
    std::optional<DistributedLM::Distillation> kd;
    if (teacher_)
      kd = DistributedLM::Distillation{
          teacher_->forward(batch.ids, batch.mask, o_.micro_batches, false, true, false, /*vocab_parallel=*/true)
              .logits,
          o_.kd_alpha, o_.kd_temperature};
    const auto drop = pass_dropout(step, k);
    r.loss += model_->forward_backward(batch.ids, batch.mask, o_.micro_batches, k == K - 1, batch.labels,
                                       std::max(1.0, s.targets), kd ? &*kd : nullptr, &drop);
  }
  r.grad_norm = optimizer_->clip_gradients(o_.clip, norm_groups_);
  r.lr = linear_schedule(o_.lr, step, o_.warmup, o_.steps);
  optimizer_->step(r.lr);
  // A GPU queues the optimizer's kernels: the step's time ends when they have run.
  if (grid_->backend() == "nccl") torch::cuda::synchronize(grid_->local_rank());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens = s.tokens;
  return r;
}

double Trainer::validate() {
  const int64_t B = o_.batch_size, dp = grid_->dp();
  double sum = 0, tokens = 0;
  const auto& v = val_->examples;
  const int64_t n = static_cast<int64_t>(v.size());
  for (int64_t first = 0; first < n; first += B) {
    const int64_t count = std::min(B, n - first);
    // Every DP rank takes the same number of rows (fillers past the end), micro-batch aligned.
    int64_t mine = (count + dp - 1) / dp;
    mine = (mine + o_.micro_batches - 1) / o_.micro_batches * o_.micro_batches;
    std::vector<int64_t> rows;
    int64_t length = 1;
    for (int64_t i = first; i < first + count; ++i)
      length = std::max<int64_t>(length, static_cast<int64_t>(v[static_cast<size_t>(i)].tokens.size()));
    for (int64_t r = 0; r < mine; ++r) {
      const int64_t i = first + grid_->dp_rank() * mine + r;
      rows.push_back(i < first + count ? i : -1);
    }
    auto batch = make_batch(*val_, rows, length, ckpt_->config().pad_token_id);
    double t = 0;
    const double loss = model_->evaluate_loss(batch.ids, batch.mask, o_.micro_batches, batch.labels, &t);
    sum += loss * t;
    tokens += t;
  }
  return sum / std::max(1.0, tokens);
}

nlohmann::json Trainer::trainer_state(int64_t step) const {
  const int64_t N = static_cast<int64_t>(data_.examples.size()), B = o_.batch_size;
  return nlohmann::json{{"step", step},
                        {"options", schedule_options(o_, ckpt_->config())},
                        {"data", o_.data},
                        {"data_hash", fmt::format("{:016x}", data_.hash)},
                        {"data_examples", N},
                        {"data_position", step * B},
                        {"epoch", step * B / N},
                        {"order", "mt19937_64(seed * 1000003 + epoch) Fisher-Yates per epoch"},
                        {"val_data", o_.val_data},
                        {"best_val", std::isfinite(best_val_) ? nlohmann::json(best_val_) : nlohmann::json()},
                        {"best_step", best_step_},
                        {"model", o_.model},
                        {"model_config", ckpt_->config().raw}};
}

void Trainer::log_step(int64_t step, const StepResult& r) {
  tokens_done_ += r.tokens;
  ++ran_;
  last_loss_ = r.loss;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  nlohmann::json record = {{"step", step + 1},
                           {"loss", r.loss},
                           {"lr", r.lr},
                           {"grad_norm", r.grad_norm},
                           {"tokens", r.tokens},
                           {"tokens_per_s", r.tokens / r.seconds},
                           {"seconds", r.seconds},
                           {"dropout", hidden_dropout_},
                           {"attention_dropout", attention_dropout_}};
  // The first record of a run names its optimiser memory (rank 0's; every rank logs its own),
  // measured after the step: SIFT allocates its sparse state when the first step picks the mask.
  if (ran_ == 1) record["optimizer_state_bytes"] = state_bytes(*optimizer_);
  log_->write(record);
  interval_.loss += r.loss;
  interval_.tokens += r.tokens;
  interval_.seconds += r.seconds;
  ++interval_.steps;
  if ((step + 1) % o_.log_interval == 0 || ran_ == 1 || step + 1 == o_.steps) {
    spdlog::info("step {}/{}: loss {:.4f}, lr {:.3g}, grad norm {:.3f}, {:.0f} tokens/s, {} left", step + 1, o_.steps,
                 interval_.loss / interval_.steps, r.lr, r.grad_norm, interval_.tokens / interval_.seconds,
                 duration_text(elapsed / ran_ * (o_.steps - step - 1)));
    interval_ = {};
  }
}

void Trainer::evaluate_and_keep(int64_t done) {
  const bool last = done == o_.steps;
  if (val_ && ((o_.eval_every > 0 && done % o_.eval_every == 0) || last)) {
    const double v = validate();
    const bool better = v < best_val_;
    if (better) {
      best_val_ = v;
      best_step_ = done;
      save_model();
    }
    log_->write({{"step", done}, {"val_loss", v}, {"best", better}});
    spdlog::info("step {}: validation loss {:.4f}{}", done, v, better ? " (best so far, saved)" : "");
  }
  if (last && !val_) save_model();
}

void Trainer::save_model() {
  const std::string model_dir = (fs::path(out_) / "model").string();
  if (!lora_) return model_->save_model(model_dir);
  lora_->with_merged([&] { model_->save_model(model_dir); });
  lora_->save_peft((fs::path(out_) / "adapter").string(), *grid_, fs::absolute(o_.model).string());
}

void Trainer::save_or_stop(int64_t done) {
  const bool last = done == o_.steps;
  const bool save = (o_.save_every > 0 && done % o_.save_every == 0) || last;
  // SIGUSR1/SIGTERM (a batch job near its time limit): every rank stops after the same step
  // with a checkpoint, and --resume continues exactly from it.
  const bool stop = !last && stop_agreed(*grid_->world());
  if (save || stop)
    save_train_checkpoint(ckpt_root_, done, *grid_, *optimizer_, slices_, trainer_state(done), o_.keep_checkpoints);
  if (stop)
    throw StopRequested(
        fmt::format("stopped by a signal after step {} of {}; checkpoint in {} (run again with --resume)", done,
                    o_.steps, ckpt_root_));
}

TrainSummary Trainer::run() {
  run_start_ = std::chrono::steady_clock::now();
  for (int64_t step = start_; step < o_.steps; ++step) {
    log_step(step, train_step(step));
    evaluate_and_keep(step + 1);
    save_or_stop(step + 1);
    if (o_.stop_after > 0 && ran_ >= o_.stop_after) break;
  }
  return finish();
}

TrainSummary Trainer::finish() {
  const ModelConfig& cfg = ckpt_->config();
  if (sift_ && !o_.save_increments.empty() && start_ + ran_ == o_.steps)
    save_increments(o_.save_increments, *sift_, *grid_, *ckpt_, cfg.tie_word_embeddings ? "lm_head.weight" : "");
  {
    // Optimiser memory (moments, masters, SIFT's indices) of this rank: what SIFT shrinks.
    spdlog::info("optimizer state: {} bytes on rank {}", state_bytes(*optimizer_), grid_->rank());
    // Peak resident memory of this process so far (Linux reports KiB): what recomputation shrinks.
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    spdlog::info("peak RSS: {} KiB on rank {}", usage.ru_maxrss, grid_->rank());
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start_).count();
  TrainSummary summary;
  summary.steps = ran_;
  summary.last_loss = last_loss_;
  summary.best_val = best_val_;
  summary.tokens_per_second = total > 0 ? tokens_done_ / total : 0;
  spdlog::info("trained {} steps in {}: {:.0f} tokens/s; model in {}", ran_, duration_text(total),
               summary.tokens_per_second, (fs::path(out_) / "model").string());
  return summary;
}

TrainSummary train(const TrainOptions& options) { return Trainer(options).run(); }

}  // namespace crash
