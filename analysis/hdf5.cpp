#include "analysis/hdf5.h"

#include <cstdio>
#include <filesystem>

#include "framework/atomic_file.h"
#include "parallel/errors.h"

namespace crash {

H5Id& H5Id::operator=(H5Id&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    close_ = o.close_;
    o.id_ = -1;
  }
  return *this;
}

void H5Id::reset() {
  if (id_ >= 0 && close_) close_(id_);
  id_ = -1;
}

namespace {

hid_t h5_type(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return H5T_NATIVE_FLOAT;
    case torch::kFloat64: return H5T_NATIVE_DOUBLE;
    case torch::kInt64: return H5T_NATIVE_INT64;
    case torch::kInt32: return H5T_NATIVE_INT32;
    case torch::kUInt8: return H5T_NATIVE_UINT8;
    default: fail("HDF5: cannot store tensors of type {}", c10::toString(t));
  }
}

}  // namespace

H5Writer::H5Writer(const std::string& path, bool overwrite) : path_(path), tmp_(staging_path(path)) {
  if (!overwrite && std::filesystem::exists(path)) fail("{}: output exists (pass --overwrite to replace it)", path);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  file_ = H5Id(H5Fcreate(tmp_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  if (file_.get() < 0) fail("{}: cannot create HDF5 file", tmp_);
}

H5Writer::~H5Writer() {
  if (!committed_) {
    file_.reset();
    std::remove(tmp_.c_str());
  }
}

hid_t H5Writer::ensure_parent(const std::string& name) {
  size_t pos = 0;
  while ((pos = name.find('/', pos + 1)) != std::string::npos) {
    std::string group = name.substr(0, pos);
    if (group.empty() || H5Lexists(file_, group.c_str(), H5P_DEFAULT) > 0) continue;
    H5Id g(H5Gcreate2(file_, group.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    if (g.get() < 0) fail("{}: cannot create group {}", tmp_, group);
  }
  return file_;
}

void H5Writer::write(const std::string& name, const torch::Tensor& tensor) {
  ensure_parent(name);
  auto t = tensor.detach().to(torch::kCPU).contiguous();
  std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
  H5Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  hid_t mem_type = h5_type(t.scalar_type());
  H5Id set(H5Dcreate2(file_, name.c_str(), mem_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (set.get() < 0) fail("{}: cannot create dataset {}", tmp_, name);
  if (t.numel() > 0 && H5Dwrite(set, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
    fail("{}: writing dataset {} failed (disk full?)", tmp_, name);
}

void H5Writer::attribute(const std::string& object, const std::string& key, const std::string& value) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, H5T_VARIABLE);  // h5py reads variable-length strings as str
  H5Tset_cset(type, H5T_CSET_UTF8);
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr(H5Acreate_by_name(file_, object.c_str(), key.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
            H5Aclose);
  const char* text = value.c_str();
  if (attr.get() < 0 || H5Awrite(attr, type, &text) < 0) fail("{}: cannot write attribute {}", tmp_, key);
}

void H5Writer::attribute(const std::string& object, const std::string& key, int64_t value) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr(H5Acreate_by_name(file_, object.c_str(), key.c_str(), H5T_NATIVE_INT64, space, H5P_DEFAULT, H5P_DEFAULT,
                              H5P_DEFAULT),
            H5Aclose);
  if (attr.get() < 0 || H5Awrite(attr, H5T_NATIVE_INT64, &value) < 0) fail("{}: cannot write attribute {}", tmp_, key);
}

void H5Writer::commit() {
  if (H5Fflush(file_, H5F_SCOPE_GLOBAL) < 0) fail("{}: flush failed (disk full?)", tmp_);
  file_.reset();
  rename_into_place(tmp_, path_);
  committed_ = true;
}

namespace {

// The attribute `key` of `object` when it holds exactly one value; an invalid H5Id otherwise.
H5Id open_single(hid_t object, const std::string& key) {
  if (H5Aexists(object, key.c_str()) <= 0) return {};
  H5Id attr(H5Aopen(object, key.c_str(), H5P_DEFAULT), H5Aclose);
  if (attr.get() < 0) return {};
  H5Id space(H5Aget_space(attr), H5Sclose);
  if (space.get() < 0 || H5Sget_simple_extent_npoints(space) != 1) return {};
  return attr;
}

}  // namespace

int64_t h5_int_attribute(hid_t object, const std::string& key, int64_t missing) {
  H5Id attr = open_single(object, key);
  if (attr.get() < 0) return missing;
  H5Id type(H5Aget_type(attr), H5Tclose);
  const H5T_class_t kind = H5Tget_class(type);
  if (kind != H5T_INTEGER && kind != H5T_FLOAT) return missing;
  int64_t v = missing;
  if (H5Aread(attr, H5T_NATIVE_INT64, &v) < 0) return missing;
  return v;
}

std::string h5_text_attribute(hid_t object, const std::string& key, const std::string& missing) {
  H5Id attr = open_single(object, key);
  if (attr.get() < 0) return missing;
  H5Id type(H5Aget_type(attr), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING) return missing;
  H5Id mem(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_cset(mem, H5Tget_cset(type));  // HDF5 does not convert between character sets
  if (H5Tis_variable_str(type) > 0) {
    H5Tset_size(mem, H5T_VARIABLE);
    char* text = nullptr;
    if (H5Aread(attr, mem, &text) < 0) return missing;
    std::string out = text ? text : "";
    H5free_memory(text);
    return out;
  }
  // Fixed length n: read as n + 1 bytes, NUL-terminated, so a string that fills all n survives.
  const size_t n = H5Tget_size(type);
  H5Tset_size(mem, n + 1);
  std::string out(n + 1, '\0');
  if (H5Aread(attr, mem, out.data()) < 0) return missing;
  return out.c_str();
}

torch::Tensor h5_read(const std::string& path, const std::string& name) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (file.get() < 0) fail("{}: cannot open HDF5 file", path);
  H5Id set(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (set.get() < 0) fail("{}: no dataset {}", path, name);
  H5Id space(H5Dget_space(set), H5Sclose);
  int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  H5Id type(H5Dget_type(set), H5Tclose);
  torch::ScalarType st = torch::kFloat32;
  hid_t mem = H5T_NATIVE_FLOAT;
  if (H5Tget_class(type) == H5T_INTEGER) {
    st = H5Tget_size(type) == 8 ? torch::kInt64 : torch::kInt32;
    mem = st == torch::kInt64 ? H5T_NATIVE_INT64 : H5T_NATIVE_INT32;
  } else if (H5Tget_size(type) == 8) {
    st = torch::kFloat64;
    mem = H5T_NATIVE_DOUBLE;
  }
  std::vector<int64_t> shape(dims.begin(), dims.end());
  auto t = torch::empty(shape, torch::TensorOptions().dtype(st));
  if (t.numel() > 0 && H5Dread(set, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()) < 0)
    fail("{}: reading dataset {} failed", path, name);
  return t;
}

}  // namespace crash
