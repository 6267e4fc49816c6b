// Writes a random checkpoint of any configuration as an HF folder (sharded like HF's, 5 GB
// shards), one layer at a time, so a 6.7B model is written without ever being held whole.
#include <boost/program_options.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include "framework/config.h"
#include "framework/models/decoder.h"
#include "framework/safetensors.h"

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  namespace fs = std::filesystem;
  po::options_description o("make_random_checkpoint");
  o.add_options()("config", po::value<std::string>()->required(), "config.json")(
      "out", po::value<std::string>()->required(), "output folder")(
      "dtype", po::value<std::string>()->default_value("bfloat16"), "bfloat16 or float32")(
      "shard-bytes", po::value<uint64_t>()->default_value(5000000000ull), "")(
      "seed", po::value<int64_t>()->default_value(0), "");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  torch::manual_seed(vm["seed"].as<int64_t>());
  auto cfg = crash::ModelConfig::load(vm["config"].as<std::string>());
  auto dtype = vm["dtype"].as<std::string>() == "float32" ? torch::kFloat32 : torch::kBFloat16;
  const fs::path out(vm["out"].as<std::string>());
  const fs::path tmp = out.string() + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);

  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> shards(1);
  uint64_t in_shard = 0, total = 0;
  std::vector<std::string> written_files;
  nlohmann::json weight_map = nlohmann::json::object();
  auto flush = [&](bool last) {
    auto& s = shards.back();
    if (s.empty()) return;
    std::string name = "model-" + std::to_string(written_files.size() + 1) + ".safetensors";
    crash::write_safetensors((tmp / name).string(), s, {{"format", "pt"}});
    for (auto& [n, t] : s) weight_map[n] = name;
    written_files.push_back(name);
    std::cout << "wrote " << name << " (" << in_shard / 1e9 << " GB)" << std::endl;
    s.clear();
    in_shard = 0;
  };
  std::set<std::string> seen;
  torch::NoGradGuard ng;
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    auto piece = crash::build_model(cfg, {l, l + 1, nullptr, torch::kFloat32});
    for (auto& item : piece->named_parameters()) {
      if (!seen.insert(item.key()).second) continue;
      if (item.key() == "lm_head.weight" && cfg.tie_word_embeddings) continue;  // the last piece's copy
      auto t = item.value().dim() == 1 && item.key().find("norm") != std::string::npos
                   ? torch::ones_like(item.value())
                   : torch::randn(item.value().sizes()) * 0.02;
      t = t.to(dtype);
      const uint64_t bytes = t.numel() * t.element_size();
      if (in_shard > 0 && in_shard + bytes > vm["shard-bytes"].as<uint64_t>()) flush(false);
      shards.back().emplace_back(item.key(), t);
      in_shard += bytes;
      total += bytes;
    }
  }
  flush(true);
  // Shard names as HF writes them: model-0000i-of-0000n.safetensors.
  const size_t n = written_files.size();
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    fs::rename(tmp / written_files[i], tmp / name);
    for (auto& [k, v] : weight_map.items())
      if (v == written_files[i]) v = name;
  }
  std::ofstream(tmp / "model.safetensors.index.json")
      << nlohmann::json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2);
  auto raw = cfg.raw;
  raw["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : "float32";
  std::ofstream(tmp / "config.json") << raw.dump(2);
  fs::remove_all(out);
  fs::rename(tmp, out);
  std::cout << "checkpoint " << out << ": " << total << " bytes in " << n << " shards" << std::endl;
}
