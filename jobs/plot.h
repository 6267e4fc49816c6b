// Figures and the run report are drawn by Python scripts of analysis/ (plots.py, report.py; numpy,
// h5py, matplotlib), run as child processes. A job's --plot is a convenience: a missing python3 or
// matplotlib is a warning there, never a failure. The report job needs them and says so.
#pragma once
#include <string>
#include <vector>

namespace crash {

// Runs `python3 analysis/plots.py ARGS...` (for example {"cka.h5", "--out", "cka.png"}) on rank 0
// and waits for it; other ranks return at once. Returns true when the figure was written.
// Logs a warning and returns false when python3, matplotlib, h5py or the script is missing, or
// the script fails. $CRASH_PYTHON and $CRASH_PLOTS_SCRIPT override the interpreter and script.
bool run_plot_script(const std::vector<std::string>& args);

// Runs `python3 analysis/report.py ARGS...` in this process and returns its exit status (2: the
// script found bad input and said why on stderr). A missing interpreter, library or script is a
// user error naming the Debian packages. $CRASH_REPORT_SCRIPT overrides the script.
int run_report_script(const std::vector<std::string>& args);

// OUT with its extension replaced by `ext` (".png"): where a job puts the figure of OUT.
std::string plot_path(const std::string& out, const std::string& ext = ".png");

}  // namespace crash
