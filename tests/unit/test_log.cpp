// Stage logs and per-stage peak memory (parallel/log.h), as the pipeline uses them.
#include <gtest/gtest.h>
#include <spdlog/sinks/sink.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "parallel/log.h"
#include "parallel/progress.h"

namespace crash {
namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(LogToFile, SendsTheFullLogToTheFileAndOnlyWarningsToTheConsole) {
  const auto dir = std::filesystem::temp_directory_path() / "crash_test_log";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "stage.log").string();
  auto logger = spdlog::default_logger();
  const auto console_level = logger->sinks().front()->level();
  {
    LogToFile to_file(path);
    EXPECT_TRUE(logging_to_file());
    EXPECT_EQ(logger->sinks().size(), 2u);
    EXPECT_EQ(logger->sinks().front()->level(), std::max(console_level, spdlog::level::warn));
    spdlog::info("stage detail {}", 42);
    spdlog::warn("stage warning");
  }
  EXPECT_FALSE(logging_to_file());
  EXPECT_EQ(logger->sinks().size(), 1u);
  EXPECT_EQ(logger->sinks().front()->level(), console_level);
  spdlog::info("after the stage");
  const std::string text = read_all(path);
  EXPECT_NE(text.find("info: stage detail 42"), std::string::npos) << text;
  EXPECT_NE(text.find("warning: stage warning"), std::string::npos) << text;
  EXPECT_EQ(text.find("after the stage"), std::string::npos) << text;
  {
    LogToFile nothing("");
    EXPECT_FALSE(logging_to_file());
  }
  std::filesystem::remove_all(dir);
}

TEST(LogToFile, ATerminalProgressLineIsClearedAndLogged) {
  const auto dir = std::filesystem::temp_directory_path() / "crash_test_log_progress";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "stage.log").string();
  std::vector<std::string> out;
  {
    LogToFile to_file(path);
    Progress::Settings s;
    s.terminal = true;
    double now = 0;
    s.clock = [&] { return now; };
    s.sink = [&](const std::string& text) { out.push_back(text); };
    Progress p("eval", 4, "batches", s);
    p.advance(2);
    now = 1;
    p.finish();
  }
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.back(), "\r\033[K");  // no line left behind on the terminal
  EXPECT_NE(read_all(path).find("eval: 4/4 batches"), std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(PeakMemory, ResetStartsANewPeak) {
  if (!reset_peak_rss()) GTEST_SKIP() << "this kernel does not let /proc/self/clear_refs reset the peak";
  const int64_t before = peak_rss_since_reset();
  {
    // mmap rather than new: the allocator may keep a freed block resident.
    const size_t bytes = size_t(256) << 20;
    void* block = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(block, MAP_FAILED);
    std::memset(block, 1, bytes);  // touched: resident
    EXPECT_GE(peak_rss_since_reset(), before + (int64_t(200) << 20));
    munmap(block, bytes);
  }
  ASSERT_TRUE(reset_peak_rss());
  EXPECT_LT(peak_rss_since_reset(), before + (int64_t(128) << 20));
}

}  // namespace
}  // namespace crash
