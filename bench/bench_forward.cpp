// Times crash-hpc's forward pass (logits) on random token ids; prints one JSON line on rank 0.
// Single process, or under mpirun with --tp/--pp. Driven by bench/forward.py (against HF
// transformers) and bench/shard_memory.sh (TP1 vs TP2).
#include <boost/program_options.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "framework/distributed_lm.h"
#include "parallel/log.h"
#include "parallel/world.h"

int main(int argc, char** argv) {
  crash::World& world = crash::World::init(&argc, &argv);
  namespace po = boost::program_options;
  po::options_description o("bench_forward");
  o.add_options()("model", po::value<std::string>()->required(), "HF model folder")(
      "batch", po::value<int64_t>()->default_value(8), "")("seq", po::value<int64_t>()->default_value(128), "")(
      "threads", po::value<int>()->default_value(2), "")("iters", po::value<int>()->default_value(5), "")(
      "tp", po::value<int>()->default_value(1), "")("pp", po::value<int>()->default_value(1), "")(
      "micro-batches", po::value<int>()->default_value(1), "")("dtype",
                                                               po::value<std::string>()->default_value("float32"),
                                                               "")("seed", po::value<int64_t>()->default_value(0), "");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  torch::set_num_threads(vm["threads"].as<int>());
  crash::CheckpointReader ckpt(vm["model"].as<std::string>());
  auto grid = crash::ProcessGrid::create({vm["tp"].as<int>(), vm["pp"].as<int>()});
  crash::DistributedOptions opt;
  opt.dtype = vm["dtype"].as<std::string>() == "bfloat16" ? torch::kBFloat16 : torch::kFloat32;
  crash::DistributedLM model(ckpt, grid, opt);
  const int64_t B = vm["batch"].as<int64_t>(), T = vm["seq"].as<int64_t>();
  const int M = vm["micro-batches"].as<int>();
  torch::manual_seed(vm["seed"].as<int64_t>());
  auto ids = torch::randint(4, ckpt.config().vocab_size, {B, T}, torch::kInt64);
  auto mask = torch::ones_like(ids);
  model.forward(ids, mask, M, false);  // warm-up
  std::vector<double> secs;
  for (int i = 0; i < vm["iters"].as<int>(); ++i) {
    grid->world()->barrier();
    auto t0 = std::chrono::steady_clock::now();
    model.forward(ids, mask, M, false);
    grid->world()->barrier();
    secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(secs.begin(), secs.end());
  const double median = secs[secs.size() / 2];
  auto rss = torch::full({1}, static_cast<double>(crash::peak_rss_bytes()), torch::kFloat64);
  grid->world()->allreduce(rss, crash::ReduceOp::Max);
  if (world.rank() == 0)
    std::cout << "{\"tokens_per_s\": " << (B * T * grid->dp()) / median << ", \"median_s\": " << median
              << ", \"max_rank_peak_rss_bytes\": " << rss.item<double>() << "}" << std::endl;
}
