#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "framework/safetensors.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

using test::expect_user_error;

TEST(Safetensors, RoundTripAllFloatTypes) {
  test::TempDir dir;
  auto a = torch::randn({3, 5});
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"f32", a}, {"f16", a.to(torch::kFloat16)}, {"bf16", a.to(torch::kBFloat16)}, {"i64", torch::arange(7)}};
  write_safetensors(dir / "t.safetensors", ts, {{"format", "pt"}});
  SafetensorsFile f(dir / "t.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (auto& [name, t] : ts) {
    auto r = f.read(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(r, t)) << name;
  }
  EXPECT_EQ(f.info("bf16").dtype, "BF16");
  EXPECT_EQ(f.info("f16").dtype, "F16");
}

TEST(Safetensors, SlicesEqualNarrowedTensors) {
  test::TempDir dir;
  auto a = torch::randn({8, 6, 4});
  write_safetensors(dir / "t.safetensors", {{"a", a}});
  SafetensorsFile f(dir / "t.safetensors");
  EXPECT_TRUE(torch::equal(f.read_slice("a", 0, 2, 3), a.narrow(0, 2, 3)));
  EXPECT_TRUE(torch::equal(f.read_slice("a", 1, 3, 3), a.narrow(1, 3, 3)));
  EXPECT_TRUE(torch::equal(f.read_slice("a", 2, 1, 2), a.narrow(2, 1, 2)));
  EXPECT_TRUE(f.read_slice("a", 1, 3, 3).is_contiguous());
  expect_user_error([&] { f.read_slice("a", 1, 4, 3); }, {"'a'", "out of range"});
  expect_user_error([&] { f.read_slice("a", 3, 0, 1); }, {"cannot slice dimension 3"});
  expect_user_error([&] { f.read("b"); }, {"no tensor named 'b'"});
}

// Pages of the mapping that are in the page cache.
int64_t resident_pages(const uint8_t* begin, uint64_t bytes) {
  const long page = sysconf(_SC_PAGESIZE);
  auto start = reinterpret_cast<uintptr_t>(begin) & ~static_cast<uintptr_t>(page - 1);
  size_t n = (reinterpret_cast<uintptr_t>(begin) + bytes - start + page - 1) / page;
  std::vector<unsigned char> vec(n);
  if (mincore(reinterpret_cast<void*>(start), n * page, vec.data()) != 0) return -1;
  int64_t count = 0;
  for (unsigned char v : vec) count += v & 1;
  return count;
}

TEST(Safetensors, ReadingASliceTouchesOnlyItsBytes) {
  test::TempDir dir;
  const int64_t rows = 4096, cols = 1024;  // 16 MiB of float32, 4 KiB per row
  write_safetensors(dir / "big.safetensors", {{"w", torch::randn({rows, cols})}});
  {  // Drop the file from the page cache so residency shows what reading brings in.
    int fd = ::open((dir / "big.safetensors").c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
  SafetensorsFile f(dir / "big.safetensors");
  const int64_t before = resident_pages(f.data(), f.data_size());
  if (before < 0) GTEST_SKIP() << "mincore unavailable";
  if (before > 16) GTEST_SKIP() << "page cache could not be dropped here (" << before << " pages resident)";
  auto slice = f.read_slice("w", 0, 1024, 256);  // rows [1024, 1280): 1 MiB, 256 pages
  EXPECT_EQ(slice.size(0), 256);
  const int64_t after = resident_pages(f.data(), f.data_size());
  const int64_t total_pages = static_cast<int64_t>(f.data_size() / 4096);
  EXPECT_GE(after - before, 256);
  EXPECT_LE(after - before, 256 + 2) << "of " << total_pages << " pages";
}

// Writes a file with a hand-made header followed by `data_bytes` zero bytes.
std::string raw_file(const test::TempDir& dir, const std::string& header, size_t data_bytes, int64_t claimed = -1) {
  std::string path = dir / "bad.safetensors";
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t n = claimed >= 0 ? static_cast<uint64_t>(claimed) : header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header;
  out << std::string(data_bytes, '\0');
  return path;
}

TEST(Safetensors, RejectsBadFiles) {
  test::TempDir dir;
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  EXPECT_NO_THROW(SafetensorsFile(raw_file(dir, ok, 16)));
  expect_user_error([&] { SafetensorsFile(raw_file(dir, ok, 8)); }, {"bad.safetensors", "'a'", "out of range"});
  expect_user_error([&] { SafetensorsFile(raw_file(dir, ok, 16, 1 << 20)); }, {"bad.safetensors", "truncated"});
  expect_user_error([&] { SafetensorsFile(raw_file(dir, "{\"a\":", 0)); }, {"bad.safetensors", "not valid JSON"});
  expect_user_error(
      [&] {
        SafetensorsFile(raw_file(dir,
                                 R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                 16));
      },
      {"overlap"});
  expect_user_error(
      [&] { SafetensorsFile(raw_file(dir, R"({"a":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}})", 16)); },
      {"'a'", "needs 24 bytes"});
  expect_user_error(
      [&] { SafetensorsFile(raw_file(dir, R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}})", 2)); },
      {"unknown dtype 'Q4'"});
  expect_user_error([&] { SafetensorsFile(raw_file(dir, R"({"a":{"dtype":"F32"}})", 0)); }, {"data_offsets"});
  expect_user_error(
      [&] { SafetensorsFile(raw_file(dir, R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)); },
      {"non-negative"});
  {
    std::ofstream(dir / "tiny.safetensors") << "abc";
    expect_user_error([&] { SafetensorsFile(dir / "tiny.safetensors"); }, {"tiny.safetensors", "truncated"});
  }
  expect_user_error([&] { SafetensorsFile(dir / "absent.safetensors"); }, {"absent.safetensors", "cannot open"});
}

TEST(Safetensors, TruncatedRealFile) {
  test::TempDir dir;
  write_safetensors(dir / "t.safetensors", {{"w", torch::randn({64, 64})}});
  std::filesystem::resize_file(dir / "t.safetensors", std::filesystem::file_size(dir / "t.safetensors") - 100);
  expect_user_error([&] { SafetensorsFile(dir / "t.safetensors"); }, {"t.safetensors", "'w'", "truncated"});
}

}  // namespace
}  // namespace crash
