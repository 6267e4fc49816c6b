#include "jobs/plot.h"

#include <fcntl.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>

#include "parallel/world.h"

extern char** environ;

#ifndef CRASH_PLOTS_SCRIPT  // set by jobs/CMakeLists.txt to the source tree's script
#define CRASH_PLOTS_SCRIPT "analysis/plots.py"
#endif

namespace crash {

namespace {

// Runs argv and returns its exit status (-1 when it could not start). `quiet` sends its output
// to /dev/null. posix_spawn, not fork: safe in an MPI process.
int spawn(const std::vector<std::string>& argv, bool quiet) {
  std::vector<char*> cargs;
  for (const auto& a : argv) cargs.push_back(const_cast<char*>(a.c_str()));
  cargs.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (quiet) {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, cargs[0], &actions, nullptr, cargs.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The first interpreter that has what the script imports: $CRASH_PYTHON, python3 on PATH, then
// Debian's (a virtual environment on PATH may lack matplotlib).
std::string find_python() {
  std::vector<std::string> candidates;
  if (const char* p = std::getenv("CRASH_PYTHON")) candidates.push_back(p);
  candidates.push_back("python3");
  candidates.push_back("/usr/bin/python3");
  for (const auto& py : candidates)
    if (spawn({py, "-c", "import matplotlib, h5py, numpy"}, true) == 0) return py;
  return "";
}

}  // namespace

std::string plot_path(const std::string& out, const std::string& ext) {
  return std::filesystem::path(out).replace_extension(ext).string();
}

bool run_plot_script(const std::vector<std::string>& args) {
  if (World::get().rank() != 0) return false;
  std::string script = CRASH_PLOTS_SCRIPT;
  if (const char* s = std::getenv("CRASH_PLOTS_SCRIPT")) script = s;
  if (!std::filesystem::exists(script)) {
    spdlog::warn("--plot: skipped, the plot script {} is not there", script);
    return false;
  }
  const std::string python = find_python();
  if (python.empty()) {
    spdlog::warn(
        "--plot: skipped, no python3 with matplotlib, h5py and numpy (apt install python3-matplotlib python3-h5py)");
    return false;
  }
  std::vector<std::string> argv = {python, script};
  argv.insert(argv.end(), args.begin(), args.end());
  const int rc = spawn(argv, false);
  if (rc != 0) {
    spdlog::warn("--plot: {} {} failed (exit {}); no figure", python, script, rc);
    return false;
  }
  return true;
}

}  // namespace crash
