// Hugging Face model folders: config.json plus model.safetensors or a sharded
// model.safetensors.index.json. Reading is lazy and memory-mapped; writing is atomic.
#pragma once
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "framework/config.h"
#include "framework/safetensors.h"

namespace crash {

class CheckpointReader {
 public:
  // Reads config.json and the weight index; shards are mapped when first used.
  explicit CheckpointReader(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  // A view aliasing the mapped file (see SafetensorsFile::view); narrow it before copying
  // to read only a slice.
  torch::Tensor view(const std::string& name) const;
  // Lets the kernel drop the mapped pages of a tensor once it has been copied, so that
  // loading does not keep the file's pages in this process's resident memory.
  void drop_pages(const std::string& name) const;
  // The file (for error messages) that holds a tensor.
  std::string file_of(const std::string& name) const;

 private:
  SafetensorsFile& shard(const std::string& file) const;

  std::string dir_;
  ModelConfig config_;
  std::map<std::string, std::string> where_;  // tensor -> shard file name
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

struct SaveOptions {
  uint64_t max_shard_bytes = 5ull << 30;   // HF's default 5 GB shards
  std::optional<torch::ScalarType> dtype;  // convert floating tensors, e.g. to bf16
  // Files copied into the folder (tokenizer.json, crash_plan.json, ...); missing ones are skipped.
  std::vector<std::string> copy_files;
  // Files written into the folder: name -> contents.
  std::map<std::string, std::string> extra_files;
};

// Writes an HF-loadable folder: config.json (the config's JSON with `config_updates` merged),
// model.safetensors, or shards plus model.safetensors.index.json when larger than a shard.
// The folder is assembled under a temporary name and renamed into place.
void save_hf_folder(const std::string& dir, const ModelConfig& config,
                    const std::vector<std::pair<std::string, torch::Tensor>>& tensors, const SaveOptions& options = {},
                    const nlohmann::json& config_updates = nlohmann::json::object());

}  // namespace crash
