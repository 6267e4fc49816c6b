// SIFT's distributed top-k on N tensor-parallel ranks: each rank holds a slice (along dim 0 or
// 1, the last one padded past the end as vocabulary shards are) of a tensor full of ties; the
// union of the ranks' choices must be exactly the k entries a sort of the whole tensor picks
// (|g| descending, flat index ascending). Also a replicated group (slice.group 2 on 4 ranks).
// Run under mpirun; rank 0 prints the verdict.
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <numeric>

#include "framework/sift.h"
#include "parallel/grid.h"
#include "parallel/world.h"

using namespace crash;

namespace {

int failures = 0, passes = 0;

void expect(bool ok, const std::string& what, const CommPtr& comm) {
  auto flag = torch::full({1}, ok ? 0 : 1, torch::kInt32);
  comm->allreduce(flag, ReduceOp::Max);
  const bool all = flag.item<int>() == 0;
  (all ? passes : failures)++;
  if (comm->rank() == 0) std::cout << (all ? "ok   " : "FAIL ") << what << std::endl;
}

std::vector<int64_t> reference_top_k(const torch::Tensor& g, int64_t k) {
  auto a = g.abs().to(torch::kFloat64).reshape({-1}).contiguous();
  const double* v = a.data_ptr<double>();
  std::vector<int64_t> order(static_cast<size_t>(a.numel()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return v[x] > v[y]; });
  order.resize(static_cast<size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

// The global indices every rank chose, gathered (padded with -1) and sorted.
std::vector<int64_t> union_of(const torch::Tensor& global, const CommPtr& tp, bool counts) {
  auto mine = counts ? global : global.narrow(0, 0, 0);
  auto n = torch::full({1}, mine.numel(), torch::kInt64);
  const int64_t longest = std::max<int64_t>(1, tp->allgather(n, 0).max().item<int64_t>());
  auto padded = torch::full({longest}, -1, torch::kInt64);
  padded.narrow(0, 0, mine.numel()).copy_(mine);
  auto all = tp->allgather(padded, 0);
  all = std::get<0>(all.masked_select(all >= 0).sort());
  return std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
}

}  // namespace

int main(int argc, char** argv) {
  World::init(&argc, &argv);
  torch::set_num_threads(1);
  const int N = World::get().size();
  auto grid = ProcessGrid::create(GridSizes{N, 1});
  auto tp = grid->tp_group();
  const int r = grid->tp_rank();
  torch::manual_seed(7);  // the same tensors on every rank
  const std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"random", torch::randn({10, 13})},
      {"ties", torch::randint(-4, 5, {11, 9}).to(torch::kFloat32)},
      {"zeros", torch::zeros({6, 7})},
      {"few values", (torch::randint(0, 2, {9, 10}) * 0.5).to(torch::kFloat32)}};
  for (const auto& [what, full] : tensors)
    for (int64_t dim : {0, 1}) {
      // Shards of ceil(n / N), the last padded past the end (like a padded vocabulary).
      const int64_t n = full.size(dim), len = (n + N - 1) / N, start = r * len;
      const int64_t avail = std::max<int64_t>(0, std::min(len, n - start));
      auto shard = torch::full(full.sizes().vec(), 99.0f).narrow(dim, 0, len).contiguous();
      if (avail > 0) shard.narrow(dim, 0, avail).copy_(full.narrow(dim, start, avail));
      ShardSlice slice{dim, n, start, len, 1};
      for (int64_t k : {int64_t(1), int64_t(5), full.numel() / 3, full.numel()}) {
        auto idx = select_top_k(shard, k, slice, tp, r);
        auto got = union_of(shard_to_global(idx, shard.sizes(), slice), tp, true);
        expect(got == reference_top_k(full, k),
               "TP" + std::to_string(N) + " " + what + ", dim " + std::to_string(dim) + ", k " + std::to_string(k), tp);
      }
    }
  if (N == 4) {
    // Two pieces, each replicated on a group of 2 ranks (like key/value heads with TP > heads).
    auto full = torch::randint(-3, 4, {8, 5}).to(torch::kFloat32);
    const int piece = r / 2;
    ShardSlice slice{0, 8, piece * 4, 4, 2};
    auto shard = full.narrow(0, piece * 4, 4).contiguous();
    for (int64_t k : {int64_t(3), int64_t(17), int64_t(40)}) {
      auto idx = select_top_k(shard, k, slice, tp, r);
      auto got = union_of(shard_to_global(idx, shard.sizes(), slice), tp, r % 2 == 0);
      expect(got == reference_top_k(full, k), "TP4, replicated groups of 2, k " + std::to_string(k), tp);
    }
  }
  if (r == 0) std::cout << passes << " passed, " << failures << " failed" << std::endl;
  return failures ? 1 : 0;
}
