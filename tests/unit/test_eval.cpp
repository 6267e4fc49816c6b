// framework/eval.h: lm-eval's request inputs, normalisation, stderr, and the library on one rank
// against lm-eval's results in fixtures/eval/expected.json.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "framework/eval.h"
#include "framework/json_fields.h"
#include "framework/prepare.h"
#include "framework/token_input.h"
#include "test_util.h"

namespace crash {
namespace {

TEST(Eval, LoglikelihoodInputDropsTheLastTokenAndKeepsTheEnd) {
  auto [input, scored] = loglikelihood_input({1, 2, 3}, {4, 5}, 16);
  EXPECT_EQ(input, (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(scored, 2);
  // Longer than the context: the last max_length + 1 tokens, minus the last one.
  std::tie(input, scored) = loglikelihood_input({1, 2, 3, 4, 5, 6}, {7, 8}, 4);
  EXPECT_EQ(input, (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(scored, 2);
}

TEST(Eval, NormalizeAnswerAsLmEvalExactMatch) {
  EXPECT_EQ(normalize_answer("  The Paris. "), "paris");
  EXPECT_EQ(normalize_answer("an apple!"), "apple");
  EXPECT_EQ(normalize_answer("Banana split"), "banana split");
  EXPECT_EQ(normalize_answer("the"), "the");  // the regex needs the article's trailing space
  EXPECT_EQ(normalize_answer("\"U.S.A.\""), "usa");
}

TEST(Eval, MeanStderrIsSampleStddevOverSqrtN) {
  // mean 0.6: squared deviations 3 x 0.16 and 2 x 0.36, over n - 1 = 4.
  const std::vector<double> v = {1, 0, 0, 1, 1};
  const double var = (3 * 0.16 + 2 * 0.36) / 4;
  EXPECT_NEAR(mean_stderr(v), std::sqrt(var / 5), 1e-15);
  EXPECT_TRUE(std::isnan(mean_stderr({1.0})));
}

TEST(Eval, TableListsEveryMetric) {
  TaskResult r;
  r.task = "piqa";
  r.kind = "multiple_choice";
  r.num_examples = 10;
  r.metrics = {{"acc", 0.5, 0.1}, {"acc_norm", 0.6, 0.2}};
  const auto table = results_table({r});
  EXPECT_NE(table.find("|piqa|multiple_choice| 10|acc     |0.5000|±  |0.1000|"), std::string::npos) << table;
  EXPECT_NE(table.find("acc_norm"), std::string::npos);
  const auto j = r.to_json();
  EXPECT_DOUBLE_EQ(j["metrics"]["acc_norm"]["stderr"].get<double>(), 0.2);
}

TEST(Eval, MultipleChoiceMatchesLmEvalOnOneRank) {
  torch::set_num_threads(1);
  test::TempDir tmp;
  const auto model_dir = test::fixture("eval/model");
  PrepareOptions po;
  prepare_task(test::fixture("eval/mc.jsonl"), model_dir, tmp / "mc", po);
  const auto expected = read_json_file(test::fixture("eval/expected.json"));
  CheckpointReader ckpt(model_dir);
  auto task = read_prepared(tmp / "mc", -1, ckpt.config().vocab_size);
  check_task_tokenizer(task, model_dir);
  DistributedLM model(ckpt, ProcessGrid::create({1, 1}));
  EvalOptions o;
  o.batch_size = 5;
  auto r = evaluate_task(model, task, o);
  EXPECT_EQ(r.task, "mc");
  ASSERT_EQ(r.details.size(), expected["mc"]["logliks"].size());
  for (size_t e = 0; e < r.details.size(); ++e) {
    const auto mine = r.details[e]["logliks"].get<std::vector<double>>();
    const auto ref = expected["mc"]["logliks"][e].get<std::vector<double>>();
    ASSERT_EQ(mine.size(), ref.size());
    for (size_t k = 0; k < mine.size(); ++k) EXPECT_NEAR(mine[k], ref[k], 1e-4) << "example " << e << " choice " << k;
  }
  EXPECT_DOUBLE_EQ(r.metrics[0].value, expected["mc"]["acc"].get<double>());
  EXPECT_DOUBLE_EQ(r.metrics[1].value, expected["mc"]["acc_norm"].get<double>());
  EXPECT_NEAR(r.metrics[1].stderr_, expected["mc"]["acc_norm_stderr"].get<double>(), 1e-12);
  // The batch size changes nothing but rounding.
  o.batch_size = 1;
  auto r1 = evaluate_task(model, task, o);
  for (size_t e = 0; e < r.details.size(); ++e) {
    const auto a = r.details[e]["logliks"].get<std::vector<double>>();
    const auto b = r1.details[e]["logliks"].get<std::vector<double>>();
    for (size_t k = 0; k < a.size(); ++k) EXPECT_NEAR(a[k], b[k], 1e-5);
  }
}

// lm-eval's webqs: several gold aliases, exact_match = one of them is the greedy continuation.
TEST(Eval, MultipleTargetsScoreExactMatchAsLmEval) {
  torch::set_num_threads(1);
  test::TempDir tmp;
  const auto model_dir = test::fixture("eval/model");
  prepare_task(test::fixture("eval/webqs.jsonl"), model_dir, tmp / "webqs", PrepareOptions{});
  const auto expected = read_json_file(test::fixture("eval/expected.json"))["webqs"];
  CheckpointReader ckpt(model_dir);
  auto task = read_prepared(tmp / "webqs", -1, ckpt.config().vocab_size);
  EXPECT_TRUE(task.multiple_target);
  DistributedLM model(ckpt, ProcessGrid::create({1, 1}));
  EvalOptions o;
  o.batch_size = 3;
  auto r = evaluate_task(model, task, o);
  ASSERT_EQ(r.details.size(), expected["logliks"].size());
  for (size_t e = 0; e < r.details.size(); ++e) {
    const auto mine = r.details[e]["logliks"].get<std::vector<double>>();
    const auto ref = expected["logliks"][e].get<std::vector<double>>();
    ASSERT_EQ(mine.size(), ref.size());
    for (size_t k = 0; k < mine.size(); ++k) EXPECT_NEAR(mine[k], ref[k], 1e-4) << "example " << e << " choice " << k;
    EXPECT_EQ(r.details[e]["greedy"], expected["greedy"][e]) << "example " << e;
    EXPECT_EQ(r.details[e]["exact_match"].get<double>(), expected["scores"][e]["exact_match"].get<double>());
  }
  ASSERT_EQ(r.metrics.size(), 1u);  // lm-eval reports exact_match alone for webqs
  EXPECT_EQ(r.metrics[0].name, "exact_match");
  EXPECT_DOUBLE_EQ(r.metrics[0].value, expected["exact_match"].get<double>());
  EXPECT_NEAR(r.metrics[0].stderr_, expected["exact_match_stderr"].get<double>(), 1e-12);
}

// The eval fixture model on one rank with its generation task prepared in a temporary folder.
struct GenerationTask {
  test::TempDir tmp;
  std::string model_dir = test::fixture("eval/model");
  CheckpointReader ckpt{model_dir};
  PreparedTask task = prepare_gen();
  DistributedLM model{ckpt, ProcessGrid::create({1, 1})};

  PreparedTask prepare_gen() {
    PrepareOptions po;
    prepare_task(test::fixture("eval/gen.jsonl"), model_dir, tmp / "gen", po);
    return read_prepared(tmp / "gen");
  }
};

TEST(Eval, GenerationStopsAtAnyOfTheModelsStopIds) {
  GenerationTask g;
  auto& tmp = g.tmp;
  auto& task = g.task;
  auto& model = g.model;
  const auto& model_dir = g.model_dir;
  const auto& ckpt = g.ckpt;
  auto tok = Tokenizer::load(model_dir + "/tokenizer.json");
  // Every id a stop id: each generation is its first token, a prefix of the unstopped one.
  EvalOptions every, plain;
  for (int64_t i = 0; i < ckpt.config().vocab_size; ++i) every.stop_ids.push_back(i);
  auto a = evaluate_task(model, task, every, &tok), b = evaluate_task(model, task, plain, &tok);
  ASSERT_EQ(a.details.size(), b.details.size());
  size_t shorter = 0;
  for (size_t i = 0; i < a.details.size(); ++i) {
    const auto first = a.details[i]["generation"].get<std::string>(),
               whole = b.details[i]["generation"].get<std::string>();
    EXPECT_EQ(whole.rfind(first, 0), 0u) << first << " | " << whole;
    shorter += first.size() < whole.size();
  }
  EXPECT_GT(shorter, 0u);
  // The ids: generation_config.json's (one or a list) where there is one, else config.json's.
  const auto c = ckpt.config();
  EXPECT_EQ(generation_stop_ids(tmp.str(), c), c.eos_token_ids);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{c.eos_token_id});
  auto write_text = [](const std::string& path, const std::string& text) { std::ofstream(path) << text; };
  write_text(tmp / "generation_config.json", R"({"eos_token_id": [1, 106]})");
  EXPECT_EQ(generation_stop_ids(tmp.str(), c), (std::vector<int64_t>{1, 106}));
  write_text(tmp / "generation_config.json", R"({"eos_token_id": 7})");
  EXPECT_EQ(generation_stop_ids(tmp.str(), c), std::vector<int64_t>{7});
  write_text(tmp / "generation_config.json", R"({"eos_token_id": "x"})");
  test::expect_user_error([&] { generation_stop_ids(tmp.str(), c); }, {"generation_config.json", "eos_token_id"});
}

TEST(Eval, BadInputIsAUserError) {
  GenerationTask g;
  auto& tmp = g.tmp;
  auto& task = g.task;
  auto& model = g.model;
  EvalOptions o;
  o.batch_size = 0;
  test::expect_user_error([&] { evaluate_task(model, task, o); }, {"--batch-size"});
  o.batch_size = 2;
  test::expect_user_error([&] { evaluate_task(model, task, o, nullptr); }, {"tokenizer.json"});
  test::expect_user_error([&] { read_prepared(tmp / "none"); }, {"not a prepared folder"});
}

}  // namespace
}  // namespace crash
