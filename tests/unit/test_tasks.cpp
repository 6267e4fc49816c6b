#include <fstream>

#include "framework/tasks.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

std::string write(const test::TempDir& dir, const std::string& text) {
  std::ofstream(dir / "task.jsonl") << text;
  return dir / "task.jsonl";
}

TEST(Tasks, ReadsEveryKind) {
  test::TempDir dir;
  auto mc = read_task(write(dir, R"({"context": "Q: 2+2?\nA:", "choices": [" 3", " 4"], "gold": 1}
{"context": "c", "choices": [" x"], "gold": 0, "meta": {"source": "t"}}
)"));
  EXPECT_EQ(mc.kind, TaskKind::MultipleChoice);
  ASSERT_EQ(mc.examples.size(), 2u);
  EXPECT_EQ(mc.examples[0].choices[1], " 4");
  EXPECT_EQ(mc.examples[1].index, 1);
  auto gen = read_task(write(dir, "{\"context\": \"Q\", \"answers\": [\" a\", \" b\"]}\n\n"));
  EXPECT_EQ(gen.kind, TaskKind::Generation);
  auto text = read_task(write(dir, "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"three\"}\n"), 2);
  EXPECT_EQ(text.kind, TaskKind::Text);
  EXPECT_EQ(text.examples.size(), 2u);
}

TEST(Tasks, BadLinesNameFileAndLine) {
  test::TempDir dir;
  test::expect_user_error([&] { read_task(write(dir, "{\"text\": \"a\"}\n{\"text\": \n")); }, {"task.jsonl:2", "JSON"});
  test::expect_user_error([&] { read_task(write(dir, "{\"text\": \"a\", \"label\": 1}\n")); },
                          {"task.jsonl:1", "unknown field \"label\""});
  test::expect_user_error([&] { read_task(write(dir, "{\"context\": \"c\", \"choices\": [\" a\"], \"gold\": 3}\n")); },
                          {"task.jsonl:1", "gold"});
  test::expect_user_error([&] { read_task(write(dir, "{\"context\": \"c\", \"choices\": [\" a\"]}\n")); },
                          {"needs context, choices and gold"});
  test::expect_user_error(
      [&] { read_task(write(dir, "{\"text\": \"a\"}\n{\"context\": \"c\", \"answers\": [\"x\"]}\n")); },
      {"task.jsonl:2", "generation line in a text task"});
  test::expect_user_error([&] { read_task(write(dir, "\n\n")); }, {"no examples"});
  test::expect_user_error([&] { read_task(dir / "absent.jsonl"); }, {"absent.jsonl", "cannot open"});
}

}  // namespace
}  // namespace crash
