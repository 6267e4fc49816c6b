// Optimisers of the trainer: AdamW with fp32 master weights, gradient clipping by the norm
// over the whole grid, and the linear schedule with warm-up. An Optimizer exposes its state
// as named tensors, each a slice of one parameter, so checkpoints can save and reshard it;
// a sparse variant (SIFT) can keep values and moments of masked entries only behind the same
// interface.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "parallel/comm.h"

namespace crash {

// A parameter as the optimiser sees it: this rank's shard of one model tensor.
struct OptimParam {
  std::string name;
  torch::Tensor param;  // any floating dtype; its .grad() is read
  bool in_norm = true;  // counted in the global gradient norm on this rank (copies elsewhere: false)
};

// One tensor of optimiser state (or the parameter itself) for checkpoints: `kind/name`.
struct StateTensor {
  std::string kind;     // "param", "master", "exp_avg", "exp_avg_sq" ("sift_index" for SIFT)
  std::string param;    // the parameter it belongs to (same shape and slice)
  torch::Tensor value;  // live: loading a checkpoint copies into it
  // Per-rank sparse data (SIFT: entries of this rank's shard, any length): saved as it is,
  // loaded only on the same TP x PP grid, by replacing the tensor's storage (set_).
  bool sparse = false;
  // A flat piece (the distributed optimiser): `value` is elements [flat_start, flat_start +
  // numel) of the flattened parameter shard of shape `shape`; -1: `value` is the whole shard.
  int64_t flat_start = -1;
  std::vector<int64_t> shape = {};
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update with learning rate `lr` from the gradients in the parameters.
  virtual void step(double lr) = 0;
  virtual void zero_grad();
  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  const std::vector<OptimParam>& params() const { return params_; }
  // Everything a checkpoint must hold to continue exactly.
  virtual std::vector<StateTensor> state() = 0;
  // After the state tensors were overwritten: refresh what derives from them.
  virtual void state_loaded() {}
  // Clips the gradients the update will use to a global norm of max_norm and returns the norm
  // before clipping (see clip_grad_norm below); SIFT counts only its masked entries.
  virtual double clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over);

 protected:
  std::vector<OptimParam> params_;
  int64_t steps_ = 0;
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// AdamW (Loshchilov & Hutter: decoupled weight decay, bias correction), the same arithmetic
// as torch::optim::AdamW. Moments and the master copy are fp32; bf16/fp16 parameters get the
// master stepped and copied back; fp32 parameters are their own master.
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<OptimParam> params, const AdamWOptions& options);
  void step(double lr) override;
  std::vector<StateTensor> state() override;
  void state_loaded() override;

 private:
  AdamWOptions options_;
  std::vector<torch::Tensor> master_, exp_avg_, exp_avg_sq_;
  std::vector<bool> own_master_;  // fp32 parameters are stepped in place
};

// One AdamW update of w (fp32) and its moments by grad (fp32, same shape) at optimiser step
// `step` (1-based); shared by the dense AdamW and SIFT's sparse one.
void adamw_update(torch::Tensor& w, torch::Tensor& exp_avg, torch::Tensor& exp_avg_sq, const torch::Tensor& grad,
                  double lr, int64_t step, const AdamWOptions& options);

// Norm of the gradient of the whole model: squares summed over this rank's parameters that
// count (in_norm), then over each group in `sum_over` (TP, then PP; DP ranks hold the same
// gradients after the sum and are not counted again). fp64.
// Norm of tensors summed over this rank's list, then over each group of `sum_over`. fp64.
double global_norm(const std::vector<torch::Tensor>& tensors, torch::Device device,
                   const std::vector<CommPtr>& sum_over);
double global_grad_norm(const std::vector<OptimParam>& params, const std::vector<CommPtr>& sum_over);
// Scales gradients so the global norm is at most max_norm (as torch clip_grad_norm_);
// returns the norm before clipping. max_norm <= 0: only measures.
double clip_grad_norm(const std::vector<OptimParam>& params, double max_norm, const std::vector<CommPtr>& sum_over);

// Bytes of optimiser state (everything but the parameters themselves) this rank holds.
int64_t state_bytes(Optimizer& optimizer);

// Linear warm-up then linear decay to 0 (HF get_linear_schedule_with_warmup): the learning
// rate of optimiser step `step` (0-based) of `total`.
double linear_schedule(double peak, int64_t step, int64_t warmup, int64_t total);

}  // namespace crash
