// What a model family is, in one place per family (docs/architecture.md section 11.2): the
// model_types it reads, its config.json fields, its tensors (names, full shapes, how each splits
// under tensor parallelism), the embedding a tied head is, the decoder layers' names and Linears,
// and how its CausalLM is built. framework/models/<family>.cpp defines one ModelFamily each;
// model_families() lists them. Nothing outside those files asks which family a model is.
#pragma once
#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace crash {

struct ModelConfig;
struct ModelShard;
class CausalLM;

// How a tensor is divided over the TP group (docs/architecture.md section 4).
enum class TpSplit {
  Replicated,  // every rank holds it whole
  Column,      // rows (output features) split; a bias goes with them
  Row,         // columns (input features) split; the bias is replicated
  Vocab,       // vocabulary rows split, padded to a multiple of the TP size
};

struct TensorSpec {
  std::string name;            // HF name; relative to the layer ("mlp.up_proj.weight") in layer_tensors
  std::vector<int64_t> shape;  // the full (unsplit) shape
  TpSplit split = TpSplit::Replicated;
};

class ModelFamily {
 public:
  virtual ~ModelFamily() = default;
  // The config.json model_type values it reads ("llama").
  virtual std::vector<std::string> model_types() const = 0;
  // Fills `c` from config.json: sizes, heads, head_dim when explicit (0: hidden / heads), norm,
  // activation, biases, rotary settings, tied embeddings, token ids, dropout rates. A field that
  // would change the computation but is not implemented fails (exit 2) naming it.
  virtual void read_config(ModelConfig& c, const nlohmann::json& j, const std::string& source) const = 0;
  // Checks that need the completed config (head_dim known).
  virtual void check_config(const ModelConfig& c, const std::string& source) const {}
  virtual std::shared_ptr<CausalLM> build(const ModelConfig& c, const ModelShard& shard) const = 0;

  // The embedding matrix that a tied LM head is.
  virtual std::string embedding_name() const = 0;
  // Decoder layer l's tensors are named layer_prefix() + l + "." + a layer_tensors() name.
  virtual std::string layer_prefix() const = 0;
  // One decoder layer's tensors.
  virtual std::vector<TensorSpec> layer_tensors(const ModelConfig& c) const = 0;
  // The tensors outside the layers (embeddings, final norm, an untied head).
  virtual std::vector<TensorSpec> outer_tensors(const ModelConfig& c) const = 0;

  // config.json lists with one entry per decoder layer (Qwen's layer_types): an emulator that
  // drops or repeats layers writes them re-indexed by its slots' source layers.
  virtual std::vector<std::string> layer_config_fields() const { return {}; }
  // Those lists as this model has them, one entry per layer: config.json's by default. A family
  // whose per-layer settings may come from a scalar (Qwen's max_window_layers) spells them out,
  // since a scalar cannot be re-indexed.
  virtual std::map<std::string, nlohmann::json> layer_config_lists(const ModelConfig& c) const;

  // One layer's Linear modules ("self_attn.q_proj"): the split weights of layer_tensors().
  std::vector<std::string> layer_linears(const ModelConfig& c) const;
  // Parameters as HF counts them (tied weights once, a shared layer once).
  int64_t parameter_count(const ModelConfig& c) const;
  // Every tensor of the model under its full name, in layer order.
  std::vector<TensorSpec> tensors(const ModelConfig& c) const;
};

// Every family, in the order their model types are listed in errors.
const std::vector<const ModelFamily*>& model_families();
// The family that reads `model_type`; fails naming `source` and the supported types.
const ModelFamily& family_of_model_type(const std::string& model_type, const std::string& source);

// The files an HF model folder carries besides config.json and the weights (tokenizer,
// generation settings). Every writer of a model folder copies those of its source that exist.
const std::vector<std::string>& hf_folder_files();
// hf_folder_files() as paths in `dir`, then `extra` (crash-hpc's own records such as crash_plan.json).
std::vector<std::string> hf_folder_paths(const std::string& dir, const std::vector<std::string>& extra = {});

// For the families' read_config: the sizes every family names alike (the MLP width under its
// family's key, checked at once), and the range check of a size.
void require_positive(int64_t v, const char* key, const std::string& source, int64_t most = int64_t(1) << 24);
void read_sizes(ModelConfig& c, const nlohmann::json& j, const std::string& source, const char* intermediate_key);
// HF's layer_types (num_layers read from `c`) as ModelConfig::sliding_layers: "full_attention"
// (or the legacy "attention") or "sliding_attention"; any other type fails naming it.
std::vector<bool> read_layer_types(const ModelConfig& c, const nlohmann::json& j, const std::string& source);
// config.json's sliding_window: `fallback` when absent, 0 (none) when null, else a positive size.
int64_t read_sliding_window(const nlohmann::json& j, int64_t fallback, const std::string& source);
// config.json's eos_token_id: `fallback` when absent or null, the first entry of a list (-1 for
// an empty one); ModelConfig::from_json keeps every entry in eos_token_ids.
int64_t read_eos_token_id(const nlohmann::json& j, int64_t fallback, const std::string& source);
// ModelConfig::sliding_layers as layer_types.
nlohmann::json layer_types_json(const ModelConfig& c);

// The families (one file each); model_families() lists them.
const ModelFamily& opt_family();
const ModelFamily& llama_family();
const ModelFamily& qwen2_family();
const ModelFamily& qwen3_family();
const ModelFamily& mistral_family();
const ModelFamily& gemma2_family();
const ModelFamily& gemma3_family();

}  // namespace crash
