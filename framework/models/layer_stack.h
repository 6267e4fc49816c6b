// What the model families' CausalLMs share: the stack of decoder layers a shard holds.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "framework/models/decoder.h"
#include "framework/models/dropout.h"

namespace crash {

// A module that only names its children (HF's "model", "model.decoder", "layers").
struct Holder : torch::nn::Module {};

// A CausalLM whose layers are `Layer`s, each built as Layer(config, tp) and run as
// forward(h, ctx, cache, layer) (layer: the slot's number, which keys dropout masks).
template <class Layer>
class LayerStackLM : public CausalLM {
 public:
  using CausalLM::CausalLM;

  torch::Tensor run_layer(int64_t layer, const torch::Tensor& h, const AttentionContext& ctx,
                          LayerCache* cache) override {
    const LayerPass pass(ctx, layer);
    return layers_.at(static_cast<size_t>(layer - first_))->forward(h, ctx, cache, layer);
  }

 protected:
  // This shard's layers [first_, end_) as `parent`'s module "layers". A shared layer (CRaSh
  // share) is one module under its storing slot's name, used by every slot.
  void build_layers(torch::nn::Module& parent) {
    auto layers = parent.register_module("layers", std::make_shared<Holder>());
    std::map<int64_t, std::shared_ptr<Layer>> stored;
    for (int64_t l = first_; l < end_; ++l) {
      auto& layer = stored[config_.storage_of(l)];
      if (!layer)
        layer = layers->register_module(std::to_string(config_.storage_of(l)),
                                        place(std::make_shared<Layer>(config_, tp_)));
      layers_.push_back(layer);
    }
  }

  std::vector<std::shared_ptr<Layer>> layers_;
};

}  // namespace crash
