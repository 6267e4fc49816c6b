#include "framework/sift.h"

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>

#include <torch/csrc/autograd/function.h>

#include "framework/models/family.h"
#include "framework/safetensors.h"
#include "parallel/errors.h"

namespace crash {

int64_t sift_k(double rho, int64_t numel) {
  return std::min(numel, static_cast<int64_t>(std::floor(rho * static_cast<double>(numel))) + 1);
}

torch::Tensor shard_to_global(const torch::Tensor& local, c10::IntArrayRef shape, const ShardSlice& s) {
  int64_t inner = 1;
  for (size_t d = static_cast<size_t>(s.dim) + 1; d < shape.size(); ++d) inner *= shape[d];
  const int64_t L = shape[static_cast<size_t>(s.dim)];
  auto outer = local.div(L * inner, "floor");
  auto mid = local.div(inner, "floor").remainder(L);
  auto in = local.remainder(inner);
  return outer * (s.full * inner) + (mid + s.start) * inner + in;
}

torch::Tensor select_top_k(const torch::Tensor& grad, int64_t k, const std::optional<ShardSlice>& slice,
                           const CommPtr& tp, int tp_rank) {
  torch::NoGradGuard no_grad;
  // |g| as int32 bits: for non-negative floats their order is the order of the values, so the
  // k-th largest is found by bisection on integers. Padding past the full tensor gets -1.
  auto bits = grad.detach().abs().to(torch::kFloat32).contiguous().view(torch::kInt32);
  if (slice) {
    const int64_t avail = std::max<int64_t>(0, std::min(slice->length, slice->full - slice->start));
    if (avail < bits.size(slice->dim)) bits.narrow(slice->dim, avail, bits.size(slice->dim) - avail).fill_(-1);
  }
  bits = bits.reshape({-1});
  // A replicated group of TP ranks (slice.group > 1) holds one piece: its first rank counts it.
  const bool counts = !slice || slice->group <= 1 || tp_rank % slice->group == 0;
  auto total = [&](const torch::Tensor& local_count) -> int64_t {
    const int64_t n = local_count.item<int64_t>();
    if (!slice || !tp || tp->size() == 1) return n;
    auto t = torch::full({1}, counts ? static_cast<double>(n) : 0.0,
                         torch::TensorOptions().dtype(torch::kFloat64).device(grad.device()));
    tp->allreduce(t);
    return static_cast<int64_t>(t.item<double>());
  };
  // Largest threshold t with count(|g| >= t) >= k: count(lo) >= k > count(hi) throughout.
  int64_t lo = 0, hi = 0x7f800001;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (total((bits >= static_cast<int32_t>(mid)).sum()) >= k)
      lo = mid;
    else
      hi = mid;
  }
  const auto t = static_cast<int32_t>(lo);
  auto above = (bits > t).nonzero().reshape({-1});
  const int64_t need = k - total(torch::tensor(above.numel()));
  auto ties = (bits == t).nonzero().reshape({-1});
  int64_t take = std::min<int64_t>(need, ties.numel());
  if (slice && tp && tp->size() > 1) {
    // The ties of lowest global flat index: smallest bound I with count(global < I) >= need.
    auto global = shard_to_global(ties, grad.sizes(), *slice);
    int64_t glo = 0, ghi = 1;
    for (auto d : grad.sizes()) ghi *= d;
    ghi = ghi / grad.size(slice->dim) * slice->full;
    while (ghi - glo > 1) {
      const int64_t mid = glo + (ghi - glo) / 2;
      if (total((global < mid).sum()) >= need)
        ghi = mid;
      else
        glo = mid;
    }
    take = (global < ghi).sum().item<int64_t>();
  }
  // Local and global flat order agree, so the first `take` ties are the lowest global ones.
  return std::get<0>(torch::cat({above, ties.narrow(0, 0, take)}).sort());
}

namespace {

// Runs after AccumulateGrad: the dense gradient autograd just stored is folded into the masked
// sum and dropped, so at most one dense gradient lives at a time.
struct MaskedGradientHook : torch::autograd::FunctionPostHook {
  MaskedGradientHook(SparseAdamW* owner, size_t i) : owner(owner), i(i) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    owner->absorb(i);
    return outputs;
  }
  SparseAdamW* owner;
  size_t i;
};

}  // namespace

SparseAdamW::SparseAdamW(std::vector<SiftParam> params, double rho, const AdamWOptions& options, CommPtr tp,
                         int tp_rank, CommPtr dp)
    : rho_(rho), options_(options), tp_(std::move(tp)), dp_(std::move(dp)), tp_rank_(tp_rank) {
  for (auto& p : params) {
    params_.push_back(p.param);
    slices_.push_back(p.slice);
    full_numel_.push_back(p.full_numel);
    const auto dev = p.param.param.device();
    index_.push_back(torch::empty({0}, torch::TensorOptions().dtype(torch::kInt64).device(dev)));
    for (auto* v : {&master_, &exp_avg_, &exp_avg_sq_, &masked_grad_})
      v->push_back(torch::empty({0}, torch::TensorOptions().dtype(torch::kFloat32).device(dev)));
    grad_.emplace_back();
  }
}

SparseAdamW::~SparseAdamW() {
  for (auto& [node, key] : hooks_) node->del_post_hook(key);
}

std::vector<std::vector<size_t>> SparseAdamW::selection_groups(int passes,
                                                               const std::vector<std::string>& pinned) const {
  std::vector<std::vector<size_t>> groups(static_cast<size_t>(std::max(1, passes)));
  int64_t total = 0;
  for (const auto& p : params_) total += p.param.numel() * p.param.element_size();
  const double per_group = static_cast<double>(total) / static_cast<double>(groups.size());
  int64_t bytes = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    const bool pin = std::find(pinned.begin(), pinned.end(), p.name) != pinned.end();
    // Greedy in order: the group that the running byte count has reached.
    const auto g = pin ? 0 : std::min(groups.size() - 1, static_cast<size_t>(static_cast<double>(bytes) / per_group));
    groups[g].push_back(i);
    bytes += p.param.numel() * p.param.element_size();
  }
  return groups;
}

void SparseAdamW::select(const std::vector<size_t>& which) {
  torch::NoGradGuard no_grad;
  int64_t chosen = 0;
  for (size_t i : which) {
    auto param = params_[i].param.detach();
    auto grad = params_[i].param.grad().defined() ? params_[i].param.grad() : torch::zeros_like(param);
    auto idx = select_top_k(grad, sift_k(rho_, full_numel_[i]), slices_[i], tp_, tp_rank_);
    // DP replicas hold the same summed gradient; DP rank 0's mask is sent anyway, so that
    // rounding differences between replicas can never split the mask.
    if (dp_ && dp_->size() > 1) {
      auto n = torch::full({1}, idx.numel(), torch::TensorOptions().dtype(torch::kInt64).device(idx.device()));
      dp_->broadcast(n, 0);
      if (dp_->rank() != 0) idx = torch::empty({n.item<int64_t>()}, idx.options());
      dp_->broadcast(idx, 0);
    }
    index_[i] = idx;
    master_[i] = param.reshape({-1}).index_select(0, idx).to(torch::kFloat32);
    exp_avg_[i] = torch::zeros_like(master_[i]);
    exp_avg_sq_[i] = torch::zeros_like(master_[i]);
    chosen += idx.numel();
    params_[i].param.mutable_grad() = torch::Tensor();
  }
  spdlog::debug("SIFT: {} entries of {} tensors of this rank's shards train (rho {})", chosen, which.size(), rho_);
}

void SparseAdamW::arm() {
  const bool hooked = !hooks_.empty();
  for (size_t i = 0; i < params_.size(); ++i) {
    masked_grad_[i] = torch::zeros_like(master_[i]);
    if (hooked) continue;
    auto node = torch::autograd::impl::grad_accumulator(params_[i].param);
    if (!node) continue;
    hooks_.emplace_back(node, node->add_post_hook(std::make_unique<MaskedGradientHook>(this, i)));
  }
  selected_ = true;
}

void SparseAdamW::absorb(size_t i) {
  torch::NoGradGuard no_grad;
  auto& p = params_[i].param;
  if (!p.grad().defined()) return;
  masked_grad_[i].add_(p.grad().reshape({-1}).index_select(0, index_[i]).to(torch::kFloat32));
  p.mutable_grad() = torch::Tensor();
}

torch::Tensor SparseAdamW::gradient_of(const torch::Tensor& p) {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].param.is_same(p)) {
      if (selected_) {
        absorb(i);
        return masked_grad_[i];
      }
      break;
    }
  if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  return p.grad();
}

void SparseAdamW::zero_grad() {
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].param.mutable_grad() = torch::Tensor();
    if (masked_grad_[i].defined()) masked_grad_[i].zero_();
  }
}

void SparseAdamW::gather_grads() {
  // A gradient autograd left dense (no hook yet on this backward) is folded in first.
  for (size_t i = 0; i < params_.size(); ++i) {
    absorb(i);
    grad_[i] = masked_grad_[i];
  }
  gathered_ = true;
}

void SparseAdamW::select_from_dense() {
  std::vector<size_t> all(params_.size());
  std::iota(all.begin(), all.end(), size_t{0});
  // select() drops the dense gradients it read: this step's update still needs them.
  std::vector<torch::Tensor> dense;
  for (auto& p : params_) dense.push_back(p.param.grad());
  select(all);
  arm();
  for (size_t i = 0; i < params_.size(); ++i) params_[i].param.mutable_grad() = dense[i];
}

double SparseAdamW::clip_gradients(double max_norm, const std::vector<CommPtr>& sum_over) {
  if (!selected_) select_from_dense();
  gather_grads();
  std::vector<torch::Tensor> counted;
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].in_norm) counted.push_back(grad_[i]);
  const double norm =
      global_norm(counted, params_.empty() ? torch::Device(torch::kCPU) : params_[0].param.device(), sum_over);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1)
      for (auto& g : grad_) g.mul_(coef);
  }
  return norm;
}

void SparseAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  if (!selected_) select_from_dense();
  if (!gathered_) gather_grads();
  ++steps_;
  for (size_t i = 0; i < params_.size(); ++i) {
    adamw_update(master_[i], exp_avg_[i], exp_avg_sq_[i], grad_[i], lr, steps_, options_);
    auto flat = params_[i].param.detach().view({-1});
    flat.index_copy_(0, index_[i], master_[i].to(flat.scalar_type()));
    grad_[i] = torch::Tensor();
    masked_grad_[i].zero_();
  }
  gathered_ = false;
}

std::vector<StateTensor> SparseAdamW::state() {
  std::vector<StateTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].name;
    out.push_back({"param", name, params_[i].param.detach()});
    out.push_back({"sift_index", name, index_[i], true});
    out.push_back({"master", name, master_[i], true});
    out.push_back({"exp_avg", name, exp_avg_[i], true});
    out.push_back({"exp_avg_sq", name, exp_avg_sq_[i], true});
  }
  return out;
}

void SparseAdamW::state_loaded() {
  if (steps_ > 0) arm();
}

}  // namespace crash

namespace crash {

namespace {
constexpr const char* kIncrementsFormat = "crash-hpc sift increments 1";
}

void save_increments(const std::string& path, const SparseAdamW& optimizer, const ProcessGrid& grid,
                     const CheckpointReader& base, const std::string& skip) {
  namespace fs = std::filesystem;
  torch::NoGradGuard no_grad;
  if (!optimizer.selected()) fail("--save-increments {}: no step has run, so there is no mask", path);
  const bool writer = grid.tp_rank() == 0 && grid.dp_rank() == 0;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  nlohmann::json shapes = nlohmann::json::object();
  const auto& params = optimizer.params();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (p.name == skip) continue;
    const auto& slice = optimizer.slices()[i];
    const auto& idx = optimizer.indices(i);
    auto values = p.param.detach().reshape({-1}).index_select(0, idx).to(torch::kFloat32);
    auto global = slice ? shard_to_global(idx, p.param.sizes(), *slice) : idx;
    if (slice && grid.tp() > 1) {
      // Each distinct piece once (a replicated group's first rank), gathered padded to the
      // longest with index -1, then put in global order.
      if (slice->group > 1 && grid.tp_rank() % slice->group != 0) {
        global = global.narrow(0, 0, 0);
        values = values.narrow(0, 0, 0);
      }
      auto n = torch::full({1}, global.numel(), global.options());
      const int64_t longest = grid.tp_group()->allgather(n, 0).max().item<int64_t>();
      auto gi = torch::full({longest}, -1, global.options());
      auto gv = torch::zeros({longest}, values.options());
      gi.narrow(0, 0, global.numel()).copy_(global);
      gv.narrow(0, 0, values.numel()).copy_(values);
      gi = grid.tp_group()->allgather(gi, 0);
      gv = grid.tp_group()->allgather(gv, 0);
      auto keep = gi >= 0;
      auto sorted = gi.masked_select(keep).sort();
      global = std::get<0>(sorted);
      values = gv.masked_select(keep).index_select(0, std::get<1>(sorted));
    }
    if (!writer) continue;
    if (!base.contains(p.name)) fail("{}: has no tensor '{}' to take increments from", base.dir(), p.name);
    global = global.cpu();
    auto start = base.view(p.name).reshape({-1}).index_select(0, global).to(torch::kFloat32);
    tensors.emplace_back(p.name + ".sift_index", global.contiguous());
    tensors.emplace_back(p.name + ".sift_delta", (values.cpu() - start).contiguous());
    shapes[p.name] = base.info(p.name).shape;
  }
  // One part per pipeline stage, joined by rank 0.
  const std::string part = fmt::format("{}.part-pp{:03d}", path, grid.pp_rank());
  if (writer) write_safetensors(part, tensors, {{"shapes", shapes.dump()}});
  grid.world()->barrier();
  if (grid.rank() == 0) {
    std::vector<std::pair<std::string, torch::Tensor>> all;
    nlohmann::json all_shapes = nlohmann::json::object();
    for (int pp = 0; pp < grid.pp(); ++pp) {
      const std::string name = fmt::format("{}.part-pp{:03d}", path, pp);
      {
        SafetensorsFile f(name);
        for (const auto& [key, info] : f.tensors()) all.emplace_back(key, f.read(key));
        all_shapes.update(nlohmann::json::parse(f.metadata().at("shapes")));
      }
      fs::remove(name);
    }
    write_safetensors(path, all,
                      {{"format", kIncrementsFormat},
                       {"base_model", fs::absolute(base.dir()).string()},
                       {"shapes", all_shapes.dump()}});
    spdlog::info("wrote the increments of {} tensors to {}", all_shapes.size(), path);
  }
  grid.world()->barrier();
}

void merge_increments(const std::string& base_dir, const std::string& increments, const std::string& out) {
  namespace fs = std::filesystem;
  CheckpointReader base(base_dir);
  if (!fs::exists(increments)) fail("{}: increments file not found", increments);
  SafetensorsFile inc(increments);
  auto fmt_it = inc.metadata().find("format");
  if (fmt_it == inc.metadata().end() || fmt_it->second != kIncrementsFormat)
    fail("{}: not a SIFT increments file (metadata 'format' must be \"{}\")", increments, kIncrementsFormat);
  nlohmann::json shapes;
  try {
    shapes = nlohmann::json::parse(inc.metadata().at("shapes"));
  } catch (const std::exception&) {
    fail("{}: metadata 'shapes' is missing or not JSON", increments);
  }
  std::map<std::string, torch::Tensor> merged;
  for (const auto& [name, shape_json] : shapes.items()) {
    if (!base.contains(name)) fail("{}: tensor '{}' is not in the base model {}", increments, name, base_dir);
    const auto shape = shape_json.get<std::vector<int64_t>>();
    const auto& have = base.info(name).shape;
    if (shape != have)
      fail("{}: '{}' has the shape {} but the base model's is {}", increments, name, fmt::join(shape, "x"),
           fmt::join(have, "x"));
    if (!inc.contains(name + ".sift_index") || !inc.contains(name + ".sift_delta"))
      fail("{}: '{}' lacks its .sift_index or .sift_delta tensor", increments, name);
    auto idx = inc.read(name + ".sift_index");
    auto delta = inc.read(name + ".sift_delta");
    if (idx.scalar_type() != torch::kInt64 || idx.dim() != 1 || delta.sizes() != idx.sizes())
      fail("{}: '{}.sift_index' must be int64 [k] and '{}.sift_delta' of the same length", increments, name, name);
    const int64_t numel = base.info(name).numel();
    if (idx.numel() > 0 && (idx.min().item<int64_t>() < 0 || idx.max().item<int64_t>() >= numel))
      fail("{}: '{}.sift_index' has an index outside the tensor's {} entries", increments, name, numel);
    auto w = base.view(name).clone();
    auto flat = w.view({-1});
    // base + delta in fp32, stored in the base's dtype.
    flat.index_copy_(0, idx,
                     (flat.index_select(0, idx).to(torch::kFloat32) + delta.to(torch::kFloat32)).to(w.scalar_type()));
    merged[name] = w;
  }
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& name : base.names()) {
    auto it = merged.find(name);
    tensors.emplace_back(name, it != merged.end() ? it->second : base.view(name));
  }
  SaveOptions options;
  options.copy_files = hf_folder_paths(base_dir, {"crash_plan.json"});
  options.extra_files["crash_sift_merge.json"] = nlohmann::json{{"format", "crash-hpc sift merge 1"},
                                                                {"base_model", fs::absolute(base_dir).string()},
                                                                {"increments", fs::absolute(increments).string()},
                                                                {"tensors", shapes.size()}}
                                                     .dump(2) +
                                                 "\n";
  save_hf_folder(out, base.config(), tensors, options);
}

}  // namespace crash
