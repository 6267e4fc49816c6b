// Model configuration read from a Hugging Face config.json; each family reads its own fields
// (framework/models/family.h).
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace crash {

class ModelFamily;

// rope_scaling of type "llama3" (LLaMA-3.1 and later) or "linear" (Gemma-3's global layers:
// every frequency divided by factor).
struct RopeScaling {
  bool linear = false;
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  const ModelFamily* family = nullptr;  // set by from_json: what reads, builds and names this model
  std::string model_type;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // OPT ffn_dim
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_positions = 0;
  double norm_eps = 1e-5;
  std::string activation;  // relu, gelu, gelu_new, silu
  bool tie_word_embeddings = true;

  // OPT
  int64_t word_embed_proj_dim = 0;  // == hidden_size unless project_in/out exist (OPT-350m)
  bool pre_norm = true;             // do_layer_norm_before
  bool final_norm = true;           // OPT post-LN models have no final layer norm
  bool linear_bias = true;          // OPT enable_bias
  bool norm_affine = true;          // OPT layer_norm_elementwise_affine

  // LLaMA-style attention (framework/models/llama.h)
  bool attention_bias = false;  // the config field (LLaMA: on every projection)
  bool qkv_bias = false;        // q/k/v projections have a bias
  bool out_bias = false;        // o_proj has a bias
  bool rotary = false;          // rotary positions (head_dim must be even)
  bool mlp_bias = false;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;

  // Sliding-window attention (Mistral, Qwen's sliding layers, Gemma's local layers): a token of a
  // sliding layer attends to itself and the sliding_window - 1 tokens before it. Per layer, as
  // HF's layer_types: sliding_layers[l] (by slot in an emulator); empty: every layer slides.
  int64_t sliding_window = 0;  // 0: none
  std::vector<bool> sliding_layers;
  bool slides(int64_t layer) const {
    return sliding_window > 0 && (sliding_layers.empty() || sliding_layers[static_cast<size_t>(layer)]);
  }
  // The rotary base of sliding layers, without scaling (Gemma-3's rope_local_base_freq); 0: they
  // use rope_theta and rope_scaling as the other layers do.
  double sliding_rope_theta = 0;

  // Gemma (framework/models/gemma.cpp): the attention scores' scale (query_pre_attn_scalar^-1/2;
  // 0: head_dim^-1/2), and tanh soft-capping cap * tanh(x / cap) of the attention scores before
  // the mask and of the logits (0: none).
  double attention_scale = 0;
  double attention_softcap = 0;
  double logit_softcap = 0;

  // Dropout rates of training (HF semantics; framework/models/dropout.h): OPT `dropout` on the
  // attention and MLP outputs before each residual add (HF's default 0.1 when absent), and
  // `attention_dropout` on attention probabilities (both families). OPT's `activation_dropout`
  // is read and checked, but HF's OPT never applies it, so neither does this.
  double dropout = 0.0;
  double attention_dropout = 0.0;
  double activation_dropout = 0.0;

  int64_t pad_token_id = -1;
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  // Every id config.json's eos_token_id lists (Gemma-3, LLaMA-3.1-Instruct and Qwen2.5-Instruct
  // give several); eos_token_id is the first.
  std::vector<int64_t> eos_token_ids;

  // CRaSh "share" emulators (framework/emulator.h): the slot whose weights layer l uses, from
  // config.json's "crash_shared_layers"; empty when every layer has its own.
  std::vector<int64_t> shared_layers;
  int64_t storage_of(int64_t layer) const {
    return shared_layers.empty() ? layer : shared_layers[static_cast<size_t>(layer)];
  }
  // SFSD factored Linears (analysis/sfsd.h): module name -> rank, from config.json's
  // "crash_sfsd_ranks"; such a module holds factor_a [r, in] and factor_b [out, r] (+ bias).
  std::map<std::string, int64_t> sfsd_ranks;
  // Layers stored (and trained) once: num_layers without sharing.
  int64_t stored_layers() const;

  nlohmann::json raw;  // the file as read, written back unchanged by the checkpoint writer

  bool has_projection() const { return word_embed_proj_dim != hidden_size; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Parameters of the model as Hugging Face counts them (tied weights once).
  int64_t parameter_count() const;
  // The embedding matrix a tied LM head is (its family's name for it).
  std::string embedding_name() const;

  // `source` names the file in error messages.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& source);
  static ModelConfig load(const std::string& path);
};

}  // namespace crash
