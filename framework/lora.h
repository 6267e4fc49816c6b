// LoRA (Hu et al. 2021) in PEFT's parameterisation: a linear layer's output gains
// (alpha / R) B A x with A [R, in] and B [out, R] trained and the base weight frozen.
// Tensor-parallel as NeMo/Megatron do it: on a column-parallel layer A is replicated and B split
// by output rows like the weight; on a row-parallel layer A is split by input columns like the
// weight and B replicated, the [tokens, R] product summed over TP. The adapter is written in
// PEFT's format (adapter_config.json, adapter_model.safetensors) and merged into the HF folder.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "framework/config.h"
#include "framework/models/decoder.h"
#include "parallel/grid.h"
#include "parallel/tensor_parallel.h"

namespace crash {

struct LoraOptions {
  std::optional<int64_t> rank;  // absent: no LoRA
  std::optional<double> alpha;  // absent: PEFT's default, 8
  std::optional<double> dropout;
  // Generic names (q, k, v, o, gate, up, down), mapped per family; empty: q and v (PEFT's
  // default for LLaMA and OPT).
  std::vector<std::string> targets;
  std::string init;  // a PEFT adapter folder to start from instead of the random init

  bool active() const { return rank.has_value(); }
  double lora_alpha() const { return alpha.value_or(8.0); }
  double scaling() const { return lora_alpha() / static_cast<double>(*rank); }
  std::vector<std::string> target_names() const;
};

// Throws UserError naming the first LoRA option out of range (called by check_train_options).
// With a config, the targets are also checked against the family's linear layers.
void check_lora_options(const LoraOptions& o, const ModelConfig* config = nullptr);

// A decoder layer's module (e.g. "self_attn.q_proj", "fc1") that generic target `target` names
// in this family; empty when it has none.
std::string lora_module(const ModelConfig& c, const std::string& target);

// The adapters of one pipeline stage.
class LoraAdapters {
 public:
  // Adds A and B to every targeted linear layer of `stage` (on `grid`) whose weight `adapted`
  // accepts (by HF parameter name): A from torch's Linear init drawn per module from (seed, name),
  // so every grid gets the same values, and B zero (PEFT's init). The base parameters are left as
  // they are.
  LoraAdapters(CausalLM& stage, ProcessGrid& grid, const LoraOptions& options,
               const std::function<bool(const std::string&)>& adapted, uint64_t seed);
  ~LoraAdapters();
  // Replaces A and B by a PEFT adapter folder's (this rank's slices); every adapted module must be in it.
  void load_peft(const std::string& dir);
  // Collective over the world: writes DIR (through DIR.tmp) in PEFT's format with full tensors.
  void save_peft(const std::string& dir, const ProcessGrid& grid, const std::string& base_model) const;
  // Runs `save` with W + (alpha / R) B A in every adapted layer's weight and the adapters
  // detached, so the stage is the merged HF model; then puts everything back as it was.
  void with_merged(const std::function<void()>& save);
  // Layers adapted on this rank, by module name (same on every rank of a stage).
  std::vector<std::string> modules() const;

 private:
  struct Site;
  std::vector<Site> sites_;
  LoraOptions o_;
  std::vector<std::string> target_modules_;  // the family's module names, e.g. q_proj
  int64_t num_layers_ = 0;
  std::string layer_prefix_;
};

}  // namespace crash
