#include "framework/atomic_file.h"

#include <fstream>

#include "parallel/errors.h"

namespace fs = std::filesystem;

namespace crash {

std::string staging_path(const std::string& path) { return path + ".tmp"; }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("{}: cannot write", path);
  f << text;
  f.close();  // a full disk may only show when the buffer is flushed
  if (!f) {
    std::error_code ec;
    fs::remove(path, ec);
    fail("{}: write failed (disk full?)", path);
  }
}

void rename_into_place(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail("{}: cannot rename to {} ({})", tmp, path, ec.message());
}

void write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = staging_path(path);
  write_text(tmp, text);
  rename_into_place(tmp, path);
}

StagedDir::StagedDir(const std::string& dir, bool owner, std::string what)
    : dir_(dir), tmp_(staging_path(dir)), owner_(owner), what_(std::move(what)) {
  if (!owner_) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);  // left by a run that failed
  fs::create_directories(tmp_, ec);
  if (ec) fail("{}: cannot create {} ({})", tmp_.string(), what_, ec.message());
}

void StagedDir::commit() {
  if (!owner_) return;
  std::error_code ec;
  fs::remove_all(dir_, ec);  // a folder cannot be renamed over a non-empty one
  fs::rename(tmp_, dir_, ec);
  if (ec) fail("{}: cannot move the finished {} into place ({})", dir_.string(), what_, ec.message());
}

}  // namespace crash
