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

TEST(Tasks, SeveralGoldsAreMultipleTargets) {
  test::TempDir dir;
  auto task =
      read_task(write(dir, R"({"context": "Question: where?\nAnswer:", "choices": [" Paris", " Lyon"], "gold": [0, 1]}
{"context": "Q", "choices": [" a", " b", " c"], "gold": [2]}
)"));
  EXPECT_EQ(task.kind, TaskKind::MultipleChoice);
  EXPECT_TRUE(task.multiple_target);
  EXPECT_EQ(task.examples[0].golds, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(task.examples[0].gold, 0);
  EXPECT_EQ(task.examples[1].golds, (std::vector<int64_t>{2}));
  EXPECT_EQ(task.examples[1].gold, 2);
  // One index: a single target, golds {gold}.
  auto one = read_task(write(dir, "{\"context\": \"c\", \"choices\": [\" x\", \" y\"], \"gold\": 1}\n"));
  EXPECT_FALSE(one.multiple_target);
  EXPECT_EQ(one.examples[0].golds, (std::vector<int64_t>{1}));
}

TEST(Tasks, BadGoldsNameTheLine) {
  test::TempDir dir;
  const std::string ok = R"({"context": "c", "choices": [" a", " b"], "gold": [0]})";
  auto line = [](const std::string& gold) {
    return R"({"context": "c", "choices": [" a", " b"], "gold": )" + gold + "}";
  };
  test::expect_user_error([&] { read_task(write(dir, ok + "\n" + line("[]") + "\n")); },
                          {"task.jsonl:2", "non-empty list"});
  test::expect_user_error([&] { read_task(write(dir, ok + "\n" + line("[0, 2]") + "\n")); },
                          {"task.jsonl:2", "\"gold\" 2 is not the index of one of the 2 choices"});
  test::expect_user_error([&] { read_task(write(dir, line("[-1]") + "\n")); }, {"task.jsonl:1", "gold\" -1"});
  test::expect_user_error([&] { read_task(write(dir, line("[1, 1]") + "\n")); }, {"task.jsonl:1", "twice"});
  test::expect_user_error([&] { read_task(write(dir, line("[0, \"1\"]") + "\n")); },
                          {"task.jsonl:1", "must list choice indices"});
  test::expect_user_error([&] { read_task(write(dir, line("[0.5]") + "\n")); }, {"task.jsonl:1", "choice indices"});
  test::expect_user_error([&] { read_task(write(dir, line("\"0\"") + "\n")); }, {"task.jsonl:1", "gold"});
  // lm-eval decides single or multiple targets from the first document: mixing is an error.
  test::expect_user_error([&] { read_task(write(dir, ok + "\n" + line("1") + "\n")); },
                          {"task.jsonl:2", "one index here but a list on the first line"});
  test::expect_user_error([&] { read_task(write(dir, line("1") + "\n\n" + ok + "\n")); },
                          {"task.jsonl:3", "a list here but one index on the first line"});
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
