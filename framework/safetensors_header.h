// The header of a safetensors file (an 8-byte little-endian size, then a JSON object of
// tensors), parsed from bytes: every check a hostile file needs before its data is touched.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace crash {

struct TensorInfo {
  std::string name;
  std::string dtype;  // as written in the header: F32, F16, BF16, I64, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  uint64_t end = 0;
  int64_t numel() const;
};

// Bytes of one element of a safetensors dtype; 0 when the dtype is unknown.
size_t safetensors_dtype_size(const std::string& dtype);

// Validates the `file_size` bytes of a whole safetensors file (sizes, offsets within the data
// section, shapes matching spans, no overlaps) and fills `tensors` and `metadata`; returns the
// header's size. Throws UserError naming `path` and the entry.
uint64_t parse_safetensors_header(const std::string& path, const uint8_t* bytes, uint64_t file_size,
                                  std::map<std::string, TensorInfo>& tensors,
                                  std::map<std::string, std::string>& metadata);

}  // namespace crash
