#include "parallel/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <sys/resource.h>

#include <dlfcn.h>
#include <malloc.h>

#include <fstream>
#include <string>

#include "parallel/errors.h"

namespace crash {

void init_logging(int rank, int world_size, const std::string& level, bool all_ranks) {
  auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off")
    fail("--log-level: unknown level '{}' (expected trace, debug, info, warn, error or off)", level);
  auto logger = spdlog::stderr_color_mt("crash");
  std::string prefix = world_size > 1 ? fmt::format("[rank {}] ", rank) : "";
  logger->set_pattern("[%H:%M:%S] " + prefix + "%^%l%$: %v");
  if (rank != 0 && !all_ranks && parsed < spdlog::level::warn) parsed = spdlog::level::warn;
  logger->set_level(parsed);
  spdlog::set_default_logger(logger);
}

int64_t peak_rss_bytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}

namespace {
bool peak_was_reset = false;
int log_files = 0;

// Gives memory the allocator keeps for reuse back to the system, so that the next peak counts what
// the next stage holds, not what earlier stages freed: tcmalloc's C entry point when the program
// runs on tcmalloc (found at run time: it is optional), glibc's malloc_trim otherwise.
void release_free_memory() {
  using Release = void (*)();
  if (auto f = reinterpret_cast<Release>(dlsym(RTLD_DEFAULT, "MallocExtension_ReleaseFreeMemory"))) f();
  malloc_trim(0);
}

// VmHWM of /proc/self/status, in bytes; -1 if absent.
int64_t vm_hwm_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:   123 kB"
  return -1;
}
}  // namespace

bool reset_peak_rss() {
  release_free_memory();
  std::ofstream out("/proc/self/clear_refs");
  out << "5";  // 5: reset the peak resident set size to the current one
  out.flush();
  peak_was_reset = peak_was_reset || (out.good() && vm_hwm_bytes() >= 0);
  return peak_was_reset;
}

int64_t peak_rss_since_reset() {
  if (peak_was_reset) {
    const int64_t hwm = vm_hwm_bytes();
    if (hwm >= 0) return hwm;
  }
  return peak_rss_bytes();
}

LogToFile::LogToFile(const std::string& path) {
  if (path.empty()) return;
  auto logger = spdlog::default_logger();
  if (logger->sinks().empty()) return;
  try {
    file_ = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/true);
  } catch (const spdlog::spdlog_ex& e) {
    fail("{}: cannot write the log file ({})", path, e.what());
  }
  file_->set_pattern("[%Y-%m-%d %H:%M:%S] %l: %v");
  console_level_ = logger->sinks().front()->level();
  logger->sinks().front()->set_level(std::max(console_level_, spdlog::level::warn));
  logger->sinks().push_back(file_);
  // Each line reaches the file at once, so that `tail -f` on a stage's log follows it (log lines
  // are seconds apart; progress lines at most every CRASH_PROGRESS_SECONDS).
  flush_level_ = logger->flush_level();
  logger->flush_on(spdlog::level::trace);
  ++log_files;
}

LogToFile::~LogToFile() {
  if (!file_) return;
  auto logger = spdlog::default_logger();
  auto& sinks = logger->sinks();
  for (auto it = sinks.begin(); it != sinks.end(); ++it)
    if (*it == file_) {
      sinks.erase(it);
      break;
    }
  file_->flush();
  logger->flush_on(flush_level_);
  if (!sinks.empty()) sinks.front()->set_level(console_level_);
  --log_files;
}

bool logging_to_file() { return log_files > 0; }

}  // namespace crash
