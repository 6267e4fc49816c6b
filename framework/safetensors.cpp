#include "framework/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "parallel/errors.h"

namespace crash {

torch::ScalarType scalar_type_of(const std::string& d, const std::string& source) {
  static const std::map<std::string, torch::ScalarType> types = {
      {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},   {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  auto it = types.find(d);
  if (it == types.end()) fail("{}: dtype '{}' cannot be loaded as a tensor", source, d);
  return it->second;
}

std::string safetensors_dtype_of(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat64: return "F64";
    case torch::kFloat32: return "F32";
    case torch::kFloat16: return "F16";
    case torch::kBFloat16: return "BF16";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kInt16: return "I16";
    case torch::kInt8: return "I8";
    case torch::kUInt8: return "U8";
    case torch::kBool: return "BOOL";
    default: fail("safetensors: cannot store tensors of type {}", c10::toString(t));
  }
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open ({})", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("{}: cannot stat ({})", path, std::strerror(errno));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file ({} bytes, the header size alone takes 8)", path, file_size);
  }
  map_size_ = file_size;
  map_ = ::mmap(nullptr, map_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail("{}: cannot map ({})", path, std::strerror(errno));
  }
  // Pages come in only when a tensor asks for them (see view()).
  ::madvise(map_, map_size_, MADV_RANDOM);
  auto* bytes = static_cast<uint8_t*>(map_);
  try {
    const uint64_t header_size = parse_safetensors_header(path, bytes, file_size, tensors_, metadata_);
    data_ = bytes + 8 + header_size;
    data_size_ = file_size - 8 - header_size;
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("{}: no tensor named '{}'", path_, name);
  return it->second;
}

torch::Tensor SafetensorsFile::view(const std::string& name) const {
  const TensorInfo& t = info(name);
  auto type = scalar_type_of(t.dtype, path_);
  return torch::from_blob(data_ + t.begin, t.shape, torch::TensorOptions().dtype(type));
}

torch::Tensor SafetensorsFile::read(const std::string& name) const {
  const TensorInfo& t = info(name);
  ::madvise(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(data_ + t.begin) & ~uintptr_t(4095)),
            t.end - t.begin + 4096, MADV_WILLNEED);
  return view(name).clone();
}

void SafetensorsFile::drop_pages(const std::string& name) const {
  const TensorInfo& t = info(name);
  const uintptr_t page = 4096;
  auto begin = (reinterpret_cast<uintptr_t>(data_ + t.begin) + page - 1) & ~(page - 1);  // whole pages inside
  auto end = reinterpret_cast<uintptr_t>(data_ + t.end) & ~(page - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

torch::Tensor SafetensorsFile::read_slice(const std::string& name, int64_t dim, int64_t start, int64_t length) const {
  const TensorInfo& t = info(name);
  int64_t rank = static_cast<int64_t>(t.shape.size());
  if (dim < 0 || dim >= rank)
    fail("{}: tensor '{}' has {} dimensions, cannot slice dimension {}", path_, name, rank, dim);
  if (start < 0 || length < 0 || start + length > t.shape[dim])
    fail("{}: tensor '{}': slice [{}, {}) of dimension {} is out of range (size {})", path_, name, start,
         start + length, dim, t.shape[dim]);
  return view(name).narrow(dim, start, length).clone(at::MemoryFormat::Contiguous);
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", safetensors_dtype_of(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  const std::string tmp = staging_path(path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("{}: cannot create file", tmp);
    uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& t : contiguous)
      out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      fail("{}: write failed (disk full?)", tmp);
    }
  }
  rename_into_place(tmp, path);
}

}  // namespace crash
