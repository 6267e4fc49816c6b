#include "parallel/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

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

}  // namespace crash
