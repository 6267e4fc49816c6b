#include "analysis/archive.h"

#include <filesystem>

#include "framework/atomic_file.h"
#include "parallel/comm_mpi.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

namespace {

// IEEE half precision as a file type (HDF5 1.10 has no predefined one; h5py reads it as float16).
H5Id half_type() {
  H5Id t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_ebias(t, 15);
  H5Tset_size(t, 2);
  return t;
}

void set_text(hid_t obj, const std::string& key, const std::string& value) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  if (H5Aexists(obj, key.c_str()) > 0) H5Adelete(obj, key.c_str());
  H5Id attr(H5Acreate2(obj, key.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  const char* text = value.c_str();
  H5Awrite(attr, type, &text);
}

void set_int(hid_t obj, const std::string& key, int64_t value) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  if (H5Aexists(obj, key.c_str()) > 0) {
    H5Id attr(H5Aopen(obj, key.c_str(), H5P_DEFAULT), H5Aclose);
    H5Awrite(attr, H5T_NATIVE_INT64, &value);
    return;
  }
  H5Id attr(H5Acreate2(obj, key.c_str(), H5T_NATIVE_INT64, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5Awrite(attr, H5T_NATIVE_INT64, &value);
}

H5Id make_set(hid_t file, const std::string& name, hid_t type, std::vector<hsize_t> dims, size_t element_bytes) {
  H5Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  // Chunks of about 2 MiB: whole rows, as many as fit.
  std::vector<hsize_t> chunk = dims;
  hsize_t row_bytes = element_bytes;
  for (size_t i = 1; i < dims.size(); ++i) row_bytes *= dims[i];
  chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], (2u << 20) / std::max<hsize_t>(1, row_bytes)));
  if (dims[0] > 0) H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
  H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
  // Every chunk exists from the start, so writing rows never changes the file's metadata and a
  // kill in the middle leaves the header as it was made.
  H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY);
  H5Id lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl, 1);
  H5Id set(H5Dcreate2(file, name.c_str(), type, space, lcpl, dcpl, H5P_DEFAULT), H5Dclose);
  if (set.get() < 0) fail("HDF5: cannot create dataset {}", name);
  return set;
}

}  // namespace

ActivationArchive::ActivationArchive(const std::string& path, const ArchiveSpec& spec, const CommPtr& comm, bool resume,
                                     bool overwrite)
    : path_(path), partial_(path + ".partial"), comm_(comm), parallel_(comm->size() > 1), widths_(spec.widths) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  if (std::filesystem::exists(path) && !overwrite) fail("{}: output exists (pass --overwrite to replace it)", path);
  if (resume && !std::filesystem::exists(partial_))
    fail("{}: nothing to resume (no {} from an interrupted run)", path, partial_);
  H5Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  xfer_ = H5Id(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
  if (parallel_) {
    H5Pset_fapl_mpio(fapl, mpi_handle(*comm), MPI_INFO_NULL);
    H5Pset_all_coll_metadata_ops(fapl, true);
    H5Pset_coll_metadata_write(fapl, true);
    H5Pset_dxpl_mpio(xfer_, H5FD_MPIO_COLLECTIVE);
  }
  if (resume) {
    file_ = H5Id(H5Fopen(partial_.c_str(), H5F_ACC_RDWR, fapl), H5Fclose);
    if (file_.get() < 0)
      fail("{}: cannot reopen the interrupted archive (damaged?); start again without --resume", partial_);
    open_existing(spec);
  } else {
    // The header is made in PATH.partial.new, closed, and only then renamed: a PATH.partial
    // always opens, however early a run is killed.
    const std::string fresh = partial_ + ".new";
    comm->barrier();
    file_ = H5Id(H5Fcreate(fresh.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
    if (file_.get() < 0) fail("{}: cannot create HDF5 file", fresh);
    create(spec);
    close_and_rename(fresh, partial_);
    file_ = H5Id(H5Fopen(partial_.c_str(), H5F_ACC_RDWR, fapl), H5Fclose);
    if (file_.get() < 0) fail("{}: cannot open the archive just made", partial_);
    open_existing(spec);
  }
}

ActivationArchive::~ActivationArchive() {
  if (completed_ || !parallel_) return;
  // Unwinding after a failure: closing would be collective and could wait forever for peers
  // that are in another collective. The file stays PATH.partial, flushed after each round.
  for (auto& l : layers_) l.release();
  index_set_.release();
  hash_set_.release();
  done_set_.release();
  xfer_.release();
  file_.release();
}

void ActivationArchive::create(const ArchiveSpec& spec) {
  const bool half = spec.dtype == "float16";
  H5Id f16 = half_type();
  hid_t store = half ? f16.get() : H5T_IEEE_F32LE;
  const hsize_t rows = spec.pooled ? spec.num_examples : static_cast<hsize_t>(spec.offsets.back());
  for (size_t l = 0; l < spec.widths.size(); ++l)
    layers_.push_back(make_set(file_, "layers/" + std::to_string(l), store,
                               {rows, static_cast<hsize_t>(spec.widths[l])}, half ? 2 : 4));
  const hsize_t n = spec.num_examples;
  index_set_ = make_set(file_, "example_index", H5T_STD_I64LE, {n}, 8);
  hash_set_ = make_set(file_, "example_hash", H5T_STD_U64LE, {n}, 8);
  done_set_ = make_set(file_, "blocks_done", H5T_STD_U8LE, {static_cast<hsize_t>(spec.num_blocks())}, 1);
  done_.assign(static_cast<size_t>(spec.num_blocks()), 0);
  // Everyone writes the same zeros; collective writes need every rank.
  write_rows(done_set_, H5T_NATIVE_UINT8, comm_->rank() == 0 ? 0 : -1, spec.num_blocks(), 1, done_.data());
  if (!spec.pooled) {
    H5Id offsets = make_set(file_, "index", H5T_STD_I64LE, {n + 1}, 8);
    write_rows(offsets, H5T_NATIVE_INT64, comm_->rank() == 0 ? 0 : -1, n + 1, 1, spec.offsets.data());
  }
  for (const auto& [k, v] : spec.text_attributes) set_text(file_, k, v);
  set_text(file_, "dtype", spec.dtype);
  set_int(file_, "num_examples", spec.num_examples);
  set_int(file_, "num_layers", static_cast<int64_t>(spec.widths.size()));
  set_int(file_, "block_size", spec.block_size);
  set_int(file_, "pooled", spec.pooled ? 1 : 0);
  set_int(file_, "complete", 0);
  H5Fflush(file_, H5F_SCOPE_GLOBAL);
}

void ActivationArchive::open_existing(const ArchiveSpec& spec) {
  auto differs = [&](const std::string& what, const std::string& was, const std::string& now) {
    if (was != now) fail("{}: cannot resume: {} was '{}' in the interrupted run, now '{}'", partial_, what, was, now);
  };
  for (const auto& [k, v] : spec.text_attributes)
    if (k != "grid" && k != "tool_version") differs(k, h5_text_attribute(file_, k), v);
  differs("dtype", h5_text_attribute(file_, "dtype"), spec.dtype);
  auto stored = [&](const char* key) { return std::to_string(h5_int_attribute(file_, key)); };
  differs("number of examples", stored("num_examples"), std::to_string(spec.num_examples));
  differs("block size", stored("block_size"), std::to_string(spec.block_size));
  differs("pooling of rows", stored("pooled"), std::to_string(spec.pooled ? 1 : 0));
  for (size_t l = 0; l < spec.widths.size(); ++l) {
    layers_.emplace_back(H5Dopen2(file_, ("layers/" + std::to_string(l)).c_str(), H5P_DEFAULT), H5Dclose);
    if (layers_.back().get() < 0) fail("{}: cannot resume: no dataset layers/{}", partial_, l);
  }
  index_set_ = H5Id(H5Dopen2(file_, "example_index", H5P_DEFAULT), H5Dclose);
  hash_set_ = H5Id(H5Dopen2(file_, "example_hash", H5P_DEFAULT), H5Dclose);
  done_set_ = H5Id(H5Dopen2(file_, "blocks_done", H5P_DEFAULT), H5Dclose);
  if (index_set_.get() < 0 || hash_set_.get() < 0 || done_set_.get() < 0)
    fail("{}: cannot resume: damaged archive", partial_);
  done_.assign(static_cast<size_t>(spec.num_blocks()), 0);
  H5Dread(done_set_, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, xfer_, done_.data());
}

void ActivationArchive::check_hashes(const std::vector<uint64_t>& hashes) const {
  std::vector<uint64_t> stored(hashes.size());
  H5Dread(hash_set_, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, xfer_, stored.data());
  const int64_t B = static_cast<int64_t>(hashes.size() + done_.size() - 1) / static_cast<int64_t>(done_.size());
  for (size_t b = 0; b < done_.size(); ++b) {
    if (!done_[b]) continue;
    for (size_t i = b * B; i < std::min(hashes.size(), (b + 1) * B); ++i)
      if (stored[i] != hashes[i])
        fail("{}: cannot resume: example {} is not the one the interrupted run saw (different input or order)",
             partial_, i);
  }
}

void ActivationArchive::write_rows(hid_t set, hid_t mem_type, int64_t row, int64_t rows, int64_t width,
                                   const void* data) {
  H5Id file_space(H5Dget_space(set), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(file_space);
  hsize_t start[2] = {static_cast<hsize_t>(std::max<int64_t>(row, 0)), 0};
  hsize_t count[2] = {static_cast<hsize_t>(std::max<int64_t>(rows, 1)), static_cast<hsize_t>(width)};
  H5Id mem_space(H5Screate_simple(rank, count, nullptr), H5Sclose);
  static const float dummy = 0;
  if (row < 0 || rows == 0) {  // this rank has nothing for this dataset, but takes part
    H5Sselect_none(file_space);
    H5Sselect_none(mem_space);
    data = &dummy;
  } else {
    H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, nullptr, count, nullptr);
  }
  if (H5Dwrite(set, mem_type, mem_space, file_space, xfer_, data) < 0)
    fail("{}: writing the archive failed (disk full?)", partial_);
}

void ActivationArchive::write_round(const std::vector<Piece>& pieces, const Ids& ids) {
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Piece* mine = nullptr;
    for (const auto& p : pieces)
      if (p.layer == static_cast<int64_t>(l)) mine = &p;
    if (mine) {
      // HDF5 reads host memory: values a GPU made are copied over first.
      auto v = mine->values.to(torch::kCPU, torch::kFloat32).contiguous();
      write_rows(layers_[l], H5T_NATIVE_FLOAT, mine->row, v.size(0), widths_[l], v.data_ptr());
    } else {
      write_rows(layers_[l], H5T_NATIVE_FLOAT, -1, 0, widths_[l], nullptr);
    }
  }
  const int64_t n = static_cast<int64_t>(ids.index.size());
  write_rows(index_set_, H5T_NATIVE_INT64, n ? ids.first : -1, n, 1, ids.index.data());
  write_rows(hash_set_, H5T_NATIVE_UINT64, n ? ids.first : -1, n, 1, ids.hash.data());
  // Blocks are marked done only after their data, and each rank marks its own.
  uint8_t one = 1;
  write_rows(done_set_, H5T_NATIVE_UINT8, ids.block, ids.block >= 0 ? 1 : 0, 1, &one);
  auto blocks = torch::zeros({static_cast<int64_t>(done_.size())}, torch::kUInt8);
  if (ids.block >= 0) blocks[ids.block] = 1;
  comm_->allreduce(blocks, ReduceOp::Max);
  for (size_t b = 0; b < done_.size(); ++b) done_[b] |= blocks[static_cast<int64_t>(b)].item<uint8_t>();
  if (H5Fflush(file_, H5F_SCOPE_GLOBAL) < 0) fail("{}: flush failed (disk full?)", partial_);
}

void ActivationArchive::close_sets() {
  layers_.clear();
  index_set_.reset();
  hash_set_.reset();
  done_set_.reset();
}

void ActivationArchive::close_and_rename(const std::string& from, const std::string& to) {
  close_sets();
  if (H5Fflush(file_, H5F_SCOPE_GLOBAL) < 0) fail("{}: flush failed (disk full?)", from);
  file_.reset();
  comm_->barrier();
  if (comm_->rank() == 0) rename_into_place(from, to);
  comm_->barrier();
}

void ActivationArchive::complete() {
  set_int(file_, "complete", 1);
  close_and_rename(partial_, path_);
  completed_ = true;
}

ArchiveReader::ArchiveReader(const std::string& path) : path_(path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  if (!std::filesystem::exists(path)) {
    if (std::filesystem::exists(path + ".partial"))
      fail("{}: no such archive ({}.partial is an unfinished collection: finish it with crash-hpc collect --resume)",
           path, path);
    fail("{}: no such archive", path);
  }
  file_ = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (file_.get() < 0) fail("{}: not an HDF5 file", path);
  const int64_t complete = h5_int_attribute(file_, "complete", -1);
  if (complete == -1) fail("{}: not an activation archive (no attribute 'complete'; made by crash-hpc collect?)", path);
  if (complete != 1)
    fail("{}: incomplete archive (attribute complete = {}); finish it with crash-hpc collect --resume", path, complete);
  if (H5Lexists(file_, "layers", H5P_DEFAULT) <= 0) fail("{}: not an activation archive (no /layers group)", path);
  for (int64_t l = 0;; ++l) {
    const std::string name = "layers/" + std::to_string(l);
    if (H5Lexists(file_, name.c_str(), H5P_DEFAULT) <= 0) break;
    H5Id set(H5Dopen2(file_, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (set.get() < 0) fail("{}: cannot open dataset /{}", path, name);
    H5Id space(H5Dget_space(set), H5Sclose);
    hsize_t dims[2] = {0, 0};
    if (H5Sget_simple_extent_ndims(space) != 2) fail("{}: /{} is not a matrix [rows, features]", path, name);
    H5Sget_simple_extent_dims(space, dims, nullptr);
    if (l == 0) rows_ = static_cast<int64_t>(dims[0]);
    if (static_cast<int64_t>(dims[0]) != rows_)
      fail("{}: /{} has {} rows, /layers/0 has {}", path, name, dims[0], rows_);
    widths_.push_back(static_cast<int64_t>(dims[1]));
    layers_.push_back(std::move(set));
  }
  if (widths_.empty()) fail("{}: not an activation archive (no /layers/0)", path);
  const int64_t stated = h5_int_attribute(file_, "num_layers", -1);
  if (stated >= 0 && stated != num_layers())
    fail("{}: attribute num_layers = {} but /layers holds {} layers", path, stated, num_layers());
  if (H5Lexists(file_, "example_hash", H5P_DEFAULT) <= 0)
    fail("{}: not an activation archive (no /example_hash)", path);
  H5Id hashes(H5Dopen2(file_, "example_hash", H5P_DEFAULT), H5Dclose);
  H5Id space(H5Dget_space(hashes), H5Sclose);
  examples_ = H5Sget_simple_extent_npoints(space);
  pooled_ = H5Lexists(file_, "index", H5P_DEFAULT) <= 0;
  if (pooled_ && rows_ != examples_)
    fail("{}: /layers/0 has {} rows for {} examples, and no /index of token offsets", path, rows_, examples_);
}

std::string ArchiveReader::attribute(const std::string& key) const { return h5_text_attribute(file_, key); }

std::vector<uint64_t> ArchiveReader::example_hashes() const {
  std::vector<uint64_t> out(static_cast<size_t>(examples_));
  H5Id set(H5Dopen2(file_, "example_hash", H5P_DEFAULT), H5Dclose);
  if (examples_ > 0 && H5Dread(set, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0)
    fail("{}: reading /example_hash failed", path_);
  return out;
}

torch::Tensor ArchiveReader::read(int64_t layer, int64_t row, int64_t count) const {
  const int64_t width = widths_[static_cast<size_t>(layer)];
  auto out = torch::empty({count, width}, torch::kFloat32);
  if (count == 0) return out.to(torch::kFloat64);
  hid_t set = layers_[static_cast<size_t>(layer)];
  H5Id space(H5Dget_space(set), H5Sclose);
  hsize_t start[2] = {static_cast<hsize_t>(row), 0},
          size[2] = {static_cast<hsize_t>(count), static_cast<hsize_t>(width)};
  H5Sselect_hyperslab(space, H5S_SELECT_SET, start, nullptr, size, nullptr);
  H5Id mem(H5Screate_simple(2, size, nullptr), H5Sclose);
  if (H5Dread(set, H5T_NATIVE_FLOAT, mem, space, H5P_DEFAULT, out.data_ptr()) < 0)
    fail("{}: reading rows {}..{} of /layers/{} failed", path_, row, row + count, layer);
  return out.to(torch::kFloat64);
}

}  // namespace crash
