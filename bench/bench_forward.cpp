// Times crash-hpc's forward pass (logits only) on random token ids; prints one JSON line.
// Driven by bench/forward.py, which times HF transformers on the same model in the same run.
#include <boost/program_options.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "framework/checkpoint.h"
#include "framework/models/decoder.h"

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  po::options_description o("bench_forward");
  o.add_options()("model", po::value<std::string>()->required(), "HF model folder")(
      "batch", po::value<int64_t>()->default_value(8), "")("seq", po::value<int64_t>()->default_value(128), "")(
      "threads", po::value<int>()->default_value(2), "")("iters", po::value<int>()->default_value(5), "")(
      "seed", po::value<int64_t>()->default_value(0), "");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  torch::set_num_threads(vm["threads"].as<int>());
  crash::CheckpointReader ckpt(vm["model"].as<std::string>());
  auto model = crash::load_model(ckpt);
  const int64_t B = vm["batch"].as<int64_t>(), T = vm["seq"].as<int64_t>();
  torch::manual_seed(vm["seed"].as<int64_t>());
  auto ids = torch::randint(4, ckpt.config().vocab_size, {B, T}, torch::kInt64);
  auto mask = torch::ones_like(ids);
  torch::InferenceMode guard;
  model->forward(ids, mask);  // warm-up
  std::vector<double> secs;
  for (int i = 0; i < vm["iters"].as<int>(); ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto logits = model->forward(ids, mask).logits;
    secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(secs.begin(), secs.end());
  const double median = secs[secs.size() / 2];
  std::cout << "{\"tokens_per_s\": " << (B * T) / median << ", \"median_s\": " << median << "}" << std::endl;
}
