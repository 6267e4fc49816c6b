#include "framework/checkpoint.h"

#include <filesystem>
#include <fstream>

#include "framework/atomic_file.h"
#include "framework/json_fields.h"

namespace fs = std::filesystem;

namespace crash {

CheckpointReader::CheckpointReader(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) fail("{}: not a model folder (expected a directory with config.json)", dir);
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::exists(config_path)) fail("{}: missing config.json", dir);
  config_ = ModelConfig::load(config_path.string());

  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    auto j = read_json_file(index.string());
    auto map = json_field<nlohmann::json>(j, "weight_map", index.string());
    for (auto& [name, file] : map.items()) {
      if (!file.is_string()) fail("{}: weight_map entry '{}' must be a file name", index.string(), name);
      where_[name] = file.get<std::string>();
    }
    for (auto& [name, file] : where_)
      if (!fs::exists(fs::path(dir) / file))
        fail("{}: shard '{}' (holding '{}') is missing", index.string(), file, name);
    // Every listed tensor must really be in its shard; checking now keeps errors out of loading.
    for (auto& [name, file] : where_)
      if (!shard(file).contains(name))
        fail("{}: tensor '{}' is listed for shard '{}' but is not in it", index.string(), name, file);
  } else if (fs::exists(single)) {
    for (auto& [name, info] : shard("model.safetensors").tensors()) where_[name] = "model.safetensors";
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin files are not supported)", dir);
  }
}

SafetensorsFile& CheckpointReader::shard(const std::string& file) const {
  auto it = shards_.find(file);
  if (it == shards_.end())
    it = shards_.emplace(file, std::make_unique<SafetensorsFile>((fs::path(dir_) / file).string())).first;
  return *it->second;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (auto& [name, file] : where_) out.push_back(name);
  return out;
}

std::string CheckpointReader::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? dir_ : (fs::path(dir_) / it->second).string();
}

const TensorInfo& CheckpointReader::info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: checkpoint has no tensor '{}'", dir_, name);
  return shard(it->second).info(name);
}

void CheckpointReader::drop_pages(const std::string& name) const {
  auto it = where_.find(name);
  if (it != where_.end()) shard(it->second).drop_pages(name);
}

torch::Tensor CheckpointReader::view(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: checkpoint has no tensor '{}'", dir_, name);
  return shard(it->second).view(name);
}

void save_hf_folder(const std::string& dir, const ModelConfig& config,
                    const std::vector<std::pair<std::string, torch::Tensor>>& tensors, const SaveOptions& options,
                    const nlohmann::json& config_updates) {
  StagedDir staged(dir);
  const fs::path& tmp = staged.path();
  std::error_code ec;

  // Group tensors into shards in order, each under max_shard_bytes (a larger tensor gets its own).
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (auto [name, t] : tensors) {
    if (options.dtype && t.is_floating_point()) t = t.to(*options.dtype);
    uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    if (in_shard > 0 && in_shard + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().emplace_back(name, t);
    in_shard += bytes;
    total += bytes;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors((tmp / "model.safetensors").string(), shards[0], meta);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
      write_safetensors((tmp / file).string(), shards[i], meta);
      for (auto& [name, t] : shards[i]) weight_map[name] = file;
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream((tmp / "model.safetensors.index.json").string()) << index.dump(2) << "\n";
  }
  nlohmann::json cfg = config.raw;
  cfg.merge_patch(config_updates);
  if (options.dtype)
    cfg["torch_dtype"] = *options.dtype == torch::kBFloat16  ? "bfloat16"
                         : *options.dtype == torch::kFloat16 ? "float16"
                                                             : "float32";
  std::ofstream out((tmp / "config.json").string());
  out << cfg.dump(2) << "\n";
  out.close();
  if (!out) fail("{}: cannot write config.json", tmp.string());

  for (const auto& file : options.copy_files) {
    if (!fs::exists(file)) continue;
    fs::copy_file(file, tmp / fs::path(file).filename(), fs::copy_options::overwrite_existing, ec);
    if (ec) fail("{}: cannot copy into {} ({})", file, tmp.string(), ec.message());
  }
  for (const auto& [name, contents] : options.extra_files) {
    std::ofstream extra((tmp / name).string());
    extra << contents;
    extra.close();
    if (!extra) fail("{}: cannot write {}", tmp.string(), name);
  }
  staged.commit();
}

}  // namespace crash
