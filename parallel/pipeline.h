// Pipeline parallelism: layers split into stages, micro-batches streamed through them,
// and the 1F1B schedule (one forward, one backward) for training.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

#include "parallel/comm.h"

namespace crash {

// [first, end) layers of each stage: balanced (earlier stages take the remainder) when
// `counts` is empty, else counts[s] layers for stage s. Throws UserError on a bad split.
std::vector<std::pair<int64_t, int64_t>> split_layers(int64_t layers, int stages,
                                                      const std::vector<int64_t>& counts = {});

// What a stage does with micro-batch `mb`; the schedule does the communication.
struct StageStep {
  std::function<torch::Tensor(int mb)> input;                         // first stage: embedding output
  std::function<torch::Tensor(const torch::Tensor& x, int mb)> run;   // this stage's layers
  std::function<torch::Tensor(const torch::Tensor& y, int mb)> loss;  // last stage, training: scaled loss
  std::function<void(const torch::Tensor& y, int mb)> output;         // last stage, inference
  std::function<torch::Tensor(int mb)> empty_activation;              // buffer for a received activation
};

// Forward and backward of every micro-batch in the 1F1B order; gradients accumulate in the
// parameters. Returns the sum of the micro-batch losses on the last stage, 0 elsewhere.
double run_1f1b(const CommPtr& pp, int micro_batches, const StageStep& step);

// Inference: micro-batches flow stage to stage without waiting for the whole batch.
void run_forward(const CommPtr& pp, int micro_batches, const StageStep& step);

}  // namespace crash
