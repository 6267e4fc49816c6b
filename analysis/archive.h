// The activation archive (docs/architecture.md section 5): one HDF5 file per collection run, written
// collectively by every rank (parallel HDF5 when under MPI):
//   /layers/{l}       [N, d] pooled, or [tokens, d] with /index [N + 1] token offsets
//   /example_index    [N] int64    the example's position in the task file
//   /example_hash     [N] uint64   FNV-1a of its token ids (joins and resumes check it)
//   /blocks_done      [blocks] uint8, work done so far (resume skips those blocks)
// Root attributes describe the run; "complete" becomes 1 last, and the file is written as
// PATH.partial and renamed to PATH only then.
#pragma once
#include <hdf5.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include "analysis/hdf5.h"
#include "parallel/comm.h"

namespace crash {

struct ArchiveSpec {
  int64_t num_examples = 0;
  std::vector<int64_t> widths;  // feature size of each hidden-state index 0..L
  bool pooled = true;
  std::vector<int64_t> offsets;                        // unpooled: token offsets of the examples, N + 1 entries
  std::string dtype = "float32";                       // stored type: float32 or float16
  int64_t block_size = 32;                             // examples per block, the unit of work and of resume
  std::map<std::string, std::string> text_attributes;  // model, task, pooling, grid, ...
  int64_t num_blocks() const { return (num_examples + block_size - 1) / block_size; }
};

class ActivationArchive {
 public:
  // Collective over `comm`. Creates PATH.partial, or with `resume` reopens it and checks that
  // it was made by the same kind of run. An existing PATH needs `overwrite`.
  ActivationArchive(const std::string& path, const ArchiveSpec& spec, const CommPtr& comm, bool resume, bool overwrite);
  ~ActivationArchive();

  const std::vector<uint8_t>& blocks_done() const { return done_; }
  // Fails (naming the example) if finished blocks hold other examples than `hashes` says.
  void check_hashes(const std::vector<uint64_t>& hashes) const;

  // What one rank writes in a round: rows [row, row + n) of one layer (rows are tokens when
  // unpooled), and for the examples of its block, their ids.
  struct Piece {
    int64_t layer = 0;
    int64_t row = 0;
    torch::Tensor values;  // [n, d] float32
  };
  struct Ids {
    int64_t first = 0;  // example index of the block's first example
    std::vector<int64_t> index;
    std::vector<uint64_t> hash;
    int64_t block = -1;
  };
  // Collective: every rank calls it once per round, with what it holds (possibly nothing).
  void write_round(const std::vector<Piece>& pieces, const Ids& ids);
  // Collective: marks the file complete and moves it to its final name.
  void complete();

 private:
  void create(const ArchiveSpec& spec);
  void open_existing(const ArchiveSpec& spec);
  void close_sets();
  // Collective: closes the file (every rank) and renames it (rank 0) once all have closed it.
  void close_and_rename(const std::string& from, const std::string& to);
  void write_rows(hid_t set, hid_t mem_type, int64_t row, int64_t rows, int64_t width, const void* data);

  std::string path_, partial_;
  CommPtr comm_;
  bool parallel_;
  H5Id file_, xfer_;
  std::vector<H5Id> layers_;
  H5Id index_set_, hash_set_, done_set_;
  std::vector<int64_t> widths_;
  std::vector<uint8_t> done_;
  bool completed_ = false;
};

// An archive opened read-only by one process (plain HDF5 reads; every rank may open it).
// Fails clearly when missing, not an archive, or incomplete.
class ArchiveReader {
 public:
  explicit ArchiveReader(const std::string& path);
  const std::string& path() const { return path_; }
  int64_t num_layers() const { return static_cast<int64_t>(widths_.size()); }  // hidden states 0..L
  int64_t num_rows() const { return rows_; }                                   // examples (pooled) or tokens
  int64_t num_examples() const { return examples_; }
  int64_t width(int64_t layer) const { return widths_[static_cast<size_t>(layer)]; }
  bool pooled() const { return pooled_; }
  std::string attribute(const std::string& key) const;  // a text attribute, "" if absent
  std::vector<uint64_t> example_hashes() const;
  // Rows [row, row + count) of one layer, float64 [count, width].
  torch::Tensor read(int64_t layer, int64_t row, int64_t count) const;

 private:
  std::string path_;
  H5Id file_;
  std::vector<H5Id> layers_;
  std::vector<int64_t> widths_;
  int64_t rows_ = 0, examples_ = 0;
  bool pooled_ = true;
};

}  // namespace crash
