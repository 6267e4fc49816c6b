#include <filesystem>
#include <fstream>

#include "framework/checkpoint.h"
#include "framework/json_fields.h"
#include "framework/models/decoder.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

using test::expect_user_error;
using test::fixture;
namespace fs = std::filesystem;

TEST(Checkpoint, ShardedFolderListsEveryTensor) {
  CheckpointReader ckpt(fixture("models/opt_preln"));
  auto names = ckpt.names();
  EXPECT_GT(names.size(), 40u);
  EXPECT_TRUE(ckpt.contains("model.decoder.layers.2.fc2.weight"));
  EXPECT_NE(ckpt.file_of("model.decoder.layers.2.fc2.weight").find("-of-"), std::string::npos);
}

TEST(Checkpoint, SaveWritesFoldersThatLoadBack) {
  test::TempDir dir;
  CheckpointReader src(fixture("models/llama_gqa"));
  auto model = load_model(src);
  for (uint64_t shard_bytes : {uint64_t(5) << 30, uint64_t(64) << 10}) {
    SaveOptions opt;
    opt.max_shard_bytes = shard_bytes;
    save_hf_folder(dir / "out", src.config(), model->hf_state(), opt);
    EXPECT_EQ(fs::exists(dir / "out/model.safetensors.index.json"), shard_bytes < (1u << 20));
    EXPECT_FALSE(fs::exists(dir / "out.tmp"));
    CheckpointReader back(dir / "out");
    auto again = load_model(back);
    auto a = model->hf_state(), b = again->hf_state();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
    EXPECT_EQ(back.config().raw, src.config().raw);
  }
  SaveOptions bf16;
  bf16.dtype = torch::kBFloat16;
  save_hf_folder(dir / "bf16", src.config(), model->hf_state(), bf16);
  CheckpointReader back(dir / "bf16");
  EXPECT_EQ(back.info("model.layers.0.mlp.up_proj.weight").dtype, "BF16");
  EXPECT_EQ(back.config().raw["torch_dtype"], "bfloat16");
}

TEST(Checkpoint, MissingShardIsNamed) {
  test::TempDir dir;
  test::copy_folder(fixture("models/opt_preln"), dir / "m");
  fs::remove(dir / "m/model-00003-of-00007.safetensors");
  expect_user_error([&] { CheckpointReader r(dir / "m"); },
                    {"model.safetensors.index.json", "model-00003-of-00007", "missing"});
}

TEST(Checkpoint, ShapeDisagreeingWithConfig) {
  test::TempDir dir;
  test::copy_folder(fixture("models/llama_gqa"), dir / "m");
  auto cfg = read_json_file(dir / "m/config.json");
  cfg["intermediate_size"] = 80;
  std::ofstream(dir / "m/config.json") << cfg.dump();
  CheckpointReader ckpt(dir / "m");
  expect_user_error([&] { load_model(ckpt); }, {"model.safetensors", "mlp", "shape", "config.json"});
}

TEST(Checkpoint, MissingTensorAndFolderErrors) {
  test::TempDir dir;
  test::copy_folder(fixture("models/llama_gqa"), dir / "m");
  auto cfg = read_json_file(dir / "m/config.json");
  cfg["num_hidden_layers"] = 5;  // the file holds 4 layers
  std::ofstream(dir / "m/config.json") << cfg.dump();
  CheckpointReader ckpt(dir / "m");
  expect_user_error([&] { load_model(ckpt); }, {"model.layers.4.", "config.json"});
  expect_user_error([&] { CheckpointReader r(dir / "absent"); }, {"absent", "not a model folder"});
  fs::remove(dir / "m/model.safetensors");
  expect_user_error([&] { CheckpointReader r(dir / "m"); }, {"no model.safetensors"});
  fs::remove(dir / "m/config.json");
  expect_user_error([&] { CheckpointReader r(dir / "m"); }, {"missing config.json"});
}

TEST(Checkpoint, TruncatedShardIsReported) {
  test::TempDir dir;
  test::copy_folder(fixture("models/llama_mha_tied"), dir / "m");
  fs::resize_file(dir / "m/model.safetensors", fs::file_size(dir / "m/model.safetensors") / 2);
  expect_user_error([&] { CheckpointReader r(dir / "m"); }, {"model.safetensors", "truncated"});
}

}  // namespace
}  // namespace crash
