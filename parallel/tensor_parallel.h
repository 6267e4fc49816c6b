// Megatron-style tensor parallelism: the four communication regions as autograd functions,
// column- and row-parallel linear layers, a vocabulary-parallel embedding and cross-entropy.
// With a one-rank communicator every layer is its ordinary single-device counterpart.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <optional>
#include <string>

#include "parallel/comm.h"

namespace crash {

// Forward identity, backward allreduce (input of a column-parallel layer).
torch::Tensor copy_to_tp(const torch::Tensor& x, const CommPtr& tp);
// Forward allreduce, backward identity (output of a row-parallel layer).
torch::Tensor reduce_from_tp(const torch::Tensor& x, const CommPtr& tp);
// Forward allgather along the last dimension, backward keeps this rank's part.
torch::Tensor gather_from_tp(const torch::Tensor& x, const CommPtr& tp);
// Forward keeps this rank's part of the last dimension, backward allgathers.
torch::Tensor scatter_to_tp(const torch::Tensor& x, const CommPtr& tp);

// The local product x W^T + b of every tensor-parallel linear layer. An upper layer may install
// a faster kernel for inference (framework/models/onednn.cpp does, for CPU float32); it is
// consulted only when no gradient is wanted and returns nullopt where it does not apply.
using InferenceLinear =
    std::function<std::optional<torch::Tensor>(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b)>;
void set_inference_linear(InferenceLinear kernel);
// While one lives, this thread's local_linear skips that kernel even without grad mode: a
// forward that is run again for its gradients (activation recomputation) must match bit for bit.
struct TrainingKernelsGuard {
  TrainingKernelsGuard();
  ~TrainingKernelsGuard();
  TrainingKernelsGuard(const TrainingKernelsGuard&) = delete;
  TrainingKernelsGuard& operator=(const TrainingKernelsGuard&) = delete;

 private:
  bool previous_;
};
torch::Tensor local_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b = {});

// Which part of a full (checkpoint) tensor a rank holds: `length` entries from `start` along
// `dim` of a dimension of size `full`. Entries past `full` are padding (zero). `group`
// consecutive TP ranks hold the same part (key/value heads replicated when fewer than TP).
struct ShardSlice {
  int64_t dim = 0;
  int64_t full = 0;
  int64_t start = 0;
  int64_t length = 0;
  int group = 1;
};

// While one lives on this thread, new parallel layers leave their parameters uninitialised:
// for models a checkpoint load overwrites whole (as HF's from_pretrained skips its init).
// Drawing the random init of a 6.7B model would cost tens of seconds per rank.
class SkipParameterInit {
 public:
  SkipParameterInit();
  ~SkipParameterInit();
  SkipParameterInit(const SkipParameterInit&) = delete;
  SkipParameterInit& operator=(const SkipParameterInit&) = delete;
  static bool active();

 private:
  bool previous_;
};

// A module whose parameters are slices of full tensors; the loader asks it which slice.
class TensorParallelModule {
 public:
  virtual ~TensorParallelModule() = default;
  // nullopt: the parameter is replicated whole on every TP rank.
  virtual std::optional<ShardSlice> slice_of(const std::string& param) const = 0;
};

// Reassembles a full tensor from every TP rank's part (collective over tp).
torch::Tensor gather_shards(const torch::Tensor& local, const ShardSlice& slice, const CommPtr& tp);

// One factor of a low-rank (SFSD) linear layer: y = x W^T (+ b), W [out, in]; `slice` when its
// weight (and bias) is a part of the full factor split over TP.
class LowRankFactorImpl : public torch::nn::Module, public TensorParallelModule {
 public:
  LowRankFactorImpl(int64_t out, int64_t in, bool bias, std::optional<ShardSlice> slice);
  std::optional<ShardSlice> slice_of(const std::string& param) const override { return slice_; }
  torch::Tensor weight, bias;

 private:
  std::optional<ShardSlice> slice_;
};
TORCH_MODULE(LowRankFactor);

// Calibration hook of a linear layer: receives every forward's whole output (gathered over TP),
// detached. Empty (the default): no cost.
using LinearObserver = std::function<void(const torch::Tensor& y)>;

// What the column- and row-parallel linear layers share: weight and bias, or after SFSD's
// make_low_rank the two factors in their place, the calibration observer, the part of the full
// weight this rank holds and the TP group.
class ParallelLinearBase : public torch::nn::Module, public TensorParallelModule {
 public:
  ParallelLinearBase(ShardSlice slice, CommPtr tp) : slice_(slice), tp_(std::move(tp)) {}
  // SFSD: weight and bias become two factors of rank `rank` (fresh values), as the layer says.
  virtual void make_low_rank(int64_t rank) = 0;
  int64_t low_rank() const { return factor_a ? factor_a->weight.size(0) : 0; }
  const CommPtr& tp() const { return tp_; }
  torch::Tensor weight, bias;
  LowRankFactor factor_a{nullptr}, factor_b{nullptr};
  LinearObserver observer;
  // An additive branch (LoRA, framework/lora.h), empty by default: its result is added to the
  // layer's output before any gather. It gets the input as the layer does (column-parallel: the
  // whole input, not yet copied to TP; row-parallel: this rank's part) and returns what the layer
  // returns before a gather (column: this rank's outputs; row: the whole output, summed over TP).
  std::function<torch::Tensor(const torch::Tensor& x)> adapter;

 protected:
  // Replaces weight and bias by factor_a [rank, a_in] and factor_b [b_out, rank] with the bias,
  // each a part of the full factor where its slice says, on the weight's device and dtype.
  void replace_with_factors(int64_t rank, int64_t a_in, std::optional<ShardSlice> a_slice, int64_t b_out,
                            std::optional<ShardSlice> b_slice);
  ShardSlice slice_;
  CommPtr tp_;
};

// y = x W^T + b with W split by rows (output features). `start` is this rank's first output
// row of the full `full_out`; with gather_output the full output is returned.
class ColumnParallelLinearImpl : public ParallelLinearBase {
 public:
  ColumnParallelLinearImpl(int64_t in, int64_t full_out, int64_t start, int64_t local_out, bool bias, CommPtr tp,
                           int group = 1, bool gather_output = false);
  torch::Tensor forward(const torch::Tensor& x);
  std::optional<ShardSlice> slice_of(const std::string& param) const override;
  // SFSD: weight and bias become factor_a [rank, in] (replicated) and factor_b [local_out, rank]
  // with the bias (split like the outputs), so forward computes B (A x) + b. Fresh values.
  void make_low_rank(int64_t rank) override;

 private:
  bool gather_;
};
TORCH_MODULE(ColumnParallelLinear);

// y = x W^T + b with W split by columns (input features); x arrives already split.
class RowParallelLinearImpl : public ParallelLinearBase {
 public:
  RowParallelLinearImpl(int64_t full_in, int64_t start, int64_t local_in, int64_t out, bool bias, CommPtr tp);
  torch::Tensor forward(const torch::Tensor& x);
  std::optional<ShardSlice> slice_of(const std::string& param) const override;
  // SFSD: weight and bias become factor_a [rank, local_in] (split by input columns; the
  // rank-dimension partial sums are allreduced) and factor_b [out, rank] with the bias (replicated).
  void make_low_rank(int64_t rank) override;
};
TORCH_MODULE(RowParallelLinear);

// Embedding rows split over TP ranks; the vocabulary is padded to a multiple of TP.
class VocabParallelEmbeddingImpl : public torch::nn::Module, public TensorParallelModule {
 public:
  VocabParallelEmbeddingImpl(int64_t vocab, int64_t dim, CommPtr tp);
  torch::Tensor forward(const torch::Tensor& ids);
  std::optional<ShardSlice> slice_of(const std::string& param) const override;
  int64_t vocab_start() const { return slice_.start; }
  int64_t local_vocab() const { return slice_.length; }
  int64_t vocab() const { return slice_.full; }
  torch::Tensor weight;

 private:
  ShardSlice slice_;
  CommPtr tp_;
};
TORCH_MODULE(VocabParallelEmbedding);

// Rows of the full vocabulary a TP rank holds: ceil(vocab / tp) each.
int64_t padded_vocab(int64_t vocab, int tp);

// Per-token cross-entropy from vocabulary-parallel logits [N, V/tp] without gathering them:
// targets [N] (ignore_index where no loss), vocab_start this rank's first column, vocab the
// real vocabulary (padding columns never win). Returns [N] losses (0 where ignored).
torch::Tensor vocab_parallel_cross_entropy(const torch::Tensor& local_logits, const torch::Tensor& targets,
                                           int64_t vocab_start, int64_t vocab, const CommPtr& tp,
                                           int64_t ignore_index = -100);
// Per-row KL(p || q) of knowledge distillation at temperature T, p = softmax(teacher / T),
// q = softmax(student / T), from vocabulary-parallel logits [N, V/tp] of both (padding columns
// excluded) without gathering them: [N], the same on every TP rank. The gradient flows to the
// student only ((q - p) / T per column); fp32 inside.
torch::Tensor vocab_parallel_kl_divergence(const torch::Tensor& student_local, const torch::Tensor& teacher_local,
                                           double temperature, int64_t vocab_start, int64_t vocab, const CommPtr& tp);

}  // namespace crash
