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

}  // namespace crash
