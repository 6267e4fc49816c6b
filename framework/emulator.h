// CRaSh emulator plans (docs/architecture.md section 1): which layer of the full model fills each slot
// of the emulator, which slots train, and which slots share another slot's weights. The plan
// is data, saved as crash_plan.json next to the emulator's weights:
//   {"format": "crash-hpc emulator plan 1", "mode": "uniform"|"remove"|"share",
//    "source_model": DIR, "full_layers": L, "adapters": [a, b],
//    "slots": [{"source": full-model layer, "train": bool, "stored_as": slot}, ...], "clusters": [[...], ...]}
// A slot whose "stored_as" is another slot uses that slot's weights (tied and frozen, "share");
// config.json of such an emulator carries the same map as "crash_shared_layers".
// Pruned models are plans too: mode "prune" (the slots are the kept layers) or "merge" (LaCo: a
// slot's "merged" lists the later layers folded into its source layer, "weights" their weights). Their "adapters" are
// [0, k]: the last k slots train (train --train-all trains everything), and "pruning" records
// how the layers were chosen: {"method", "removed", "merged_groups", "ratio", "scores": {"file",
// "method", "values"}, "calibration": {...}}.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace crash {

struct EmulatorSlot {
  int64_t source = 0;     // layer of the full model this slot started from
  bool train = false;     // an adapter: trained, then plugged back into the full model
  int64_t stored_as = 0;  // the slot whose weights this slot uses (itself unless shared)
  // merge: the later full-model layers folded into `source` (LaCo), empty otherwise, and the
  // weight of each of source, merged... in the slot's tensors (sum_j w_j theta_j; LaCo's
  // theta_l + sum_i (theta_l+i - theta_l) is w = {1 - k, 1, ..., 1}).
  std::vector<int64_t> merged;
  std::vector<double> weights;
};

struct EmulatorPlan {
  std::string mode;  // uniform, remove, share, prune or merge
  std::string source_model;
  int64_t full_layers = 0;
  int64_t bottom = 2, top = 2;  // adapters
  std::vector<EmulatorSlot> slots;
  std::vector<std::vector<int64_t>> clusters;  // remove/share: the clusters of the middle layers
  nlohmann::json pruning;                      // prune/merge: provenance (null otherwise)

  std::vector<int64_t> trainable_slots() const;
  // config.json's "crash_shared_layers" (empty when no slot is shared).
  std::vector<int64_t> storage() const;
  nlohmann::json to_json() const;
  static EmulatorPlan from_json(const nlohmann::json& j, const std::string& source);
};

// Plans from the full model's depth L, the adapters (a bottom, b top) and, for remove and
// share, the clusters of the middle layers [a, L - b) (contiguous, covering them in order).
// uniform keeps round(i*(M-1)/(n-1)), i = 0..n-1, of the M middle layers, n = `keep`.
EmulatorPlan plan_uniform(int64_t L, int64_t a, int64_t b, int64_t keep);
EmulatorPlan plan_remove(int64_t L, int64_t a, int64_t b, const std::vector<std::vector<int64_t>>& clusters);
EmulatorPlan plan_share(int64_t L, int64_t a, int64_t b, const std::vector<std::vector<int64_t>>& clusters);

// A pruned model: every layer but `removed` kept in order; the last `train_last` slots train.
EmulatorPlan plan_prune(int64_t L, const std::vector<int64_t>& removed, int64_t train_last);
// LaCo: each group [l, l + k] (contiguous, disjoint, k >= 1) collapses into one slot at l.
EmulatorPlan plan_merge(int64_t L, const std::vector<std::vector<int64_t>>& groups, int64_t train_last);
// Marks the last `train_last` slots, and only those, as training (adapters [0, train_last]).
void train_top(EmulatorPlan& plan, int64_t train_last);
// Slots [first, first + count) of a merge (or prune) plan collapsed into one, as LaCo merges the
// layers of the model it has so far: w = w_first + sum_i (w_first+i - w_first) over the full
// model's layers (a merge of merges stays a weighted sum of the original layers).
EmulatorPlan merge_slots(const EmulatorPlan& plan, int64_t first, int64_t count);
// Whether a layer tensor is a norm (LaCo keeps the base layer's norms: its reference code
// merges only the attention and MLP projections).
bool is_norm_tensor(const std::string& hf_name);

// The clusters of a `cluster` job's output (clusters.json): lists of decoder layers.
std::vector<std::vector<int64_t>> read_clusters(const std::string& path);

// crash_plan.json of a model folder, if it has one.
std::optional<EmulatorPlan> read_plan(const std::string& model_dir);
void write_plan(const std::string& model_dir, const EmulatorPlan& plan);

// The decoder layer a Hugging Face parameter name belongs to ("model.decoder.layers.7.fc1.weight" -> 7,
// "model.layers.3.mlp.up_proj.weight" -> 3), or nullopt for embeddings, norms and the head.
std::optional<int64_t> layer_of_parameter(const std::string& hf_name);

class CheckpointReader;

// Writes the emulator `plan` describes as an HF folder built from the full model's tensors
// (no model is instantiated: tensors are copied from the mapped files), with crash_plan.json
// and the full model's tokenizer.json. Shared slots store their weights once. A merged slot's
// tensors are sum_j w_j theta_j, summed in fp64, except its norms (the source layer's).
void write_emulator_folder(const CheckpointReader& full, const EmulatorPlan& plan, const std::string& out);

// The full model with the emulator's trained slots copied back into the layers they came
// from (CRaSh plug-in), written as an HF folder. The emulator's embeddings, final norm and
// head (trained by train --train-all) replace the full model's (a stored tied head follows the
// embedding). UserError when the emulator was made from a model of another shape, or when a
// frozen slot's tensor differs from the layer it came from (training the plug-in would drop).
// Returns the names of the full model's tensors outside the layers that it changed.
std::vector<std::string> write_plugin_folder(const CheckpointReader& full, const CheckpointReader& emulator,
                                             const EmulatorPlan& plan, const std::string& out);

}  // namespace crash
