// The communicator interface (in the spirit of PyTorch c10d): collectives and point-to-point
// on tensors. Backends: MPI for CPU tensors, NCCL for CUDA tensors, and a one-rank local one.
#pragma once
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

namespace crash {

enum class ReduceOp { Sum, Max, Min };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // In place on `t` (contiguous).
  virtual void allreduce(torch::Tensor& t, ReduceOp op = ReduceOp::Sum) = 0;
  virtual void broadcast(torch::Tensor& t, int root) = 0;
  // Concatenation of every rank's `t` along `dim` (all ranks give the same shape).
  virtual torch::Tensor allgather(const torch::Tensor& t, int64_t dim) = 0;
  // Sum over ranks of `t`, split along `dim` into size() equal parts; returns this rank's part.
  virtual torch::Tensor reduce_scatter(const torch::Tensor& t, int64_t dim) = 0;
  // Point to point. Sends are asynchronous: the tensor is kept alive until the send completes
  // (the caller must not modify it before wait_sends), so a pipeline stage never blocks on a
  // peer that is itself sending.
  virtual void send(const torch::Tensor& t, int dst, int tag) = 0;
  // Receives into `t`, which has the sender's shape and dtype.
  virtual void recv(torch::Tensor& t, int src, int tag) = 0;
  // Waits for every outstanding send of this communicator.
  virtual void wait_sends() = 0;
  virtual void barrier() = 0;
};

using CommPtr = std::shared_ptr<Communicator>;

// A communicator of one process: collectives are the identity.
CommPtr make_local_comm();

}  // namespace crash
