// The trainer's model side on one process: loss on target tokens only (against a hand
// computation), frozen parameters untouched, the saved model equal to the one in memory,
// reading training data.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "framework/distributed_lm.h"
#include "framework/emulator.h"
#include "framework/optim.h"
#include "framework/trainer.h"
#include "test_util.h"

using namespace crash;
using crash::test::fixture;
using crash::test::TempDir;

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Two multiple-choice-like examples: loss on the last tokens only.
TrainData tiny_data() {
  TrainData d;
  d.examples = {{{5, 9, 17, 33, 2, 41, 8}, 4}, {{12, 7, 99, 3, 60}, 2}};
  return d;
}

std::shared_ptr<ProcessGrid> one_rank() { return ProcessGrid::create({1, 1}); }

}  // namespace

TEST(Trainer, MakeBatchLabelsOnlyTargets) {
  auto b = make_batch(tiny_data(), {0, 1, -1}, 8, 1);
  // Row 0: positions 3..5 predict tokens 4..6; row 1: positions 1..3 predict tokens 2..4.
  auto want = torch::full({3, 8}, -100, torch::kInt64);
  want[0][3] = 2, want[0][4] = 41, want[0][5] = 8;
  want[1][1] = 99, want[1][2] = 3, want[1][3] = 60;
  EXPECT_TRUE(torch::equal(b.labels, want));
  EXPECT_EQ(b.mask.sum(1)[0].item<int64_t>(), 7);
  EXPECT_EQ(b.mask.sum(1)[2].item<int64_t>(), 0);  // the filler row is all padding
}

TEST(Trainer, LossOnTargetTokensEqualsHandComputation) {
  torch::set_num_threads(2);
  CheckpointReader ckpt(fixture("models/opt_preln"));
  DistributedLM model(ckpt, one_rank());
  auto b = make_batch(tiny_data(), {0, 1}, 7, 1);
  double tokens = 0;
  const double eval = model.evaluate_loss(b.ids, b.mask, 1, b.labels, &tokens);
  const double trained = model.forward_backward(b.ids, b.mask, 2, true, b.labels);
  // By hand: the full logits, cross-entropy at the six target positions, mean.
  auto ref = load_model(ckpt);
  auto logits = ref->forward(b.ids, b.mask).logits.to(torch::kFloat64);
  auto logp = torch::log_softmax(logits, -1);
  double sum = 0;
  int n = 0;
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t t = 0; t < 7; ++t) {
      const int64_t y = b.labels[r][t].item<int64_t>();
      if (y == -100) continue;
      sum -= logp[r][t][y].item<double>();
      ++n;
    }
  EXPECT_EQ(n, 6);
  EXPECT_EQ(tokens, 6);
  EXPECT_NEAR(eval, sum / n, 1e-5);
  EXPECT_NEAR(trained, sum / n, 1e-5);
  // The -100 labels keep the context out: marking a context position as a target changes the loss.
  auto labels2 = b.labels.clone();
  labels2[0][0] = 50;  // now a target too: the loss changes
  EXPECT_GT(std::abs(model.evaluate_loss(b.ids, b.mask, 1, labels2) - eval), 1e-6);
  // Causal next-token loss (no labels) differs from the target-only loss.
  EXPECT_GT(std::abs(model.evaluate_loss(b.ids, b.mask, 1) - eval), 1e-6);
}

TEST(Trainer, FrozenParametersUnchangedTrainableChanged) {
  torch::set_num_threads(2);
  CheckpointReader ckpt(fixture("models/opt_preln"));
  DistributedLM model(ckpt, one_rank());
  model.set_trainable([](const std::string& name) {
    auto l = layer_of_parameter(name);
    return l && (*l == 0 || *l == 3);
  });
  std::map<std::string, torch::Tensor> before;
  for (auto& item : model.stage().named_parameters()) before[item.key()] = item.value().detach().clone();
  std::vector<OptimParam> ps;
  for (auto& p : model.trainable()) ps.push_back({p.name, p.tensor, p.in_norm});
  ASSERT_FALSE(ps.empty());
  AdamW opt(ps, AdamWOptions{});
  auto b = make_batch(tiny_data(), {0, 1}, 7, 1);
  for (int step = 0; step < 2; ++step) {
    opt.zero_grad();
    model.forward_backward(b.ids, b.mask, 1, true, b.labels);
    clip_grad_norm(ps, 1.0, {});
    opt.step(1e-3);
  }
  int frozen = 0, trained = 0;
  for (auto& item : model.stage().named_parameters()) {
    auto l = layer_of_parameter(item.key());
    const bool trains = l && (*l == 0 || *l == 3);
    const double d = max_diff(item.value(), before[item.key()]);
    if (trains) {
      EXPECT_GT(d, 0.0) << item.key();
      ++trained;
    } else {
      EXPECT_EQ(d, 0.0) << item.key();
      EXPECT_FALSE(item.value().grad().defined()) << item.key();
      ++frozen;
    }
  }
  EXPECT_GT(frozen, 0);
  EXPECT_GT(trained, 0);
}

TEST(Trainer, SavedModelGivesTheSameLogits) {
  torch::set_num_threads(2);
  TempDir dir;
  // A source folder with a tokenizer and a plan, which the saved folder must carry along.
  const std::string src = dir / "src";
  std::filesystem::copy(fixture("models/opt_preln"), src);
  std::filesystem::copy_file(fixture("tokenizers/opt/tokenizer.json"), src + "/tokenizer.json");
  write_plan(src, plan_uniform(4, 1, 1, 2));
  CheckpointReader ckpt(src);
  DistributedLM model(ckpt, one_rank());
  model.set_trainable([](const std::string&) { return true; });
  std::vector<OptimParam> ps;
  for (auto& p : model.trainable()) ps.push_back({p.name, p.tensor, p.in_norm});
  AdamW opt(ps, AdamWOptions{});
  auto b = make_batch(tiny_data(), {0, 1}, 7, 1);
  for (int step = 0; step < 2; ++step) {
    opt.zero_grad();
    model.forward_backward(b.ids, b.mask, 1, true, b.labels);
    opt.step(1e-2);
  }
  model.save_model(dir / "saved");
  EXPECT_FALSE(std::filesystem::exists(dir / "saved.tmp"));
  EXPECT_TRUE(std::filesystem::exists(dir / "saved/tokenizer.json"));
  EXPECT_TRUE(read_plan(dir / "saved").has_value());
  torch::NoGradGuard ng;
  auto in_memory = model.stage().forward(b.ids, b.mask).logits;
  auto loaded = load_model(CheckpointReader(dir / "saved"))->forward(b.ids, b.mask).logits;
  auto original = load_model(ckpt)->forward(b.ids, b.mask).logits;
  EXPECT_EQ(max_diff(in_memory, loaded), 0.0);
  EXPECT_GT(max_diff(original, loaded), 1e-4);  // training changed the model
}

TEST(Trainer, ReadsPreparedMultipleChoiceAndTruncates) {
  TempDir dir;
  const std::string task = dir / "task";
  std::filesystem::create_directories(task);
  std::ofstream(task + "/manifest.json") << R"({"kind": "multiple_choice", "shards": ["shard-00000.jsonl"]})";
  std::ofstream(task + "/shard-00000.jsonl")
      << R"({"index": 0, "hash": "0000000000000001", "tokens": [4, 5, 6, 7, 8], "context": [4, 5, 6],)"
      << R"( "continuations": [[9], [7, 8]], "gold": 1, "choice_chars": [2, 4]})"
      << "\n";
  CheckpointReader ckpt(fixture("models/opt_preln"));
  ModelConfig cfg = ckpt.config();
  auto data = read_train_data(task, cfg, nullptr);
  ASSERT_EQ(data.examples.size(), 1u);
  EXPECT_EQ(data.kind, "multiple_choice");
  EXPECT_EQ(data.examples[0].loss_from, 3);  // the gold continuation [7, 8]
  cfg.max_positions = 4;                     // longer inputs keep their last tokens
  auto cut = read_train_data(task, cfg, nullptr);
  EXPECT_EQ(cut.examples[0].tokens, (std::vector<int64_t>{5, 6, 7, 8}));
  EXPECT_EQ(cut.examples[0].loss_from, 2);
  crash::test::expect_user_error([&] { read_train_data(dir / "missing", cfg, nullptr); }, {"missing", "not found"});
}

TEST(Trainer, DistillationLossEqualsHandComputation) {
  torch::set_num_threads(2);
  CheckpointReader ckpt(fixture("models/opt_preln"));
  DistributedLM model(ckpt, one_rank());
  auto b = make_batch(tiny_data(), {0, 1}, 7, 1);
  torch::manual_seed(4);
  DistributedLM::Distillation kd{torch::randn({2, 7, ckpt.config().vocab_size}) * 3, 0.3, 2.0};
  const double got = model.forward_backward(b.ids, b.mask, 2, true, b.labels, 0, &kd);
  // By hand: (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), summed over targets, / count.
  auto ref = load_model(ckpt);
  auto logits = ref->forward(b.ids, b.mask).logits.to(torch::kFloat64);
  auto teacher = kd.teacher_logits.to(torch::kFloat64);
  double sum = 0;
  int n = 0;
  const double T = kd.temperature;
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t t = 0; t < 7; ++t) {
      const int64_t y = b.labels[r][t].item<int64_t>();
      if (y == -100) continue;
      const double ce = -torch::log_softmax(logits[r][t], -1)[y].item<double>();
      auto log_p = torch::log_softmax(teacher[r][t] / T, -1), log_q = torch::log_softmax(logits[r][t] / T, -1);
      const double kl = (log_p.exp() * (log_p - log_q)).sum().item<double>();
      sum += (1 - kd.alpha) * ce + kd.alpha * T * T * kl;
      ++n;
    }
  EXPECT_NEAR(got, sum / n, 1e-5);
  // alpha 0 is the plain loss.
  DistributedLM::Distillation none{kd.teacher_logits, 0.0, 2.0};
  EXPECT_NEAR(model.forward_backward(b.ids, b.mask, 1, true, b.labels, 0, &none),
              model.evaluate_loss(b.ids, b.mask, 1, b.labels), 1e-6);
}
