// Logging: levels, a rank prefix under MPI, ranks other than 0 quiet unless asked.
#pragma once
#include <spdlog/spdlog.h>
#include <string>

namespace crash {

// level: trace, debug, info, warn, error, off. Ranks other than 0 log warnings and errors only,
// unless all_ranks is set.
void init_logging(int rank, int world_size, const std::string& level, bool all_ranks = false);

// Peak resident memory of this process so far (getrusage), in bytes.
int64_t peak_rss_bytes();

// Starts a new peak of resident memory (Linux: VmHWM, reset through /proc/self/clear_refs), so that
// peak_rss_since_reset measures one stage of a pipeline. False where the kernel does not allow it.
bool reset_peak_rss();
// The peak since the last successful reset_peak_rss, or since the start (getrusage) without one.
int64_t peak_rss_since_reset();

// While it lives, the log also goes in full to `path` (rank 0; other ranks' warnings keep going to
// the terminal) and the terminal shows warnings and errors only: one pipeline stage's log. An empty
// path changes nothing. Progress lines on a terminal are cleared when done, not left (progress.h).
class LogToFile {
 public:
  explicit LogToFile(const std::string& path);
  ~LogToFile();
  LogToFile(const LogToFile&) = delete;
  LogToFile& operator=(const LogToFile&) = delete;

 private:
  spdlog::sink_ptr file_;
  spdlog::level::level_enum console_level_ = spdlog::level::info;
  spdlog::level::level_enum flush_level_ = spdlog::level::off;
};
// True while a LogToFile is alive.
bool logging_to_file();

}  // namespace crash
