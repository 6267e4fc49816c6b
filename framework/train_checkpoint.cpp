#include "framework/train_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>

#include "framework/atomic_file.h"
#include "framework/json_fields.h"
#include "framework/safetensors.h"
#include "parallel/errors.h"

namespace crash {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "crash-hpc train checkpoint 1";

// DP rank 0's file holds the parameters and the replicated state; other DP ranks write a file
// only for the flat pieces a distributed optimiser shards over them.
std::string file_name(int tp, int pp, int dp = 0) {
  return dp == 0 ? fmt::format("shard-pp{:03d}-tp{:03d}.safetensors", pp, tp)
                 : fmt::format("shard-pp{:03d}-tp{:03d}-dp{:03d}.safetensors", pp, tp, dp);
}

// The shape of the parameter shard a state tensor belongs to.
std::vector<int64_t> shard_shape(const StateTensor& s) { return s.flat_start >= 0 ? s.shape : s.value.sizes().vec(); }

std::vector<int64_t> full_shape(std::vector<int64_t> shape, const std::optional<ShardSlice>& s) {
  if (s) shape[static_cast<size_t>(s->dim)] = s->full;
  return shape;
}

nlohmann::json slice_json(const std::optional<ShardSlice>& s) {
  if (!s) return nullptr;
  return {{"dim", s->dim}, {"full", s->full}, {"start", s->start}, {"length", s->length}, {"group", s->group}};
}

torch::Tensor rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

void save_train_checkpoint(const std::string& root, int64_t step, const ProcessGrid& grid, Optimizer& optimizer,
                           const SliceMap& slices, const nlohmann::json& trainer_state, int keep) {
  const fs::path dir = fs::path(root) / fmt::format("step-{:06d}", step);
  StagedDir staged(dir.string(), grid.rank() == 0, "checkpoint folder");
  const fs::path& tmp = staged.path();
  grid.world()->barrier();
  auto state = optimizer.state();
  const bool sharded = std::any_of(state.begin(), state.end(), [](const StateTensor& s) { return s.flat_start >= 0; });
  if (grid.dp_rank() == 0 || sharded) {
    // The file's own slice table goes into its header, so rank 0 can build the manifest.
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    nlohmann::json table = nlohmann::json::object();
    for (auto& s : state) {
      // What is not sharded over DP, DP rank 0 writes for all.
      if (s.flat_start < 0 && grid.dp_rank() != 0) continue;
      const std::string key = s.kind + "/" + s.param;
      if (s.sparse) {
        // A shard may hold none of a tensor's mask: the table says so, the file has nothing
        // (the safetensors reader refuses zero-byte entries).
        if (s.value.numel() > 0) tensors.emplace_back(key, s.value.detach().cpu());
        table[key] = {{"param", s.param}, {"full_shape", s.value.sizes().vec()}, {"slice", nullptr}, {"sparse", true}};
        continue;
      }
      auto it = slices.find(s.param);
      const std::optional<ShardSlice> slice = it == slices.end() ? std::nullopt : it->second;
      tensors.emplace_back(key, s.value.detach().cpu());
      table[key] = {
          {"param", s.param}, {"full_shape", full_shape(shard_shape(s), slice)}, {"slice", slice_json(slice)}};
      if (s.flat_start >= 0) table[key]["flat"] = {{"start", s.flat_start}, {"length", s.value.numel()}};
    }
    if (grid.dp_rank() == 0) tensors.emplace_back("rng/torch", rng_state());
    write_safetensors((tmp / file_name(grid.tp_rank(), grid.pp_rank(), grid.dp_rank())).string(), tensors,
                      {{"crash_slices", table.dump()}});
  }
  grid.world()->barrier();
  if (grid.rank() == 0) {
    nlohmann::json files = nlohmann::json::array();
    for (int pp = 0; pp < grid.pp(); ++pp)
      for (int tp = 0; tp < grid.tp(); ++tp)
        for (int dp = 0; dp < grid.dp(); ++dp) {
          if (dp > 0 && !fs::exists(tmp / file_name(tp, pp, dp))) continue;
          SafetensorsFile f((tmp / file_name(tp, pp, dp)).string());
          nlohmann::json entry = {{"file", file_name(tp, pp, dp)},
                                  {"tp_rank", tp},
                                  {"pp_rank", pp},
                                  {"tensors", nlohmann::json::parse(f.metadata().at("crash_slices"))}};
          if (dp > 0) entry["dp_rank"] = dp;
          files.push_back(entry);
        }
    nlohmann::json manifest = {{"format", kFormat},
                               {"step", step},
                               {"grid", {{"tp", grid.tp()}, {"pp", grid.pp()}, {"dp", grid.dp()}}},
                               {"optimizer_steps", optimizer.steps()},
                               {"trainer", trainer_state},
                               {"files", files}};
    {
      std::ofstream out((tmp / "manifest.json").string());
      out << manifest.dump(2) << "\n";
      if (!out) fail("{}: cannot write manifest.json", tmp.string());
    }
    staged.commit();
    // Old checkpoints beyond the newest `keep` go (the complete ones, oldest first).
    std::error_code ec;
    std::vector<fs::path> done;
    static const std::regex pattern(R"(step-\d{6})");
    for (const auto& e : fs::directory_iterator(root))
      if (e.is_directory() && std::regex_match(e.path().filename().string(), pattern)) done.push_back(e.path());
    std::sort(done.begin(), done.end());
    for (size_t i = 0; i + static_cast<size_t>(keep) < done.size(); ++i) fs::remove_all(done[i], ec);
  }
  grid.world()->barrier();
}

std::optional<std::string> latest_train_checkpoint(const std::string& root) {
  if (!fs::is_directory(root)) return std::nullopt;
  static const std::regex pattern(R"(step-\d{6})");
  std::vector<fs::path> done;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && std::regex_match(e.path().filename().string(), pattern) &&
        fs::exists(e.path() / "manifest.json"))
      done.push_back(e.path());
  if (done.empty()) return std::nullopt;
  std::sort(done.begin(), done.end());
  return done.back().string();
}

nlohmann::json read_train_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  if (!std::ifstream(path)) fail("{}: cannot open (not a training checkpoint)", path);
  const nlohmann::json m = read_json_file(path);
  if (!m.is_object() || m.value("format", "") != kFormat) fail("{}: field 'format' must be \"{}\"", path, kFormat);
  for (const char* key : {"step", "grid", "trainer", "files", "optimizer_steps"})
    if (!m.contains(key)) fail("{}: missing field '{}'", path, key);
  // The trainer indexes its schedule and data with these: check them before anyone reads them.
  if (json_field<int64_t>(m, "step", path) < 0) fail("{}: field 'step' must be non-negative", path);
  if (json_field<int64_t>(m, "optimizer_steps", path) < 0)
    fail("{}: field 'optimizer_steps' must be non-negative", path);
  const auto grid = json_field<nlohmann::json>(m, "grid", path);
  for (const char* key : {"tp", "pp", "dp"})
    if (json_field<int64_t>(grid, key, path + " grid") < 1) fail("{}: grid field '{}' must be positive", path, key);
  const auto trainer = json_field<nlohmann::json>(m, "trainer", path);
  json_field<nlohmann::json>(trainer, "options", path + " trainer");
  json_field<std::string>(trainer, "data_hash", path + " trainer");
  if (trainer.contains("best_val") && !trainer["best_val"].is_null())
    json_field<double>(trainer, "best_val", path + " trainer");
  json_field_or<int64_t>(trainer, "best_step", -1, path + " trainer");
  if (!m["files"].is_array()) fail("{}: field 'files' must be a list of objects", path);
  for (const auto& f : m["files"])
    if (!f.is_object()) fail("{}: field 'files' must be a list of objects", path);
  return m;
}

void load_train_checkpoint(const std::string& dir, const ProcessGrid& grid, Optimizer& optimizer,
                           const SliceMap& slices, const std::string& tied_embedding) {
  const auto manifest = read_train_manifest(dir);
  const std::string mpath = dir + "/manifest.json";
  // Every saved piece of each tensor: (file, slice table entry).
  struct Piece {
    std::string file;
    nlohmann::json entry;
  };
  std::map<std::string, std::vector<Piece>> pieces;
  std::string rng_file;
  for (const auto& f : manifest["files"]) {
    const auto file = json_field<std::string>(f, "file", mpath);
    for (const auto& [key, entry] : f.at("tensors").items()) pieces[key].push_back({file, entry});
    if (json_field<int64_t>(f, "tp_rank", mpath) == grid.tp_rank() &&
        json_field<int64_t>(f, "pp_rank", mpath) == grid.pp_rank() &&
        json_field_or<int64_t>(f, "dp_rank", 0, mpath) == 0)
      rng_file = file;
  }
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open;
  auto file = [&](const std::string& name) -> SafetensorsFile& {
    auto& f = open[name];
    if (!f) {
      const std::string path = dir + "/" + name;
      if (!fs::exists(path)) fail("{}: missing; the checkpoint is incomplete", path);
      f = std::make_unique<SafetensorsFile>(path);
    }
    return *f;
  };
  // The saved key of a tensor; a tied model's lm_head (on a last stage) and embedding (first
  // stage) are one tensor. Empty when absent.
  auto find = [&](const std::string& kind, const std::string& param) -> std::string {
    if (pieces.count(kind + "/" + param)) return kind + "/" + param;
    if (tied_embedding.empty()) return "";
    const std::string other = param == "lm_head.weight" ? tied_embedding
                              : param == tied_embedding ? std::string("lm_head.weight")
                                                        : "";
    return !other.empty() && pieces.count(kind + "/" + other) ? kind + "/" + other : "";
  };

  torch::NoGradGuard no_grad;
  for (auto& s : optimizer.state()) {
    if (s.sparse) {
      // SIFT's sparse state belongs to one rank's shard: only the same TP x PP grid reads it.
      const auto& g = manifest["grid"];
      if (g.value("tp", 0) != grid.tp() || g.value("pp", 0) != grid.pp())
        fail(
            "{}: written on TP {} x PP {}; sparse (SIFT) optimiser state resumes only on the same TP and PP sizes, "
            "not TP {} x PP {}",
            mpath, g.value("tp", 0), g.value("pp", 0), grid.tp(), grid.pp());
      const std::string key = s.kind + "/" + s.param;
      auto it = pieces.find(key);
      const Piece* piece = nullptr;
      if (it != pieces.end())
        for (const auto& p : it->second)
          if (p.file == rng_file) piece = &p;
      if (!piece)
        fail("{}: the checkpoint has no '{}' for this rank; it was written for other trained parameters", mpath, key);
      const auto saved = json_field<std::vector<int64_t>>(piece->entry, "full_shape", mpath);
      if (saved.size() == 1 && saved[0] == 0)
        s.value.set_(torch::empty({0}, s.value.options()));
      else
        s.value.set_(file(piece->file).read(key).to(s.value.device()).clone());
      continue;
    }
    auto it = slices.find(s.param);
    const std::optional<ShardSlice> mine = it == slices.end() ? std::nullopt : it->second;
    const auto want_full = full_shape(shard_shape(s), mine);
    const std::string key = find(s.kind, s.param);
    if (key.empty())
      fail("{}: the checkpoint has no '{}/{}'; it was written for other trained parameters or another dtype", mpath,
           s.kind, s.param);
    // Assemble the full tensor from the saved pieces, then take this rank's slice.
    torch::Tensor full;
    auto place = [&](const torch::Tensor& data, const nlohmann::json& slice) {
      if (slice.is_null()) {
        full.copy_(data);
        return;
      }
      const int64_t dim = slice["dim"].get<int64_t>();
      const int64_t start = slice["start"].get<int64_t>();
      const int64_t length = slice["length"].get<int64_t>();
      const int64_t avail = std::max<int64_t>(0, std::min(length, want_full[static_cast<size_t>(dim)] - start));
      if (avail > 0) full.narrow(dim, start, avail).copy_(data.narrow(dim, 0, avail));
    };
    // A distributed optimiser's flat pieces first make up the shard of the rank that wrote them.
    std::map<std::string, torch::Tensor> shards;  // slice -> that shard
    for (const auto& piece : pieces.at(key)) {
      const auto saved_full = json_field<std::vector<int64_t>>(piece.entry, "full_shape", mpath);
      if (saved_full != want_full)
        fail("{}: '{}' has the full shape {} but the model needs {}", mpath, key, fmt::join(saved_full, "x"),
             fmt::join(want_full, "x"));
      auto data = file(piece.file).view(key);
      if (!full.defined()) full = torch::zeros(want_full, torch::TensorOptions().dtype(data.scalar_type()));
      if (!piece.entry.contains("flat")) {
        place(data, piece.entry["slice"]);
        continue;
      }
      auto shape = saved_full;
      const auto& slice = piece.entry["slice"];
      if (!slice.is_null()) shape[slice["dim"].get<size_t>()] = slice["length"].get<int64_t>();
      auto& shard = shards[slice.dump()];
      if (!shard.defined()) shard = torch::zeros(shape, torch::TensorOptions().dtype(data.scalar_type()));
      const int64_t start = json_field<int64_t>(piece.entry["flat"], "start", mpath);
      const int64_t length = json_field<int64_t>(piece.entry["flat"], "length", mpath);
      if (start < 0 || length != data.numel() || start + length > shard.numel())
        fail("{}: '{}' has a flat piece outside its shard", mpath, key);
      shard.view({-1}).narrow(0, start, length).copy_(data.reshape({-1}));
    }
    for (const auto& [slice, shard] : shards) place(shard, nlohmann::json::parse(slice));
    // A flat piece of this rank's shard is cut from the whole shard.
    auto target = s.flat_start >= 0 ? torch::empty(s.shape, s.value.options()) : s.value;
    if (!mine) {
      target.copy_(full);
    } else {
      const int64_t avail = std::max<int64_t>(0, std::min(mine->length, mine->full - mine->start));
      if (avail > 0) target.narrow(mine->dim, 0, avail).copy_(full.narrow(mine->dim, mine->start, avail));
      if (avail < mine->length) target.narrow(mine->dim, avail, mine->length - avail).zero_();
    }
    if (s.flat_start >= 0) s.value.copy_(target.view({-1}).narrow(0, s.flat_start, s.value.numel()));
  }
  optimizer.set_steps(manifest["optimizer_steps"].get<int64_t>());
  optimizer.state_loaded();
  if (!rng_file.empty()) set_rng_state(file(rng_file).read("rng/torch"));
}

}  // namespace crash
