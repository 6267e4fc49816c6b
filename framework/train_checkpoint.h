// Training checkpoints (docs/architecture.md section 5): OUT/checkpoints/step-NNNNNN/ holds one
// safetensors file per model-parallel rank (DP replicas are identical; DP rank 0 writes) with
// its shard of every trained parameter and the optimiser state ("param/NAME", "master/NAME",
// "exp_avg/NAME", "exp_avg_sq/NAME", "rng/torch"), plus manifest.json: the grid, the step,
// the trainer's state (data position, best validation, options) and, for every tensor of
// every file, which slice of the full tensor it is. A distributed optimiser's masters and
// moments are flat pieces of a shard, one file per DP rank (`-dpNNN`, "flat" in the table).
// Loading reassembles each rank's slices from whatever grid wrote them, on any DP size.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "framework/optim.h"
#include "parallel/grid.h"
#include "parallel/tensor_parallel.h"

namespace crash {

// Slice of the full tensor each parameter of this rank is (absent: whole).
using SliceMap = std::map<std::string, std::optional<ShardSlice>>;

// Collective over the world: writes `root`/step-NNNNNN through a temporary folder renamed
// when complete, then removes all but the newest `keep` checkpoints. `trainer_state` goes
// into the manifest as it is.
void save_train_checkpoint(const std::string& root, int64_t step, const ProcessGrid& grid, Optimizer& optimizer,
                           const SliceMap& slices, const nlohmann::json& trainer_state, int keep = 2);

// The newest complete checkpoint folder under `root`, if any.
std::optional<std::string> latest_train_checkpoint(const std::string& root);

// manifest.json of a checkpoint folder, checked.
nlohmann::json read_train_manifest(const std::string& dir);

// Fills this rank's optimiser state (parameters included) from a checkpoint written on any
// grid; names a tied lm_head and the embedding as the same tensor. UserError when a tensor is
// missing or its full shape differs.
void load_train_checkpoint(const std::string& dir, const ProcessGrid& grid, Optimizer& optimizer,
                           const SliceMap& slices, const std::string& tied_embedding = "");

}  // namespace crash
