// The safetensors format: a memory-mapped, validated reader and an atomic writer.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "framework/safetensors_header.h"

namespace crash {

torch::ScalarType scalar_type_of(const std::string& dtype, const std::string& source);
std::string safetensors_dtype_of(torch::ScalarType t);

// A safetensors file mapped read-only (copy-on-write, so a stray write never reaches the file).
// The header is validated when the file is opened; views stay valid while the object lives.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;

  // A tensor aliasing the mapping, no bytes read yet. Narrowing it and copying the result
  // reads only the narrowed bytes: that is how a rank reads its tensor-parallel slice.
  torch::Tensor view(const std::string& name) const;
  // An owned copy (in the stored dtype).
  torch::Tensor read(const std::string& name) const;
  // An owned copy of `length` entries from `start` along `dim`.
  torch::Tensor read_slice(const std::string& name, int64_t dim, int64_t start, int64_t length) const;

  // Releases the resident pages of a tensor's bytes (they are read again if needed).
  void drop_pages(const std::string& name) const;
  // Pointer to the first byte of the data section (for tests that inspect page residency).
  const uint8_t* data() const { return data_; }
  uint64_t data_size() const { return data_size_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  uint8_t* data_ = nullptr;
  uint64_t data_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any device/dtype; stored as they are) to `path` through a temporary file
// renamed when complete.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace crash
