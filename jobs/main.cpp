// crash-hpc <job> [options]: dispatches to one job; user errors exit with code 2.
#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include "jobs/job.h"
#include "parallel/errors.h"
#include "parallel/log.h"
#include "parallel/stop_signal.h"
#include "parallel/world.h"

namespace {

void print_usage() {
  std::cout << "usage: crash-hpc <job> [options]    (crash-hpc <job> --help for a job's options)\n\njobs:\n";
  for (const auto& job : crash::all_jobs()) std::printf("  %-12s %s\n", job.name, job.summary);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace crash;
  World& world = World::init(&argc, &argv);
  // One rank's failure ends every rank (no peer is left waiting in a collective) and its
  // message is printed once: rank 0 reports at once; another rank first gives rank 0 a moment,
  // since an error every rank meets (a bad file, say) is then reported by rank 0 alone.
  auto report = [&](const char* kind, const std::string& what, int code) -> int {
    if (world.size() > 1 && world.rank() != 0) std::this_thread::sleep_for(std::chrono::seconds(3));
    std::fprintf(stderr, "crash-hpc: %s%s%s\n", world.size() > 1 ? fmt::format("[rank {}] ", world.rank()).c_str() : "",
                 kind, what.c_str());
    std::fflush(stderr);
    if (world.size() > 1) world.abort(code);
    return code;
  };
  try {
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
      if (world.rank() == 0) print_usage();
      return argc < 2 ? kExitUserError : 0;
    }
    const std::string name = argv[1];
    const Job* job = nullptr;
    for (const auto& j : all_jobs())
      if (name == j.name) job = &j;
    if (!job) fail("unknown job '{}' (run crash-hpc --help for the list)", name);
    bool help = false;
    auto vm = parse_job_options(*job, std::vector<std::string>(argv + 2, argv + argc), help);
    if (help) return 0;
    init_logging(world.rank(), world.size(), vm["log-level"].as<std::string>(), vm["log-all-ranks"].as<bool>());
    apply_threads(vm);
    return job->run(vm);
  } catch (const StopRequested& e) {
    // Every rank stopped at the same step (stop_agreed): nobody waits, so no abort.
    if (world.rank() == 0) std::fprintf(stderr, "crash-hpc: %s\n", e.what());
    return kExitStopped;
  } catch (const UserError& e) {
    return report("error: ", e.what(), kExitUserError);
  } catch (const c10::Error& e) {
    return report("internal error: ", e.what_without_backtrace(), 1);
  } catch (const std::exception& e) {
    return report("internal error: ", e.what(), 1);
  }
}
