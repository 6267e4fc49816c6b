// Training-time dropout: the counter-based masks (rate, scale, keys), HF's sites in an OPT layer
// against a hand computation, padding and packing independence, the TP head slice, dropout 0
// bit for bit as before, and the trainer's runs (same seed, same weights; dropout changes the loss).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "framework/distributed_lm.h"
#include "framework/json_fields.h"
#include "framework/models/dropout.h"
#include "framework/trainer.h"
#include "test_util.h"

using namespace crash;
using crash::test::expect_user_error;
using crash::test::fixture;
using crash::test::TempDir;

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Two right-padded rows of 7 and 5 real tokens.
struct Batch {
  torch::Tensor ids = torch::tensor({{5, 9, 17, 33, 2, 41, 8}, {12, 7, 99, 3, 60, 1, 1}}, torch::kInt64);
  torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 1, 0, 0}}, torch::kInt64);
  std::vector<int64_t> lengths = {7, 5};
};

std::shared_ptr<DropoutContext> drop(const torch::Tensor& mask, double hidden, double attention,
                                     int64_t first_slot = 3) {
  auto d = DropoutContext::padded(mask, first_slot);
  d->hidden = hidden;
  d->attention = attention;
  d->seed = 11;
  d->step = 4;
  return d;
}

// A packed context's dropout: the same rows and slots, tokens in packed order.
std::shared_ptr<DropoutContext> packed_drop(const DropoutContext& padded) {
  auto d = std::make_shared<DropoutContext>(padded);
  d->token_position.clear();
  d->padded_length = 0;
  return d;
}

torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return torch::layer_norm(x, {x.size(-1)}, w, b, 1e-5);
}

}  // namespace

TEST(Dropout, MaskRateAndScale) {
  const int64_t n = 1 << 20;
  for (double p : {0.1, 0.5}) {
    auto m = dropout_mask(dropout_key(1, 2, 3, 4, DropoutSite::MlpOutput), n, p);
    const double dropped = (m == 0).sum().item<double>() / n;
    EXPECT_NEAR(dropped, p, 5 * std::sqrt(p * (1 - p) / n)) << p;
    // Kept units are scaled as torch scales them: the expectation is unchanged.
    auto kept = m.masked_select(m != 0);
    EXPECT_TRUE(torch::all(kept == static_cast<float>(1.0 / (1.0 - p))).item<bool>());
    EXPECT_NEAR(m.to(torch::kFloat64).mean().item<double>(), 1.0, 0.005);
  }
  EXPECT_TRUE(torch::all(dropout_mask(7, 1000, 0.0) == 1).item<bool>());
  expect_user_error([] { dropout_mask(7, 10, 1.0); }, {"dropout", "[0, 1)"});
}

TEST(Dropout, SameKeySameMaskOtherKeysOther) {
  const double p = 0.1;
  const int64_t n = 1 << 16;
  auto key = [](int64_t step, int64_t slot, int64_t layer, DropoutSite site, int64_t head) {
    return dropout_key(5, step, slot, layer, site, head);
  };
  auto base = dropout_mask(key(1, 2, 3, DropoutSite::AttentionProbs, 0), n, p);
  EXPECT_TRUE(torch::equal(base, dropout_mask(key(1, 2, 3, DropoutSite::AttentionProbs, 0), n, p)));
  // A prefix is the shorter mask: element i depends on (key, i) alone.
  EXPECT_TRUE(torch::equal(base.narrow(0, 0, 100), dropout_mask(key(1, 2, 3, DropoutSite::AttentionProbs, 0), 100, p)));
  const uint64_t others[] = {dropout_key(6, 1, 2, 3, DropoutSite::AttentionProbs, 0),
                             key(2, 2, 3, DropoutSite::AttentionProbs, 0),
                             key(1, 3, 3, DropoutSite::AttentionProbs, 0),
                             key(1, 2, 4, DropoutSite::AttentionProbs, 0),
                             key(1, 2, 3, DropoutSite::AttentionOutput, 0),
                             key(1, 2, 3, DropoutSite::AttentionProbs, 1)};
  for (uint64_t k : others) {
    // Independent masks disagree on 2 p (1 - p) of the elements.
    const double differ = (dropout_mask(k, n, p) != base).sum().item<double>() / n;
    EXPECT_NEAR(differ, 2 * p * (1 - p), 0.01);
  }
}

TEST(Dropout, ResidualMaskFollowsTheExampleNotThePadding) {
  Batch b;
  auto x = torch::randn({2, 7, 16});
  AttentionContext ctx;
  ctx.dropout = drop(b.mask, 0.3, 0);
  auto y = residual_dropout(x, ctx, 2, DropoutSite::AttentionOutput);
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t L = b.lengths[static_cast<size_t>(r)];
    auto m = dropout_mask(dropout_key(11, 4, 3 + r, 2, DropoutSite::AttentionOutput), L * 16, 0.3).view({L, 16});
    EXPECT_TRUE(torch::equal(y[r].narrow(0, 0, L), x[r].narrow(0, 0, L) * m)) << r;
    if (L < 7) EXPECT_TRUE(torch::equal(y[r].narrow(0, L, 7 - L), x[r].narrow(0, L, 7 - L)));  // padding kept
  }
  // The same example left-padded to 9 tokens in a batch of its own: the same mask on its tokens.
  auto mask2 = torch::tensor({{0, 0, 0, 0, 1, 1, 1, 1, 1}}, torch::kInt64);
  AttentionContext ctx2;
  ctx2.dropout = drop(mask2, 0.3, 0, /*first_slot=*/4);
  auto x2 = torch::zeros({1, 9, 16});
  x2[0].narrow(0, 4, 5).copy_(x[1].narrow(0, 0, 5));
  auto y2 = residual_dropout(x2, ctx2, 2, DropoutSite::AttentionOutput);
  EXPECT_TRUE(torch::equal(y2[0].narrow(0, 4, 5), y[1].narrow(0, 0, 5)));
  // Packed ([1, N, d]): the same values at the real tokens.
  AttentionContext pctx;
  pctx.dropout = packed_drop(*ctx.dropout);
  auto px = torch::cat({x[0].narrow(0, 0, 7), x[1].narrow(0, 0, 5)}).unsqueeze(0);
  auto py = residual_dropout(px, pctx, 2, DropoutSite::AttentionOutput);
  EXPECT_TRUE(torch::equal(py[0], torch::cat({y[0].narrow(0, 0, 7), y[1].narrow(0, 0, 5)})));
}

TEST(Dropout, AttentionMaskOfATensorParallelRankIsTheOneRankSlice) {
  Batch b;
  auto probs = torch::rand({2, 4, 7, 7});
  AttentionContext ctx;
  ctx.dropout = drop(b.mask, 0, 0.25);
  auto all = attention_probs_dropout(probs, ctx, 1, 0);
  // TP2: rank 1 holds heads 2 and 3.
  auto second = attention_probs_dropout(probs.narrow(1, 2, 2), ctx, 1, 2);
  EXPECT_TRUE(torch::equal(second, all.narrow(1, 2, 2)));
  EXPECT_FALSE(torch::equal(all.narrow(1, 0, 2), all.narrow(1, 2, 2)));
  // Each head's mask over a row's real tokens, query-major.
  const int64_t L = 5;
  auto m = dropout_mask(dropout_key(11, 4, 4, 1, DropoutSite::AttentionProbs, 3), L * L, 0.25).view({L, L});
  EXPECT_TRUE(torch::equal(all[1][3].narrow(0, 0, L).narrow(1, 0, L), probs[1][3].narrow(0, 0, L).narrow(1, 0, L) * m));
  // A packed row draws the same.
  AttentionContext pctx;
  pctx.dropout = packed_drop(*ctx.dropout);
  auto row = packed_row_probs_dropout(probs[1].narrow(1, 0, L).narrow(2, 0, L).contiguous(), pctx, 1, 1, 0);
  EXPECT_TRUE(torch::equal(row, all[1].narrow(1, 0, L).narrow(2, 0, L)));
}

// OPT's pre-LN layer by hand: dropout on the attention probabilities, on the attention output
// and on the fc2 output before each residual add (HF's OPTDecoderLayer), nothing else.
TEST(Dropout, OptLayerMatchesHandComputation) {
  torch::NoGradGuard ng;
  torch::manual_seed(0);
  auto model = load_model(CheckpointReader(fixture("models/opt_preln")));
  Batch b;
  const int64_t layer = 1, d = 64, H = 4, D = 16;
  const double ph = 0.2, pa = 0.3;
  auto positions = model->default_positions(b.mask, 7);
  auto h = torch::randn({2, 7, d});
  auto ctx = model->attention_context(b.mask, positions);
  ctx.dropout = drop(b.mask, ph, pa);
  auto got = model->run_layer(layer, h, ctx, nullptr);

  std::map<std::string, torch::Tensor> w;
  for (auto& item : model->named_parameters()) w[item.key()] = item.value();
  const std::string pre = "model.decoder.layers.1.";
  auto P = [&](const std::string& n) { return w.at(pre + n); };
  auto lin = [&](const torch::Tensor& x, const std::string& n) {
    return torch::matmul(x, P(n + ".weight").t()) + P(n + ".bias");
  };
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t L = b.lengths[static_cast<size_t>(r)], slot = 3 + r;
    auto hr = h[r].narrow(0, 0, L);
    auto x = layer_norm(hr, P("self_attn_layer_norm.weight"), P("self_attn_layer_norm.bias"));
    auto q = lin(x, "self_attn.q_proj").view({L, H, D}).transpose(0, 1) / std::sqrt(16.0);
    auto k = lin(x, "self_attn.k_proj").view({L, H, D}).transpose(0, 1);
    auto v = lin(x, "self_attn.v_proj").view({L, H, D}).transpose(0, 1);
    auto causal = torch::ones({L, L}).tril().logical_not();
    auto probs = torch::softmax(torch::matmul(q, k.transpose(1, 2)).masked_fill(causal, -1e30), -1);
    for (int64_t head = 0; head < H; ++head)
      probs[head] *=
          dropout_mask(dropout_key(11, 4, slot, layer, DropoutSite::AttentionProbs, head), L * L, pa).view({L, L});
    auto a = lin(torch::matmul(probs, v).transpose(0, 1).reshape({L, d}), "self_attn.out_proj");
    a = a * dropout_mask(dropout_key(11, 4, slot, layer, DropoutSite::AttentionOutput), L * d, ph).view({L, d});
    auto h1 = hr + a;
    auto y = layer_norm(h1, P("final_layer_norm.weight"), P("final_layer_norm.bias"));
    auto f = lin(torch::relu(lin(y, "fc1")), "fc2");
    f = f * dropout_mask(dropout_key(11, 4, slot, layer, DropoutSite::MlpOutput), L * d, ph).view({L, d});
    EXPECT_LT(max_diff(got[r].narrow(0, 0, L), h1 + f), 1e-5) << r;
  }
  // Without dropout the layer differs: the masks took effect.
  auto plain = model->run_layer(layer, h, model->attention_context(b.mask, positions), nullptr);
  EXPECT_GT(max_diff(plain[0], got[0]), 1e-3);

  // The packed path (torch's per-row attention, as in training) draws the same masks.
  auto packing = TokenPacking::of(b.mask);
  auto pctx = model->attention_context(packing, packing.pack(positions.unsqueeze(-1)).squeeze(-1));
  pctx.dropout = packed_drop(*ctx.dropout);
  auto packed = model->run_layer(layer, packing.pack(h), pctx, nullptr);
  EXPECT_LT(max_diff(packed[0], packing.pack(got)[0]), 1e-5);
}

TEST(Dropout, RateZeroIsBitForBitTheDeterministicLayer) {
  torch::NoGradGuard ng;
  torch::manual_seed(1);
  Batch b;
  for (const char* name : {"models/opt_preln", "models/llama_gqa", "models/opt_postln_proj"}) {
    auto model = load_model(CheckpointReader(fixture(name)));
    const int64_t d = model->config().hidden_size;
    auto positions = model->default_positions(b.mask, 7);
    auto h = torch::randn({2, 7, d});
    auto ctx = model->attention_context(b.mask, positions);
    auto before = model->run_layer(0, h, ctx, nullptr);
    ctx.dropout = drop(b.mask, 0, 0);
    EXPECT_TRUE(torch::equal(model->run_layer(0, h, ctx, nullptr), before)) << name;
  }
}

TEST(Dropout, LlamaDropsAttentionProbabilitiesOnly) {
  torch::NoGradGuard ng;
  auto model = load_model(CheckpointReader(fixture("models/llama_gqa")));
  Batch b;
  auto positions = model->default_positions(b.mask, 7);
  auto h = torch::randn({2, 7, model->config().hidden_size});
  auto ctx = model->attention_context(b.mask, positions);
  auto plain = model->run_layer(0, h, ctx, nullptr);
  ctx.dropout = drop(b.mask, 0, 0.2);
  auto att = model->run_layer(0, h, ctx, nullptr);
  EXPECT_GT(max_diff(att[0], plain[0]), 1e-4);
  // Grouped-query heads: the packed path draws the padded path's masks.
  auto packing = TokenPacking::of(b.mask);
  auto pctx = model->attention_context(packing, packing.pack(positions.unsqueeze(-1)).squeeze(-1));
  pctx.dropout = packed_drop(*ctx.dropout);
  EXPECT_LT(max_diff(model->run_layer(0, packing.pack(h), pctx, nullptr)[0], packing.pack(att)[0]), 1e-5);
}

TEST(Dropout, ForwardBackwardWithRateZeroUnchangedAndWithRateRepeatable) {
  torch::set_num_threads(2);
  CheckpointReader ckpt(fixture("models/opt_preln"));
  DistributedLM model(ckpt, ProcessGrid::create({1, 1}));
  Batch b;
  auto grads = [&] {
    std::vector<torch::Tensor> g;
    for (auto& p : model.parameters()) {
      g.push_back(p.grad().clone());
      p.mutable_grad().zero_();
    }
    return g;
  };
  auto same = [](const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& c) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!torch::equal(a[i], c[i])) return false;
    return true;
  };
  const double plain = model.forward_backward(b.ids, b.mask, 2);
  auto g_plain = grads();
  DistributedLM::Dropout zero{0, 0, 9, 1, 0};
  EXPECT_EQ(model.forward_backward(b.ids, b.mask, 2, true, {}, 0, nullptr, &zero), plain);
  EXPECT_TRUE(same(grads(), g_plain));
  DistributedLM::Dropout on{0.1, 0.1, 9, 1, 0};
  const double first = model.forward_backward(b.ids, b.mask, 2, true, {}, 0, nullptr, &on);
  auto g_first = grads();
  EXPECT_GT(std::abs(first - plain), 1e-4);
  EXPECT_EQ(model.forward_backward(b.ids, b.mask, 2, true, {}, 0, nullptr, &on), first);
  EXPECT_TRUE(same(grads(), g_first));
  // One micro-batch instead of two: the masks follow the rows' slots, so the loss is the same.
  EXPECT_NEAR(model.forward_backward(b.ids, b.mask, 1, true, {}, 0, nullptr, &on), first, 1e-6);
  grads();
  DistributedLM::Dropout next = on;
  next.step = 2;
  EXPECT_GT(std::abs(model.forward_backward(b.ids, b.mask, 2, true, {}, 0, nullptr, &next) - first), 1e-5);
  grads();
  // Evaluation stays deterministic.
  EXPECT_NEAR(model.evaluate_loss(b.ids, b.mask, 1), plain, 1e-6);
}

TEST(Dropout, TrainingRunsRepeatAndDropoutChangesTheLoss) {
  torch::set_num_threads(2);
  TempDir dir;
  const std::string data = dir / "data.jsonl";
  {
    std::ofstream f(data);
    for (int i = 0; i < 8; ++i) {
      f << "{\"tokens\": [";
      for (int t = 0; t < 6 + i % 3; ++t) f << (t ? ", " : "") << 3 + (i * 7 + t * 13) % 120;
      f << "]}\n";
    }
  }
  auto run = [&](const std::string& out, std::optional<double> p) {
    TrainOptions o;
    o.model = fixture("models/opt_preln");
    o.data = data;
    o.out = dir / out;
    o.steps = 3;
    o.batch_size = 4;
    o.micro_batches = 2;
    o.lr = 1e-2;
    o.seed = 3;
    o.train_all = true;
    o.dropout = p;
    o.grid = {1, 1};
    return train(o);
  };
  auto with = run("a", 0.1), again = run("b", 0.1), without = run("c", std::nullopt), zero = run("d", 0.0);
  EXPECT_EQ(read_file(dir / "a/model/model.safetensors"), read_file(dir / "b/model/model.safetensors"));
  EXPECT_EQ(with.last_loss, again.last_loss);
  EXPECT_GT(std::abs(with.last_loss - without.last_loss), 1e-4);
  // The fixture's config has dropout 0: --dropout 0 is the same run.
  EXPECT_EQ(read_file(dir / "c/model/model.safetensors"), read_file(dir / "d/model/model.safetensors"));
  // The log records the rates used.
  EXPECT_NE(read_file(dir / "a/train_log.jsonl").find("\"dropout\":0.1"), std::string::npos);
  EXPECT_NE(read_file(dir / "c/train_log.jsonl").find("\"dropout\":0.0"), std::string::npos);
  expect_user_error([&] { run("e", 1.0); }, {"--dropout", "[0, 1)"});
  expect_user_error([&] { run("f", -0.1); }, {"--dropout"});
}

TEST(Dropout, ConfigRatesReadAndChecked) {
  auto j = read_json_file(fixture("models/opt_preln/config.json"));
  j["dropout"] = 0.1;
  j["attention_dropout"] = 0.05;
  auto c = ModelConfig::from_json(j, "x/config.json");
  EXPECT_EQ(c.dropout, 0.1);
  EXPECT_EQ(c.attention_dropout, 0.05);
  j.erase("dropout");
  EXPECT_EQ(ModelConfig::from_json(j, "x/config.json").dropout, 0.1);  // OPTConfig's default
  j["dropout"] = 1.0;
  expect_user_error([&] { ModelConfig::from_json(j, "x/config.json"); }, {"x/config.json", "dropout", "[0, 1)"});
  auto l = read_json_file(fixture("models/llama_gqa/config.json"));
  l["attention_dropout"] = 0.2;
  c = ModelConfig::from_json(l, "y/config.json");
  EXPECT_EQ(c.attention_dropout, 0.2);
  EXPECT_EQ(c.dropout, 0.0);
}
