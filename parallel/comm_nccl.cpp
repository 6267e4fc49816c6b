#include "parallel/comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <list>
#include <stdexcept>
#include <string>

#if defined(CRASH_TORCH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

namespace crash {

bool nccl_compiled() { return true; }

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string("NCCL: ") + what + ": " + ncclGetErrorString(r));
}

ncclDataType_t nccl_type(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return ncclFloat32;
    case torch::kFloat64: return ncclFloat64;
    case torch::kFloat16: return ncclFloat16;
    case torch::kBFloat16: return ncclBfloat16;
    case torch::kInt64: return ncclInt64;
    case torch::kInt32: return ncclInt32;
    case torch::kUInt8:
    case torch::kBool: return ncclUint8;
    case torch::kInt8: return ncclInt8;
    default: throw std::runtime_error(std::string("NCCL communicator: unsupported dtype ") + c10::toString(t));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
    default: return ncclSum;
  }
}

class NcclComm : public Communicator {
 public:
  NcclComm(MPI_Comm mpi, int device) : device_(device) {
    MPI_Comm_rank(mpi, &rank_);
    MPI_Comm_size(mpi, &size_);
    ncclUniqueId id;
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mpi);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaEventCreateWithFlags(&before_, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&after_, cudaEventDisableTiming), "cudaEventCreate");
    check_nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }
  ~NcclComm() override {
    try {
      wait_sends();
    } catch (...) {
    }
    ncclCommDestroy(comm_);
    cudaEventDestroy(before_);
    cudaEventDestroy(after_);
    cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  // Control values (counts, flags, scores) are CPU tensors; NCCL reads device memory only, so
  // they travel through the GPU (as a non-contiguous view goes through a contiguous copy).
  void allreduce(torch::Tensor& t, ReduceOp op) override {
    if (!t.is_cuda() || !t.is_contiguous()) return through_device(t, [&](torch::Tensor& d) { allreduce(d, op); });
    Ordered o(*this, t);
    check_nccl(
        ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()), nccl_op(op), comm_, stream_),
        "ncclAllReduce");
  }
  void broadcast(torch::Tensor& t, int root) override {
    if (!t.is_cuda() || !t.is_contiguous()) return through_device(t, [&](torch::Tensor& d) { broadcast(d, root); });
    Ordered o(*this, t);
    check_nccl(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()), root, comm_, stream_),
               "ncclBroadcast");
  }
  torch::Tensor allgather(const torch::Tensor& in, int64_t dim) override {
    if (!in.is_cuda()) return allgather(in.to(cuda()), dim).cpu();
    auto t = in.contiguous();
    auto out = torch::empty({size_, t.numel()}, t.options());
    {
      Ordered o(*this, t);
      check_nccl(ncclAllGather(t.data_ptr(), out.data_ptr(), t.numel(), nccl_type(t.scalar_type()), comm_, stream_),
                 "ncclAllGather");
    }
    std::vector<int64_t> shape = {size_};
    for (auto s : t.sizes()) shape.push_back(s);
    if (dim < 0) dim += t.dim();
    return torch::cat(out.view(shape).unbind(0), dim);
  }
  torch::Tensor reduce_scatter(const torch::Tensor& in, int64_t dim) override {
    if (!in.is_cuda()) return reduce_scatter(in.to(cuda()), dim).cpu();
    if (dim < 0) dim += in.dim();
    auto blocks = torch::stack(in.split(in.size(dim) / size_, dim)).contiguous();
    auto out = torch::empty(blocks.sizes().slice(1), in.options());
    Ordered o(*this, blocks);
    check_nccl(ncclReduceScatter(blocks.data_ptr(), out.data_ptr(), out.numel(), nccl_type(in.scalar_type()), ncclSum,
                                 comm_, stream_),
               "ncclReduceScatter");
    return out;
  }
  void send(const torch::Tensor& in, int dst, int tag) override {
    if (!in.is_cuda()) return send(in.to(cuda()), dst, tag);
    auto t = in.contiguous();
    Ordered o(*this, t);
    check_nccl(ncclSend(t.data_ptr(), t.numel(), nccl_type(t.scalar_type()), dst, comm_, stream_), "ncclSend");
    in_flight_.push_back(t);  // kept alive until the stream has sent it
  }
  void recv(torch::Tensor& t, int src, int tag) override {
    if (!t.is_cuda()) return through_device(t, [&](torch::Tensor& d) { recv(d, src, tag); });
    auto buf = t.is_contiguous() ? t : torch::empty_like(t, at::MemoryFormat::Contiguous);
    {
      Ordered o(*this, buf);
      check_nccl(ncclRecv(buf.data_ptr(), buf.numel(), nccl_type(buf.scalar_type()), src, comm_, stream_), "ncclRecv");
    }
    if (!buf.is_same(t)) t.copy_(buf);
  }
  void wait_sends() override {
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    in_flight_.clear();
  }
  void barrier() override {
    auto one = torch::ones({1}, torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCUDA, device_));
    allreduce(one, ReduceOp::Sum);
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  // Orders one operation between torch's current stream and this communicator's stream.
  struct Ordered {
    Ordered(NcclComm& c, const torch::Tensor& t) : c_(c) {
      if (!t.is_cuda()) throw std::runtime_error("NCCL communicator: needs a CUDA tensor");
      torch_stream_ = current_stream(c_.device_);
      check_cuda(cudaEventRecord(c_.before_, torch_stream_), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(c_.stream_, c_.before_, 0), "cudaStreamWaitEvent");
    }
    ~Ordered() {
      cudaEventRecord(c_.after_, c_.stream_);
      cudaStreamWaitEvent(torch_stream_, c_.after_, 0);
    }
    NcclComm& c_;
    cudaStream_t torch_stream_;
  };

  torch::Device cuda() const { return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_)); }
  // The copy back runs on torch's stream, which waits for the operation (Ordered).
  template <class F>
  void through_device(torch::Tensor& t, F&& op) {
    auto d = t.to(cuda()).contiguous();
    op(d);
    t.copy_(d);
  }

  static cudaStream_t current_stream(int device) {
#if defined(CRASH_TORCH_CUDA)
    return c10::cuda::getCurrentCUDAStream(device).stream();
#else
    return nullptr;  // the legacy default stream, where a LibTorch without CUDA would have nothing
#endif
  }

  int device_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t before_ = nullptr, after_ = nullptr;
  std::list<torch::Tensor> in_flight_;
};

}  // namespace

CommPtr make_nccl_comm(MPI_Comm comm, int device) { return std::make_shared<NcclComm>(comm, device); }

}  // namespace crash
