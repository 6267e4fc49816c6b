// The family descriptors (framework/models/family.h) against the models they build: every
// tensor's name, shape and TP split, the tied embedding, the Linears SFSD factors, and the
// model_type dispatch.
#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "framework/checkpoint.h"
#include "framework/config.h"
#include "framework/models/blocks.h"
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
                                           "llama3_scaled", "qwen2_bias", "qwen3_kv1", "mistral_swa", "qwen2_swa",
                                           "gemma2_softcap", "gemma3_local_rope"));

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
    // A sliding layer with no window is an error in HF too.
    auto j = tiny_qwen(type);
    j["layer_types"] = {"full_attention", "sliding_attention"};
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"layer_types", "no window applies"});
    j["use_sliding_window"] = true;
    j["sliding_window"] = nullptr;
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"layer_types", "no window applies"});
    j = tiny_qwen(type);
    j["layer_types"] = {"full_attention", "linear_attention"};
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"layer_types", "linear_attention"});
    j = tiny_qwen(type);
    j["use_sliding_window"] = true;
    j["sliding_window"] = -3;
    test::expect_user_error([&] { ModelConfig::from_json(j, "q/config.json"); }, {"sliding_window", "positive"});
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

std::vector<bool> sliding_of(const ModelConfig& c) {
  std::vector<bool> out;
  for (int64_t l = 0; l < c.num_layers; ++l) out.push_back(c.slides(l));
  return out;
}

TEST(Families, QwenSlidingWindowLayersAsHFReadsThem) {
  for (const char* type : {"qwen2", "qwen3"}) {
    SCOPED_TRACE(type);
    auto j = tiny_qwen(type);
    j["num_hidden_layers"] = 4;
    EXPECT_EQ(ModelConfig::from_json(j, "q").sliding_window, 0);  // use_sliding_window false: inert
    j["use_sliding_window"] = true;
    auto c = ModelConfig::from_json(j, "q");  // max_window_layers 28 > 4: no layer slides
    EXPECT_EQ(c.sliding_window, 0);
    EXPECT_EQ(sliding_of(c), std::vector<bool>(4, false));
    j["max_window_layers"] = 1;
    j["sliding_window"] = 7;
    c = ModelConfig::from_json(j, "q");
    EXPECT_EQ(c.sliding_window, 7);
    EXPECT_EQ(sliding_of(c), (std::vector<bool>{false, true, true, true}));
    // An emulator re-indexes the layers spelled out, since max_window_layers cannot be.
    auto lists = c.family->layer_config_lists(c);
    ASSERT_EQ(lists.count("layer_types"), 1u);
    EXPECT_EQ(lists["layer_types"],
              nlohmann::json({"full_attention", "sliding_attention", "sliding_attention", "sliding_attention"}));
    j.erase("sliding_window");  // HF's default window
    EXPECT_EQ(ModelConfig::from_json(j, "q").sliding_window, 4096);
    // layer_types, when given, overrides max_window_layers.
    j["layer_types"] = {"sliding_attention", "full_attention", "attention", "sliding_attention"};
    c = ModelConfig::from_json(j, "q");
    EXPECT_EQ(sliding_of(c), (std::vector<bool>{true, false, false, true}));
  }
}

TEST(Families, MistralSlidesOnEveryLayer) {
  nlohmann::json j = {
      {"model_type", "mistral"}, {"vocab_size", 100},        {"hidden_size", 64},           {"intermediate_size", 96},
      {"num_hidden_layers", 3},  {"num_attention_heads", 4}, {"num_key_value_heads", 2},    {"head_dim", 24},
      {"rope_theta", 1000000.0}, {"sliding_window", 4096},   {"tie_word_embeddings", false}};
  auto c = ModelConfig::from_json(j, "m/config.json");
  EXPECT_EQ(c.head_dim, 24);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(sliding_of(c), std::vector<bool>(3, true));
  EXPECT_FALSE(c.qkv_bias || c.out_bias || c.mlp_bias);
  EXPECT_FALSE(has_tensor(c, "self_attn.q_proj.bias"));
  // q 96 x 64, k and v 48 x 64, o 64 x 96, three 96 x 64 MLP matrices, two norms.
  EXPECT_EQ(c.parameter_count(), 3 * (96 * 64 + 2 * 48 * 64 + 64 * 96 + 3 * 96 * 64 + 2 * 64) + 2 * 100 * 64 + 64);
  j["sliding_window"] = nullptr;  // Mistral-7B v0.2 and later: full attention
  EXPECT_EQ(ModelConfig::from_json(j, "m").sliding_window, 0);
  EXPECT_FALSE(ModelConfig::from_json(j, "m").slides(0));
  j.erase("sliding_window");
  EXPECT_EQ(ModelConfig::from_json(j, "m").sliding_window, 4096);  // MistralConfig's default
  j["sliding_window"] = 0;
  test::expect_user_error([&] { ModelConfig::from_json(j, "m/config.json"); }, {"m/config.json", "sliding_window"});
  j["sliding_window"] = 4;
  j["num_experts"] = 8;
  test::expect_user_error([&] { ModelConfig::from_json(j, "m/config.json"); }, {"num_experts"});
  // The published 7B configs (parameter counts: Config.PublishedModelsHaveHFParameterCounts).
  const std::string examples = std::string(CRASH_EXAMPLES) + "/models/";
  EXPECT_EQ(ModelConfig::load(examples + "mistral-7b-v0.1/config.json").sliding_window, 4096);
  EXPECT_EQ(ModelConfig::load(examples + "mistral-7b-v0.3/config.json").sliding_window, 0);
}

// The window's bias, padded and packed: query q keeps key k when q - window < k <= q (and k is a
// real token), the same for every row of a packed pass; layers that do not slide keep the causal bias.
TEST(Families, SlidingWindowBiasKeepsTheLastWindowKeys) {
  nlohmann::json j = tiny_qwen("qwen2");
  j["num_hidden_layers"] = 2;
  j["use_sliding_window"] = true;
  j["sliding_window"] = 3;
  j["max_window_layers"] = 1;
  SkipParameterInit skip;
  auto model = build_model(ModelConfig::from_json(j, "q"));
  const int64_t T = 7;
  auto mask = torch::ones({2, T}, torch::kInt64);
  mask[1].narrow(0, 0, 2).zero_();  // left padding
  auto ctx = model->attention_context(mask, model->default_positions(mask, T));
  ASSERT_TRUE(ctx.window_bias.defined());
  EXPECT_TRUE(ctx.bias_of(0).is_same(ctx.bias));
  auto kept = ctx.bias_of(1) == 0, causal = ctx.bias == 0;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t q = 0; q < T; ++q)
      for (int64_t k = 0; k < T; ++k) {
        const bool real = mask[b][k].item<int64_t>() != 0;
        EXPECT_EQ(kept[b][0][q][k].item<bool>(), real && k <= q && k > q - 3) << b << " " << q << " " << k;
        EXPECT_EQ(causal[b][0][q][k].item<bool>(), real && k <= q);
      }
  auto packing = TokenPacking::of(mask);
  auto pctx = model->attention_context(packing, torch::zeros({1, packing.tokens()}, torch::kInt64));
  auto pkept = pctx.bias_of(1) == 0;
  for (int64_t q = 0; q < T; ++q)
    for (int64_t k = 0; k < T; ++k) EXPECT_EQ(pkept[q][k].item<bool>(), k <= q && k > q - 3);
  // A window as long as the pass changes nothing: no second bias is made.
  auto short_mask = torch::ones({1, 3}, torch::kInt64);
  EXPECT_FALSE(model->attention_context(short_mask, model->default_positions(short_mask, 3)).window_bias.defined());
}

nlohmann::json tiny_gemma(const std::string& type) {
  return {{"model_type", type},     {"vocab_size", 100},        {"hidden_size", 64},        {"intermediate_size", 96},
          {"num_hidden_layers", 7}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 16}};
}

TEST(Families, GemmaDefaultsAsTheirHFConfigClasses) {
  // Gemma-2: every other layer slides from the first, 4096 tokens; caps 50 and 30 when absent.
  auto g2 = ModelConfig::from_json(tiny_gemma("gemma2"), "g/config.json");
  EXPECT_EQ(g2.sliding_window, 4096);
  EXPECT_EQ(sliding_of(g2), (std::vector<bool>{true, false, true, false, true, false, true}));
  EXPECT_DOUBLE_EQ(g2.attention_softcap, 50.0);
  EXPECT_DOUBLE_EQ(g2.logit_softcap, 30.0);
  EXPECT_DOUBLE_EQ(g2.attention_scale, 1.0 / 16.0);  // query_pre_attn_scalar 256
  EXPECT_DOUBLE_EQ(g2.sliding_rope_theta, 0.0);
  EXPECT_EQ(g2.activation, "gelu_pytorch_tanh");
  EXPECT_TRUE(g2.tie_word_embeddings);
  EXPECT_EQ(g2.bos_token_id, 2);
  EXPECT_EQ(g2.eos_token_id, 1);
  // null: no cap.
  auto j = tiny_gemma("gemma2");
  j["attn_logit_softcapping"] = nullptr;
  j["final_logit_softcapping"] = nullptr;
  auto uncapped = ModelConfig::from_json(j, "g/config.json");
  EXPECT_EQ(uncapped.attention_softcap, 0.0);
  EXPECT_EQ(uncapped.logit_softcap, 0.0);
  // Gemma-3: every sixth layer global, q/k norms, local base 10000 unscaled, global 1e6 scaled.
  j = tiny_gemma("gemma3_text");
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
  auto g3 = ModelConfig::from_json(j, "g/config.json");
  EXPECT_EQ(sliding_of(g3), (std::vector<bool>{true, true, true, true, true, false, true}));
  EXPECT_EQ(g3.attention_softcap, 0.0);
  EXPECT_EQ(g3.logit_softcap, 0.0);
  EXPECT_DOUBLE_EQ(g3.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(g3.sliding_rope_theta, 10000.0);
  ASSERT_TRUE(g3.rope_scaling && g3.rope_scaling->linear);
  EXPECT_TRUE(has_tensor(g3, "self_attn.q_norm.weight"));
  EXPECT_TRUE(has_tensor(g3, "post_feedforward_layernorm.weight"));
  EXPECT_FALSE(has_tensor(g2, "self_attn.q_norm.weight"));
  // The global layers' frequencies are divided by the factor; the sliding layers' are not.
  auto global = rotary_inverse_frequencies(g3), local = rotary_inverse_frequencies(g3, /*sliding=*/true);
  auto exponent = torch::arange(0, 16, 2).to(torch::kFloat32) / 16.0;
  EXPECT_TRUE(torch::allclose(global, 1.0 / torch::pow(1e6, exponent) / 8.0));
  EXPECT_TRUE(torch::allclose(local, 1.0 / torch::pow(10000.0, exponent)));
  // sliding_window_pattern where layer_types is absent; layer_types first.
  j["sliding_window_pattern"] = 3;
  EXPECT_EQ(sliding_of(ModelConfig::from_json(j, "g/config.json")),
            (std::vector<bool>{true, true, false, true, true, false, true}));
  // An emulator re-indexes layer_types: the family always spells them out.
  EXPECT_EQ(g3.family->layer_config_lists(g3).at("layer_types").size(), 7u);
}

TEST(Families, GemmaFieldsThatChangeTheModelFailNamingThem) {
  for (const char* type : {"gemma2", "gemma3_text"}) {
    auto j = tiny_gemma(type);
    j["use_bidirectional_attention"] = true;
    test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"use_bidirectional_attention"});
    j = tiny_gemma(type);
    j["sliding_window"] = nullptr;
    test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"sliding_window", "null"});
    j = tiny_gemma(type);
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"rope_scaling", "yarn"});
    j = tiny_gemma(type);
    j["attn_logit_softcapping"] = -1.0;
    test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"attn_logit_softcapping"});
    j = tiny_gemma(type);
    j["query_pre_attn_scalar"] = 0;
    test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"query_pre_attn_scalar"});
  }
  auto j = tiny_gemma("gemma3_text");
  j["rope_parameters"] = {{"sliding_attention", {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10.0}}},
                          {"full_attention", {{"rope_type", "default"}, {"rope_theta", 1e6}}}};
  test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"sliding_attention", "not supported"});
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"rope_parameters", "full_attention"});
  j = tiny_gemma("gemma3");  // the multimodal model's config: its text_config is a gemma3_text one
  test::expect_user_error([&] { ModelConfig::from_json(j, "g/config.json"); }, {"gemma3", "not supported"});
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
