// SFSD (Chavan et al. 2024, "Surgical Feature-Space Decomposition of LLMs"): each decoder
// Linear y = W x + b is replaced by two factors found in the space of its outputs. Over
// calibration tokens the output covariance C = E[(y - mu)(y - mu)^T] is streamed as fp64 sums
// (never the activations); with V_r its top-r eigenvectors the layer becomes
//   y' = V_r (V_r^T W x) + b',  b' = V_r V_r^T b + (I - V_r V_r^T) mu,
// i.e. the projection of y on the r main directions of the outputs, the rest replaced by its
// mean. The factored model stores A = V_r^T W as <module>.factor_a.weight and B = V_r,
// b' as <module>.factor_b.weight/.bias, and config.json "crash_sfsd_ranks" (framework/config.h).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"

namespace crash {

// A decoder Linear of a checkpoint: HF module name and weight shape [out, in].
struct LinearInfo {
  std::string name;    // as the model names it (e.g. model.decoder.layers.3.fc1)
  std::string source;  // its tensors' prefix in the checkpoint (older OPT files lack "model.")
  int64_t layer = 0;
  int64_t in = 0, out = 0;
  bool bias = false;
};

// Every Linear of the decoder layers (attention q/k/v/out and the MLP), in checkpoint order
// of layers, as the checkpoint stores them. Fails on a checkpoint that is already factored.
std::vector<LinearInfo> decoder_linears(const CheckpointReader& ckpt);

// Sums over calibration tokens of one Linear's outputs, fp64.
struct OutputStats {
  double count = 0;
  torch::Tensor sum;        // [out]
  torch::Tensor sum_outer;  // [out, out]: sum of y y^T
  torch::Tensor mean() const { return sum / count; }
  torch::Tensor covariance() const;  // E[(y - mu)(y - mu)^T]
};

// Adds the rows of y [.., out] selected by `valid` (bool, y's rows flattened; undefined: all).
void accumulate(OutputStats& stats, const torch::Tensor& y, const torch::Tensor& valid);

// Runs the examples (this DP rank's share is taken from the list by index) through the model,
// first `tokens` tokens of each (at most the model's context), `batch_size` rows at a time, and returns the output
// statistics of every decoder Linear this rank's stage holds, over the non-padding tokens, summed over the DP group
// (full outputs: gathered over TP). Collective over the model's grid.
std::map<std::string, OutputStats> calibrate(DistributedLM& model, const std::vector<LinearInfo>& linears,
                                             const std::vector<std::vector<int64_t>>& examples, int64_t tokens,
                                             int64_t batch_size);

// Gives rank 0 of the grid every module's statistics (each held by one pipeline stage);
// other ranks get an empty map. Collective over the world, one module at a time.
std::map<std::string, OutputStats> gather_stats(const ProcessGrid& grid, const std::vector<LinearInfo>& linears,
                                                std::map<std::string, OutputStats> local);

// The two factors of one Linear, in fp64: a [r, in], b [out, r], bias [out].
struct SfsdFactors {
  torch::Tensor a, b, bias;
  torch::Tensor eigenvalues;  // all of C's, descending
};
SfsdFactors sfsd_factors(const torch::Tensor& weight, const torch::Tensor& bias, const OutputStats& stats,
                         int64_t rank);

// Whether a rank saves parameters: r (in + out) < in out.
bool rank_saves(int64_t rank, const LinearInfo& m);

// How a fraction f in (0, 1] becomes a module's rank (at least 1):
//   kRatio  (--ratio, and --candidates by default): ceil(f min(in, out)), a fraction of the
//           module's full rank;
//   kBudget (--budget, SFSD's budget): int(f in out / (in + out)), so the two factors hold about
//           f x the weight's in x out parameters (the reference's int(kappa x budget)).
enum class RankUnit { kRatio, kBudget };
int64_t unit_rank(const LinearInfo& m, double fraction, RankUnit unit);
const char* rank_unit_name(RankUnit unit);  // "ratio" or "budget"

// --ratio F / --budget B: every module at unit_rank(m, F, unit); modules where that does not
// save parameters are left out (stay dense).
std::map<std::string, int64_t> fixed_ranks(const std::vector<LinearInfo>& linears, double fraction, RankUnit unit);
inline std::map<std::string, int64_t> ratio_ranks(const std::vector<LinearInfo>& linears, double ratio) {
  return fixed_ranks(linears, ratio, RankUnit::kRatio);
}

// --search greedy (the paper's surgical search): from the top of the network down, each module
// tries its candidate ranks (unit_rank(m, f, unit) for each fraction f, small to large, those
// that save parameters) with the modules already decided at their ranks and the rest dense;
// the smallest rank `accept` takes is kept, else the module stays dense. `accept` evaluates a
// whole rank plan (on every rank of the grid alike: it may be collective).
std::map<std::string, int64_t> greedy_ranks(
    const std::vector<LinearInfo>& linears, const std::vector<double>& fractions,
    const std::function<bool(const std::map<std::string, int64_t>& ranks)>& accept, RankUnit unit = RankUnit::kRatio);

// The tensors of the factored model: the checkpoint's, with each module of `ranks` replaced by
// its factors, in `factor_dtype` (default: the checkpoint tensor's dtype).
std::vector<std::pair<std::string, torch::Tensor>> factored_tensors(
    const CheckpointReader& ckpt, const std::vector<LinearInfo>& linears,
    const std::map<std::string, OutputStats>& stats, const std::map<std::string, int64_t>& ranks,
    std::optional<torch::ScalarType> factor_dtype = std::nullopt);

// Parameter and FLOP accounting of a rank plan.
struct SfsdSummary {
  int64_t params_before = 0, params_after = 0;                  // whole model
  int64_t decoder_params_before = 0, decoder_params_after = 0;  // decoder layers
  // 2 x (multiply-adds of every weight matrix per token: decoder Linears and LM head);
  // attention scores, which grow with the context, are not counted.
  int64_t flops_before = 0, flops_after = 0;
  nlohmann::json modules;  // sfsd_ranks.json: name -> {rank, in, out, params_before, params_after}
};
SfsdSummary sfsd_summary(const CheckpointReader& ckpt, const std::vector<LinearInfo>& linears,
                         const std::map<std::string, int64_t>& ranks);

}  // namespace crash
