// --plot: jobs draw their figures with analysis/plots.py (Python + matplotlib), run as a child
// process. Plots are a convenience: a missing python3 or matplotlib is a warning, never a failure.
#pragma once
#include <string>
#include <vector>

namespace crash {

// Runs `python3 analysis/plots.py ARGS...` (for example {"cka.h5", "--out", "cka.png"}) on rank 0
// and waits for it; other ranks return at once. Returns true when the figure was written.
// Logs a warning and returns false when python3, matplotlib, h5py or the script is missing, or
// the script fails. $CRASH_PYTHON and $CRASH_PLOTS_SCRIPT override the interpreter and script.
bool run_plot_script(const std::vector<std::string>& args);

// OUT with its extension replaced by `ext` (".png"): where a job puts the figure of OUT.
std::string plot_path(const std::string& out, const std::string& ext = ".png");

}  // namespace crash
