#include <filesystem>
#include <fstream>

#include "framework/json_fields.h"
#include "framework/prepare.h"
#include "framework/prepared.h"
#include "framework/token_input.h"
#include "tests/unit/test_util.h"

namespace crash {
namespace {

const std::string kTokenizer = test::fixture("tokenizers/opt/tokenizer.json");

TEST(Prepare, SplitsContextAndContinuationAsLmEval) {
  auto tok = Tokenizer::load(kTokenizer);
  // Trailing spaces of the context move to the continuation.
  auto [ctx, cont] = split_context_continuation(tok, "Question: the cat sat on the  ", "mat");
  EXPECT_EQ(ctx, tok.encode("Question: the cat sat on the", false));
  std::vector<int64_t> joined = ctx;
  joined.insert(joined.end(), cont.begin(), cont.end());
  EXPECT_EQ(joined, tok.encode("Question: the cat sat on the  mat", false));
  EXPECT_FALSE(cont.empty());
  // Without trailing spaces the continuation is what follows encode(context) in encode(context + continuation).
  auto [c2, k2] = split_context_continuation(tok, "Answer:", " yes");
  EXPECT_EQ(c2, tok.encode("Answer:", false));
  EXPECT_EQ(tok.decode(k2), " yes");
  EXPECT_EQ(utf8_length(" héllo 😀"), 8);
}

TEST(Prepare, WritesShardsEveryLaterJobReads) {
  test::TempDir dir;
  std::ofstream(dir / "mc.jsonl")
      << R"({"context": "Question: 2 + 2?\nAnswer:", "choices": [" 3", " 4", " five"], "gold": 1}
{"context": "The sky is ", "choices": ["blue", "green"], "gold": 0}
{"context": "Pick one:", "choices": [" a", " b"], "gold": 1}
)";
  PrepareOptions opt;
  opt.examples_per_shard = 2;
  auto m = prepare_task(dir / "mc.jsonl", kTokenizer, dir / "out", opt);
  EXPECT_EQ(m["kind"], "multiple_choice");
  EXPECT_EQ(m["num_examples"], 3);
  EXPECT_EQ(m["shards"].size(), 2u);
  EXPECT_FALSE(std::filesystem::exists(dir / "out.tmp"));
  auto manifest = read_manifest(dir / "out");
  std::ifstream shard(manifest["shards"][0].get<std::string>());
  std::string line;
  std::getline(shard, line);
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["index"], 0);
  EXPECT_EQ(j["gold"], 1);
  EXPECT_EQ(j["continuations"].size(), 3u);
  // Lengths without lm-eval's target delimiter (the leading space): " 3", " 4", " five".
  EXPECT_EQ(j["choice_chars"], nlohmann::json::array({1, 1, 4}));
  auto tok = Tokenizer::load(kTokenizer);
  std::vector<int64_t> tokens = j["context"];
  for (int64_t t : j["continuations"][1]) tokens.push_back(t);
  EXPECT_EQ(j["tokens"].get<std::vector<int64_t>>(), tokens);
  // The reader of later jobs sees the same fields.
  auto task = read_prepared(dir / "out");
  ASSERT_EQ(task.examples.size(), 3u);
  EXPECT_EQ(task.kind, "multiple_choice");
  EXPECT_EQ(task.examples[0].continuations.size(), 3u);
  EXPECT_EQ(task.examples[0].context, j["context"].get<std::vector<int64_t>>());
  EXPECT_EQ(task.examples[0].tokens, tokens);
  EXPECT_EQ(task.examples[1].choice_chars, (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(task.examples[2].gold, 1);
  EXPECT_EQ(tok.decode(j["continuations"][1].get<std::vector<int64_t>>()), " 4");
  EXPECT_EQ(j["hash"].get<std::string>().size(), 16u);
  // Every later job reads the folder as token sequences.
  auto seqs = read_token_lines(dir / "out", tok.vocab_size(), 1000);
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_EQ(seqs[0], tokens);
}

TEST(Prepare, TextIsCutIntoWindows) {
  test::TempDir dir;
  std::ofstream(dir / "book.txt") << std::string(200, 'a') + " the end of a long text, repeated. " +
                                         std::string(50, 'b');
  PrepareOptions opt;
  opt.window = 16;
  auto m = prepare_task(dir / "book.txt", kTokenizer, dir / "out", opt);
  EXPECT_EQ(m["kind"], "text");
  auto tok = Tokenizer::load(kTokenizer);
  auto all = tok.encode(std::string(200, 'a') + " the end of a long text, repeated. " + std::string(50, 'b'), true);
  auto seqs = read_token_lines(dir / "out", tok.vocab_size(), 16);
  size_t total = 0;
  for (auto& s : seqs) {
    EXPECT_LE(s.size(), 16u);
    total += s.size();
  }
  EXPECT_GE(total + 1, all.size());  // a final one-token window is dropped
}

TEST(Prepare, BadInput) {
  test::TempDir dir;
  std::ofstream(dir / "t.jsonl") << "{\"context\": \"c\", \"choices\": [\" a\"], \"gold\": 0, \"label\": 3}\n";
  test::expect_user_error([&] { prepare_task(dir / "t.jsonl", kTokenizer, dir / "out", {}); },
                          {"t.jsonl:1", "unknown field \"label\""});
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
  test::expect_user_error([&] { prepare_task(dir / "t.jsonl", dir / "none", dir / "out", {}); }, {"no tokenizer.json"});
  std::filesystem::create_directories(dir / "exists");
  test::expect_user_error([&] { prepare_task(dir / "t.jsonl", kTokenizer, dir / "exists", {}); },
                          {"exists", "--overwrite"});
  test::expect_user_error([&] { read_manifest(dir / "exists"); }, {"not a prepared folder"});
}

}  // namespace
}  // namespace crash

namespace crash {
namespace {

TEST(TokenInput, TextLinesNeedATokenizer) {
  test::TempDir dir;
  std::ofstream(dir / "in.jsonl") << "{\"text\": \"Hello world\"}\n{\"tokens\": [5, 6]}\n";
  auto tok = Tokenizer::load(kTokenizer);
  auto seqs = read_token_lines(dir / "in.jsonl", tok.vocab_size(), 100, &tok);
  ASSERT_EQ(seqs.size(), 2u);
  EXPECT_EQ(seqs[0], tok.encode("Hello world", true));
  EXPECT_EQ(seqs[1], (std::vector<int64_t>{5, 6}));
  test::expect_user_error([&] { read_token_lines(dir / "in.jsonl", tok.vocab_size(), 100); },
                          {"in.jsonl:1", "tokenizer.json"});
}

}  // namespace
}  // namespace crash
