// CRaSh emulator plans, emulator folders (uniform, remove, share) and plug-in, checked by
// running the full model's own layers in the order the plan says; the plug-in carries trained
// embeddings, final norm and head, and refuses trained frozen slots.
#include <algorithm>
#include <functional>
#include <optional>
#include <set>

#include "framework/checkpoint.h"
#include "framework/emulator.h"
#include "framework/json_fields.h"
#include "framework/models/decoder.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

using test::expect_user_error;
using test::fixture;
using test::TempDir;

std::vector<int64_t> sources(const EmulatorPlan& p) {
  std::vector<int64_t> out;
  for (const auto& s : p.slots) out.push_back(s.source);
  return out;
}

TEST(EmulatorPlan, UniformKeepsEvenlySpacedMiddleLayers) {
  // 12 layers, 2 + 2 adapters: middle 2..9 (M = 8); keep round(i*7/3) = 0, 2, 5, 7.
  auto p = plan_uniform(12, 2, 2, 4);
  EXPECT_EQ(sources(p), (std::vector<int64_t>{0, 1, 2, 4, 7, 9, 10, 11}));
  EXPECT_EQ(p.trainable_slots(), (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_TRUE(p.storage().empty());
  EXPECT_EQ(sources(plan_uniform(12, 2, 2, 1)), (std::vector<int64_t>{0, 1, 2, 10, 11}));
  EXPECT_EQ(sources(plan_uniform(6, 1, 1, 4)), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
}

TEST(EmulatorPlan, UniformEqualsOffsiteTuningsLists) {
  // OPT-1.3B (24 layers) 2-8-2 and OPT-6.7B (32 layers) 2-18-2, as Offsite-Tuning chooses them.
  auto middle = [](const EmulatorPlan& p) {
    std::vector<int64_t> out;
    for (int64_t i = p.bottom; i < static_cast<int64_t>(p.slots.size()) - p.top; ++i) out.push_back(p.slots[i].source);
    return out;
  };
  EXPECT_EQ(middle(plan_uniform(24, 2, 2, 8)), (std::vector<int64_t>{2, 5, 7, 10, 13, 16, 18, 21}));
  EXPECT_EQ(middle(plan_uniform(32, 2, 2, 18)),
            (std::vector<int64_t>{2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29}));
  // Ties round half to even, as Python's round does: M = 3, n = 3 -> 0, 1, 2; M = 6, n = 3 -> 0, 2 (2.5), 5.
  EXPECT_EQ(middle(plan_uniform(10, 2, 2, 3)), (std::vector<int64_t>{2, 4, 7}));
}

TEST(EmulatorPlan, RemoveKeepsEachClustersMiddleLayer) {
  auto p = plan_remove(12, 2, 2, {{2, 3, 4}, {5, 6}, {7, 8, 9}});
  EXPECT_EQ(sources(p), (std::vector<int64_t>{0, 1, 3, 6, 8, 10, 11}));
  EXPECT_EQ(p.clusters.size(), 3u);
}

TEST(EmulatorPlan, ShareTiesRemovedLayersToTheNearestKeptOneRightOnTies) {
  // Representatives 3, 6, 8. Layer 2 -> 3; 4 -> 3; 5 -> 6; 7: 6 and 8 tie -> 8; 9 -> 8.
  auto p = plan_share(12, 2, 2, {{2, 3, 4}, {5, 6}, {7, 8, 9}});
  ASSERT_EQ(p.slots.size(), 12u);
  EXPECT_EQ(p.storage(), (std::vector<int64_t>{0, 1, 3, 3, 3, 6, 6, 8, 8, 8, 10, 11}));
  EXPECT_EQ(sources(p), (std::vector<int64_t>{0, 1, 3, 3, 3, 6, 6, 8, 8, 8, 10, 11}));
  EXPECT_EQ(p.trainable_slots(), (std::vector<int64_t>{0, 1, 10, 11}));
}

TEST(EmulatorPlan, JsonRoundTripAndBadPlans) {
  auto p = plan_share(12, 2, 2, {{2, 3, 4}, {5, 6}, {7, 8, 9}});
  auto q = EmulatorPlan::from_json(p.to_json(), "plan");
  EXPECT_EQ(q.to_json(), p.to_json());
  expect_user_error([] { plan_remove(12, 2, 2, {{2, 3}, {5, 6, 7, 8, 9}}); }, {"contiguous", "layer 5", "4"});
  expect_user_error([] { plan_remove(12, 2, 2, {{2, 3, 4}}); }, {"middle is 2..9", "--layers 2:10"});
  expect_user_error([] { plan_uniform(12, 2, 2, 9); }, {"keep 9", "1..8"});
  expect_user_error([] { plan_uniform(4, 2, 2, 1); }, {"no middle"});
  auto j = p.to_json();
  j["slots"][2]["train"] = true;  // a shared slot may not train
  expect_user_error([&] { EmulatorPlan::from_json(j, "bad.json"); }, {"bad.json", "cannot train"});
  j = p.to_json();
  j["slots"][0]["source"] = 12;
  expect_user_error([&] { EmulatorPlan::from_json(j, "bad.json"); }, {"bad.json slot 0", "'source' 12"});
}

TEST(EmulatorPlan, LayerOfParameter) {
  EXPECT_EQ(layer_of_parameter("model.decoder.layers.7.fc1.weight"), 7);
  EXPECT_EQ(layer_of_parameter("model.layers.12.mlp.up_proj.weight"), 12);
  EXPECT_FALSE(layer_of_parameter("model.decoder.embed_tokens.weight"));
  EXPECT_FALSE(layer_of_parameter("lm_head.weight"));
}

// The emulator's logits equal the full model's pieces run slot by slot as the plan says.
void expect_emulator_runs_plan(const std::string& model, const EmulatorPlan& plan) {
  torch::InferenceMode guard;
  TempDir tmp;
  CheckpointReader full_ckpt(fixture("models/" + model));
  write_emulator_folder(full_ckpt, plan, tmp / "emu");
  CheckpointReader emu_ckpt(tmp / "emu");
  auto saved = read_plan(tmp / "emu");
  ASSERT_TRUE(saved);
  EXPECT_EQ(saved->slots.size(), plan.slots.size());
  EXPECT_EQ(emu_ckpt.config().num_layers, static_cast<int64_t>(plan.slots.size()));
  auto full = load_model(full_ckpt);
  auto emu = load_model(emu_ckpt);

  // Each stored layer once: parameters and tensors on disk.
  int64_t stored = 0;
  for (size_t s = 0; s < plan.slots.size(); ++s) stored += plan.slots[s].stored_as == static_cast<int64_t>(s);
  std::set<int64_t> layers_on_disk;
  for (const auto& n : emu_ckpt.names())
    if (auto l = layer_of_parameter(n)) layers_on_disk.insert(*l);
  EXPECT_EQ(static_cast<int64_t>(layers_on_disk.size()), stored);
  EXPECT_EQ(emu_ckpt.config().stored_layers(), stored);
  // In memory too: one set of parameters per stored layer, whatever the number of slots using it.
  int64_t layer_params = 0, per_layer = 0;
  for (const auto& item : emu->named_parameters()) layer_params += layer_of_parameter(item.key()) ? 1 : 0;
  for (const auto& item : full->named_parameters()) per_layer += layer_of_parameter(item.key()) == 0 ? 1 : 0;
  EXPECT_EQ(layer_params, stored * per_layer);

  auto ids = torch::randint(3, full_ckpt.config().vocab_size, {2, 9}, torch::kInt64);
  auto mask = torch::ones({2, 9}, torch::kInt64);
  mask[1].narrow(0, 6, 3).zero_();
  auto got = emu->forward(ids, mask).logits;
  auto pos = full->default_positions(mask, 9);
  auto ctx = full->attention_context(mask, pos);
  auto h = full->embed(ids, pos);
  for (const auto& slot : plan.slots) h = full->run_layer(slot.source, h, ctx, nullptr);
  auto want = full->head(full->finish(h));
  auto keep = mask.to(torch::kBool).unsqueeze(-1).expand_as(want);
  EXPECT_LT((got - want).abs().masked_select(keep).max().item<double>(), 1e-5);
}

TEST(EmulatorFolder, UniformRemoveShareOnEveryFamily) {
  torch::set_num_threads(2);
  // Qwen's per-layer layer_types follow the slots (a wrong length would not load).
  for (std::string model : {"opt_preln", "llama_gqa", "qwen2_bias", "qwen3_kv1", "mistral_swa", "qwen2_swa",
                            "gemma2_softcap", "gemma3_local_rope"}) {
    SCOPED_TRACE(model);
    const int64_t L = CheckpointReader(fixture("models/" + model)).config().num_layers;
    ASSERT_EQ(L, 4);
    expect_emulator_runs_plan(model, plan_uniform(L, 1, 1, 1));
    expect_emulator_runs_plan(model, plan_remove(L, 1, 1, {{1, 2}}));
    expect_emulator_runs_plan(model, plan_share(L, 1, 1, {{1, 2}}));
    expect_emulator_runs_plan(model, plan_share(L, 0, 1, {{0}, {1, 2}}));
  }
}

// Writes the emulator of `plan` from `full` to DIR/emu and a "tuned" copy to DIR/tuned whose
// tensors are `change`d (name, tensor -> new tensor), in `dtype` (default: as stored).
void write_tuned(const CheckpointReader& full, const EmulatorPlan& plan, const TempDir& dir,
                 const std::function<torch::Tensor(const std::string&, torch::Tensor)>& change,
                 std::optional<torch::ScalarType> dtype = std::nullopt) {
  write_emulator_folder(full, plan, dir / "emu");
  CheckpointReader emu(dir / "emu");
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& n : emu.names()) {
    auto t = change(n, emu.view(n).clone());
    tensors.emplace_back(n, dtype ? t.to(*dtype) : t);
  }
  SaveOptions o;
  o.copy_files = {dir / "emu/crash_plan.json"};
  save_hf_folder(dir / "tuned", emu.config(), tensors, o);
}

TEST(EmulatorFolder, PluginCopiesTrainedSlotsBack) {
  torch::InferenceMode guard;
  TempDir tmp;
  CheckpointReader full(fixture("models/opt_preln"));
  auto plan = plan_share(4, 1, 1, {{1, 2}});
  // "Tune" the emulator: new values for the adapters (slots 0 and 3).
  write_tuned(full, plan, tmp, [&](const std::string& n, torch::Tensor t) {
    auto l = layer_of_parameter(n);
    return l && plan.slots[static_cast<size_t>(*l)].train ? t + 1.0 : t;
  });
  CheckpointReader tuned(tmp / "tuned");
  EXPECT_TRUE(write_plugin_folder(full, tuned, *read_plan(tmp / "tuned"), tmp / "plugged").empty());
  CheckpointReader plugged(tmp / "plugged");
  EXPECT_TRUE(plugged.config().shared_layers.empty());
  EXPECT_EQ(plugged.names(), full.names());
  for (const auto& n : full.names()) {
    auto l = layer_of_parameter(n);
    const bool tuned_layer = l && (*l == 0 || *l == 3);
    auto want = tuned_layer ? full.view(n) + 1.0 : full.view(n);
    EXPECT_TRUE(torch::equal(plugged.view(n), want)) << n;
  }
  expect_user_error(
      [&] {
        write_plugin_folder(CheckpointReader(fixture("models/llama_gqa")), tuned, *read_plan(tmp / "tuned"), tmp / "x");
      },
      {"llama_gqa", "opt model", "llama model"});
}

// train --train-all also trains the embeddings, final norm and head: the plug-in carries them
// into the full model (a tied head with its embedding), and records them in crash_plugin.json.
TEST(EmulatorFolder, PluginCarriesTrainedEmbeddingsNormAndHead) {
  torch::InferenceMode guard;
  for (std::string model : {"opt_preln", "opt_postln_proj", "llama_gqa", "llama_mha_tied", "qwen2_bias", "qwen3_kv1"}) {
    SCOPED_TRACE(model);
    TempDir tmp;
    CheckpointReader full(fixture("models/" + model));
    auto plan = plan_uniform(4, 1, 1, 1);
    std::set<std::string> changed;
    write_tuned(full, plan, tmp, [&](const std::string& n, torch::Tensor t) {
      auto l = layer_of_parameter(n);
      if (l && !plan.slots[static_cast<size_t>(*l)].train) return t;  // frozen middle slot
      if (!l) changed.insert(n);
      return t * 1.5 + 0.25;
    });
    ASSERT_GE(changed.size(), 2u);  // at least the embedding and the final norm
    CheckpointReader tuned(tmp / "tuned");
    const auto carried = write_plugin_folder(full, tuned, *read_plan(tmp / "tuned"), tmp / "plugged");
    CheckpointReader plugged(tmp / "plugged");
    EXPECT_EQ(plugged.names(), full.names());
    std::set<std::string> want_carried;
    for (const auto& n : full.names()) {
      auto l = layer_of_parameter(n);
      const bool tuned_layer = l && (*l == 0 || *l == 3);
      const bool outside = !l;
      auto want = (tuned_layer || outside) ? full.view(n) * 1.5 + 0.25 : full.view(n);
      EXPECT_TRUE(torch::equal(plugged.view(n), want)) << n;
      if (outside) want_carried.insert(n);
    }
    EXPECT_EQ(std::set<std::string>(carried.begin(), carried.end()), want_carried);
    auto record = read_json_file(tmp / "plugged/crash_plugin.json");
    EXPECT_EQ(record["carried_tensors"].size(), want_carried.size());
    // A tied model's head is the carried embedding.
    if (full.config().tie_word_embeddings) {
      auto m = load_model(plugged);
      auto h = torch::randn({1, 2, full.config().hidden_size});
      auto w = tuned.view(full.config().embedding_name()).to(torch::kFloat32);
      if (full.config().has_projection()) continue;  // the head runs project_out first
      auto want = h.matmul(w.t());
      EXPECT_LT((m->head(h) - want).abs().max().item<double>(), 1e-5);
    }
  }
}

// An older OPT file names its tensors without "model.", a trained emulator (saved by train)
// with it: the plug-in matches the two.
TEST(EmulatorFolder, PluginMatchesOptNamesWithoutModelPrefix) {
  torch::InferenceMode guard;
  TempDir tmp;
  CheckpointReader fixture_ckpt(fixture("models/opt_preln"));
  std::vector<std::pair<std::string, torch::Tensor>> old_names, tuned;
  for (const auto& n : fixture_ckpt.names()) old_names.emplace_back(n.substr(6), fixture_ckpt.view(n));
  save_hf_folder(tmp / "old", fixture_ckpt.config(), old_names);
  CheckpointReader full(tmp / "old");
  auto plan = plan_uniform(4, 1, 1, 1);
  write_emulator_folder(full, plan, tmp / "emu");
  CheckpointReader emu(tmp / "emu");
  for (const auto& n : emu.names()) {
    auto l = layer_of_parameter(n);
    const bool trained = !l || plan.slots[static_cast<size_t>(*l)].train;
    tuned.emplace_back("model." + n, trained ? emu.view(n) + 0.5 : emu.view(n).clone());
  }
  SaveOptions o;
  o.copy_files = {tmp / "emu/crash_plan.json"};
  save_hf_folder(tmp / "tuned", emu.config(), tuned, o);
  const auto carried = write_plugin_folder(full, CheckpointReader(tmp / "tuned"), plan, tmp / "plugged");
  EXPECT_NE(std::find(carried.begin(), carried.end(), "decoder.embed_tokens.weight"), carried.end());
  CheckpointReader plugged(tmp / "plugged");
  EXPECT_TRUE(
      torch::equal(plugged.view("decoder.embed_tokens.weight"), full.view("decoder.embed_tokens.weight") + 0.5));
  EXPECT_TRUE(
      torch::equal(plugged.view("decoder.layers.3.fc1.weight"), full.view("decoder.layers.3.fc1.weight") + 0.5));
  EXPECT_TRUE(torch::equal(plugged.view("decoder.layers.1.fc1.weight"), full.view("decoder.layers.1.fc1.weight")));
}

// A frozen (middle) slot that differs from its source layer was trained (train --train-all):
// the plug-in would drop that, so it refuses, naming the tensor. A tuned emulator saved in
// another dtype is not mistaken for a trained one.
TEST(EmulatorFolder, PluginRefusesTrainedFrozenSlots) {
  torch::InferenceMode guard;
  CheckpointReader full(fixture("models/llama_gqa"));
  auto plan = plan_remove(4, 1, 1, {{1, 2}});
  {
    TempDir tmp;
    write_tuned(full, plan, tmp, [&](const std::string& n, torch::Tensor t) {
      return n == "model.layers.1.mlp.up_proj.weight" ? t + 1e-3 : t;
    });
    CheckpointReader tuned(tmp / "tuned");
    expect_user_error([&] { write_plugin_folder(full, tuned, *read_plan(tmp / "tuned"), tmp / "x"); },
                      {"'model.layers.1.mlp.up_proj.weight'", "frozen slot 1", "--train-all"});
    EXPECT_FALSE(std::filesystem::exists(tmp / "x"));
  }
  {
    TempDir tmp;
    write_tuned(
        full, plan, tmp,
        [&](const std::string& n, torch::Tensor t) { return layer_of_parameter(n) == 0 ? t * 2.0 : t; },
        torch::kFloat64);
    CheckpointReader tuned(tmp / "tuned");
    EXPECT_TRUE(write_plugin_folder(full, tuned, *read_plan(tmp / "tuned"), tmp / "x").empty());
    CheckpointReader plugged(tmp / "x");
    EXPECT_TRUE(torch::equal(plugged.view("model.layers.0.mlp.up_proj.weight"),
                             full.view("model.layers.0.mlp.up_proj.weight") * 2.0));
    EXPECT_EQ(plugged.view("model.layers.0.mlp.up_proj.weight").scalar_type(),
              full.view("model.layers.0.mlp.up_proj.weight").scalar_type());
  }
}

}  // namespace
}  // namespace crash
