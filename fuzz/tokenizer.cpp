// libFuzzer target: tokenizer.json loading and encoding. An input starting with '{' is a
// tokenizer.json: it is loaded and, if accepted, encodes and decodes a sample text. Any other
// input is text: its first byte picks one of the fixture tokenizers (loaded once), the rest is
// encoded (with and without special tokens) and decoded. UserError (bad JSON, invalid UTF-8)
// is the expected answer to bad input; token ids must be valid.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "framework/json_fields.h"
#include "framework/tokenizer.h"
#include "parallel/errors.h"

namespace {

std::vector<crash::Tokenizer>& fixtures() {
  static std::vector<crash::Tokenizer> all = [] {
    std::vector<crash::Tokenizer> t;
    for (const char* name :
         {"opt", "roberta", "llama2", "llama2_metaspace", "llama3", "misc_bytelevel", "misc_metaspace", "misc_suffix"})
      t.push_back(crash::Tokenizer::load(std::string(CRASH_TOKENIZERS) + "/" + name + "/tokenizer.json"));
    return t;
  }();
  return all;
}

// A fuzzed tokenizer.json may number its vocabulary sparsely, so only the fixtures (dense
// vocabularies) are held to ids below vocab_size().
void exercise(const crash::Tokenizer& tok, const std::string& text, bool dense) {
  for (bool special : {true, false}) {
    const auto ids = tok.encode(text, special);
    for (int64_t id : ids)
      if (id < 0 || (dense && id >= tok.vocab_size())) std::abort();
    tok.decode(ids, !special);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixtures();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    if (bytes[0] == '{') {
      const auto tok = crash::Tokenizer::parse(bytes, "tokenizer.json");
      exercise(tok, "Hello world! The  quick\tbrown fox, 123 \xc3\xa9t\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87.", false);
    } else {
      const auto& all = fixtures();
      exercise(all[static_cast<uint8_t>(bytes[0]) % all.size()], bytes.substr(1), true);
    }
  } catch (const crash::UserError&) {
  }
  return 0;
}
