// Encode speed of a tokenizer.json on a text file; prints one JSON line (see bench/tokenizer.py).
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

#include "framework/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: bench_tokenizer TOKENIZER.json TEXT\n";
    return 2;
  }
  auto tok = crash::Tokenizer::load(argv[1]);
  std::ifstream in(argv[2]);
  std::stringstream s;
  s << in.rdbuf();
  const std::string text = s.str();
  auto t0 = std::chrono::steady_clock::now();
  auto ids = tok.encode(text, false);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "{\"mb_per_s\": " << text.size() / 1e6 / secs << ", \"tokens\": " << ids.size() << "}" << std::endl;
}
