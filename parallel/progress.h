// Progress of a long loop (docs/architecture.md section 7), shown on rank 0 only: items done of the total,
// rate and time left. On a terminal, one line redrawn in place (carriage return); in a batch log,
// a plain info line at most every CRASH_PROGRESS_SECONDS seconds (default 10), plus the first
// and the last. Nothing shows when the log level is above info.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace crash {

// A duration as people read it: "42s", "3m05s", "1h02m".
std::string duration_text(double seconds);

class Progress {
 public:
  struct Settings {
    bool show = true;                              // false: counts, prints nothing (ranks other than 0)
    bool terminal = false;                         // one line redrawn in place, rather than log lines
    double interval = 10;                          // seconds between log lines (0: a line per update)
    std::function<double()> clock;                 // seconds; the steady clock when empty
    std::function<void(const std::string&)> sink;  // the text out; spdlog::info (log) or stderr (terminal)
  };
  // Shown on world rank 0 when the log level lets info through; terminal when stderr is one;
  // interval from CRASH_PROGRESS_SECONDS.
  static Settings defaults();

  // `what` starts each line ("eval (perplexity)"), `unit` names the items ("batches").
  Progress(std::string what, int64_t total, std::string unit);
  Progress(std::string what, int64_t total, std::string unit, Settings settings);
  ~Progress();  // ends a terminal line left open (also when unwinding)
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `done` items were finished before this run (a resume): they count as done, not in the rate.
  void resume(int64_t done);
  // n more items done; `note` (optional) is appended to the line ("loss 2.31").
  void advance(int64_t n = 1, const std::string& note = "");
  // `done` items done in all.
  void update(int64_t done, const std::string& note = "");
  // All items are done (also those of other ranks): the last line (total, time taken, rate),
  // unless already shown; ends a terminal line. A loop that stops early does not call it.
  void finish();

  int64_t done() const { return done_; }
  int64_t total() const { return total_; }
  double elapsed() const;       // seconds since construction
  double rate() const;          // items per second done by this run (0 before any time passed)
  double seconds_left() const;  // at that rate; 0 when done or when no rate is known yet
  std::string line() const;     // the text of a line now, without the note

 private:
  void show();

  std::string what_, unit_;
  int64_t total_, done_ = 0, base_ = 0, shown_done_ = -1;
  Settings settings_;
  double start_ = 0, last_shown_ = 0;
  std::string note_;
  bool open_line_ = false, finished_ = false;
};

}  // namespace crash
