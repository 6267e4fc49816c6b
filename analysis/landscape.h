// Loss landscapes (docs/architecture.md section 1): the mean next-token loss of models whose parameters
// combine checkpoints of one architecture, theta = theta_0 + sum_k c_k (theta_k - theta_0):
// a line theta(alpha) = (1 - alpha) theta_A + alpha theta_B (c = {alpha}), or a plane
// theta_0 + a (theta_1 - theta_0) + b (theta_2 - theta_0) (c = {a, b}).
//
// Each rank keeps its own shard of every checkpoint (its stage, its TP slices) and writes the
// combination into the model's parameters in place; grid points are shared among the DP
// replicas, each replica evaluating its points on all the data on its PP x TP grid.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"

namespace crash {

// Checks that `other` has the architecture (every shape-giving field of the config) of
// `base`; a UserError names both folders and the first field that differs.
void check_same_architecture(const CheckpointReader& base, const CheckpointReader& other);

// `n` evenly spaced values from lo to hi (lo alone when n is 1).
std::vector<double> linspace(double lo, double hi, int64_t n);

class LossLandscape {
 public:
  // `model` holds theta_0; `others` are theta_1.. (checkpoints of the same architecture),
  // read here as this rank's slices, in the model's dtype, on its device.
  LossLandscape(DistributedLM& model, const std::vector<const CheckpointReader*>& others,
                const DistributedOptions& options);

  // Sets the model's parameters to theta_0 + sum_k coefs[k] (theta_{k+1} - theta_0) (in fp64, then
  // the model's dtype).
  void set_point(const std::vector<double>& coefs);

  // Sum of the next-token losses of every non-padding target of `seqs` and their count, on
  // every rank of this replica (batches of batch_size rows, padded with pad_id).
  std::pair<double, int64_t> loss_sum(const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size,
                                      int64_t pad_id);

  // Mean loss at every point (each a coefficient vector), points shared round-robin among
  // the DP replicas; collective over the world, the result on every rank. Logs progress.
  std::vector<double> evaluate(const std::vector<std::vector<double>>& points,
                               const std::vector<std::vector<int64_t>>& seqs, int64_t batch_size, int64_t pad_id);

 private:
  DistributedLM& model_;
  std::vector<torch::Tensor> params_;               // the stage's parameters, in named_parameters order
  std::vector<torch::Tensor> base_;                 // theta_0
  std::vector<std::vector<torch::Tensor>> others_;  // theta_k, same order
};

}  // namespace crash
