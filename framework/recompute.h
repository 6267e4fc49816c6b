// Activation recomputation (Megatron-LM's --recompute-granularity): a piece of the forward pass
// keeps only its inputs, and its activations are made again during backward.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace crash {

// none: every activation is kept. full: each decoder layer keeps only its input and runs its
// forward again in backward. selective: only the attention core (scores, softmax, dropout,
// probabilities @ V), whose [B, H, T, T] activations dominate at long sequences, is recomputed.
enum class Recompute { None, Full, Selective };

// "none", "full" or "selective"; anything else is a UserError naming `option`.
Recompute parse_recompute(const std::string& name, const std::string& option = "--recompute");
const char* recompute_name(Recompute r);

using RecomputedFn = std::function<torch::Tensor(const std::vector<torch::Tensor>& inputs)>;

// fn(inputs) with the gradients fn itself would give, bit for bit, holding only `inputs` until
// backward: the forward runs without grad (with the kernels of a grad pass, so the rerun
// matches it), and backward runs fn again with grad and backpropagates through that copy.
// Parameters fn uses receive their gradients (accumulated into .grad) during that backward.
// fn must be deterministic: dropout here draws counter-based masks (models/dropout.h) and any
// communication it does must be done by every rank of its group in the same order, which
// backward, run in the same order on every rank, keeps. Without grad mode: fn(inputs).
torch::Tensor recomputed(RecomputedFn fn, const std::vector<torch::Tensor>& inputs);

}  // namespace crash
