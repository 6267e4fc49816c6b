// The family descriptors (framework/models/family.h) against the models they build: every
// tensor's name, shape and TP split, the tied embedding, the Linears SFSD factors, and the
// model_type dispatch.
#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/models/decoder.h"
#include "framework/models/family.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

class FamilyDescriptor : public ::testing::TestWithParam<std::string> {};

// Which dimension the built module splits (-1: replicated) for a descriptor's split.
int split_dim(TpSplit s) { return s == TpSplit::Replicated ? -1 : s == TpSplit::Row ? 1 : 0; }

TEST_P(FamilyDescriptor, ListsExactlyTheTensorsOfTheBuiltModel) {
  CheckpointReader ckpt(test::fixture("models/" + GetParam()));
  const ModelConfig& c = ckpt.config();
  ASSERT_NE(c.family, nullptr);
  auto model = build_model(c);
  auto slices = model->parameter_slices();
  std::map<std::string, torch::Tensor> built;
  for (const auto& item : model->named_parameters()) built[item.key()] = item.value();
  const auto specs = c.family->tensors(c);
  ASSERT_EQ(specs.size(), built.size());
  for (const auto& t : specs) {
    auto it = built.find(t.name);
    ASSERT_NE(it, built.end()) << t.name;
    auto shape = it->second.sizes().vec();
    auto sl = slices.find(t.name);
    if (sl != slices.end()) shape[sl->second.dim] = sl->second.full;
    EXPECT_EQ(shape, t.shape) << t.name;
    EXPECT_EQ(sl == slices.end() ? -1 : static_cast<int>(sl->second.dim), split_dim(t.split)) << t.name;
    // The checkpoint (the file HF wrote) holds the same tensors (older OPT files lack "model.").
    const std::string on_disk = ckpt.contains(t.name) ? t.name : t.name.substr(6);
    ASSERT_TRUE(ckpt.contains(on_disk)) << t.name;
    EXPECT_EQ(ckpt.info(on_disk).shape, t.shape) << t.name;
  }
  EXPECT_EQ(c.parameter_count(), static_cast<int64_t>(std::accumulate(specs.begin(), specs.end(), int64_t(0),
                                                                      [](int64_t n, const TensorSpec& t) {
                                                                        int64_t k = 1;
                                                                        for (auto d : t.shape) k *= d;
                                                                        return n + k;
                                                                      })));
  // The tied head is the embedding; an untied one is its own tensor.
  EXPECT_TRUE(built.count(c.embedding_name()));
  EXPECT_EQ(built.count("lm_head.weight"), c.tie_word_embeddings ? 0u : 1u);
  // Every Linear SFSD may factor is a split matrix of each layer.
  const auto linears = c.family->layer_linears(c);
  EXPECT_GE(linears.size(), 6u);
  for (const auto& l : linears) {
    const std::string name = c.family->layer_prefix() + "0." + l + ".weight";
    ASSERT_TRUE(built.count(name)) << name;
    EXPECT_EQ(built[name].dim(), 2);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FamilyDescriptor,
                         ::testing::Values("opt_preln", "opt_postln_proj", "llama_gqa", "llama_mha_tied",
                                           "llama3_scaled", "qwen2_bias", "qwen3_kv1"));

TEST(Families, EachModelTypeHasOneFamily) {
  std::set<std::string> seen;
  for (const ModelFamily* f : model_families())
    for (const auto& t : f->model_types()) {
      EXPECT_TRUE(seen.insert(t).second) << t;
      EXPECT_EQ(&family_of_model_type(t, "x"), f);
    }
  EXPECT_TRUE(seen.count("opt") && seen.count("llama") && seen.count("qwen2") && seen.count("qwen3"));
  test::expect_user_error([] { family_of_model_type("mamba", "m/config.json"); },
                          {"m/config.json", "'mamba'", "not supported", "'opt'", "'llama'"});
}

nlohmann::json tiny_qwen(const std::string& type) {
  return {{"model_type", type},       {"vocab_size", 100},       {"hidden_size", 64},
          {"intermediate_size", 96},  {"num_hidden_layers", 2},  {"num_attention_heads", 4},
          {"num_key_value_heads", 2}, {"rope_theta", 1000000.0}, {"use_sliding_window", false},
          {"sliding_window", 4096},   {"max_window_layers", 28}};
}

bool has_tensor(const ModelConfig& c, const std::string& layer_tensor) {
  for (const auto& t : c.family->layer_tensors(c))
    if (t.name == layer_tensor) return true;
  return false;
}

TEST(Families, Qwen2HasQkvBiasesOnly) {
  auto j = tiny_qwen("qwen2");
  j["attention_bias"] = true;  // not a Qwen2Config field: ignored, as HF ignores it
  auto c = ModelConfig::from_json(j, "q/config.json");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.out_bias);
  EXPECT_FALSE(has_tensor(c, "self_attn.q_norm.weight"));
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.embedding_name(), "model.embed_tokens.weight");
}

TEST(Families, Qwen3HeadDimDefaultsTo128AndHonoursAttentionBias) {
  auto j = tiny_qwen("qwen3");
  auto c = ModelConfig::from_json(j, "q/config.json");
  EXPECT_EQ(c.head_dim, 128);  // Qwen3Config's default, not 64 / 4
  EXPECT_TRUE(has_tensor(c, "self_attn.q_norm.weight") && has_tensor(c, "self_attn.k_norm.weight"));
  EXPECT_FALSE(c.qkv_bias || c.out_bias);
  j["attention_bias"] = true;
  j["head_dim"] = 24;
  c = ModelConfig::from_json(j, "q/config.json");
  EXPECT_EQ(c.head_dim, 24);
  EXPECT_TRUE(c.qkv_bias && c.out_bias);
  // q and k norms count 2 x head_dim per layer; biases q + 2 kv + hidden.
  auto no_bias = tiny_qwen("qwen3");
  no_bias["head_dim"] = 24;
  EXPECT_EQ(c.parameter_count() - ModelConfig::from_json(no_bias, "q").parameter_count(),
            2 * (4 * 24 + 2 * 2 * 24 + 64));
}

TEST(Families, UnimplementedFieldsFailNamingThem) {
  for (const char* type : {"qwen2", "qwen3"}) {
    auto j = tiny_qwen(type);
    j["use_sliding_window"] = true;
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); },
                            {"q/config.json", "use_sliding_window"});
    j = tiny_qwen(type);
    j["layer_types"] = {"full_attention", "sliding_attention"};
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"layer_types", "sliding_attention"});
    j = tiny_qwen(type);
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"rope_scaling", "yarn"});
    j = tiny_qwen(type);
    j["num_experts"] = 8;
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"num_experts", "mixture of experts"});
  }
  auto j = tiny_qwen("qwen2");
  j["layer_types"] = {"full_attention"};
  test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); },
                          {"layer_types", "1 entries for 2 layers"});
  j = tiny_qwen("qwen2_moe");
  test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"qwen2_moe", "not supported"});
  // Inert sliding-window settings (use_sliding_window false, every layer full) load.
  j = tiny_qwen("qwen3");
  j["layer_types"] = {"full_attention", "full_attention"};
  EXPECT_NO_THROW(ModelConfig::from_json(j, "q/config.json"));
}

TEST(Families, OneListOfHFFolderFiles) {
  const auto& files = hf_folder_files();
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"})
    EXPECT_NE(std::find(files.begin(), files.end(), f), files.end()) << f;
  auto paths = hf_folder_paths("/m", {"crash_plan.json"});
  EXPECT_EQ(paths.size(), files.size() + 1);
  EXPECT_EQ(paths.front(), "/m/tokenizer.json");
  EXPECT_EQ(paths.back(), "/m/crash_plan.json");
}

}  // namespace
}  // namespace crash
