// The importance file (analysis/importance_file.h) read back as written, and 1 - adjacent CKA
// (analysis/importance.h). The scores themselves: tests/cli/importance.py against NumPy.
#include <cmath>
#include <limits>

#include "analysis/hdf5.h"
#include "analysis/importance.h"
#include "analysis/importance_file.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

using namespace test;

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

TEST(ImportanceFile, ReadsBackWhatItWrote) {
  TempDir dir;
  ImportanceRecord r;
  r.num_layers = 3;
  r.model = "models/m";
  r.model_type = "llama";
  r.block_influence = torch::tensor({0.5, 0.25, 0.125}, kF64);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  r.angular_distance = torch::tensor({0.1, 0.2, 0.3, 0.4, 0.5, nan, 0.6, nan, nan}, kF64).reshape({3, 3});
  r.archive = "tokens.h5";
  r.num_examples = 7;
  r.num_tokens = 70;
  r.cka_importance = torch::tensor({0.3, 0.2, 0.1}, kF64);
  r.cka_file = "cka.h5";
  r.cka_method = "gram";
  r.cka_pooling = "mean";
  r.cka_examples = 9;
  const auto path = dir / "importance.h5";
  write_importance_file(path, r, false);
  const ImportanceRecord back = read_importance_file(path);
  EXPECT_EQ(importance_methods(back),
            (std::vector<std::string>{"block_influence", "angular_distance", "cka_importance"}));
  EXPECT_EQ(back.num_layers, 3);
  EXPECT_EQ(back.model, "models/m");
  EXPECT_EQ(back.model_type, "llama");
  EXPECT_EQ(back.archive, "tokens.h5");
  EXPECT_EQ(back.num_examples, 7);
  EXPECT_EQ(back.num_tokens, 70);
  EXPECT_EQ(back.cka_file, "cka.h5");
  EXPECT_EQ(back.cka_method, "gram");
  EXPECT_EQ(back.cka_pooling, "mean");
  EXPECT_EQ(back.cka_examples, 9);
  EXPECT_TRUE(torch::equal(back.block_influence, r.block_influence));
  EXPECT_TRUE(torch::equal(back.cka_importance, r.cka_importance));
  EXPECT_TRUE(torch::equal(back.angular_distance.isnan(), r.angular_distance.isnan()));
  EXPECT_TRUE(torch::equal(back.angular_distance.nan_to_num(-1), r.angular_distance.nan_to_num(-1)));

  // Only some methods: the others stay undefined.
  ImportanceRecord some;
  some.num_layers = 2;
  some.cka_importance = torch::tensor({0.5, 0.5}, kF64);
  write_importance_file(dir / "some.h5", some, false);
  const auto s = read_importance_file(dir / "some.h5");
  EXPECT_EQ(importance_methods(s), std::vector<std::string>{"cka_importance"});
  EXPECT_FALSE(s.block_influence.defined());
  EXPECT_FALSE(s.angular_distance.defined());
  expect_user_error([&] { write_importance_file(dir / "some.h5", some, false); }, {"output exists"});
}

TEST(ImportanceFile, RejectsOtherFiles) {
  TempDir dir;
  expect_user_error([&] { read_importance_file(dir / "none.h5"); }, {"none.h5", "no such file"});
  {
    H5Writer w(dir / "cka.h5", false);
    w.write("cka", torch::eye(3, kF64));
    w.commit();
  }
  expect_user_error([&] { read_importance_file(dir / "cka.h5"); }, {"not an importance file"});
}

TEST(Importance, AdjacentCka) {
  auto cka = torch::tensor({1.0, 0.9, 0.5, 0.9, 1.0, 0.7, 0.5, 0.7, 1.0}, kF64).reshape({3, 3});
  auto got = adjacent_cka_importance(cka);
  EXPECT_TRUE(torch::allclose(got, torch::tensor({0.1, 0.3}, kF64), 0, 1e-15));
  expect_user_error([&] { adjacent_cka_importance(torch::ones({2, 3}, kF64)); }, {"against itself"});
}

}  // namespace
}  // namespace crash
