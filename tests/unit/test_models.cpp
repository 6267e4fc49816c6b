// Golden tests: our models of every family against Hugging Face transformers outputs
// (tests/fixtures/generate.py), on right- and left-padded batches and greedy generation.
#include "framework/checkpoint.h"
#include "framework/models/decoder.h"
#include "parallel/grid.h"
#include "parallel/tensor_parallel.h"
#include "tests/unit/test_util.h"

#include <optional>

namespace crash {
namespace {

using test::fixture;

class GoldenModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    torch::set_num_threads(2);
    ckpt_ = std::make_unique<CheckpointReader>(fixture("models/" + GetParam()));
    golden_ = std::make_unique<SafetensorsFile>(fixture("golden/" + GetParam() + ".safetensors"));
    model_ = load_model(*ckpt_);
  }
  torch::Tensor g(const std::string& name) { return golden_->read(name); }

  std::unique_ptr<CheckpointReader> ckpt_;
  std::unique_ptr<SafetensorsFile> golden_;
  std::shared_ptr<CausalLM> model_;
};

// Largest difference over the positions the mask keeps (padding positions are undefined in HF too).
double masked_max_diff(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& mask) {
  auto keep = mask.to(torch::kBool).unsqueeze(-1).expand_as(a);
  return (a - b).abs().masked_select(keep).max().item<double>();
}

TEST_P(GoldenModel, LogitsAndHiddenStatesMatchHF) {
  torch::InferenceMode guard;
  for (std::string side : {"right", "left"}) {
    SCOPED_TRACE(side + " padding");
    auto mask = g(side + "_mask");
    auto out = model_->forward(g(side + "_ids"), mask, /*hidden_states=*/true);
    const int64_t L = ckpt_->config().num_layers;
    ASSERT_EQ(static_cast<int64_t>(out.hidden_states.size()), L + 1);
    EXPECT_LE(masked_max_diff(out.logits, g(side + "_logits"), mask), 1e-4);
    for (int64_t l = 0; l <= L; ++l) {
      auto want = g(side + "_hidden_" + std::to_string(l));
      ASSERT_EQ(out.hidden_states[l].sizes(), want.sizes()) << "hidden state " << l;
      EXPECT_LE(masked_max_diff(out.hidden_states[l], want, mask), 1e-4) << "hidden state " << l;
    }
  }
}

TEST_P(GoldenModel, GreedyGenerationMatchesHF) {
  auto out = model_->generate(g("gen_ids"), g("gen_mask"), g("gen_new").item<int64_t>(), g("gen_eos").item<int64_t>(),
                              g("gen_pad").item<int64_t>());
  auto want = g("gen_out");
  ASSERT_EQ(out.sizes(), want.sizes());
  EXPECT_TRUE(torch::equal(out, want)) << "ours:\n" << out << "\nHF:\n" << want;
}

TEST_P(GoldenModel, KVCacheStepsEqualFullForward) {
  // Decoding token by token with the cache gives the logits of one full forward pass.
  torch::InferenceMode guard;
  auto ids = g("right_ids").narrow(0, 1, 1);  // the longest row, no padding
  auto full = model_->forward(ids, torch::ones_like(ids)).logits;
  KVCache cache;
  cache.layers.resize(static_cast<size_t>(ckpt_->config().num_layers));
  for (int64_t t = 0; t < ids.size(1); ++t) {
    cache.mask = torch::ones({1, t + 1}, torch::kInt64);
    auto pos = model_->generation_positions(cache.mask, 1);
    auto ctx = model_->attention_context(cache.mask, pos);
    auto h = model_->embed(ids.narrow(1, t, 1), pos);
    for (int64_t l = 0; l < ckpt_->config().num_layers; ++l) h = model_->run_layer(l, h, ctx, &cache.layers[l]);
    auto logits = model_->head(model_->finish(h));
    EXPECT_LE((logits.squeeze(1) - full.select(1, t)).abs().max().item<double>(), 1e-4) << "step " << t;
  }
}

TEST_P(GoldenModel, PipelineStagesComposeToTheFullModel) {
  // Two stages holding layers [0, 1) and [1, L) give the same logits as the whole model.
  torch::InferenceMode guard;
  const int64_t L = ckpt_->config().num_layers;
  auto first = load_model(*ckpt_, {0, 1, nullptr});
  auto last = load_model(*ckpt_, {1, L, nullptr});
  EXPECT_TRUE(first->has_embedding());
  EXPECT_FALSE(first->has_head());
  EXPECT_TRUE(last->has_head());
  auto ids = g("right_ids"), mask = g("right_mask");
  auto pos = first->default_positions(mask, ids.size(1));
  auto ctx = first->attention_context(mask, pos);
  auto h = first->run_layer(0, first->embed(ids, pos), ctx, nullptr);
  for (int64_t l = 1; l < L; ++l) h = last->run_layer(l, h, ctx, nullptr);
  auto logits = last->head(last->finish(h));
  EXPECT_LE(masked_max_diff(logits, g("right_logits"), mask), 1e-4);
}

TEST_P(GoldenModel, PackedPassMatchesHF) {
  // Only the real tokens, row after row, with attention within each row: the hidden states and
  // logits HF gives at those tokens. Under InferenceMode attention takes the fast CPU path,
  // with autograd on it takes torch's.
  const int64_t L = ckpt_->config().num_layers;
  for (bool inference : {true, false}) {
    for (std::string side : {"right", "left"}) {
      SCOPED_TRACE(side + (inference ? " padding, inference mode" : " padding, autograd"));
      std::optional<torch::InferenceMode> guard;
      if (inference) guard.emplace();
      auto ids = g(side + "_ids"), mask = g(side + "_mask");
      auto packing = TokenPacking::of(mask);
      ASSERT_EQ(packing.tokens(), mask.sum().item<int64_t>());
      auto pos = packing.pack(model_->default_positions(mask, ids.size(1)).unsqueeze(-1)).squeeze(-1);
      auto ctx = model_->attention_context(packing, pos);
      ASSERT_TRUE(ctx.packed());
      auto h = model_->embed(packing.pack(ids.unsqueeze(-1)).squeeze(-1), pos);
      EXPECT_LE((h - packing.pack(g(side + "_hidden_0"))).abs().max().item<double>(), 1e-5);
      for (int64_t l = 0; l < L; ++l) {
        h = model_->run_layer(l, h, ctx, nullptr);
        if (l + 1 < L) {
          EXPECT_LE((h - packing.pack(g(side + "_hidden_" + std::to_string(l + 1)))).abs().max().item<double>(), 1e-4)
              << "hidden state " << l + 1;
        }
      }
      h = model_->finish(h);
      EXPECT_LE((h - packing.pack(g(side + "_hidden_" + std::to_string(L)))).abs().max().item<double>(), 1e-4);
      auto logits = model_->head(h);
      EXPECT_LE((logits - packing.pack(g(side + "_logits"))).abs().max().item<double>(), 1e-4);
    }
  }
}

TEST_P(GoldenModel, BFloat16StaysCloseToFloat32) {
  torch::InferenceMode guard;
  auto model = load_model(*ckpt_, {}, torch::kBFloat16);
  auto mask = g("right_mask");
  auto out = model->forward(g("right_ids"), mask);
  EXPECT_EQ(out.logits.scalar_type(), torch::kBFloat16);
  auto want = g("right_logits");
  double scale = want.abs().max().item<double>();
  EXPECT_LE(masked_max_diff(out.logits.to(torch::kFloat32), want, mask), 0.05 * scale);
}

TEST_P(GoldenModel, ParameterCountMatchesConfig) {
  int64_t n = 0;
  for (const auto& p : model_->parameters()) n += p.numel();
  EXPECT_EQ(n, ckpt_->config().parameter_count());
}

TEST(ParameterInit, LoadingDrawsNoRandomInitAndBuildingStillDoes) {
  // Loading skips the init (every parameter is overwritten): the generator is not advanced.
  CheckpointReader ckpt(fixture("models/opt_preln"));
  torch::manual_seed(7);
  auto expected = torch::rand({4});
  torch::manual_seed(7);
  auto loaded = load_model(ckpt);
  EXPECT_TRUE(torch::equal(torch::rand({4}), expected));
  EXPECT_FALSE(SkipParameterInit::active());  // the guard ends with the load
  // A layer built outside the guard is initialised as torch::nn::Linear is, draw for draw.
  auto tp = ProcessGrid::create({1, 1})->tp_group();
  torch::manual_seed(3);
  torch::nn::Linear reference(torch::nn::LinearOptions(16, 8));
  torch::manual_seed(3);
  ColumnParallelLinear column(16, 8, 0, 8, true, tp);
  EXPECT_TRUE(torch::equal(column->weight, reference->weight));
  EXPECT_TRUE(torch::equal(column->bias, reference->bias));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenModel,
                         ::testing::Values("opt_preln", "opt_postln_proj", "llama_gqa", "llama_mha_tied",
                                           "llama3_scaled", "qwen2_bias", "qwen3_kv1", "mistral_swa", "qwen2_swa",
                                           "gemma2_softcap", "gemma3_local_rope"));

}  // namespace
}  // namespace crash
