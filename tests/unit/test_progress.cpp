// The progress reporter (parallel/progress.h): its arithmetic, throttling and the two kinds of
// output, on a clock the test moves.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "parallel/errors.h"
#include "parallel/progress.h"

namespace crash {
namespace {

// A progress whose clock and output the test holds.
struct Fixture {
  double now = 100;  // any origin
  std::vector<std::string> out;
  Progress::Settings settings(bool terminal, double interval) {
    Progress::Settings s;
    s.terminal = terminal;
    s.interval = interval;
    s.clock = [this] { return now; };
    s.sink = [this](const std::string& text) { out.push_back(text); };
    return s;
  }
};

TEST(Progress, DurationText) {
  EXPECT_EQ(duration_text(0), "0s");
  EXPECT_EQ(duration_text(42.4), "42s");
  EXPECT_EQ(duration_text(59.6), "1m00s");
  EXPECT_EQ(duration_text(185), "3m05s");
  EXPECT_EQ(duration_text(3725), "1h02m");
  EXPECT_EQ(duration_text(-3), "0s");
}

TEST(Progress, RateAndTimeLeft) {
  Fixture f;
  Progress p("eval", 100, "batches", f.settings(false, 10));
  EXPECT_EQ(p.rate(), 0);
  EXPECT_EQ(p.seconds_left(), 0);  // unknown yet
  f.now += 5;
  p.update(20);
  EXPECT_DOUBLE_EQ(p.elapsed(), 5);
  EXPECT_DOUBLE_EQ(p.rate(), 4);
  EXPECT_DOUBLE_EQ(p.seconds_left(), 20);
  EXPECT_EQ(p.line(), "eval: 20/100 batches, 4.00 batches/s, 20s left");
  f.now += 15;
  p.advance(30);
  EXPECT_EQ(p.done(), 50);
  EXPECT_DOUBLE_EQ(p.rate(), 2.5);
  EXPECT_DOUBLE_EQ(p.seconds_left(), 20);
  f.now += 20;
  p.update(100);
  EXPECT_DOUBLE_EQ(p.seconds_left(), 0);
  EXPECT_EQ(p.line(), "eval: 100/100 batches in 40s, 2.50 batches/s");
}

TEST(Progress, ResumedItemsAreNotInTheRate) {
  Fixture f;
  Progress p("collect", 1000, "examples", f.settings(false, 10));
  p.resume(400);
  f.now += 10;
  p.advance(100);
  EXPECT_EQ(p.done(), 500);
  EXPECT_DOUBLE_EQ(p.rate(), 10);
  EXPECT_DOUBLE_EQ(p.seconds_left(), 50);
}

TEST(Progress, LogLinesAreThrottledButTheFirstAndLastShow) {
  Fixture f;
  Progress p("lens", 10, "examples", f.settings(false, 10));
  for (int i = 1; i <= 10; ++i) {
    f.now += 3;
    p.update(i);
  }
  // The first (t=3), then t=15 (12 s after it), t=27, and the last (t=30), which the interval
  // alone would have dropped.
  ASSERT_EQ(f.out.size(), 4u);
  EXPECT_EQ(f.out[0], "lens: 1/10 examples, 0.33 examples/s, 27s left");
  EXPECT_EQ(f.out[1], "lens: 5/10 examples, 0.33 examples/s, 15s left");
  EXPECT_EQ(f.out[2], "lens: 9/10 examples, 0.33 examples/s, 3s left");
  EXPECT_EQ(f.out[3], "lens: 10/10 examples in 30s, 0.33 examples/s");
  p.finish();  // already shown
  EXPECT_EQ(f.out.size(), 4u);
}

TEST(Progress, IntervalZeroShowsEveryUpdateWithItsNote) {
  Fixture f;
  Progress p("landscape", 3, "points", f.settings(false, 0));
  for (int i = 0; i < 3; ++i) {
    f.now += 2;
    p.advance(1, "loss " + std::to_string(i));
  }
  ASSERT_EQ(f.out.size(), 3u);
  EXPECT_EQ(f.out[0], "landscape: 1/3 points, 0.50 points/s, 4s left, loss 0");
  EXPECT_EQ(f.out[2], "landscape: 3/3 points in 6s, 0.50 points/s, loss 2");
}

TEST(Progress, FinishReportsTheWholeWork) {
  // A rank that did only its share of the items (the others did the rest).
  Fixture f;
  Progress p("eval (perplexity)", 8, "batches", f.settings(false, 10));
  f.now += 1;
  p.update(1);
  f.now += 1;
  p.update(7);
  f.now += 2;
  p.finish();
  ASSERT_EQ(f.out.size(), 2u);
  EXPECT_EQ(f.out[1], "eval (perplexity): 8/8 batches in 4s, 2.00 batches/s");
}

TEST(Progress, TerminalRedrawsOneLine) {
  Fixture f;
  {
    Progress p("similarity (Gram form)", 4, "tiles", f.settings(true, 10));
    for (int i = 1; i <= 4; ++i) {
      f.now += 1;
      p.update(i);
    }
    p.finish();
  }
  ASSERT_EQ(f.out.size(), 5u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(f.out[i].front(), '\r');
    EXPECT_EQ(f.out[i].substr(f.out[i].size() - 3), "\033[K");
  }
  EXPECT_EQ(f.out[0], "\rsimilarity (Gram form): 1/4 tiles, 1.00 tiles/s, 3s left\033[K");
  EXPECT_EQ(f.out[3], "\rsimilarity (Gram form): 4/4 tiles in 4s, 1.00 tiles/s\033[K");
  EXPECT_EQ(f.out[4], "\n");
}

TEST(Progress, TerminalLineEndsWhenUnwinding) {
  Fixture f;
  try {
    Progress p("x", 10, "items", f.settings(true, 10));
    f.now += 1;
    p.update(1);
    throw std::runtime_error("stop");
  } catch (const std::runtime_error&) {
  }
  ASSERT_EQ(f.out.size(), 2u);
  EXPECT_EQ(f.out[1], "\n");
}

TEST(Progress, HiddenCountsButPrintsNothing) {
  Fixture f;
  auto s = f.settings(false, 0);
  s.show = false;
  Progress p("x", 2, "items", s);
  f.now += 1;
  p.advance(2);
  p.finish();
  EXPECT_EQ(p.done(), 2);
  EXPECT_TRUE(f.out.empty());
}

TEST(Progress, IntervalFromTheEnvironment) {
  ::setenv("CRASH_PROGRESS_SECONDS", "2.5", 1);
  EXPECT_DOUBLE_EQ(Progress::defaults().interval, 2.5);
  ::setenv("CRASH_PROGRESS_SECONDS", "soon", 1);
  try {
    Progress::defaults();
    ADD_FAILURE() << "expected a UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("CRASH_PROGRESS_SECONDS"), std::string::npos);
  }
  ::unsetenv("CRASH_PROGRESS_SECONDS");
  EXPECT_DOUBLE_EQ(Progress::defaults().interval, 10);
}

}  // namespace
}  // namespace crash
