// The safetensors header: parsed and validated from the file's bytes, without LibTorch (the
// fuzz target links only this file and json_fields.cpp).
#include "framework/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>

#include "framework/json_fields.h"
#include "parallel/errors.h"

namespace crash {

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t safetensors_dtype_size(const std::string& d) {
  static const std::map<std::string, size_t> sizes = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1},
                                                      {"U16", 2}, {"U32", 4}, {"U64", 8}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

namespace {

void parse_header(const std::string& path, const char* text, size_t size, uint64_t data_size,
                  std::map<std::string, TensorInfo>& tensors, std::map<std::string, std::string>& metadata) {
  check_json_depth(std::string_view(text, size), path);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + size);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: safetensors header is not valid JSON (byte {})", path, e.byte);
  } catch (const nlohmann::json::exception& e) {  // a number too large for a double, ...
    fail("{}: safetensors header is not valid JSON ({})", path, e.what());
  }
  if (!header.is_object()) fail("{}: safetensors header must be a JSON object", path);
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("{}: __metadata__ must be an object of strings", path);
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) fail("{}: __metadata__ field '{}' must be a string", path, k);
        metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail("{}: tensor '{}' needs dtype, shape and data_offsets", path, name);
    TensorInfo t;
    t.name = name;
    if (!entry["dtype"].is_string()) fail("{}: tensor '{}': dtype must be a string", path, name);
    t.dtype = entry["dtype"].get<std::string>();
    size_t esize = safetensors_dtype_size(t.dtype);
    if (esize == 0) fail("{}: tensor '{}': unknown dtype '{}'", path, name, t.dtype);
    const auto& shape = entry["shape"];
    if (!shape.is_array()) fail("{}: tensor '{}': shape must be an array", path, name);
    for (const auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        fail("{}: tensor '{}': shape entries must be non-negative integers", path, name);
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("{}: tensor '{}': data_offsets must be two non-negative integers", path, name);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size)
      fail("{}: tensor '{}': data_offsets [{}, {}) out of range (data section holds {} bytes; file truncated?)", path,
           name, t.begin, t.end, data_size);
    // Shape times element size must equal the byte length. The product is capped as it grows
    // (a 128-bit product of several huge dimensions could wrap back to the span); a zero
    // dimension makes it 0 however large the others are.
    const bool empty = std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end();
    unsigned __int128 bytes = empty ? 0 : esize;
    for (int64_t d : t.shape) {
      if (empty) break;
      bytes *= static_cast<uint64_t>(d);
      if (bytes > data_size) break;
    }
    if (bytes != t.end - t.begin)
      fail("{}: tensor '{}': shape {} of {} needs {} bytes but data_offsets span {}", path, name, shape.dump(), t.dtype,
           static_cast<uint64_t>(bytes), t.end - t.begin);
    tensors.emplace(name, std::move(t));
  }
  std::vector<const TensorInfo*> order;
  for (auto& [n, t] : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i]->begin < order[i - 1]->end)
      fail("{}: tensors '{}' and '{}' overlap in the data section", path, order[i - 1]->name, order[i]->name);
}

}  // namespace

uint64_t parse_safetensors_header(const std::string& path, const uint8_t* bytes, uint64_t file_size,
                                  std::map<std::string, TensorInfo>& tensors,
                                  std::map<std::string, std::string>& metadata) {
  if (file_size < 8) fail("{}: truncated safetensors file ({} bytes, the header size alone takes 8)", path, file_size);
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes, 8);  // little-endian, as the format and x86/ARM are
  if (header_size > file_size - 8)
    fail("{}: header claims {} bytes but the file has {} after the size field (truncated?)", path, header_size,
         file_size - 8);
  parse_header(path, reinterpret_cast<const char*>(bytes + 8), header_size, file_size - 8 - header_size, tensors,
               metadata);
  return header_size;
}

}  // namespace crash
