#include "parallel/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <sys/resource.h>

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

}  // namespace crash
