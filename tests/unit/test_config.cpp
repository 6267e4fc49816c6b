#include <filesystem>
#include <fstream>

#include "framework/config.h"
#include "framework/json_fields.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

using nlohmann::json;
using test::expect_user_error;

json tiny_opt() {
  return {{"model_type", "opt"},
          {"vocab_size", 100},
          {"hidden_size", 64},
          {"ffn_dim", 128},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"max_position_embeddings", 32}};
}

TEST(Config, PublishedModelsHaveHFParameterCounts) {
  // Counts from HF transformers on the meta device (tests/fixtures/published.py).
  auto counts = read_json_file(test::fixture("published_param_counts.json"));
  ASSERT_GE(counts.size(), 29u);
  for (auto& [name, count] : counts.items()) {
    auto c = ModelConfig::load(std::string(CRASH_EXAMPLES) + "/models/" + name + "/config.json");
    EXPECT_EQ(c.parameter_count(), count.get<int64_t>()) << name;
  }
}

TEST(Config, Opt350mHasProjectionAndPostNorm) {
  auto c = ModelConfig::load(std::string(CRASH_EXAMPLES) + "/models/opt-350m/config.json");
  EXPECT_TRUE(c.has_projection());
  EXPECT_EQ(c.word_embed_proj_dim, 512);
  EXPECT_FALSE(c.pre_norm);
  EXPECT_FALSE(c.final_norm);
}

TEST(Config, Llama3RopeScalingFromBothFileStyles) {
  auto c = ModelConfig::load(std::string(CRASH_EXAMPLES) + "/models/llama-3.1-8b/config.json");
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 8.0);
  EXPECT_EQ(c.num_kv_heads, 8);
  auto old = ModelConfig::load(test::fixture("models/llama_gqa/config.json"));  // rope_theta at top level
  EXPECT_DOUBLE_EQ(old.rope_theta, 10000.0);
  EXPECT_FALSE(old.rope_scaling.has_value());
}

TEST(Config, MissingFieldIsNamed) {
  auto j = tiny_opt();
  j.erase("ffn_dim");
  expect_user_error([&] { ModelConfig::from_json(j, "x/config.json"); }, {"x/config.json", "ffn_dim", "missing"});
}

TEST(Config, WrongTypeIsNamed) {
  auto j = tiny_opt();
  j["hidden_size"] = "64";
  expect_user_error([&] { ModelConfig::from_json(j, "x/config.json"); }, {"x/config.json", "hidden_size", "integer"});
}

TEST(Config, UnsupportedModelType) {
  auto j = tiny_opt();
  j["model_type"] = "gpt2";
  expect_user_error([&] { ModelConfig::from_json(j, "x/config.json"); }, {"gpt2", "not supported"});
}

TEST(Config, InconsistentShapes) {
  auto j = tiny_opt();
  j["num_attention_heads"] = 5;
  expect_user_error([&] { ModelConfig::from_json(j, "c.json"); }, {"divisible"});
  j = tiny_opt();
  j["num_hidden_layers"] = 0;
  expect_user_error([&] { ModelConfig::from_json(j, "c.json"); }, {"num_hidden_layers", "positive"});
  j = tiny_opt();
  j["activation_function"] = "tanhshrink";
  expect_user_error([&] { ModelConfig::from_json(j, "c.json"); }, {"tanhshrink"});
}

TEST(Config, BadJsonFile) {
  test::TempDir dir;
  std::ofstream(dir / "config.json") << "{\"model_type\": ";
  expect_user_error([&] { ModelConfig::load(dir / "config.json"); }, {"config.json", "invalid JSON"});
  expect_user_error([&] { ModelConfig::load(dir / "absent.json"); }, {"absent.json", "cannot open"});
}

TEST(Config, UnsupportedRopeType) {
  json j = {{"model_type", "llama"},
            {"vocab_size", 10},
            {"hidden_size", 8},
            {"intermediate_size", 16},
            {"num_hidden_layers", 1},
            {"num_attention_heads", 2},
            {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 2.0}}}};
  expect_user_error([&] { ModelConfig::from_json(j, "c.json"); }, {"yarn", "not supported"});
}

}  // namespace
}  // namespace crash
