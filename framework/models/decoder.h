// Decoder-only causal language models with Hugging Face semantics (the families of
// framework/models/family.h).
// A model is built from pieces a pipeline stage can call on its own: embed (first stage),
// run_layer (the stage's layers), finish and head (last stage).
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <memory>
#include <vector>

#include "parallel/tensor_parallel.h"

#include "framework/config.h"
#include "parallel/comm.h"

namespace crash {

class CheckpointReader;

// The layers this process holds: [first_layer, end_layer). A pipeline stage holds a range;
// the first stage also holds the embedding, the last the final norm and LM head.
struct ModelShard {
  int64_t first_layer = 0;
  int64_t end_layer = -1;  // -1: through the last layer
  CommPtr tp;              // tensor-parallel group; nullptr: one rank holds whole tensors
  // Parameters are created in this type piece by piece, so a stage never holds a float32
  // copy of itself (a 6.7B model's stage in bf16 stays at half the float32 size).
  torch::ScalarType dtype = torch::kFloat32;
};

// The real tokens of a padded batch [B, T], row after row (varlen packing): the linear layers
// then spend nothing on padding, and attention runs within each row over its own tokens.
struct TokenPacking {
  torch::Tensor index;               // [N] positions of the real tokens in the flattened [B * T]
  std::vector<int64_t> row_offsets;  // B + 1 entries: row b holds tokens [row_offsets[b], row_offsets[b + 1])
  int64_t longest = 0;               // the longest row's length

  static TokenPacking of(const torch::Tensor& mask);
  int64_t tokens() const { return row_offsets.empty() ? 0 : row_offsets.back(); }
  int64_t rows() const { return static_cast<int64_t>(row_offsets.size()) - 1; }
  // [B, T, ...] -> [1, N, ...]: only the real tokens, in order.
  torch::Tensor pack(const torch::Tensor& padded) const;
};

// Training-time dropout at Hugging Face's sites (framework/models/dropout.h). Every mask is drawn
// from a counter-based key of (seed, step, the row's slot in the step's global batch, layer,
// site, head) over the row's real tokens only, so it does not depend on the grid, padding,
// micro-batching or the DP split.
struct DropoutContext {
  double hidden = 0;     // OPT `dropout`: attention and MLP outputs before each residual add
  double attention = 0;  // `attention_dropout`: attention probabilities
  uint64_t seed = 0;
  int64_t step = 0;
  std::vector<int64_t> slots;  // each row's slot in the step's global batch
  // The real tokens: row b's are [row_offsets[b], row_offsets[b + 1]) in order; a padded pass
  // ([B, T, ..]) finds token i at flattened position token_position[i], a packed one ([1, N, ..])
  // at i (token_position empty).
  std::vector<int64_t> row_offsets, token_position;
  int64_t padded_length = 0;  // T of a padded pass

  bool active() const { return hidden > 0 || attention > 0; }
  // For a padded pass with attention mask [B, T] whose rows hold slots first_slot, first_slot + 1, ..
  static std::shared_ptr<DropoutContext> padded(const torch::Tensor& mask, int64_t first_slot);
};

// What attention needs besides the hidden states; built once per forward step.
struct AttentionContext {
  // Padded: additive [B, 1, Tq, Tk], 0 where allowed, the dtype's lowest value elsewhere.
  // Packed: the causal [longest, longest] of that form, which every row narrows.
  torch::Tensor bias;
  // Sliding-window layers (ModelConfig::slides) use window_bias instead: bias that also hides keys
  // sliding_window or more positions back. Undefined when no layer slides or the window spans
  // every key of the pass.
  torch::Tensor window_bias;
  std::vector<bool> sliding;  // per model layer (slot); empty when no layer slides
  bool slides(int64_t layer) const { return !sliding.empty() && sliding[static_cast<size_t>(layer)]; }
  const torch::Tensor& bias_of(int64_t layer) const {
    return window_bias.defined() && slides(layer) ? window_bias : bias;
  }
  torch::Tensor cos, sin;  // rotary tables [B, Tq, head_dim] ([1, N, head_dim] packed); undefined for learned positions
  // Sliding layers' own tables where their rotary base differs (Gemma-3's local layers).
  torch::Tensor sliding_cos, sliding_sin;
  const torch::Tensor& cos_of(int64_t layer) const {
    return sliding_cos.defined() && slides(layer) ? sliding_cos : cos;
  }
  const torch::Tensor& sin_of(int64_t layer) const {
    return sliding_sin.defined() && slides(layer) ? sliding_sin : sin;
  }
  // Scores are scale * q.k (0: head_dim^-1/2), then softcap * tanh(scores / softcap) when
  // softcap > 0 (Gemma-2), then the mask.
  double scale = 0, softcap = 0;
  double scale_of(int64_t head_dim) const { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim)); }
  std::vector<int64_t> row_offsets;  // packed passes (hidden states [1, N, d]): TokenPacking::row_offsets
  bool packed() const { return !row_offsets.empty(); }
  std::shared_ptr<const DropoutContext> dropout;  // training passes only; null: deterministic
  // Selective activation recomputation (framework/recompute.h): attention keeps only q, k and v
  // for backward and computes its core again there.
  bool recompute_attention = false;
  bool dropout_hidden() const { return dropout && dropout->hidden > 0; }
  bool dropout_attention() const { return dropout && dropout->attention > 0; }
};

// Keys and values of one layer for incremental decoding: [B, kv_heads, T, head_dim].
struct LayerCache {
  torch::Tensor k, v;
};

struct KVCache {
  std::vector<LayerCache> layers;  // indexed by layer - first_layer
  torch::Tensor mask;              // [B, T] attention mask of every token seen so far
  int64_t length() const { return mask.defined() ? mask.size(1) : 0; }
};

struct ForwardOutput {
  torch::Tensor logits;                      // [B, T, V] (last stage only)
  std::vector<torch::Tensor> hidden_states;  // HF output_hidden_states: L + 1 entries on a full model
};

class CausalLM : public torch::nn::Module {
 public:
  CausalLM(ModelConfig config, ModelShard shard);

  const ModelConfig& config() const { return config_; }
  int64_t first_layer() const { return first_; }
  int64_t end_layer() const { return end_; }
  bool has_embedding() const { return first_ == 0; }
  bool has_head() const { return end_ == config_.num_layers; }

  // ids [B, T] -> hidden_states[0]. positions [B, T] as the family numbers them.
  virtual torch::Tensor embed(const torch::Tensor& ids, const torch::Tensor& positions) = 0;
  virtual torch::Tensor run_layer(int64_t layer, const torch::Tensor& h, const AttentionContext& ctx,
                                  LayerCache* cache) = 0;
  // Final norm (and OPT's project_out): the last hidden state as HF reports it.
  virtual torch::Tensor finish(const torch::Tensor& h) = 0;
  // This TP rank's columns of the logits: [.., local_vocab()] from vocab_start().
  virtual torch::Tensor head_local(const torch::Tensor& h) = 0;
  // The full logits [.., vocab_size] (gathered across TP ranks).
  torch::Tensor head(const torch::Tensor& h);
  int64_t vocab_start() const { return tp_->rank() * local_vocab(); }
  int64_t local_vocab() const;
  const CommPtr& tp() const { return tp_; }

  // Positions HF's forward() uses when none are given. mask_all covers past and new tokens.
  virtual torch::Tensor default_positions(const torch::Tensor& mask_all, int64_t new_tokens) const = 0;
  // Positions HF's generate() uses (derived from the attention mask for both families).
  torch::Tensor generation_positions(const torch::Tensor& mask_all, int64_t new_tokens) const;
  AttentionContext attention_context(const torch::Tensor& mask_all, const torch::Tensor& positions) const;
  // For a packed pass: positions [1, N] are the packed tokens' (packing.pack of the padded ones).
  AttentionContext attention_context(const TokenPacking& packing, const torch::Tensor& positions) const;

  // The whole model on one process: logits and, if asked, every hidden state.
  ForwardOutput forward(const torch::Tensor& ids, const torch::Tensor& mask, bool hidden_states = false,
                        const torch::Tensor& positions = {});
  // Greedy decoding with a KV cache, as HF generate(do_sample=False): finished rows are
  // padded with pad_id; stops when every row has produced eos_id or after max_new_tokens.
  torch::Tensor generate(const torch::Tensor& ids, const torch::Tensor& mask, int64_t max_new_tokens, int64_t eos_id,
                         int64_t pad_id);

  // Copies this shard's weights from a checkpoint, checking every shape against the config.
  void load(const CheckpointReader& checkpoint);
  // Parameters under their Hugging Face names (tied weights once), as this rank holds them.
  std::vector<std::pair<std::string, torch::Tensor>> hf_state() const;
  // Which slice of the full tensor each tensor-parallel parameter is (absent: replicated).
  std::map<std::string, ShardSlice> parameter_slices() const;
  // Parameters (or gradients) reassembled across the TP group: collective over it.
  std::vector<std::pair<std::string, torch::Tensor>> gather_tp_state(bool grads) const;

 protected:
  virtual torch::Tensor rotary_inv_freq() const { return {}; }
  // Sliding layers' inverse frequencies where they differ from rotary_inv_freq(); undefined otherwise.
  virtual torch::Tensor sliding_rotary_inv_freq() const { return {}; }
  // What every pass's context holds besides its mask: which layers slide, the scores' scale and
  // cap, the rotary tables for `positions`.
  AttentionContext base_context(const torch::Tensor& positions) const;
  // Whether a pass over `keys` keys needs ctx.window_bias.
  bool windowed(int64_t keys, const AttentionContext& ctx) const;
  // Converts a freshly built piece to the shard's dtype before the next is built.
  template <class M>
  M place(M m) {
    m->to(dtype_);
    return m;
  }
  ModelConfig config_;
  int64_t first_, end_;
  CommPtr tp_;
  torch::ScalarType dtype_;
};

std::shared_ptr<CausalLM> build_model(const ModelConfig& config, const ModelShard& shard = {});
// Builds the model a folder describes and loads its weights, converted to `dtype`.
std::shared_ptr<CausalLM> load_model(const CheckpointReader& checkpoint, const ModelShard& shard = {},
                                     torch::ScalarType dtype = torch::kFloat32);

}  // namespace crash
