// tokenizer.json encode/decode, following the Rust `tokenizers` library step by step:
// added tokens in the raw text -> normalizer -> added tokens in the normalized text ->
// pre-tokenizers -> BPE per piece (with a word cache) -> post-processor; decode: ids -> token
// strings -> decoder chain. Names of the Rust functions mirrored are given where it helps.
#include "framework/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/uset.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <deque>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "framework/json_fields.h"
#include "parallel/errors.h"

namespace crash {

using nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// UTF-8

// Length of the valid UTF-8 sequence at s[i], or 0 when it is invalid; then *bad is the length of
// its maximal subpart (what Rust's from_utf8_lossy replaces by one U+FFFD).
size_t utf8_seq(std::string_view s, size_t i, size_t* bad) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return 1;
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    *bad = 1;
    return 0;
  }
  size_t j = i + 1;
  for (size_t k = 0; k < need; ++k, ++j) {
    if (j >= s.size() || static_cast<unsigned char>(s[j]) < lo || static_cast<unsigned char>(s[j]) > hi) {
      *bad = j - i;
      return 0;
    }
    lo = 0x80, hi = 0xBF;
  }
  return need + 1;
}

// Byte offset of the first invalid sequence, or npos.
size_t invalid_utf8_at(std::string_view s) {
  for (size_t i = 0, bad = 0; i < s.size();) {
    size_t n = utf8_seq(s, i, &bad);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0, bad = 0; i < s.size();) {
    size_t n = utf8_seq(s, i, &bad);
    if (n) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += bad;
    }
  }
  return out;
}

// Length of the character starting with (valid) lead byte b.
inline size_t char_len(char c) {
  const auto b = static_cast<unsigned char>(c);
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

uint32_t code_point(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + i);
  switch (char_len(s[i])) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3: return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default: return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
  }
}

void append_utf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Unicode White_Space (Rust's char::is_whitespace and regex \s, Oniguruma's \s).
bool is_white_space(uint32_t c) {
  return (c >= 0x9 && c <= 0xD) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Start of the character that ends at `end` (exclusive).
size_t prev_char(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode map (bytes_char in byte_level.rs).

struct ByteMap {
  std::string to_char[256];  // UTF-8 of the character standing for each byte
  int16_t to_byte[324];      // code point (< 324) -> byte, or -1
  ByteMap() {
    std::fill(std::begin(to_byte), std::end(to_byte), int16_t(-1));
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t c = printable ? b : 256 + n++;
      append_utf8(to_char[b], c);
      to_byte[c] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string bytes_to_chars(std::string_view s) {
  const ByteMap& m = byte_map();
  std::string out;
  out.reserve(s.size() * 2);
  for (char c : s) out += m.to_char[static_cast<unsigned char>(c)];
  return out;
}

// ---------------------------------------------------------------------------------------------
// Regular expressions (PCRE2) and literal patterns.

// Makes PCRE2 read a pattern as Oniguruma (tokenizers' engine, Ruby syntax) does, by rewriting
// escapes into explicit sets (\X outside a class becomes [set], \x inside one its members):
// - \s is Unicode White_Space (PCRE2 with UCP also takes U+180E);
// - \w is Alphabetic, marks, decimal numbers and connector punctuation (PCRE2: letters, numbers, _);
// - \h is a hexadecimal digit (PCRE2: horizontal space);
// - \w, \d, \p{L} and \p{N} take what Unicode 15.0 to 16.0 added (Oniguruma in tokenizers 0.2x has
//   Unicode 16; PCRE2 10.42 has 14).
// The negated forms \S, \W, \D, \H are rewritten outside classes only. The sets were checked
// against tokenizers itself on every code point.
std::string onig_compatible(const std::string& p) {
  static const std::string ws =
      "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
  static const std::string letters =
      "\\p{L}"
      "\\x{1C89}-\\x{1C8A}\\x{A7CB}-\\x{A7CD}\\x{A7DA}-\\x{A7DC}\\x{105C0}-\\x{105F3}\\x{10D4A}-\\x{10D65}"
      "\\x{10D6F}-\\x{10D85}\\x{10EC2}-\\x{10EC4}\\x{1123F}-\\x{11240}\\x{11380}-\\x{11389}\\x{1138B}"
      "\\x{1138E}\\x{11390}-\\x{113B5}\\x{113B7}\\x{113D1}\\x{113D3}\\x{11BC0}-\\x{11BE0}\\x{11F02}"
      "\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}\\x{1342F}\\x{13441}-\\x{13446}\\x{13460}-\\x{143FA}"
      "\\x{16100}-\\x{1611D}\\x{16D40}-\\x{16D6C}\\x{18CFF}\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}"
      "\\x{1E030}-\\x{1E06D}\\x{1E4D0}-\\x{1E4EB}\\x{1E5D0}-\\x{1E5ED}\\x{1E5F0}\\x{2B739}\\x{2EBF0}-"
      "\\x{2EE5D}\\x{31350}-\\x{323AF}";
  static const std::string numbers =
      "\\p{N}"
      "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-\\x{11F59}\\x{16130}-"
      "\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}\\x{1D2C0}-\\x{1D2D3}\\x{1E4F0}-\\x{1E4F9}"
      "\\x{1E5F1}-\\x{1E5FA}";
  static const std::string digits =
      "\\p{Nd}"
      "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-\\x{11F59}\\x{16130}-"
      "\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}\\x{1E4F0}-\\x{1E4F9}\\x{1E5F1}-\\x{1E5FA}";
  static const std::string word =
      "\\p{Alphabetic}\\p{M}\\p{Pc}" + letters + digits +  // and new marks
      "\\x{897}\\x{CF3}\\x{ECE}\\x{10D69}-\\x{10D6D}\\x{10EFC}-\\x{10EFF}\\x{11241}"
      "\\x{113B8}-\\x{113C0}\\x{113C2}\\x{113C5}\\x{113C7}-\\x{113CA}\\x{113CC}-\\x{113D0}\\x{113D2}"
      "\\x{113E1}-\\x{113E2}\\x{11F00}-\\x{11F01}\\x{11F03}\\x{11F34}-\\x{11F3A}\\x{11F3E}-\\x{11F42}"
      "\\x{11F5A}\\x{13440}\\x{13447}-\\x{13455}\\x{1611E}-\\x{1612F}\\x{1E08F}\\x{1E4EC}-\\x{1E4EF}"
      "\\x{1E5EE}-\\x{1E5EF}";
  // Outside a class Oniguruma's \w also takes these Latin-1 numbers (not in [\w]).
  static const std::string word_outside = word + "\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";
  static const std::string hex = "0-9A-Fa-f";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char e = p[++i];
      const std::string* set = e == 's' || e == 'S'   ? &ws
                               : e == 'w' || e == 'W' ? &word
                               : e == 'd' || e == 'D' ? &digits
                               : e == 'h' || e == 'H' ? &hex
                                                      : nullptr;
      if (set && !in_class && set == &word) set = &word_outside;
      if (set && std::islower(static_cast<unsigned char>(e))) {
        out += in_class ? *set : "[" + *set + "]";
      } else if (set && !in_class) {
        out += "[^" + *set + "]";
      } else if (e == 'p' && (p.compare(i + 1, 3, "{L}") == 0 || p.compare(i + 1, 3, "{N}") == 0)) {
        const std::string& prop = p[i + 2] == 'L' ? letters : numbers;
        out += in_class ? prop : "[" + prop + "]";
        i += 3;
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    out += c;
    if (!in_class && c == '[') {
      in_class = true;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // a leading ']' is literal
    } else if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {
      size_t end = p.find(":]", i + 2);
      if (end != std::string::npos) {
        out.append(p, i + 1, end + 2 - (i + 1));
        i = end + 1;
      }
    } else if (in_class && c == ']') {
      in_class = false;
    }
  }
  return out;
}

using Span = std::pair<size_t, size_t>;

class Regex {
 public:
  // `where` names the file and field for a compile error.
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    std::string p = onig_compatible(pattern);
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("{}: regex '{}' does not compile: {}", where, pattern, reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // without JIT (unsupported CPU) the interpreter runs
    code_.reset(code, pcre2_code_free);
  }

  // Matches left to right as Oniguruma's find_iter: an empty match right after the previous
  // match is skipped by one character.
  void find_all(std::string_view s, std::vector<Span>& out) const {
    std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    size_t pos = 0, last_end = 0;
    bool have_last = false;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK,
                           md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        fail("tokenizer regex failed on the text: {}", reinterpret_cast<const char*>(msg));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      size_t b = ov[0], e = std::max(ov[0], ov[1]);
      if (b == e && have_last && last_end == e) {
        pos += pos < s.size() ? char_len(s[pos]) : 1;
        continue;
      }
      pos = e, last_end = e, have_last = true;
      out.emplace_back(b, e);
    }
  }

  // Whether the pattern matches at the start of s.
  bool matches_at_start(std::string_view s) const {
    std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    return pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0,
                       PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, md.get(), nullptr) >= 0;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

// A String (literal) or Regex pattern of Split and Replace.
struct Pattern {
  std::string literal;
  std::shared_ptr<const Regex> regex;

  void find_all(std::string_view s, std::vector<Span>& out) const {
    if (regex) return regex->find_all(s, out);
    for (size_t at = s.find(literal); at != std::string_view::npos; at = s.find(literal, at + literal.size()))
      out.emplace_back(at, at + literal.size());
  }
};

// Rust regex \w (Oniguruma's [\w] and Join_Control): the test of single_word added tokens.
bool is_word_char_at(std::string_view s) {
  static const Regex word("[\\w\\x{200C}\\x{200D}]", "word regex");
  return !s.empty() && word.matches_at_start(s);
}

// ---------------------------------------------------------------------------------------------
// Splitting (NormalizedString::split with a SplitDelimiterBehavior).

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct Marked {
  size_t begin, end;
  bool is_match;
};

// The matches and the gaps between them, covering s (Pattern::find_matches).
std::vector<Marked> cover(size_t size, const std::vector<Span>& matches) {
  std::vector<Marked> out;
  size_t prev = 0;
  for (auto [b, e] : matches) {
    if (prev != b) out.push_back({prev, b, false});
    out.push_back({b, e, true});
    prev = e;
  }
  if (prev != size) out.push_back({prev, size, false});
  return out;
}

std::vector<Span> apply_behavior(const std::vector<Marked>& m, Behavior behavior) {
  std::vector<Span> out;
  bool prev = false;
  switch (behavior) {
    case Behavior::Removed:
      for (const auto& x : m)
        if (!x.is_match) out.emplace_back(x.begin, x.end);
      break;
    case Behavior::Isolated:
      for (const auto& x : m) out.emplace_back(x.begin, x.end);
      break;
    case Behavior::Contiguous:
    case Behavior::MergedWithPrevious:
      // Contiguous joins runs of matches (and of gaps); MergedWithPrevious a match to the gap before it.
      for (const auto& x : m) {
        const bool join = behavior == Behavior::Contiguous ? x.is_match == prev : x.is_match && !prev;
        if (join && !out.empty())
          out.back().second = x.end;
        else
          out.emplace_back(x.begin, x.end);
        prev = x.is_match;
      }
      break;
    case Behavior::MergedWithNext:
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->is_match && !prev && !out.empty())
          out.back().first = it->begin;
        else
          out.emplace_back(it->begin, it->end);
        prev = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  return out;
}

// A part of the text on its way through the pipeline: either still text, or an added token.
struct Piece {
  std::string text;
  int32_t id = -1;        // added token id, when this piece is one
  bool at_start = false;  // begins at offset 0 of the original text (Metaspace prepend_scheme "first")
};

// ---------------------------------------------------------------------------------------------
// Components

// s in a Unicode normalization form (unicode_form), through UTF-16 as ICU works. The text was checked to be valid
// UTF-8.
std::string unicode_normalize(const UNormalizer2* form, const std::string& s) {
  if (s.empty()) return s;
  auto check = [](UErrorCode e) {
    if (U_FAILURE(e)) fail("Unicode normalization of the text failed: {}", u_errorName(e));
  };
  UErrorCode e = U_ZERO_ERROR;
  std::u16string in(s.size(), u'\0');
  int32_t n = 0;
  u_strFromUTF8(reinterpret_cast<UChar*>(in.data()), static_cast<int32_t>(in.size()), &n, s.data(),
                static_cast<int32_t>(s.size()), &e);
  check(e);
  in.resize(n);
  if (unorm2_isNormalized(form, reinterpret_cast<const UChar*>(in.data()), n, &e) && U_SUCCESS(e)) return s;
  e = U_ZERO_ERROR;
  std::u16string out(static_cast<size_t>(n) + 16, u'\0');
  auto run = [&] {
    return unorm2_normalize(form, reinterpret_cast<const UChar*>(in.data()), n, reinterpret_cast<UChar*>(out.data()),
                            static_cast<int32_t>(out.size()), &e);
  };
  int32_t m = run();
  if (e == U_BUFFER_OVERFLOW_ERROR) {  // decompositions grew it: ICU gave the size needed
    out.assign(static_cast<size_t>(m), u'\0');
    e = U_ZERO_ERROR;
    m = run();
  }
  check(e);
  std::string r(static_cast<size_t>(m) * 3, '\0');
  int32_t k = 0;
  u_strToUTF8(r.data(), static_cast<int32_t>(r.size()), &k, reinterpret_cast<const UChar*>(out.data()), m, &e);
  check(e);
  r.resize(k);
  return r;
}

// ICU's normalizer for NFC, NFD, NFKC or NFKD, restricted to the characters of Unicode 9.0: the
// tables of `tokenizers` (unicode-normalization-alignments) are that version's, so a character
// added later neither decomposes nor reorders there. Checked on every code point, alone and
// between combining marks, against tokenizers 0.23.
const UNormalizer2* unicode_form(const std::string& name) {
  struct Forms {
    USet* age9 = nullptr;
    const UNormalizer2* form[4] = {};
    UErrorCode e = U_ZERO_ERROR;
    Forms() {
      const UNormalizer2* full[4] = {unorm2_getNFCInstance(&e), unorm2_getNFDInstance(&e), unorm2_getNFKCInstance(&e),
                                     unorm2_getNFKDInstance(&e)};
      static const UChar pattern[] = u"[:Age=9.0:]";
      age9 = uset_openPattern(pattern, -1, &e);
      if (U_FAILURE(e)) return;
      uset_freeze(age9);
      for (int k = 0; k < 4; ++k) form[k] = unorm2_openFiltered(full[k], age9, &e);
    }
  };
  static const Forms forms;  // kept for the life of the program
  if (U_FAILURE(forms.e)) fail("Unicode normalization ({}) is not available from ICU: {}", name, u_errorName(forms.e));
  return forms.form[name == "NFC" ? 0 : name == "NFD" ? 1 : name == "NFKC" ? 2 : 3];
}

struct Normalizer {
  enum Kind { Prepend, Replace, Strip, ByteLevel, Unicode } kind;
  std::string text;  // Prepend: what is prepended; Replace: the replacement
  Pattern pattern;
  bool left = false, right = false;
  const UNormalizer2* form = nullptr;  // Unicode: NFC, NFD, NFKC or NFKD (ICU)

  void apply(std::string& s) const {
    switch (kind) {
      case Prepend:
        if (!s.empty()) s.insert(0, text);
        break;
      case Replace: {
        std::vector<Span> m;
        pattern.find_all(s, m);
        if (m.empty()) break;
        std::string out;
        size_t prev = 0;
        for (auto [b, e] : m) out.append(s, prev, b - prev).append(text), prev = e;
        s = out.append(s, prev, std::string::npos);
        break;
      }
      case Strip: {
        size_t b = 0, e = s.size();
        if (left)
          while (b < e && is_white_space(code_point(s, b))) b += char_len(s[b]);
        if (right)
          while (e > b && is_white_space(code_point(s, prev_char(s, e)))) e = prev_char(s, e);
        s = s.substr(b, e - b);
        break;
      }
      case ByteLevel: s = bytes_to_chars(s); break;
      case Unicode: s = unicode_normalize(form, s); break;
    }
  }
};

enum class Prepend { Always, First, Never };

struct PreTokenizer {
  enum Kind { ByteLevel, Split, Metaspace } kind = ByteLevel;
  bool add_prefix_space = false, use_regex = true;  // ByteLevel
  Pattern pattern;                                  // Split
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  std::string replacement;  // Metaspace
  Prepend prepend = Prepend::Always;
  bool split = true;

  static const Regex& gpt2_regex() {
    static const Regex re("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
                          "ByteLevel regex");
    return re;
  }

  static void emit(const Piece& p, const std::vector<Span>& spans, std::vector<Piece>& out, bool to_bytes) {
    for (auto [b, e] : spans) {
      if (b == e) continue;
      std::string_view t(p.text.data() + b, e - b);
      out.push_back({to_bytes ? bytes_to_chars(t) : std::string(t), -1, p.at_start && b == 0});
    }
  }

  void apply(std::vector<Piece>& pieces) const {
    std::vector<Piece> out;
    out.reserve(pieces.size());
    std::vector<Span> m;
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        out.push_back(std::move(p));
        continue;
      }
      m.clear();
      switch (kind) {
        case ByteLevel:
          if (add_prefix_space && p.text[0] != ' ') p.text.insert(0, " ");
          if (use_regex) {
            gpt2_regex().find_all(p.text, m);
            emit(p, apply_behavior(cover(p.text.size(), m), Behavior::Isolated), out, true);
          } else {
            emit(p, {{0, p.text.size()}}, out, true);
          }
          break;
        case Split: {
          pattern.find_all(p.text, m);
          auto marked = cover(p.text.size(), m);
          if (invert)
            for (auto& x : marked) x.is_match = !x.is_match;
          emit(p, apply_behavior(marked, behavior), out, false);
          break;
        }
        case Metaspace: {
          std::string t;
          for (char c : p.text) {
            if (c == ' ')
              t += replacement;
            else
              t += c;
          }
          bool starts = t.compare(0, replacement.size(), replacement) == 0;
          if (!starts && (prepend == Prepend::Always || (prepend == Prepend::First && p.at_start)))
            t.insert(0, replacement);
          p.text = std::move(t);
          if (split) {
            for (size_t at = p.text.find(replacement); at != std::string::npos;
                 at = p.text.find(replacement, at + replacement.size()))
              m.emplace_back(at, at + replacement.size());
            emit(p, apply_behavior(cover(p.text.size(), m), Behavior::MergedWithNext), out, false);
          } else {
            emit(p, {{0, p.text.size()}}, out, false);
          }
          break;
        }
      }
    }
    pieces = std::move(out);
  }
};

// One post-processor step on a single sequence: its special tokens around the sequence.
struct PostProcessor {
  struct Item {
    bool sequence;
    std::vector<int32_t> ids;
  };
  std::vector<Item> items;
};

struct Decoder {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind = ByteLevel;
  Pattern pattern;  // Replace
  std::string content;
  uint32_t strip_char = ' ';  // Strip
  size_t start = 0, stop = 0;
  uint32_t replacement = 0x2581;  // Metaspace
  bool prepend = true;

  static void flush_bytes(std::string& bytes, std::vector<std::string>& out) {
    if (bytes.empty()) return;
    if (invalid_utf8_at(bytes) == std::string::npos)
      out.push_back(bytes);
    else
      for (size_t i = 0; i < bytes.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
    bytes.clear();
  }

  static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  void apply(std::vector<std::string>& tokens) const {
    std::vector<std::string> out;
    switch (kind) {
      case ByteLevel: {
        const ByteMap& bm = byte_map();
        std::string bytes;
        for (const auto& t : tokens) {
          size_t mark = bytes.size();
          bool all = true;
          for (size_t i = 0; i < t.size(); i += char_len(t[i])) {
            uint32_t c = code_point(t, i);
            if (c >= 324 || bm.to_byte[c] < 0) {
              all = false;
              break;
            }
            bytes += static_cast<char>(bm.to_byte[c]);
          }
          if (!all) bytes.resize(mark), bytes += t;
        }
        out.push_back(utf8_lossy(bytes));
        break;
      }
      case Replace:
        for (const auto& t : tokens) {
          std::vector<Span> m;
          pattern.find_all(t, m);
          std::string s;
          size_t prev = 0;
          for (auto [b, e] : m) s.append(t, prev, b - prev).append(content), prev = e;
          out.push_back(s.append(t, prev, std::string::npos));
        }
        break;
      case ByteFallback: {
        std::string bytes;
        for (auto& t : tokens) {
          // "<0xNN>" (u8::from_str_radix also takes a leading '+')
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
            int hi = hex(t[3]), lo = hex(t[4]);
            if (t[3] == '+' && lo >= 0) hi = 0;
            if (hi >= 0 && lo >= 0) {
              bytes += static_cast<char>(hi * 16 + lo);
              continue;
            }
          }
          flush_bytes(bytes, out);
          out.push_back(std::move(t));
        }
        flush_bytes(bytes, out);
        break;
      }
      case Fuse: {
        std::string s;
        for (const auto& t : tokens) s += t;
        out.push_back(std::move(s));
        break;
      }
      case Strip:
        for (const auto& t : tokens) {
          std::vector<size_t> at;  // character starts
          for (size_t i = 0; i < t.size(); i += char_len(t[i])) at.push_back(i);
          size_t n = at.size(), b = 0, e = n;
          for (size_t i = 0; i < std::min(start, n) && code_point(t, at[i]) == strip_char; ++i) b = i + 1;
          for (size_t i = 0; i < std::min(stop, n) && code_point(t, at[n - i - 1]) == strip_char; ++i) e = n - i - 1;
          if (e < b) e = b;
          size_t bb = b < n ? at[b] : t.size(), ee = e < n ? at[e] : t.size();
          out.push_back(t.substr(bb, ee - bb));
        }
        break;
      case Metaspace:
        for (size_t k = 0; k < tokens.size(); ++k) {
          const auto& t = tokens[k];
          std::string s;
          for (size_t i = 0; i < t.size(); i += char_len(t[i])) {
            if (code_point(t, i) != replacement)
              s.append(t, i, char_len(t[i]));
            else if (k != 0 || !prepend)
              s += ' ';
          }
          out.push_back(std::move(s));
        }
        break;
    }
    tokens = std::move(out);
  }
};

struct AddedToken {
  std::string content;
  std::string form;  // what is matched and decoded: the normalized content for normalized tokens
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

// Byte trie of added tokens for leftmost-longest matching (the Aho-Corasick of added_vocabulary.rs).
class Trie {
 public:
  bool empty() const { return nodes_.size() == 1; }
  void add(const std::string& s, int32_t value) {
    int32_t n = 0;
    for (char c : s) {
      auto& kids = nodes_[n].kids;
      auto it = std::find_if(kids.begin(), kids.end(), [&](auto& k) { return k.first == c; });
      if (it != kids.end()) {
        n = it->second;
      } else {
        int32_t next = static_cast<int32_t>(nodes_.size());
        kids.emplace_back(c, next);
        nodes_.emplace_back();
        n = next;
      }
    }
    nodes_[n].value = value;
    first_[static_cast<unsigned char>(s[0])] = true;
  }
  // Longest value starting at i: (value, length), value -1 when none.
  std::pair<int32_t, size_t> longest_at(std::string_view s, size_t i) const {
    std::pair<int32_t, size_t> best{-1, 0};
    if (!first_[static_cast<unsigned char>(s[i])]) return best;
    int32_t n = 0;
    for (size_t j = i; j < s.size(); ++j) {
      const auto& kids = nodes_[n].kids;
      auto it = std::find_if(kids.begin(), kids.end(), [&](auto& k) { return k.first == s[j]; });
      if (it == kids.end()) break;
      n = it->second;
      if (nodes_[n].value >= 0) best = {nodes_[n].value, j + 1 - i};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<char, int32_t>> kids;
    int32_t value = -1;
  };
  std::vector<Node> nodes_{1};
  bool first_[256] = {};
};

struct Bpe {
  std::unordered_map<std::string_view, int32_t> vocab;  // views into Impl::strings
  std::unordered_map<int32_t, std::string_view> vocab_r;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  std::optional<std::string> unk_token;
  int32_t unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string prefix, suffix;  // continuing_subword_prefix, end_of_word_suffix
  int32_t byte_ids[256];       // <0xNN> tokens, -1 where absent

  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  const std::pair<int32_t, int32_t>* merge(int32_t a, int32_t b) const {
    auto it = merges.find(key(a, b));
    return it == merges.end() ? nullptr : &it->second;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string path;
  std::deque<std::string> strings;  // owns the model's token strings
  Bpe bpe;
  std::vector<AddedToken> added;
  std::unordered_map<std::string, int32_t> added_ids;  // content -> id
  std::unordered_map<int32_t, size_t> added_by_id;     // id -> index in `added`
  std::unordered_set<std::string> special;             // contents of special tokens
  Trie raw_trie, normalized_trie;                      // values: index in `added`
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<PostProcessor> post_processors;
  std::vector<Decoder> decoders;
  bool has_decoder = false;
  std::optional<int64_t> bos, eos;
  int64_t vocab_count = 0;

  static constexpr size_t kCacheMaxWord = 256, kCacheMaxEntries = 1 << 17;
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  std::vector<Piece> find_added(std::string&& text, bool at_start, const Trie& trie) const;
  void bpe_word(const std::string& w, std::vector<int64_t>& out) const;
  void merge_word(std::string_view w, std::vector<int32_t>& out) const;
};

// find_matches + split_with_indices of added_vocabulary.rs. Empty text pieces are dropped.
std::vector<Piece> Tokenizer::Impl::find_added(std::string&& s, bool at_start, const Trie& trie) const {
  std::vector<Piece> out;
  if (s.empty()) return out;
  if (trie.empty()) {
    out.push_back({std::move(s), -1, at_start});
    return out;
  }
  auto text = [&](size_t b, size_t e) {
    if (b < e) out.push_back({s.substr(b, e - b), -1, at_start && b == 0});
  };
  size_t start_offset = 0;
  for (size_t pos = 0; pos < s.size();) {
    auto [index, len] = trie.longest_at(s, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + len;
    pos = stop;
    const AddedToken& t = added[index];
    if (t.single_word) {
      bool start_space =
          start == 0 || !is_word_char_at(std::string_view(s).substr(prev_char(s, start), std::string::npos));
      bool stop_space = stop == s.size() || !is_word_char_at(std::string_view(s).substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) {
      size_t b = start;
      while (b > 0 && is_white_space(code_point(s, prev_char(s, b)))) b = prev_char(s, b);
      start = std::max(b, start_offset);
    }
    if (t.rstrip)
      while (stop < s.size() && is_white_space(code_point(s, stop))) stop += char_len(s[stop]);
    if (start_offset < start) text(start_offset, start);
    out.push_back({s.substr(start, stop - start), t.id, at_start && start == 0});
    start_offset = stop;
  }
  if (start_offset < s.size()) text(start_offset, s.size());
  return out;
}

// merge_word + Word::merge_all of the Rust BPE: characters (or byte tokens, or unk) merged by
// lowest rank, leftmost first.
void Tokenizer::Impl::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id, prev, next;
    uint32_t len;  // 0: merged into its left neighbour
  };
  struct Candidate {
    int32_t rank, pos, id;
  };
  std::vector<Symbol> sym;
  sym.reserve(w.size());
  auto add = [&](int32_t id, size_t len) {
    int32_t n = static_cast<int32_t>(sym.size());
    if (n) sym.back().next = n;
    sym.push_back({id, n - 1, -1, static_cast<uint32_t>(len)});
  };
  const Bpe& m = bpe;
  int32_t unk = -1;  // a pending unknown token (fuse_unk extends it) and its byte length
  size_t unk_len = 0;
  std::string buf;
  for (size_t i = 0; i < w.size();) {
    size_t len = char_len(w[i]);
    std::string_view s = w.substr(i, len);
    bool first = i == 0, last = i + len >= w.size();
    if ((!first && !m.prefix.empty()) || (last && !m.suffix.empty())) {
      buf.assign(first ? "" : m.prefix).append(s).append(last ? m.suffix : "");
      s = buf;
    }
    i += len;
    auto it = m.vocab.find(s);
    if (it != m.vocab.end()) {
      if (unk >= 0) add(unk, unk_len), unk = -1;
      add(it->second, len);
      continue;
    }
    if (m.byte_fallback && std::all_of(s.begin(), s.end(), [&](char c) { return m.byte_ids[uint8_t(c)] >= 0; })) {
      for (char c : s) add(m.byte_ids[uint8_t(c)], 1);
      continue;
    }
    if (m.unk_token) {
      if (m.unk_id < 0) fail("{}: model.unk_token '{}' is not in model.vocab", path, *m.unk_token);
      if (unk >= 0 && m.fuse_unk) {
        unk_len += len;
      } else {
        if (unk >= 0) add(unk, unk_len);
        unk = m.unk_id, unk_len = len;
      }
    }
  }
  if (unk >= 0) add(unk, unk_len);

  auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<Candidate> heap;
  for (size_t i = 0; i + 1 < sym.size(); ++i)
    if (auto* mg = m.merge(sym[i].id, sym[i + 1].id)) heap.push_back({mg->first, int32_t(i), mg->second});
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    Candidate top = heap.back();
    heap.pop_back();
    Symbol& s = sym[top.pos];
    if (s.len == 0 || s.next < 0) continue;
    const Symbol right = sym[s.next];
    auto* mg = m.merge(s.id, right.id);
    if (!mg || mg->second != top.id) continue;  // stale entry
    sym[s.next].len = 0;
    s.id = top.id, s.len += right.len, s.next = right.next;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (s.prev >= 0)
      if (auto* p = m.merge(sym[s.prev].id, s.id))
        heap.push_back({p->first, s.prev, p->second}), std::push_heap(heap.begin(), heap.end(), later);
    if (s.next >= 0)
      if (auto* n = m.merge(s.id, sym[s.next].id))
        heap.push_back({n->first, top.pos, n->second}), std::push_heap(heap.begin(), heap.end(), later);
  }
  for (const Symbol& s : sym)
    if (s.len) out.push_back(s.id);
}

void Tokenizer::Impl::bpe_word(const std::string& w, std::vector<int64_t>& out) const {
  if (bpe.ignore_merges) {
    auto it = bpe.vocab.find(w);
    if (it != bpe.vocab.end()) return out.push_back(it->second);
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache.find(w);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(w, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (w.size() < kCacheMaxWord) {
    std::lock_guard<std::mutex> lock(cache_mu);
    if (cache.size() < kCacheMaxEntries) cache.emplace(w, std::move(ids));
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// Field access with messages naming the file and the field path ("model.vocab").
struct Reader {
  const std::string& file;

  static std::string join(const std::string& where, const std::string& key) {
    return where.empty() ? key : where + "." + key;
  }

  [[noreturn]] void wrong_type(const std::string& field, const char* expected, const json& v) const {
    fail("{}: field '{}' must be {}, got {}", file, field, expected, v.type_name());
  }
  const json& get(const json& j, const std::string& key, const std::string& where) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) fail("{}: missing field '{}'", file, join(where, key));
    return *it;
  }
  const json* find(const json& j, const std::string& key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json& j, const std::string& key, const std::string& where) const {
    const json& v = get(j, key, where);
    if (!v.is_object()) wrong_type(join(where, key), "an object", v);
    return v;
  }
  const json& array(const json& j, const std::string& key, const std::string& where) const {
    const json& v = get(j, key, where);
    if (!v.is_array()) wrong_type(join(where, key), "an array", v);
    return v;
  }
  std::string str(const json& j, const std::string& key, const std::string& where) const {
    const json& v = get(j, key, where);
    if (!v.is_string()) wrong_type(join(where, key), "a string", v);
    return v.get<std::string>();
  }
  std::string str_or(const json& j, const std::string& key, const std::string& fallback,
                     const std::string& where) const {
    return find(j, key) ? str(j, key, where) : fallback;
  }
  bool flag(const json& j, const std::string& key, bool fallback, const std::string& where) const {
    const json* v = find(j, key);
    if (!v) return fallback;
    if (!v->is_boolean()) wrong_type(join(where, key), "true or false", *v);
    return v->get<bool>();
  }
  int64_t integer(const json& v, const std::string& field, int64_t lo, int64_t hi) const {
    if (!v.is_number_integer()) wrong_type(field, "an integer", v);
    int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v.get<int64_t>();
    if (x < lo || x > hi) fail("{}: field '{}' must be between {} and {}, got {}", file, field, lo, hi, x);
    return x;
  }
  int32_t id(const json& v, const std::string& field) const {
    return static_cast<int32_t>(integer(v, field, 0, INT32_MAX));
  }
  uint32_t one_char(const json& j, const std::string& key, const std::string& where) const {
    std::string s = str(j, key, where);
    if (s.empty() || invalid_utf8_at(s) != std::string::npos || char_len(s[0]) != s.size())
      fail("{}: field '{}' must be one character, got '{}'", file, join(where, key), s);
    return code_point(s, 0);
  }
  [[noreturn]] void unsupported(const std::string& where, const std::string& type, const char* expected) const {
    fail("{}: {}.type '{}' is not supported (expected {})", file, where, type, expected);
  }
  // {"String": s} or {"Regex": r}
  Pattern pattern(const json& j, const std::string& where) const {
    const json& p = object(j, "pattern", where);
    std::string field = join(where, "pattern");
    Pattern out;
    if (p.contains("String")) {
      out.literal = str(p, "String", field);
      if (out.literal.empty()) fail("{}: field '{}.String' must not be empty", file, field);
    } else if (p.contains("Regex")) {
      out.regex = std::make_shared<Regex>(str(p, "Regex", field), file + ": " + field + ".Regex");
    } else {
      fail("{}: field '{}' must hold 'String' or 'Regex'", file, field);
    }
    return out;
  }
  Prepend prepend_scheme(const json& j, const std::string& where) const {
    if (!flag(j, "add_prefix_space", true, where)) return Prepend::Never;  // older files
    std::string s = str_or(j, "prepend_scheme", "always", where);
    if (s == "always") return Prepend::Always;
    if (s == "first") return Prepend::First;
    if (s == "never") return Prepend::Never;
    fail("{}: field '{}' must be always, first or never, got '{}'", file, join(where, "prepend_scheme"), s);
  }
  std::string type(const json& j, const std::string& where) const {
    if (!j.is_object()) wrong_type(where, "an object", j);
    return str(j, "type", where);
  }
};

// A step of a pipeline (normalizer, pre-tokenizer, post-processor, decoder) into `out`: one of
// type "Sequence" reads each entry of its list `key` so in turn; `read` reads any other type `t`.
template <class T>
void read_step(const Reader& r, const json& j, const std::string& where, const char* key, std::vector<T>& out,
               void (*read)(const Reader& r, const json& j, const std::string& where, const std::string& t,
                            std::vector<T>& out)) {
  const std::string t = r.type(j, where);
  if (t != "Sequence") return read(r, j, where, t, out);
  const json& list = r.array(j, key, where);
  for (size_t i = 0; i < list.size(); ++i)
    read_step(r, list[i], fmt::format("{}.{}[{}]", where, key, i), key, out, read);
}

void read_normalizer(const Reader& r, const json& j, const std::string& where, const std::string& t,
                     std::vector<Normalizer>& out) {
  if (t == "Prepend") {
    out.push_back({Normalizer::Prepend, r.str(j, "prepend", where), {}});
  } else if (t == "Replace") {
    out.push_back({Normalizer::Replace, r.str(j, "content", where), r.pattern(j, where)});
  } else if (t == "Strip") {
    Normalizer n{Normalizer::Strip, "", {}};
    n.left = r.flag(j, "strip_left", true, where), n.right = r.flag(j, "strip_right", true, where);
    out.push_back(n);
  } else if (t == "ByteLevel") {
    out.push_back({Normalizer::ByteLevel, "", {}});
  } else if (t == "NFC" || t == "NFD" || t == "NFKC" || t == "NFKD") {
    Normalizer n{Normalizer::Unicode, "", {}};
    n.form = unicode_form(t);
    out.push_back(n);
  } else {
    r.unsupported(where, t, "Sequence, Prepend, Replace, Strip, ByteLevel, NFC, NFD, NFKC or NFKD");
  }
}

Behavior read_behavior(const Reader& r, const json& j, const std::string& where) {
  std::string b = r.str(j, "behavior", where), l = b;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "removed") return Behavior::Removed;
  if (l == "isolated") return Behavior::Isolated;
  if (l == "merged_with_previous" || l == "mergedwithprevious") return Behavior::MergedWithPrevious;
  if (l == "merged_with_next" || l == "mergedwithnext") return Behavior::MergedWithNext;
  if (l == "contiguous") return Behavior::Contiguous;
  fail("{}: field '{}.behavior' must be Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous, got '{}'",
       r.file, where, b);
}

void read_pre_tokenizer(const Reader& r, const json& j, const std::string& where, const std::string& t,
                        std::vector<PreTokenizer>& out) {
  PreTokenizer p;
  if (t == "ByteLevel") {
    p.add_prefix_space = r.flag(j, "add_prefix_space", true, where);
    p.use_regex = r.flag(j, "use_regex", true, where);
  } else if (t == "Split") {
    p.kind = PreTokenizer::Split;
    p.pattern = r.pattern(j, where);
    p.behavior = read_behavior(r, j, where);
    p.invert = r.flag(j, "invert", false, where);
  } else if (t == "Metaspace") {
    p.kind = PreTokenizer::Metaspace;
    p.replacement.clear();
    append_utf8(p.replacement, r.one_char(j, "replacement", where));
    p.prepend = r.prepend_scheme(j, where);
    p.split = r.flag(j, "split", true, where);
  } else {
    r.unsupported(where, t, "Sequence, ByteLevel, Split or Metaspace");
  }
  out.push_back(std::move(p));
}

// Special tokens of RobertaProcessing/BertProcessing: ["</s>", 2]
std::vector<int32_t> read_token_pair(const Reader& r, const json& j, const std::string& key, const std::string& where) {
  const json& v = r.array(j, key, where);
  std::string field = Reader::join(where, key);
  if (v.size() != 2 || !v[0].is_string()) fail("{}: field '{}' must be [token, id]", r.file, field);
  return {r.id(v[1], field + "[1]")};
}

void read_post_processor(const Reader& r, const json& j, const std::string& where, const std::string& t,
                         std::vector<PostProcessor>& out) {
  PostProcessor p;
  if (t == "ByteLevel") {
    p.items = {{true, {}}};  // offsets only
  } else if (t == "RobertaProcessing" || t == "BertProcessing") {
    p.items = {{false, read_token_pair(r, j, "cls", where)}, {true, {}}, {false, read_token_pair(r, j, "sep", where)}};
  } else if (t == "TemplateProcessing") {
    const json& specials = r.object(j, "special_tokens", where);
    const json& single = r.array(j, "single", where);
    for (size_t i = 0; i < single.size(); ++i) {
      std::string field = fmt::format("{}.single[{}]", where, i);
      const json& piece = single[i];
      if (piece.is_object() && piece.contains("Sequence")) {
        std::string seq = r.str(r.object(piece, "Sequence", field), "id", field + ".Sequence");
        if (seq != "A") fail("{}: field '{}' uses sequence '{}' (a single sequence has only A)", r.file, field, seq);
        p.items.push_back({true, {}});
      } else if (piece.is_object() && piece.contains("SpecialToken")) {
        std::string name = r.str(r.object(piece, "SpecialToken", field), "id", field + ".SpecialToken");
        if (!specials.contains(name))
          fail("{}: field '{}' names '{}', which is not in {}.special_tokens", r.file, field, name, where);
        std::string sfield = fmt::format("{}.special_tokens.{}", where, name);
        const json& ids = r.array(specials.at(name), "ids", sfield);
        std::vector<int32_t> v;
        for (size_t k = 0; k < ids.size(); ++k) v.push_back(r.id(ids[k], fmt::format("{}.ids[{}]", sfield, k)));
        p.items.push_back({false, std::move(v)});
      } else {
        fail("{}: field '{}' must be {{\"Sequence\": ...}} or {{\"SpecialToken\": ...}}", r.file, field);
      }
    }
  } else {
    r.unsupported(where, t, "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing or Sequence");
  }
  out.push_back(std::move(p));
}

void read_decoder(const Reader& r, const json& j, const std::string& where, const std::string& t,
                  std::vector<Decoder>& out) {
  Decoder d;
  if (t == "ByteLevel") {
  } else if (t == "Replace") {
    d.kind = Decoder::Replace;
    d.pattern = r.pattern(j, where);
    d.content = r.str(j, "content", where);
  } else if (t == "ByteFallback") {
    d.kind = Decoder::ByteFallback;
  } else if (t == "Fuse") {
    d.kind = Decoder::Fuse;
  } else if (t == "Strip") {
    d.kind = Decoder::Strip;
    d.strip_char = r.one_char(j, "content", where);
    d.start = static_cast<size_t>(r.integer(r.get(j, "start", where), where + ".start", 0, INT32_MAX));
    d.stop = static_cast<size_t>(r.integer(r.get(j, "stop", where), where + ".stop", 0, INT32_MAX));
  } else if (t == "Metaspace") {
    d.kind = Decoder::Metaspace;
    d.replacement = r.one_char(j, "replacement", where);
    d.prepend = r.prepend_scheme(j, where) != Prepend::Never;
  } else {
    r.unsupported(where, t, "Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip or Metaspace");
  }
  out.push_back(std::move(d));
}

void read_bpe(const Reader& r, const json& j, Tokenizer::Impl& m) {
  Bpe& b = m.bpe;
  const json& vocab = r.object(j, "vocab", "model");
  b.vocab.reserve(vocab.size());
  b.vocab_r.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const std::string& s = m.strings.emplace_back(it.key());
    if (invalid_utf8_at(s) != std::string::npos) fail("{}: model.vocab has a key that is not valid UTF-8", r.file);
    const json& v = it.value();
    int32_t id = v.is_number_unsigned() && v.get<uint64_t>() <= INT32_MAX
                     ? static_cast<int32_t>(v.get<uint64_t>())
                     : r.id(v, "model.vocab['" + it.key() + "']");  // fails with the message
    b.vocab[s] = id;
    b.vocab_r[id] = s;
  }
  const json& merges = r.array(j, "merges", "model");
  b.merges.reserve(merges.size());
  int32_t rank = 0;
  std::string joined;
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& e = merges[i];
    std::string_view a, c;
    if (e.is_string()) {  // "a b"
      std::string_view s = e.get_ref<const std::string&>();
      if (s.substr(0, 8) == "#version") continue;
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("{}: model.merges[{}] must be two tokens separated by one space, got '{}'", r.file, i, s);
      a = s.substr(0, sp), c = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get_ref<const std::string&>(), c = e[1].get_ref<const std::string&>();
    } else {
      fail("{}: model.merges[{}] must be \"a b\" or [\"a\", \"b\"]", r.file, i);
    }
    auto find = [&](std::string_view s) {
      auto it = b.vocab.find(s);
      if (it == b.vocab.end()) fail("{}: model.merges[{}] uses '{}', which is not in model.vocab", r.file, i, s);
      return it->second;
    };
    int32_t ia = find(a), ic = find(c);
    // As Rust: the merged token is a + c without the prefix's length (continuing_subword_prefix).
    joined.assign(a).append(c.substr(std::min(b.prefix.size(), c.size())));
    b.merges[Bpe::key(ia, ic)] = {rank++, find(joined)};
  }
}
}  // namespace

Tokenizer Tokenizer::load(const std::string& path) { return parse(read_text_file(path), path); }

Tokenizer Tokenizer::parse(const std::string& text, const std::string& path) {
  json j = parse_json(text, path);
  Reader r{path};
  if (!j.is_object()) fail("{}: expected a JSON object, got {}", path, j.type_name());
  auto m = std::make_shared<Impl>();
  m->path = path;

  // model
  const json& model = r.object(j, "model", "");
  std::string mtype = r.str_or(model, "type", "BPE", "model");
  if (mtype != "BPE") r.unsupported("model", mtype, "BPE");
  Bpe& b = m->bpe;
  if (const json* d = r.find(model, "dropout"))
    if (!d->is_number() || d->get<double>() != 0.0)
      fail("{}: model.dropout must be null or 0 (BPE dropout is not supported)", path);
  if (r.find(model, "unk_token")) b.unk_token = r.str(model, "unk_token", "model");
  b.fuse_unk = r.flag(model, "fuse_unk", false, "model");
  b.byte_fallback = r.flag(model, "byte_fallback", false, "model");
  b.ignore_merges = r.flag(model, "ignore_merges", false, "model");
  b.prefix = r.str_or(model, "continuing_subword_prefix", "", "model");
  b.suffix = r.str_or(model, "end_of_word_suffix", "", "model");
  read_bpe(r, model, *m);
  if (b.unk_token) {
    auto it = b.vocab.find(*b.unk_token);
    if (it != b.vocab.end()) b.unk_id = it->second;
  }
  for (int c = 0; c < 256; ++c) {
    auto it = b.vocab.find(fmt::format("<0x{:02X}>", c));
    b.byte_ids[c] = it == b.vocab.end() ? -1 : it->second;
  }

  if (const json* n = r.find(j, "normalizer"))
    read_step(r, *n, "normalizer", "normalizers", m->normalizers, read_normalizer);
  if (const json* p = r.find(j, "pre_tokenizer"))
    read_step(r, *p, "pre_tokenizer", "pretokenizers", m->pre_tokenizers, read_pre_tokenizer);
  if (const json* p = r.find(j, "post_processor"))
    read_step(r, *p, "post_processor", "processors", m->post_processors, read_post_processor);
  if (const json* d = r.find(j, "decoder")) {
    read_step(r, *d, "decoder", "decoders", m->decoders, read_decoder);
    m->has_decoder = true;
  }

  // added tokens (AddedVocabulary::add_tokens: the model's id, else the next one after the model)
  m->vocab_count = static_cast<int64_t>(b.vocab.size());
  if (const json* list = r.find(j, "added_tokens")) {
    if (!list->is_array()) r.wrong_type("added_tokens", "an array", *list);
    int64_t next_id = static_cast<int64_t>(b.vocab.size());
    for (size_t i = 0; i < list->size(); ++i) {
      std::string where = fmt::format("added_tokens[{}]", i);
      const json& e = (*list)[i];
      if (!e.is_object()) r.wrong_type(where, "an object", e);
      AddedToken t;
      t.content = r.str(e, "content", where);
      if (t.content.empty()) continue;
      if (invalid_utf8_at(t.content) != std::string::npos) fail("{}: {}.content is not valid UTF-8", path, where);
      t.special = r.flag(e, "special", false, where);
      t.single_word = r.flag(e, "single_word", false, where);
      t.lstrip = r.flag(e, "lstrip", false, where);
      t.rstrip = r.flag(e, "rstrip", false, where);
      t.normalized = r.flag(e, "normalized", !t.special, where);
      auto known = m->added_ids.find(t.content);
      auto in_model = b.vocab.find(t.content);
      if (known != m->added_ids.end())
        t.id = known->second;
      else if (in_model != b.vocab.end())
        t.id = in_model->second;
      else if (next_id > INT32_MAX)
        fail("{}: too many added tokens", path);
      else
        t.id = static_cast<int32_t>(next_id++);
      t.form = t.content;
      if (t.normalized)
        for (const auto& n : m->normalizers) n.apply(t.form);
      if (known == m->added_ids.end() && in_model == b.vocab.end()) ++m->vocab_count;
      m->added_ids[t.content] = t.id;
      if (t.special) m->special.insert(t.content);
      auto slot = m->added_by_id.find(t.id);
      if (slot != m->added_by_id.end()) {
        m->added[slot->second] = t;
      } else {
        m->added_by_id[t.id] = m->added.size();
        m->added.push_back(t);
      }
    }
  }
  for (size_t i = 0; i < m->added.size(); ++i) {
    const AddedToken& t = m->added[i];
    if (t.form.empty()) continue;
    (t.normalized ? m->normalized_trie : m->raw_trie).add(t.form, static_cast<int32_t>(i));
  }

  // bos/eos: the special tokens the post-processor puts before and after the text
  for (const auto& p : m->post_processors) {
    bool seen_sequence = false;
    for (const auto& item : p.items) {
      if (item.sequence) {
        seen_sequence = true;
      } else if (!item.ids.empty()) {
        auto& slot = seen_sequence ? m->eos : m->bos;
        if (!slot) slot = item.ids.front();
      }
    }
  }
  auto named = [&](std::initializer_list<const char*> names) -> std::optional<int64_t> {
    for (const char* n : names) {
      auto it = m->added_ids.find(n);
      if (it != m->added_ids.end()) return it->second;
    }
    return std::nullopt;
  };
  if (!m->bos) m->bos = named({"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"});
  if (!m->eos) m->eos = named({"</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"});
  return Tokenizer(std::move(m));
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  const Impl& m = *impl_;
  size_t bad = invalid_utf8_at(text);
  if (bad != std::string::npos) fail("text to encode is not valid UTF-8 (byte {})", bad);

  // AddedVocabulary::extract_and_normalize
  std::vector<Piece> pieces = m.find_added(std::string(text), true, m.raw_trie);
  if (!m.normalizers.empty() || !m.normalized_trie.empty()) {
    std::vector<Piece> next;
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        next.push_back(std::move(p));
        continue;
      }
      for (const auto& n : m.normalizers) n.apply(p.text);
      for (Piece& q : m.find_added(std::move(p.text), p.at_start, m.normalized_trie)) next.push_back(std::move(q));
    }
    pieces = std::move(next);
  }
  for (const auto& pt : m.pre_tokenizers) pt.apply(pieces);

  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const Piece& p : pieces) {
    if (p.id >= 0)
      ids.push_back(p.id);
    else
      m.bpe_word(p.text, ids);
  }
  for (const auto& pp : m.post_processors) {
    std::vector<int64_t> out;
    out.reserve(ids.size() + 4);
    for (const auto& item : pp.items) {
      if (item.sequence)
        out.insert(out.end(), ids.begin(), ids.end());
      else if (add_special_tokens)
        out.insert(out.end(), item.ids.begin(), item.ids.end());
    }
    ids = std::move(out);
  }
  return ids;
}

std::optional<std::string> Tokenizer::id_to_token(int64_t id) const {
  const Impl& m = *impl_;
  if (id < 0 || id > INT32_MAX) return std::nullopt;
  auto a = m.added_by_id.find(static_cast<int32_t>(id));
  if (a != m.added_by_id.end()) return m.added[a->second].form;
  auto v = m.bpe.vocab_r.find(static_cast<int32_t>(id));
  if (v != m.bpe.vocab_r.end()) return std::string(v->second);
  return std::nullopt;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int64_t id : ids) {
    auto t = id_to_token(id);
    if (!t || (skip_special_tokens && m.special.count(*t))) continue;
    tokens.push_back(std::move(*t));
  }
  std::string out;
  if (!m.has_decoder) {
    for (size_t i = 0; i < tokens.size(); ++i) out.append(i ? " " : "").append(tokens[i]);
    return out;
  }
  for (const auto& d : m.decoders) d.apply(tokens);
  for (const auto& t : tokens) out += t;
  return out;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_count; }

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  const Impl& m = *impl_;
  auto a = m.added_ids.find(token);
  if (a != m.added_ids.end()) return a->second;
  auto v = m.bpe.vocab.find(token);
  if (v != m.bpe.vocab.end()) return v->second;
  return std::nullopt;
}

std::optional<int64_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int64_t> Tokenizer::eos_id() const { return impl_->eos; }

}  // namespace crash
