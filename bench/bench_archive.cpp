// Write bandwidth of the activation archive: random rows written block by block as the collect
// job writes them, then fsync; prints one JSON line on rank 0. Compared with write(2) by bench/archive.py.
#include <boost/program_options.hpp>
#include <fcntl.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <iostream>

#include "analysis/archive.h"
#include "parallel/grid.h"
#include "parallel/world.h"

int main(int argc, char** argv) {
  crash::World& world = crash::World::init(&argc, &argv);
  namespace po = boost::program_options;
  po::options_description o("bench_archive");
  o.add_options()("out", po::value<std::string>()->required(), "")(
      "examples", po::value<int64_t>()->default_value(4096), "")("layers", po::value<int64_t>()->default_value(33), "")(
      "width", po::value<int64_t>()->default_value(4096), "")("block", po::value<int64_t>()->default_value(64), "")(
      "dtype", po::value<std::string>()->default_value("float32"), "");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  auto grid = crash::ProcessGrid::create({1, 1});
  crash::ArchiveSpec spec;
  spec.num_examples = vm["examples"].as<int64_t>();
  spec.block_size = vm["block"].as<int64_t>();
  spec.dtype = vm["dtype"].as<std::string>();
  spec.widths.assign(static_cast<size_t>(vm["layers"].as<int64_t>()), vm["width"].as<int64_t>());
  const std::string out = vm["out"].as<std::string>();
  auto rows = torch::randn({spec.block_size, vm["width"].as<int64_t>()});
  auto t0 = std::chrono::steady_clock::now();
  {
    crash::ActivationArchive archive(out, spec, grid->world(), false, true);
    const int64_t blocks = spec.num_blocks(), dp = grid->dp();
    for (int64_t r = 0; r < (blocks + dp - 1) / dp; ++r) {
      const int64_t b = r * dp + grid->dp_rank();
      std::vector<crash::ActivationArchive::Piece> pieces;
      crash::ActivationArchive::Ids ids;
      if (b < blocks) {
        const int64_t first = b * spec.block_size, n = std::min(spec.block_size, spec.num_examples - first);
        for (int64_t l = 0; l < static_cast<int64_t>(spec.widths.size()); ++l)
          pieces.push_back({l, first, rows.narrow(0, 0, n)});
        ids.first = first;
        ids.block = b;
        for (int64_t i = first; i < first + n; ++i) {
          ids.index.push_back(i);
          ids.hash.push_back(static_cast<uint64_t>(i));
        }
      }
      archive.write_round(pieces, ids);
    }
    archive.complete();
  }
  if (world.rank() == 0) {
    int fd = ::open(out.c_str(), O_RDONLY);
    ::fsync(fd);
    ::close(fd);
  }
  grid->world()->barrier();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t bytes =
      spec.num_examples * static_cast<int64_t>(spec.widths.size()) * spec.widths[0] * (spec.dtype == "float16" ? 2 : 4);
  if (world.rank() == 0)
    std::cout << "{\"bytes\": " << bytes << ", \"seconds\": " << secs
              << ", \"gb_per_s\": " << static_cast<double>(bytes) / secs / 1e9 << "}" << std::endl;
}
