// Outputs written under a staging name and renamed when complete (framework/atomic_file.h).
#include <filesystem>
#include <fstream>
#include <sstream>

#include "framework/atomic_file.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

namespace fs = std::filesystem;

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

TEST(AtomicFile, WriteAtomicReplacesAndLeavesNoStagingFile) {
  test::TempDir dir;
  const std::string path = dir / "out.json";
  EXPECT_EQ(staging_path(path), path + ".tmp");
  write_atomic(path, "one\n");
  write_atomic(path, "two\n");
  EXPECT_EQ(slurp(path), "two\n");
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(AtomicFile, ErrorsNameTheFile) {
  test::TempDir dir;
  const std::string nowhere = dir / "missing/out.json";
  test::expect_user_error([&] { write_atomic(nowhere, "x"); }, {nowhere + ".tmp", "cannot write"});
  test::expect_user_error([&] { rename_into_place(dir / "absent", dir / "final"); },
                          {dir / "absent", "cannot rename to", dir / "final"});
}

TEST(AtomicFile, StagedDirIsMovedIntoPlaceWhole) {
  test::TempDir dir;
  const std::string out = dir / "model";
  fs::create_directories(out);
  std::ofstream(out + "/old.txt") << "old";
  fs::create_directories(out + ".tmp");  // left by a failed run
  std::ofstream(out + ".tmp/stale.txt") << "stale";
  {
    StagedDir staged(out);
    EXPECT_EQ(staged.path(), fs::path(out + ".tmp"));
    EXPECT_FALSE(fs::exists(staged.path() / "stale.txt"));
    write_text((staged.path() / "new.txt").string(), "new");
    EXPECT_TRUE(fs::exists(out + "/old.txt"));  // the old folder stays until commit
    staged.commit();
  }
  EXPECT_FALSE(fs::exists(out + ".tmp"));
  EXPECT_FALSE(fs::exists(out + "/old.txt"));
  EXPECT_EQ(slurp(out + "/new.txt"), "new");

  // A rank that does not own the folder only knows its path.
  StagedDir other(dir / "other", /*owner=*/false);
  EXPECT_FALSE(fs::exists(other.path()));
  other.commit();
  EXPECT_FALSE(fs::exists(dir / "other"));
}

}  // namespace
}  // namespace crash
