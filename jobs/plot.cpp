#include "jobs/plot.h"

#include <fcntl.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>

#include "parallel/errors.h"
#include "parallel/world.h"

extern char** environ;

#ifndef CRASH_ANALYSIS_DIR  // set by jobs/CMakeLists.txt to the source tree's analysis/
#define CRASH_ANALYSIS_DIR "analysis"
#endif

namespace crash {

namespace {

// Runs argv and returns its exit status (-1 when it could not start). `quiet` sends its output
// to /dev/null, `quiet_stdout` only its standard output (a script's "wrote X": the job logs that).
// posix_spawn, not fork: safe in an MPI process.
int spawn(const std::vector<std::string>& argv, bool quiet, bool quiet_stdout = false) {
  std::vector<char*> cargs;
  for (const auto& a : argv) cargs.push_back(const_cast<char*>(a.c_str()));
  cargs.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (quiet || quiet_stdout) posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  if (quiet) posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
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

// The script `name` of analysis/, or the path in the environment variable `override`.
std::string script_path(const char* name, const char* override) {
  if (const char* s = std::getenv(override)) return s;
  return (std::filesystem::path(CRASH_ANALYSIS_DIR) / name).string();
}

}  // namespace

std::string plot_path(const std::string& out, const std::string& ext) {
  return std::filesystem::path(out).replace_extension(ext).string();
}

bool run_plot_script(const std::vector<std::string>& args) {
  if (World::get().rank() != 0) return false;
  const std::string script = script_path("plots.py", "CRASH_PLOTS_SCRIPT");
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
  const int rc = spawn(argv, false, true);
  if (rc != 0) {
    spdlog::warn("--plot: {} {} failed (exit {}); no figure", python, script, rc);
    return false;
  }
  return true;
}

int run_report_script(const std::vector<std::string>& args) {
  const std::string script = script_path("report.py", "CRASH_REPORT_SCRIPT");
  if (!std::filesystem::exists(script))
    fail("the report script {} is not there (set CRASH_REPORT_SCRIPT to analysis/report.py)", script);
  const std::string python = find_python();
  if (python.empty())
    fail("the report needs python3 with matplotlib, h5py and numpy (apt install python3-matplotlib python3-h5py)");
  std::vector<std::string> argv = {python, script};
  argv.insert(argv.end(), args.begin(), args.end());
  const int rc = spawn(argv, false, true);
  if (rc < 0) fail("could not start {} {}", python, script);
  return rc;
}

}  // namespace crash
