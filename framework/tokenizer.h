// Hugging Face tokenizer.json (BPE models): encode and decode with the same ids and strings as the
// Rust `tokenizers` library (HF fast tokenizers) for GPT-2/OPT byte-level BPE, LLaMA-2 style BPE with
// byte fallback (Prepend/Replace normalizer or Metaspace pre-tokenizer), LLaMA-3 style BPE
// (Split regex + ByteLevel, ignore_merges), Qwen2/Qwen3 (NFC + Split regex + ByteLevel), Mistral
// (LLaMA-2's two forms) and Gemma-2/3 (Replace " " -> "▁", no pre-tokenizer, byte fallback).
//
// Supported components (anything else is a UserError naming the field):
//   model            BPE (vocab, merges as "a b" or ["a", "b"], unk_token, fuse_unk, byte_fallback,
//                    ignore_merges, continuing_subword_prefix, end_of_word_suffix; dropout null or 0)
//   normalizer       Sequence, Prepend, Replace, Strip, ByteLevel, NFC, NFD, NFKC, NFKD (ICU, limited
//                    to Unicode 9.0's characters as tokenizers' tables are)
//   pre_tokenizer    Sequence, ByteLevel, Split (String or Regex pattern, all five behaviors, invert),
//                    Metaspace (prepend_scheme always/first/never, split)
//   post_processor   TemplateProcessing (single sequence), ByteLevel, RobertaProcessing,
//                    BertProcessing, Sequence
//   decoder          Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace
// added_tokens are matched in the raw text (normalized: false) or in the normalized text
// (normalized: true), leftmost-longest, with their lstrip, rstrip and single_word flags.
// The file's truncation and padding are ignored, as transformers does.
// Regexes run on PCRE2 with `\s`/`\S` rewritten to Unicode White_Space, as Oniguruma reads them.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace crash {

class Tokenizer {
 public:
  // Reads a tokenizer.json file; errors name the file and the field.
  static Tokenizer load(const std::string& path);
  // The same from the file's text; `source` names it in errors.
  static Tokenizer parse(const std::string& text, const std::string& source);

  // Text (UTF-8; invalid UTF-8 is a UserError) to ids. add_special_tokens applies the
  // post-processor's special tokens (for example BOS).
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const;
  // Ids to text through the decoder; ids outside the vocabulary are skipped, as HF does.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const;  // distinct tokens, model vocabulary and added tokens together
  std::optional<int64_t> token_to_id(const std::string& token) const;
  std::optional<std::string> id_to_token(int64_t id) const;
  // The special token the post-processor puts before the text (after it, for eos); else an
  // added token with a usual name (<s>, <|begin_of_text|>, </s>, <|end_of_text|>, <|endoftext|>...).
  std::optional<int64_t> bos_id() const;
  std::optional<int64_t> eos_id() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace crash
