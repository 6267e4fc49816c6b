// report: WORK/report.html, one self-contained page of a pipeline run (analysis/report.py draws and
// writes it; this job finds the script and hands it the versions of this build).
#include <torch/version.h>

#include <cstdio>
#include <filesystem>

#include "jobs/job.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

namespace fs = std::filesystem;

void report_options(po::options_description& o) {
  o.add_options()("work", po::value<std::string>()->required(), "the pipeline's work folder")(
      "out", po::value<std::string>()->default_value(""), "the page (default: WORK/report.html)")(
      "title", po::value<std::string>()->default_value(""), "the page's title (default: the model's name)");
}

std::string torch_version() {
  return fmt::format("{}.{}.{}", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH);
}

// Writes the report of `work` to `page`; 0 when done, 2 when the script found bad input (it said why).
int write_report(const std::string& work, const std::string& page, const std::string& title) {
  if (!fs::is_directory(work)) fail("--work: {} is not a folder", work);
  std::vector<std::string> args = {"--work", work, "--tool-version", kVersion, "--torch-version", torch_version(),
                                   "--out",  page};
  if (!title.empty()) args.insert(args.end(), {"--title", title});
  const int rc = run_report_script(args);
  if (rc != 0 && rc != kExitUserError) throw std::runtime_error(fmt::format("analysis/report.py failed (exit {})", rc));
  return rc;
}

int report_run(const po::variables_map& vm) {
  const auto work = vm["work"].as<std::string>(), out = vm["out"].as<std::string>();
  const std::string page = out.empty() ? (fs::path(work) / "report.html").string() : out;
  int rc = 0;
  run_on_rank0([&] {
    rc = write_report(work, page, vm["title"].as<std::string>());
    if (rc == 0) std::printf("report: %s\n", page.c_str());
  });
  return rc;
}

}  // namespace crash
