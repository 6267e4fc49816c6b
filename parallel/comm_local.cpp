#include "parallel/comm.h"
#include "parallel/errors.h"

namespace crash {

namespace {

class LocalComm : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }
  void allreduce(torch::Tensor&, ReduceOp) override {}
  void broadcast(torch::Tensor&, int) override {}
  torch::Tensor allgather(const torch::Tensor& t, int64_t) override { return t.clone(); }
  torch::Tensor reduce_scatter(const torch::Tensor& t, int64_t) override { return t.clone(); }
  void send(const torch::Tensor&, int dst, int) override { fail("local communicator: no rank {} to send to", dst); }
  void recv(torch::Tensor&, int src, int) override { fail("local communicator: no rank {} to receive from", src); }
  void wait_sends() override {}
  void barrier() override {}
};

}  // namespace

CommPtr make_local_comm() { return std::make_shared<LocalComm>(); }

}  // namespace crash
