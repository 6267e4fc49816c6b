// oneDNN kernels for CPU float32 inference, where the build has oneDNN (libdnnl-dev): its
// small-matrix JIT kernels beat the BLAS torch calls for the products of decoder layers
// (768 x 768 projections: about 310 against 250 GFLOP/s on two AVX-512 cores) and for the
// per-row products of packed attention.
#pragma once
#include <torch/torch.h>

#include <optional>

#include "framework/models/decoder.h"

namespace crash {

// Routes the tensor-parallel layers' local products through oneDNN when no gradient is wanted
// (set_inference_linear). Idempotent; does nothing in a build without oneDNN.
void install_onednn_kernels();

// packed_attention's fast path: nullopt where it does not apply (not CPU float32, autograd on,
// strides oneDNN has only reference kernels for, or a build without oneDNN).
std::optional<torch::Tensor> onednn_packed_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v, const AttentionContext& ctx,
                                                     int64_t layer);

}  // namespace crash
