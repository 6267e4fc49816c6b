// A small RAII layer over the HDF5 C API: files, groups, datasets from tensors, attributes.
#pragma once
#include <hdf5.h>
#include <torch/types.h>

#include <string>
#include <vector>

namespace crash {

// Owns one HDF5 identifier and closes it with the right H5*close.
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  H5Id(H5Id&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  H5Id& operator=(H5Id&& o) noexcept;
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }
  void reset();
  // Forgets the identifier without closing it (closing a parallel file is collective, and a
  // failing rank must not wait for peers that are elsewhere).
  void release() { id_ = -1; }
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

// An HDF5 file written by one process, created under `path + ".tmp"` and renamed by commit(),
// so a crash never leaves a file that looks finished.
class H5Writer {
 public:
  explicit H5Writer(const std::string& path, bool overwrite);
  ~H5Writer();
  void write(const std::string& name, const torch::Tensor& t);  // creates parent groups
  void attribute(const std::string& object, const std::string& key, const std::string& value);
  void attribute(const std::string& object, const std::string& key, int64_t value);
  void commit();

 private:
  hid_t ensure_parent(const std::string& name);
  std::string path_, tmp_;
  H5Id file_;
  bool committed_ = false;
};

// Reads a whole dataset (float32, float64, int64 or int32) as a tensor.
torch::Tensor h5_read(const std::string& path, const std::string& name);

// Attributes of an open file, group or dataset, one value each (a scalar or a one-element array).
// An attribute that is absent, of another kind or unreadable gives `missing`.
// Any integer (or float, converted) as int64.
int64_t h5_int_attribute(hid_t object, const std::string& key, int64_t missing = -1);
// Text stored either way HDF5 allows: variable-length (as h5py, H5Writer and the archive write
// it) or fixed-length (NUL-padded, as numpy bytes or other tools write it), ASCII or UTF-8.
std::string h5_text_attribute(hid_t object, const std::string& key, const std::string& missing = "");

}  // namespace crash
