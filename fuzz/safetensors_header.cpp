// libFuzzer target: the safetensors header parser on arbitrary file bytes. A UserError is the
// expected answer to bad bytes; anything else (a crash, a sanitizer report, another exception)
// is a bug. Accepted headers are checked to describe spans inside the file.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>

#include "framework/safetensors_header.h"
#include "parallel/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::map<std::string, crash::TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  try {
    const uint64_t header = crash::parse_safetensors_header("fuzz.safetensors", data, size, tensors, metadata);
    const uint64_t data_size = size - 8 - header;
    for (const auto& [name, t] : tensors) {
      if (t.begin > t.end || t.end > data_size) std::abort();
      // The span's bytes are what a reader will touch: read them so ASan sees any overrun.
      volatile uint8_t sink = 0;
      for (uint64_t i = t.begin; i < t.end; i += 4096) sink ^= data[8 + header + i];
      if (static_cast<uint64_t>(t.numel()) * crash::safetensors_dtype_size(t.dtype) != t.end - t.begin) std::abort();
    }
  } catch (const crash::UserError&) {
  }
  return 0;
}
