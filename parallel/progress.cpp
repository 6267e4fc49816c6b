#include "parallel/progress.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "parallel/errors.h"
#include "parallel/log.h"
#include "parallel/world.h"

namespace crash {

namespace {

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A terminal line is redrawn at most this often, whatever the log interval.
constexpr double kTerminalRedraw = 0.25;

std::string rate_text(double rate) {
  if (rate >= 100) return fmt::format("{:.0f}", rate);
  if (rate >= 10) return fmt::format("{:.1f}", rate);
  if (rate >= 0.1) return fmt::format("{:.2f}", rate);
  return fmt::format("{:.2g}", rate);
}

}  // namespace

std::string duration_text(double seconds) {
  const auto s = static_cast<int64_t>(std::max(0.0, seconds) + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

Progress::Settings Progress::defaults() {
  Settings s;
  s.show = World::get().rank() == 0 && spdlog::default_logger_raw()->should_log(spdlog::level::info);
  s.terminal = isatty(STDERR_FILENO) == 1;
  if (const char* env = std::getenv("CRASH_PROGRESS_SECONDS")) {
    char* end = nullptr;
    s.interval = std::strtod(env, &end);
    if (end == env || *end != '\0' || !(s.interval >= 0))
      fail("CRASH_PROGRESS_SECONDS: expected a number of seconds (0 or more), got '{}'", env);
  }
  return s;
}

Progress::Progress(std::string what, int64_t total, std::string unit)
    : Progress(std::move(what), total, std::move(unit), defaults()) {}

Progress::Progress(std::string what, int64_t total, std::string unit, Settings settings)
    : what_(std::move(what)), unit_(std::move(unit)), total_(total), settings_(std::move(settings)) {
  if (!settings_.clock) settings_.clock = steady_seconds;
  if (!settings_.sink) {
    if (settings_.terminal)
      settings_.sink = [](const std::string& text) {
        std::fputs(text.c_str(), stderr);
        std::fflush(stderr);
      };
    else
      settings_.sink = [](const std::string& text) { spdlog::info("{}", text); };
  }
  start_ = settings_.clock();
}

Progress::~Progress() {
  if (open_line_) {
    try {
      settings_.sink("\n");
    } catch (...) {
    }
  }
}

void Progress::resume(int64_t done) {
  done_ = done;
  base_ = done;
}

double Progress::elapsed() const { return settings_.clock() - start_; }

double Progress::rate() const {
  const double s = elapsed();
  return s > 0 ? static_cast<double>(done_ - base_) / s : 0.0;
}

double Progress::seconds_left() const {
  const double r = rate();
  return r > 0 && done_ < total_ ? static_cast<double>(total_ - done_) / r : 0.0;
}

std::string Progress::line() const {
  if (done_ >= total_)
    return fmt::format("{}: {}/{} {} in {}, {} {}/s", what_, done_, total_, unit_, duration_text(elapsed()),
                       rate_text(rate()), unit_);
  const double r = rate();
  return fmt::format("{}: {}/{} {}, {} {}/s, {} left", what_, done_, total_, unit_, rate_text(r), unit_,
                     r > 0 ? duration_text(seconds_left()) : std::string("?"));
}

void Progress::advance(int64_t n, const std::string& note) { update(done_ + n, note); }

void Progress::update(int64_t done, const std::string& note) {
  done_ = done;
  note_ = note;
  if (!settings_.show || total_ <= 0) return;
  const double now = settings_.clock();
  const double every = settings_.terminal ? std::min(settings_.interval, kTerminalRedraw) : settings_.interval;
  const bool first = shown_done_ < 0, last = done_ >= total_;
  if (first || (last && shown_done_ != done_) || now - last_shown_ >= every) show();
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  done_ = std::max(done_, total_);
  note_.clear();
  if (!settings_.show || total_ <= 0) return;
  if (shown_done_ != done_) show();
  if (open_line_) {
    // Under a pipeline stage the terminal keeps one line per stage: the finished line goes to
    // the stage's log file and is cleared here.
    if (logging_to_file()) {
      settings_.sink("\r\033[K");
      spdlog::info("{}", line());
    } else {
      settings_.sink("\n");
    }
    open_line_ = false;
  }
}

void Progress::show() {
  last_shown_ = settings_.clock();
  shown_done_ = done_;
  const std::string text = note_.empty() ? line() : line() + ", " + note_;
  if (settings_.terminal) {
    settings_.sink("\r" + text + "\033[K");  // erase what a longer line left
    open_line_ = true;
  } else {
    settings_.sink(text);
  }
}

}  // namespace crash
