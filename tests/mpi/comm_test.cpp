// The MPI communicator and the tensor-parallel regions on N ranks, checked against values
// every rank can compute alone. Run under mpirun; rank 0 prints the verdict.
//   comm_test           the MPI communicator, CPU tensors
//   comm_test --nccl    the NCCL communicator on CUDA tensors and on CPU ones, and the MPI one on
//                       CUDA tensors (one GPU per rank; bench/gpu_check.py)
#include <torch/cuda.h>
#include <torch/torch.h>

#include <iostream>

#include "parallel/comm_mpi.h"
#include "parallel/comm_nccl.h"
#include "parallel/tensor_parallel.h"
#include "parallel/world.h"

using namespace crash;

namespace {

int failures = 0, passes = 0;

torch::Device dev = torch::kCPU;  // where every tensor of the checks lives: the communicator's device

void expect(bool ok, const std::string& what, const CommPtr& comm) {
  auto flag = torch::full({1}, ok ? 0 : 1, torch::TensorOptions().dtype(torch::kInt32).device(dev));
  comm->allreduce(flag, ReduceOp::Max);
  const bool all = flag.item<int>() == 0;
  (all ? passes : failures)++;
  if (comm->rank() == 0) std::cout << (all ? "ok   " : "FAIL ") << what << std::endl;
}

bool close(const torch::Tensor& a, const torch::Tensor& b, double tol = 1e-6) {
  return a.sizes() == b.sizes() && (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() <= tol;
}

// The same tensor on every rank r, distinct per rank: base * (r + 1).
torch::Tensor of_rank(const torch::Tensor& base, int r) { return base * (r + 1); }

void collectives(const CommPtr& c, const std::string& tag) {
  const int n = c->size(), r = c->rank();
  auto base = torch::arange(0, 24, torch::TensorOptions().dtype(torch::kFloat32).device(dev)).reshape({2, 12}) - 5;
  double ranks_sum = n * (n + 1) / 2.0;
  for (auto type : {torch::kFloat32, torch::kFloat64, torch::kInt64, torch::kBFloat16}) {
    auto t = of_rank(base, r).to(type).contiguous();
    c->allreduce(t, ReduceOp::Sum);
    expect(close(t, (base * ranks_sum).to(type)), tag + " allreduce sum " + c10::toString(type), c);
  }
  auto mx = of_rank(base, r).contiguous();
  c->allreduce(mx, ReduceOp::Max);
  expect(close(mx, torch::max(base, base * n)), tag + " allreduce max", c);
  auto mn = of_rank(base, r).contiguous();
  c->allreduce(mn, ReduceOp::Min);
  expect(close(mn, torch::min(base, base * n)), tag + " allreduce min", c);

  auto b = r == n - 1 ? base.clone() : torch::zeros_like(base);
  c->broadcast(b, n - 1);
  expect(close(b, base), tag + " broadcast", c);

  for (int64_t dim : {0, 1}) {
    auto g = c->allgather(of_rank(base, r), dim);
    std::vector<torch::Tensor> parts;
    for (int k = 0; k < n; ++k) parts.push_back(of_rank(base, k));
    expect(close(g, torch::cat(parts, dim)), tag + " allgather dim " + std::to_string(dim), c);
  }
  auto wide =
      torch::arange(0, 2 * 6 * n, torch::TensorOptions().dtype(torch::kFloat32).device(dev)).reshape({2, 6 * n});
  auto rs = c->reduce_scatter(of_rank(wide, r), 1);
  expect(close(rs, (wide * ranks_sum).narrow(1, r * 6, 6)), tag + " reduce_scatter", c);

  // NCCL's point-to-point calls queue on one stream, so a ring (every rank sends first) would wait
  // for itself; the pipeline's schedule pairs each send with a receive posted in the peer's order.
  if (c->backend() == "nccl") {
    c->barrier();
    return;
  }
  // A ring: two messages with one tag arrive in order; a non-contiguous receiver; an empty tensor.
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  c->send(of_rank(base, r), next, 7);
  c->send(of_rank(base, r) + 1000, next, 7);
  c->send(torch::empty({0}, base.options()), next, 8);
  auto first = torch::empty({2, 12}, base.options());
  auto second_t = torch::empty({12, 2}, base.options());
  auto second = second_t.t();  // non-contiguous view
  auto empty = torch::empty({0}, base.options());
  c->recv(first, prev, 7);
  c->recv(second, prev, 7);
  c->recv(empty, prev, 8);
  c->wait_sends();
  expect(close(first, of_rank(base, prev)) && close(second, of_rank(base, prev) + 1000), tag + " send/recv ring", c);
  c->barrier();
}

void tensor_parallel(const CommPtr& tp) {
  const int n = tp->size(), r = tp->rank();
  torch::manual_seed(1);  // the same full tensors on every rank
  // Column-parallel then row-parallel (an MLP) equals the unsplit computation, with gradients.
  const int64_t in = 6, hidden = 4 * n, out = 5;
  auto x = torch::randn({3, in}).to(dev).requires_grad_();
  auto w1 = torch::randn({hidden, in}).to(dev), b1 = torch::randn({hidden}).to(dev),
       w2 = torch::randn({out, hidden}).to(dev), b2 = torch::randn({out}).to(dev);
  auto want = torch::linear(torch::relu(torch::linear(x, w1, b1)), w2, b2);
  want.pow(2).sum().backward();
  auto want_grad = x.grad().clone();
  x.mutable_grad() = torch::Tensor();
  const int64_t local = hidden / n;
  ColumnParallelLinear col(in, hidden, r * local, local, true, tp);
  RowParallelLinear row(hidden, r * local, local, out, true, tp);
  col->to(dev);
  row->to(dev);
  {
    torch::NoGradGuard ng;
    col->weight.copy_(w1.narrow(0, r * local, local));
    col->bias.copy_(b1.narrow(0, r * local, local));
    row->weight.copy_(w2.narrow(1, r * local, local));
    row->bias.copy_(b2);
  }
  auto got = row->forward(torch::relu(col->forward(x)));
  got.pow(2).sum().backward();
  expect(close(got, want, 1e-5), "column/row-parallel MLP forward", tp);
  expect(close(x.grad(), want_grad, 1e-4), "column/row-parallel MLP input gradient", tp);

  // gather/scatter regions are each other's inverse.
  auto full = torch::randn({2, 3 * n}).to(dev).requires_grad_();
  auto part = scatter_to_tp(full, tp);
  auto back = gather_from_tp(part, tp);
  back.sum().backward();
  expect(close(back, full) && close(full.grad(), torch::ones_like(full)), "scatter/gather regions", tp);

  // Vocabulary-parallel embedding and cross-entropy (vocabulary padded to a multiple of n).
  const int64_t vocab = 4 * n + 1;
  auto table = torch::randn({vocab, 3}).to(dev);
  VocabParallelEmbedding emb(vocab, 3, tp);
  emb->to(dev);
  {
    torch::NoGradGuard ng;
    emb->weight.zero_();
    const int64_t avail = std::max<int64_t>(0, std::min(emb->local_vocab(), vocab - emb->vocab_start()));
    if (avail > 0) emb->weight.narrow(0, 0, avail).copy_(table.narrow(0, emb->vocab_start(), avail));
  }
  auto ids = torch::tensor({0L, vocab - 1, 3L, 2L * n}).to(dev);
  expect(close(emb->forward(ids), torch::embedding(table, ids)), "vocab-parallel embedding", tp);

  auto logits = torch::randn({5, vocab}).to(dev).requires_grad_();
  auto targets = torch::tensor({1L, vocab - 1, -100L, 0L, 2L}).to(dev);
  auto ref = torch::nn::functional::cross_entropy(
      logits, targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kNone));
  ref.sum().backward();
  auto ref_grad = logits.grad().clone();
  const int64_t lv = padded_vocab(vocab, n) / n, start = r * lv;
  auto padded =
      torch::cat({logits.detach(), torch::full({5, padded_vocab(vocab, n) - vocab}, 123.0, logits.options())}, 1);
  auto mine = padded.narrow(1, start, lv).clone().requires_grad_(true);
  auto loss = vocab_parallel_cross_entropy(mine, targets, start, vocab, tp);
  loss.sum().backward();
  const int64_t avail = std::max<int64_t>(0, std::min(lv, vocab - start));
  bool grad_ok = avail == 0 || close(mine.grad().narrow(1, 0, avail), ref_grad.narrow(1, start, avail), 1e-5);
  if (avail < lv) grad_ok = grad_ok && mine.grad().narrow(1, avail, lv - avail).abs().max().item<double>() == 0;
  expect(close(loss, ref, 1e-5), "vocab-parallel cross-entropy loss (padding never wins)", tp);
  expect(grad_ok, "vocab-parallel cross-entropy gradient", tp);

  // Vocabulary-parallel KL(teacher_T || student_T) of distillation, against the whole-vocabulary one.
  const double T = 2.0;
  auto teacher = torch::randn({5, vocab}).to(dev) * 3;
  auto student = logits.detach().clone().requires_grad_(true);
  auto log_p = torch::log_softmax(teacher / T, -1);
  auto ref_kl = (log_p.exp() * (log_p - torch::log_softmax(student / T, -1))).sum(-1);
  (ref_kl * torch::arange(1, 6, logits.options())).sum().backward();
  auto teacher_mine =
      torch::cat({teacher, torch::full({5, padded_vocab(vocab, n) - vocab}, 50.0, teacher.options())}, 1)
          .narrow(1, start, lv);
  auto student_mine =
      torch::cat({student.detach(), torch::full({5, padded_vocab(vocab, n) - vocab}, -7.0, teacher.options())}, 1)
          .narrow(1, start, lv)
          .clone()
          .requires_grad_(true);
  auto kl = vocab_parallel_kl_divergence(student_mine, teacher_mine, T, start, vocab, tp);
  (kl * torch::arange(1, 6, logits.options())).sum().backward();
  bool kl_grad_ok =
      avail == 0 || close(student_mine.grad().narrow(1, 0, avail), student.grad().narrow(1, start, avail), 1e-5);
  if (avail < lv)
    kl_grad_ok = kl_grad_ok && student_mine.grad().narrow(1, avail, lv - avail).abs().max().item<double>() == 0;
  expect(close(kl, ref_kl, 1e-5), "vocab-parallel KL divergence (padding excluded)", tp);
  expect(kl_grad_ok, "vocab-parallel KL divergence gradient", tp);
}

}  // namespace

int main(int argc, char** argv) {
  World::init(&argc, &argv);
  World::get().require_mpi();
  torch::set_num_threads(1);
  CommPtr comm;
  if (argc > 1 && std::string(argv[1]) == "--nccl") {
    if (!nccl_compiled() || !torch::cuda::is_available()) {
      std::cerr << "comm_test --nccl: this build has no NCCL, or no GPU is visible" << std::endl;
      return 2;
    }
    const int device = World::get().rank() % static_cast<int>(torch::cuda::device_count());
    const auto cuda = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device));
    comm = make_nccl_comm(MPI_COMM_WORLD, device);
    dev = cuda;
    collectives(comm, "nccl");
    // What crosses the other way: control values on the CPU over NCCL, CUDA tensors over MPI.
    dev = torch::kCPU;
    collectives(comm, "nccl, CPU tensors through the GPU");
    dev = cuda;
    collectives(make_mpi_comm(MPI_COMM_WORLD, false), "mpi, CUDA tensors through the host");
  } else {
    comm = make_mpi_comm(MPI_COMM_WORLD, false);
    collectives(comm, "mpi");
    collectives(make_mpi_comm(MPI_COMM_WORLD, false, /*max_chunk=*/5), "mpi, 5-element chunks");
  }
  tensor_parallel(comm);
  if (comm->rank() == 0) std::cout << passes << " passed, " << failures << " failed" << std::endl;
  return failures ? 1 : 0;
}
