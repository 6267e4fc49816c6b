#include "framework/lora.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "framework/atomic_file.h"
#include "framework/json_fields.h"
#include "framework/models/dropout.h"
#include "framework/models/family.h"
#include "framework/safetensors.h"
#include "parallel/errors.h"
#include "parallel/tensor_parallel.h"

namespace crash {

namespace fs = std::filesystem;

namespace {

// Generic target -> the last component of the module's name in the families that have it.
const std::map<std::string, std::vector<std::string>>& generic_targets() {
  static const std::map<std::string, std::vector<std::string>> t = {{"q", {"q_proj"}},
                                                                    {"k", {"k_proj"}},
                                                                    {"v", {"v_proj"}},
                                                                    {"o", {"o_proj", "out_proj"}},
                                                                    {"gate", {"gate_proj"}},
                                                                    {"up", {"up_proj", "fc1"}},
                                                                    {"down", {"down_proj", "fc2"}}};
  return t;
}

std::string last_component(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

// PEFT's name of a module's tensor in adapter_model.safetensors.
std::string peft_name(const std::string& module, const char* factor) {
  return "base_model.model." + module + "." + factor + ".weight";
}

// The layer number in "model.layers.3.self_attn.q_proj" after `prefix` ("model.layers.").
int64_t layer_number(const std::string& module, const std::string& prefix) {
  return std::stoll(module.substr(prefix.size()));
}

// FNV-1a: the same on every build, unlike std::hash.
uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

}  // namespace

struct LoraAdapters::Site {
  std::string name;  // the linear module, as HF names it
  std::shared_ptr<ParallelLinearBase> layer;
  bool column = true;
  LowRankFactor a{nullptr}, b{nullptr};
  std::function<torch::Tensor(const torch::Tensor&)> branch;
};

std::vector<std::string> LoraOptions::target_names() const {
  return targets.empty() ? std::vector<std::string>{"q", "v"} : targets;
}

void check_lora_options(const LoraOptions& o, const ModelConfig* config) {
  if (!o.active()) {
    if (o.alpha || o.dropout || !o.targets.empty() || !o.init.empty())
      fail("--lora-alpha, --lora-dropout, --lora-targets and --lora-init need --lora-rank");
    return;
  }
  if (*o.rank <= 0) fail("--lora-rank must be positive, got {}", *o.rank);
  if (o.alpha && !(*o.alpha > 0)) fail("--lora-alpha must be positive, got {}", *o.alpha);
  if (o.dropout && !(*o.dropout >= 0 && *o.dropout < 1)) fail("--lora-dropout must be in [0, 1), got {}", *o.dropout);
  std::set<std::string> seen;
  for (const auto& t : o.target_names()) {
    if (!generic_targets().count(t)) fail("--lora-targets: unknown target '{}' (use q, k, v, o, gate, up, down)", t);
    if (!seen.insert(t).second) fail("--lora-targets: '{}' given twice", t);
    if (config && lora_module(*config, t).empty())
      fail("--lora-targets: a {} model has no '{}' projection", config->model_type, t);
  }
  if (!o.init.empty() && !fs::exists(fs::path(o.init) / "adapter_model.safetensors"))
    fail("--lora-init {}: no adapter_model.safetensors there (a PEFT adapter folder)", o.init);
}

std::string lora_module(const ModelConfig& c, const std::string& target) {
  auto it = generic_targets().find(target);
  if (it == generic_targets().end()) return "";
  for (const auto& linear : c.family->layer_linears(c))
    for (const auto& candidate : it->second)
      if (last_component(linear) == candidate) return linear;
  return "";
}

LoraAdapters::LoraAdapters(CausalLM& stage, ProcessGrid& grid, const LoraOptions& options,
                           const std::function<bool(const std::string&)>& adapted, uint64_t seed)
    : o_(options) {
  const ModelConfig& c = stage.config();
  num_layers_ = c.num_layers;
  layer_prefix_ = c.family->layer_prefix();
  std::set<std::string> linears;  // "self_attn.q_proj"
  for (const auto& t : o_.target_names()) {
    const auto m = lora_module(c, t);
    linears.insert(m);
    target_modules_.push_back(last_component(m));
  }
  const int64_t R = *o_.rank;
  const double s = o_.scaling(), p = o_.dropout.value_or(0.0);
  // Each module's dropout mask has its own stream: its place in the layer's list of linears.
  const auto layer_linears = c.family->layer_linears(c);
  const CommPtr& tp = stage.tp();
  for (const auto& item : stage.named_modules()) {
    const std::string& name = item.key();
    if (name.rfind(layer_prefix_, 0) != 0) continue;
    const auto dot = name.find('.', layer_prefix_.size());
    if (dot == std::string::npos || !linears.count(name.substr(dot + 1))) continue;
    if (!adapted(name + ".weight")) continue;
    const int64_t l = layer_number(name, layer_prefix_);
    for (int64_t m = 0; m < c.num_layers; ++m)
      if (m != l && c.storage_of(m) == l)
        fail(
            "{}: layer {} is shared with slot {} (CRaSh share); LoRA adapts only unshared layers (train without "
            "--train-all)",
            name, l, m);
    auto layer = std::dynamic_pointer_cast<ParallelLinearBase>(item.value());
    if (!layer) fail("{}: not a tensor-parallel linear layer, so LoRA cannot adapt it", name);
    if (!layer->weight.defined()) fail("{}: a low-rank (SFSD) layer; LoRA needs its dense weight", name);
    const auto w = layer->slice_of("weight");
    // Key/value heads replicated over `group` TP ranks (DistributedLM made that group): each rank's
    // share of B's gradient comes from its own query heads, so the group sums it.
    const CommPtr kv = w && w->group > 1 ? grid.tp_block_group(w->group) : nullptr;
    Site site;
    site.name = name;
    site.layer = layer;
    site.column = std::dynamic_pointer_cast<ColumnParallelLinearImpl>(layer) != nullptr;
    const int64_t local_out = layer->weight.size(0), local_in = layer->weight.size(1);
    const int64_t full_in = site.column || !w ? local_in : w->full;
    std::optional<ShardSlice> a_slice, b_slice;
    if (w && site.column) b_slice = *w;
    if (w && !site.column) a_slice = *w;
    site.a = LowRankFactor(R, site.column ? full_in : local_in, false, a_slice);
    site.b = LowRankFactor(local_out, R, false, b_slice);
    // The full A from (seed, module) alone, as torch's Linear(in, R) draws it (kaiming_uniform,
    // a = sqrt(5): bound 1 / sqrt(in)), then this rank's columns; B starts at zero.
    {
      torch::NoGradGuard no_grad;
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ull + name_hash(name));
      auto full_a = torch::empty({R, full_in})
                        .uniform_(-1.0 / std::sqrt(static_cast<double>(full_in)),
                                  1.0 / std::sqrt(static_cast<double>(full_in)), gen);
      site.a->weight.copy_(a_slice ? full_a.narrow(1, a_slice->start, a_slice->length) : full_a);
      site.b->weight.zero_();
    }
    site.a->to(layer->weight.device(), layer->weight.scalar_type());
    site.b->to(layer->weight.device(), layer->weight.scalar_type());
    layer->register_module("lora_A", site.a);
    layer->register_module("lora_B", site.b);
    auto a = site.a, b = site.b;
    const int64_t stream =
        std::find(layer_linears.begin(), layer_linears.end(), name.substr(dot + 1)) - layer_linears.begin();
    const int64_t in_start = a_slice ? a_slice->start : 0;
    // PEFT's lora_dropout on the input of A, in training passes only; the mask covers the whole
    // input, of which a row-parallel layer's rank holds columns [in_start, in_start + local_in).
    auto dropped = [p, stream, full_in, in_start](const torch::Tensor& x) {
      const AttentionContext* ctx = LayerPass::context();
      if (p <= 0 || !ctx || !ctx->dropout) return x;
      return feature_dropout(x, *ctx, LayerPass::layer(), DropoutSite::LoraInput, stream, p, full_in, in_start);
    };
    if (site.column) {
      // x is whole on every rank: A's gradient sums the rank's outputs' parts over TP.
      site.branch = [a, b, s, tp, kv, dropped](const torch::Tensor& x) {
        return local_linear(copy_to_tp(local_linear(dropped(x), a->weight), tp),
                            kv ? copy_to_tp(b->weight, kv) : b->weight) *
               s;
      };
    } else {
      site.branch = [a, b, s, tp, dropped](const torch::Tensor& x) {
        return local_linear(reduce_from_tp(local_linear(dropped(x), a->weight), tp), b->weight) * s;
      };
    }
    layer->adapter = site.branch;
    sites_.push_back(std::move(site));
  }
}

LoraAdapters::~LoraAdapters() = default;

std::vector<std::string> LoraAdapters::modules() const {
  std::vector<std::string> out;
  for (const auto& s : sites_) out.push_back(s.name);
  return out;
}

void LoraAdapters::load_peft(const std::string& dir) {
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  SafetensorsFile f(path);
  const auto config_path = fs::path(dir) / "adapter_config.json";
  if (fs::exists(config_path)) {
    std::ifstream in(config_path);
    const auto j = parse_json(std::string(std::istreambuf_iterator<char>(in), {}), config_path.string());
    if (j.contains("r") && j["r"].get<int64_t>() != *o_.rank)
      fail("{}: an adapter of rank {}, but --lora-rank is {}", config_path.string(), j["r"].get<int64_t>(), *o_.rank);
  }
  torch::NoGradGuard no_grad;
  for (auto& s : sites_) {
    for (auto [factor, param] : {std::pair<const char*, LowRankFactor>{"lora_A", s.a}, {"lora_B", s.b}}) {
      const std::string key = peft_name(s.name, factor);
      if (!f.tensors().count(key)) fail("{}: no tensor '{}'", path, key);
      auto full = f.view(key).to(torch::kFloat32);
      auto slice = param->slice_of("weight");
      std::vector<int64_t> expected = param->weight.sizes().vec();
      if (slice) expected[static_cast<size_t>(slice->dim)] = slice->full;
      if (full.sizes().vec() != expected)
        fail("{}: tensor '{}' has shape {}, expected {}", path, key, fmt::join(full.sizes(), "x"),
             fmt::join(expected, "x"));
      param->weight.copy_(slice ? full.narrow(slice->dim, slice->start, slice->length) : full);
    }
  }
}

void LoraAdapters::save_peft(const std::string& dir, const ProcessGrid& grid, const std::string& base_model) const {
  const CommPtr& world = grid.world();
  StagedDir staged(dir, grid.rank() == 0, "adapter folder");
  world->barrier();
  const fs::path& tmp = staged.path();
  // Full tensors of this stage (collective over TP), written by its first rank.
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  auto layers = torch::zeros({num_layers_}, torch::kFloat64);
  for (const auto& s : sites_) {
    for (auto [factor, param] : {std::pair<const char*, LowRankFactor>{"lora_A", s.a}, {"lora_B", s.b}}) {
      auto slice = param->slice_of("weight");
      auto t = param->weight.detach();
      t = slice ? gather_shards(t, *slice, grid.tp_group()) : t.clone();
      tensors.emplace_back(peft_name(s.name, factor), t.cpu().contiguous());
    }
    layers[layer_number(s.name, layer_prefix_)].fill_(1);
  }
  world->allreduce(layers, ReduceOp::Max);
  const auto piece = [&](int stage) { return tmp / fmt::format("piece-{:05d}.safetensors", stage); };
  if (grid.dp_rank() == 0 && grid.tp_rank() == 0)
    write_safetensors(piece(grid.pp_rank()).string(), tensors, {{"format", "pt"}});
  world->barrier();
  if (grid.rank() == 0) {
    std::vector<std::pair<std::string, torch::Tensor>> all;
    for (int p = 0; p < grid.pp(); ++p) {
      SafetensorsFile f(piece(p).string());
      for (const auto& [name, info] : f.tensors()) all.emplace_back(name, f.view(name).clone());
    }
    for (int p = 0; p < grid.pp(); ++p) fs::remove(piece(p));
    write_safetensors((tmp / "adapter_model.safetensors").string(), all, {{"format", "pt"}});
    std::vector<int64_t> adapted;
    for (int64_t l = 0; l < num_layers_; ++l)
      if (layers[l].item<double>() > 0) adapted.push_back(l);
    nlohmann::json j = {{"peft_type", "LORA"},
                        {"task_type", "CAUSAL_LM"},
                        {"base_model_name_or_path", base_model},
                        {"r", *o_.rank},
                        {"lora_alpha", o_.lora_alpha()},
                        {"lora_dropout", o_.dropout.value_or(0.0)},
                        {"target_modules", target_modules_},
                        {"bias", "none"},
                        {"fan_in_fan_out", false},
                        {"inference_mode", true},
                        {"init_lora_weights", true},
                        {"modules_to_save", nullptr}};
    // Only some layers adapted (an emulator's adapter layers): PEFT's layers_to_transform.
    if (static_cast<int64_t>(adapted.size()) != num_layers_) {
      const std::string pattern = last_component(layer_prefix_.substr(0, layer_prefix_.size() - 1));
      j["layers_to_transform"] = adapted;
      j["layers_pattern"] = pattern;
    }
    std::ofstream out((tmp / "adapter_config.json").string());
    out << j.dump(2) << "\n";
    out.close();
    if (!out) fail("{}: cannot write adapter_config.json", tmp.string());
    staged.commit();
  }
  world->barrier();
}

void LoraAdapters::with_merged(const std::function<void()>& save) {
  std::vector<torch::Tensor> kept;
  {
    torch::NoGradGuard no_grad;
    for (auto& s : sites_) {
      auto& w = s.layer->weight;
      kept.push_back(w.detach().clone());
      // s.column: B is this rank's rows; otherwise A is this rank's columns: either way B A is
      // this rank's part of the full product.
      auto delta = torch::matmul(s.b->weight.to(torch::kFloat32), s.a->weight.to(torch::kFloat32)) * o_.scaling();
      w.copy_((w.to(torch::kFloat32) + delta).to(w.scalar_type()));
      s.layer->adapter = nullptr;
      s.layer->unregister_module("lora_A");
      s.layer->unregister_module("lora_B");
    }
  }
  auto restore = [&] {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < sites_.size(); ++i) {
      auto& s = sites_[i];
      s.layer->weight.copy_(kept[i]);
      s.layer->register_module("lora_A", s.a);
      s.layer->register_module("lora_B", s.b);
      s.layer->adapter = s.branch;
    }
  };
  try {
    save();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

}  // namespace crash
