// The importance job's output (analysis/importance.h for the scores), one HDF5 file readable
// with h5py alone. Datasets, each present only when computed (float64; L decoder layers):
//   /block_influence   [L]     BI_l, layer l = hidden state l -> l + 1; higher = more important
//   /angular_distance  [L, L]  [l][n - 1] = d(l, n), block of n layers from l; NaN where l + n > L;
//                              lower = removed first
//   /cka_importance    [L]     1 - CKA(h_l, h_l+1); higher = more important
//   /sleb_order        [n]     int64: SLEB's greedy removal order (first removed first)
//   /sleb_perplexity   [n]     calibration perplexity after each removal
// Each dataset's attributes: method, reference, definition, hidden_states (which states and
// tokens it compares), prune (which end is removed first), and its inputs (num_examples,
// num_tokens; archive or cka_file, cka_method, cka_pooling).
// Root attributes: format "crash-hpc importance 1", methods (JSON list of the dataset names
// present), num_layers (L), model, model_type, num_examples, archive, last_hidden_state,
// tool_version.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace crash {

inline constexpr const char* kImportanceFormat = "crash-hpc importance 1";

struct ImportanceRecord {
  int64_t num_layers = 0;  // L
  std::string model, model_type;
  // Hidden-state scores and their archive (undefined tensors when not computed).
  torch::Tensor block_influence, angular_distance;
  std::string archive;
  int64_t num_examples = 0, num_tokens = 0;
  // The CKA-based score and the similarity file it came from.
  torch::Tensor cka_importance;
  std::string cka_file, cka_method, cka_pooling;
  int64_t cka_examples = 0;
  // SLEB: the layers in the order removed, and the perplexity after each removal.
  torch::Tensor sleb_order, sleb_perplexity;
  std::string sleb_calibration;
  int64_t sleb_examples = 0;
  double sleb_base_perplexity = 0;
  std::string tool_version;
};

// The dataset names present, in the order above.
std::vector<std::string> importance_methods(const ImportanceRecord& record);

// Written by one process under a temporary name and renamed when complete.
void write_importance_file(const std::string& path, const ImportanceRecord& record, bool overwrite);
// UserError when missing or not an importance file.
ImportanceRecord read_importance_file(const std::string& path);

}  // namespace crash
