// HDF5 helpers (analysis/hdf5.h): the attribute readers on every way text is stored, H5Writer's
// staging and rename.
#include <filesystem>

#include "analysis/hdf5.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

// Adds to the root of `path` what H5Writer never writes: a fixed-length NUL-padded string (numpy
// bytes, as h5py stores them), a NUL-terminated one that fills its size, an ASCII variable-length
// string, an int32, a double and a two-element array.
void add_foreign_attributes(const std::string& path) {
  H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose);
  ASSERT_GE(file.get(), 0);
  H5Id scalar(H5Screate(H5S_SCALAR), H5Sclose);
  auto fixed = [&](const char* key, const std::string& bytes, H5T_str_t pad) {
    H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type, bytes.size());
    H5Tset_strpad(type, pad);
    H5Id attr(H5Acreate2(file, key, type, scalar, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ASSERT_GE(H5Awrite(attr, type, bytes.data()), 0);
  };
  fixed("fixed_nullpad", std::string("gram\0\0\0\0", 8), H5T_STR_NULLPAD);
  fixed("fixed_full", "exactly8", H5T_STR_NULLPAD);
  {
    H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);  // ASCII, the C library's default character set
    H5Tset_size(type, H5T_VARIABLE);
    H5Id attr(H5Acreate2(file, "vlen_ascii", type, scalar, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const char* text = "mean";
    ASSERT_GE(H5Awrite(attr, type, &text), 0);
  }
  {
    const int32_t v = 7;
    H5Id attr(H5Acreate2(file, "int32", H5T_STD_I32LE, scalar, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ASSERT_GE(H5Awrite(attr, H5T_NATIVE_INT32, &v), 0);
  }
  {
    const double v = 3.0;
    H5Id attr(H5Acreate2(file, "float", H5T_IEEE_F64LE, scalar, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ASSERT_GE(H5Awrite(attr, H5T_NATIVE_DOUBLE, &v), 0);
  }
  {
    const hsize_t two = 2;
    const int64_t v[2] = {1, 2};
    H5Id space(H5Screate_simple(1, &two, nullptr), H5Sclose);
    H5Id attr(H5Acreate2(file, "pair", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ASSERT_GE(H5Awrite(attr, H5T_NATIVE_INT64, v), 0);
  }
}

TEST(Hdf5, AttributesOfEveryKindReadBack) {
  test::TempDir dir;
  const std::string path = dir / "a.h5";
  {
    H5Writer w(path, false);
    w.write("group/x", torch::arange(6, torch::kFloat32).view({2, 3}));
    w.attribute("/", "text", std::string("variable length, UTF-8: ü"));
    w.attribute("/", "count", int64_t(-5000000000));
    w.attribute("group/x", "note", std::string("on a dataset"));
    w.commit();
  }
  add_foreign_attributes(path);

  H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  ASSERT_GE(file.get(), 0);
  EXPECT_EQ(h5_text_attribute(file, "text"), "variable length, UTF-8: ü");
  EXPECT_EQ(h5_text_attribute(file, "vlen_ascii"), "mean");
  EXPECT_EQ(h5_text_attribute(file, "fixed_nullpad"), "gram");
  EXPECT_EQ(h5_text_attribute(file, "fixed_full"), "exactly8");
  EXPECT_EQ(h5_int_attribute(file, "count"), -5000000000);
  EXPECT_EQ(h5_int_attribute(file, "int32"), 7);
  EXPECT_EQ(h5_int_attribute(file, "float"), 3);
  H5Id set(H5Dopen2(file, "group/x", H5P_DEFAULT), H5Dclose);
  EXPECT_EQ(h5_text_attribute(set, "note"), "on a dataset");

  // Missing, of another kind, or more than one value: the default.
  EXPECT_EQ(h5_text_attribute(file, "absent"), "");
  EXPECT_EQ(h5_text_attribute(file, "absent", "default"), "default");
  EXPECT_EQ(h5_int_attribute(file, "absent"), -1);
  EXPECT_EQ(h5_int_attribute(file, "absent", 42), 42);
  EXPECT_EQ(h5_text_attribute(file, "count", "not text"), "not text");
  EXPECT_EQ(h5_int_attribute(file, "text", 9), 9);
  EXPECT_EQ(h5_int_attribute(file, "pair", 9), 9);
}

TEST(Hdf5, WriterStagesAndRenames) {
  test::TempDir dir;
  const std::string path = dir / "out.h5";
  {
    H5Writer w(path, false);
    w.write("x", torch::ones({3}, torch::kInt64));
    EXPECT_TRUE(std::filesystem::exists(path + ".tmp"));
    EXPECT_FALSE(std::filesystem::exists(path));
    w.commit();
  }
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_TRUE(torch::equal(h5_read(path, "x"), torch::ones({3}, torch::kInt64)));
  {
    H5Writer w(dir / "dropped.h5", false);  // never committed: nothing is left
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "dropped.h5.tmp"));
  EXPECT_FALSE(std::filesystem::exists(dir / "dropped.h5"));
  test::expect_user_error([&] { H5Writer w(path, false); }, {path, "output exists"});
}

}  // namespace
}  // namespace crash
