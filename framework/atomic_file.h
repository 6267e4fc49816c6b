// Outputs reach their final name only when complete (docs/architecture.md section 7): each is written under
// a staging name and renamed, so a crash never leaves a half-written output under the final name.
// The one copy of that pattern; writers that stream binary data (safetensors, HDF5) write to
// staging_path() themselves and finish with rename_into_place().
#pragma once
#include <filesystem>
#include <string>

namespace crash {

// PATH.tmp: where an output is written before it is renamed to PATH.
std::string staging_path(const std::string& path);

// Writes `text` to `path` as it is (no renaming). Errors: "PATH: cannot write" when the file cannot
// be created, "PATH: write failed (disk full?)" when the text does not all reach it (the file is
// then removed).
void write_text(const std::string& path, const std::string& text);

// Renames a finished file or folder TMP to PATH, replacing a file of that name.
// Error: "TMP: cannot rename to PATH (why)".
void rename_into_place(const std::string& tmp, const std::string& path);

// write_text to PATH.tmp, then rename_into_place to PATH.
void write_atomic(const std::string& path, const std::string& text);

// A folder assembled as DIR.tmp and moved to DIR by commit(), replacing an older DIR. Only the
// owner (rank 0 of a multi-rank writer) touches the disk; every rank may write into path() once the
// owner has made it. A run that fails leaves DIR.tmp, never a half-written DIR; the next run
// clears it. `what` names the folder in errors: "DIR.tmp: cannot create WHAT (why)",
// "DIR: cannot move the finished WHAT into place (why)".
class StagedDir {
 public:
  explicit StagedDir(const std::string& dir, bool owner = true, std::string what = "folder");
  const std::filesystem::path& path() const { return tmp_; }
  void commit();

 private:
  std::filesystem::path dir_, tmp_;
  bool owner_;
  std::string what_;
};

}  // namespace crash
