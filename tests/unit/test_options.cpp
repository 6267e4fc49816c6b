#include <fstream>

#include "jobs/job.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

const Job& forward_job() {
  for (const auto& j : all_jobs())
    if (std::string(j.name) == "forward") return j;
  throw std::runtime_error("no forward job");
}

TEST(Options, ConfigFileAndCommandLineOverride) {
  test::TempDir dir;
  std::ofstream(dir / "f.ini") << "model = from-ini\ninput = in.jsonl\nout = o.h5\nbatch-size = 3\n";
  bool help = false;
  auto vm = parse_job_options(forward_job(), {"--config", dir / "f.ini", "--model", "from-cli"}, help);
  EXPECT_FALSE(help);
  EXPECT_EQ(vm["model"].as<std::string>(), "from-cli");
  EXPECT_EQ(vm["input"].as<std::string>(), "in.jsonl");
  EXPECT_EQ(vm["batch-size"].as<int64_t>(), 3);
}

TEST(Options, Errors) {
  test::TempDir dir;
  bool help = false;
  test::expect_user_error([&] { parse_job_options(forward_job(), {"--modle", "x"}, help); }, {"forward", "modle"});
  test::expect_user_error([&] { parse_job_options(forward_job(), {"--input", "x"}, help); }, {"model"});
  std::ofstream(dir / "bad.ini") << "colour = red\n";
  test::expect_user_error(
      [&] {
        parse_job_options(forward_job(), {"--config", dir / "bad.ini", "--model", "m", "--input", "i", "--out", "o"},
                          help);
      },
      {"bad.ini", "colour"});
  test::expect_user_error(
      [&] {
        parse_job_options(forward_job(), {"--config", dir / "none.ini"}, help);
      },
      {"none.ini", "cannot open"});
}

}  // namespace
}  // namespace crash
