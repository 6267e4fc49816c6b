#include "analysis/hdf5_check.h"

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>

#include "analysis/archive.h"
#include "parallel/errors.h"

namespace crash {

namespace fs = std::filesystem;

std::string check_parallel_hdf5(const std::string& folder, const CommPtr& comm) {
  std::error_code ec;
  fs::create_directories(folder, ec);
  // A folder that cannot be made fails on every rank alike, before any collective HDF5 call.
  auto bad = torch::full({1}, ec ? 1 : 0, torch::kInt32);
  comm->allreduce(bad, ReduceOp::Max);
  if (ec) return fmt::format("{}: cannot create the output folder ({})", folder, ec.message());
  if (bad.item<int>()) return "";  // another rank reports it
  // Rank 0's pid names the file, so two jobs sharing the folder do not meet.
  auto pid = torch::full({1}, comm->rank() == 0 ? static_cast<int64_t>(getpid()) : 0, torch::kInt64);
  comm->broadcast(pid, 0);
  const std::string path = (fs::path(folder) / fmt::format(".crash-preflight-{}.h5", pid.item<int64_t>())).string();
  const int64_t n = comm->size(), width = 8;
  std::string problem;
  try {
    ArchiveSpec spec;
    spec.num_examples = n;
    spec.widths = {width};
    spec.block_size = 1;
    spec.text_attributes = {{"purpose", "crash-hpc preflight check"}};
    ActivationArchive archive(path, spec, comm, false, true);
    ActivationArchive::Piece piece{0, comm->rank(), torch::full({1, width}, static_cast<float>(comm->rank() + 1))};
    ActivationArchive::Ids ids{comm->rank(), {comm->rank()}, {static_cast<uint64_t>(comm->rank())}, comm->rank()};
    archive.write_round({piece}, ids);
    archive.complete();
    auto rows = h5_read(path, "layers/0");
    auto want = torch::arange(1, n + 1, torch::kFloat32).unsqueeze(1).expand({n, width});
    if (!rows.sizes().equals({n, width}) || !torch::equal(rows.to(torch::kFloat32), want))
      problem = fmt::format("{}: the rows read back differ from those written", path);
  } catch (const UserError& e) {
    problem = e.what();
  }
  comm->barrier();
  if (comm->rank() == 0) {
    fs::remove(path, ec);
    fs::remove(path + ".partial", ec);
  }
  return problem;
}

}  // namespace crash
