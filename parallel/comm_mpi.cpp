#include "parallel/comm_mpi.h"

#include <algorithm>
#include <exception>
#include <list>

#include "parallel/errors.h"

namespace crash {

namespace {

MPI_Datatype mpi_type(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return MPI_FLOAT;
    case torch::kFloat64: return MPI_DOUBLE;
    case torch::kInt64: return MPI_INT64_T;
    case torch::kInt32: return MPI_INT32_T;
    case torch::kUInt8: return MPI_UINT8_T;
    case torch::kInt8: return MPI_INT8_T;
    case torch::kBool: return MPI_C_BOOL;
    case torch::kBFloat16:
    case torch::kFloat16: return MPI_UINT16_T;  // moved as bits; reductions go through float32
    default: throw std::runtime_error(std::string("MPI communicator: unsupported dtype ") + c10::toString(t));
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Max: return MPI_MAX;
    case ReduceOp::Min: return MPI_MIN;
    default: return MPI_SUM;
  }
}

bool is_half(const torch::Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat16;
}

class MpiComm : public Communicator {
 public:
  MpiComm(MPI_Comm comm, bool owned, int64_t max_chunk) : comm_(comm), owned_(owned), chunk_(max_chunk) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // While unwinding after a failure, waiting for peers could hang: MPI_Abort ends them.
    if (finalized || std::uncaught_exceptions() > 0) return;
    wait_sends();
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  // A CUDA tensor travels through host memory: this MPI is not CUDA-aware, and what goes over
  // MPI when the model runs on GPUs (scores, outputs to write) is small.
  void allreduce(torch::Tensor& t, ReduceOp op) override {
    if (t.is_cuda()) return through_host(t, [&](torch::Tensor& h) { allreduce(h, op); });
    check(t);
    if (is_half(t)) {  // MPI has no bf16/fp16 arithmetic
      auto f = t.to(torch::kFloat32);
      allreduce(f, op);
      t.copy_(f);
      return;
    }
    auto* p = static_cast<char*>(t.data_ptr());
    const int64_t n = t.numel(), es = t.element_size();
    for (int64_t off = 0; off < n; off += chunk_) {
      int count = static_cast<int>(std::min(chunk_, n - off));
      MPI_Allreduce(MPI_IN_PLACE, p + off * es, count, mpi_type(t.scalar_type()), mpi_op(op), comm_);
    }
  }

  void broadcast(torch::Tensor& t, int root) override {
    if (t.is_cuda()) return through_host(t, [&](torch::Tensor& h) { broadcast(h, root); });
    check(t);
    auto* p = static_cast<char*>(t.data_ptr());
    const int64_t n = t.numel(), es = t.element_size();
    for (int64_t off = 0; off < n; off += chunk_)
      MPI_Bcast(p + off * es, static_cast<int>(std::min(chunk_, n - off)), mpi_type(t.scalar_type()), root, comm_);
  }

  torch::Tensor allgather(const torch::Tensor& in, int64_t dim) override {
    if (in.is_cuda()) return allgather(in.cpu(), dim).to(in.device());
    auto t = in.contiguous();
    const int64_t n = t.numel(), es = t.element_size();
    auto out = torch::empty({size_, n}, t.options());
    MPI_Datatype type = mpi_type(t.scalar_type());
    for (int64_t off = 0; off < n; off += chunk_) {
      int count = static_cast<int>(std::min(chunk_, n - off));
      // One rank's piece of this chunk lands in its row: a block of `count` with the row's extent.
      MPI_Datatype block, row;
      MPI_Type_contiguous(count, type, &block);
      MPI_Type_create_resized(block, 0, n * es, &row);
      MPI_Type_commit(&row);
      MPI_Allgather(static_cast<char*>(t.data_ptr()) + off * es, count, type,
                    static_cast<char*>(out.data_ptr()) + off * es, 1, row, comm_);
      MPI_Type_free(&row);
      MPI_Type_free(&block);
    }
    std::vector<int64_t> shape = {size_};
    for (auto s : t.sizes()) shape.push_back(s);
    if (dim < 0) dim += t.dim();
    // Along dim 0 the rows are the concatenation already: no copy.
    if (dim == 0 && t.dim() > 0) {
      auto rows = t.sizes().vec();
      rows[0] *= size_;
      return out.view(rows);
    }
    auto parts = out.view(shape).unbind(0);
    return torch::cat(parts, dim);
  }

  torch::Tensor reduce_scatter(const torch::Tensor& in, int64_t dim) override {
    if (in.is_cuda()) return reduce_scatter(in.cpu(), dim).to(in.device());
    if (dim < 0) dim += in.dim();
    if (in.size(dim) % size_ != 0)
      throw std::runtime_error("reduce_scatter: dimension " + std::to_string(dim) + " of size " +
                               std::to_string(in.size(dim)) + " does not split into " + std::to_string(size_));
    const int64_t part = in.size(dim) / size_;
    const int64_t block_numel = in.numel() / size_;
    auto shape = in.sizes().vec();
    shape[static_cast<size_t>(dim)] = part;
    if (is_half(in) || block_numel > chunk_) {
      auto blocks = torch::stack(in.split(part, dim)).contiguous();  // [size, ...part]
      allreduce(blocks, ReduceOp::Sum);
      return blocks[rank_].clone();
    }
    // Along dim 0 of a contiguous tensor the parts are consecutive blocks already: no copy.
    auto blocks = dim == 0 && in.is_contiguous() ? in : torch::stack(in.split(part, dim)).contiguous();
    auto out = torch::empty(shape, in.options());
    MPI_Reduce_scatter_block(blocks.data_ptr(), out.data_ptr(), static_cast<int>(block_numel),
                             mpi_type(in.scalar_type()), MPI_SUM, comm_);
    return out;
  }

  void send(const torch::Tensor& in, int dst, int tag) override {
    reap();
    Pending p;
    p.tensor = in.is_cuda() ? in.cpu().contiguous() : in.contiguous();  // contiguous CPU input: no copy
    auto* ptr = static_cast<char*>(p.tensor.data_ptr());
    const int64_t n = p.tensor.numel(), es = p.tensor.element_size();
    for (int64_t off = 0; off < n || off == 0; off += chunk_) {
      MPI_Request r;
      MPI_Isend(ptr + off * es, static_cast<int>(std::min(chunk_, n - off)), mpi_type(p.tensor.scalar_type()), dst, tag,
                comm_, &r);
      p.requests.push_back(r);
      if (n == 0) break;
    }
    pending_.push_back(std::move(p));
  }

  void recv(torch::Tensor& t, int src, int tag) override {
    if (t.is_cuda()) return through_host(t, [&](torch::Tensor& h) { recv(h, src, tag); });
    auto buf = t.is_contiguous() ? t : torch::empty_like(t, at::MemoryFormat::Contiguous);
    auto* ptr = static_cast<char*>(buf.data_ptr());
    const int64_t n = buf.numel(), es = buf.element_size();
    for (int64_t off = 0; off < n || off == 0; off += chunk_) {
      MPI_Recv(ptr + off * es, static_cast<int>(std::min(chunk_, n - off)), mpi_type(buf.scalar_type()), src, tag,
               comm_, MPI_STATUS_IGNORE);
      if (n == 0) break;
    }
    if (!buf.is_same(t)) t.copy_(buf);
  }

  void wait_sends() override {
    for (auto& p : pending_) MPI_Waitall(static_cast<int>(p.requests.size()), p.requests.data(), MPI_STATUSES_IGNORE);
    pending_.clear();
  }

  void barrier() override { MPI_Barrier(comm_); }
  MPI_Comm handle() const { return comm_; }

 private:
  struct Pending {
    torch::Tensor tensor;
    std::vector<MPI_Request> requests;
  };
  void check(const torch::Tensor& t) const {
    if (!t.is_contiguous()) throw std::runtime_error("MPI communicator: needs a contiguous tensor");
  }
  template <class F>
  static void through_host(torch::Tensor& t, F&& op) {
    auto h = t.to(torch::kCPU).contiguous();
    op(h);
    t.copy_(h);
  }
  // Drops sends that have completed, so long runs keep no buffers they no longer need.
  void reap() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      int done = 0;
      MPI_Testall(static_cast<int>(it->requests.size()), it->requests.data(), &done, MPI_STATUSES_IGNORE);
      it = done ? pending_.erase(it) : std::next(it);
    }
  }

  MPI_Comm comm_;
  bool owned_;
  int64_t chunk_;
  int rank_ = 0, size_ = 1;
  std::list<Pending> pending_;
};

}  // namespace

MPI_Comm mpi_handle(const Communicator& comm) {
  if (auto* m = dynamic_cast<const MpiComm*>(&comm)) return m->handle();
  if (comm.size() == 1) return MPI_COMM_SELF;
  throw std::runtime_error("mpi_handle: a " + comm.backend() + " communicator has no MPI handle");
}

CommPtr make_mpi_comm(MPI_Comm comm, bool owned, int64_t max_chunk) {
  return std::make_shared<MpiComm>(comm, owned, max_chunk);
}

}  // namespace crash
