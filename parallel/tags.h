// Tags of point-to-point messages (Communicator::send / recv), one named kind per protocol, as
// TensorRT-LLM's MpiTag. Each kind owns the range [base, base + tag_span(kind)) and a message's
// tag is tag(kind, index), so two kinds never collide on one communicator. Every tag stays
// below 32767, the least MPI_TAG_UB that an MPI library may offer.
//
//   kind              base    span   index
//   kActivation           0   8192   micro-batch (pipeline: stage s to s + 1)
//   kGradient          8192   8192   micro-batch (pipeline: stage s + 1 to s)
//   kLensHidden       16384   4096   hidden_states index (logit lens: to the last stage)
//   kGatherLogits     20480   4096   0 (forward gather: a DP share's logits to rank 0)
//   kGatherHidden     24576   4096   hidden_states index (forward gather: to rank 0)
#pragma once
#include <cstdint>

#include "parallel/errors.h"

namespace crash {

enum class MpiTag : int {
  kActivation = 0,
  kGradient = 1 << 13,
  kLensHidden = 1 << 14,
  kGatherLogits = (1 << 14) + (1 << 12),
  kGatherHidden = (1 << 14) + (2 << 12),
};

// How many tags a kind owns: the pipeline's two kinds 8192 micro-batches each, the others 4096.
constexpr int tag_span(MpiTag kind) {
  return kind == MpiTag::kActivation || kind == MpiTag::kGradient ? 1 << 13 : 1 << 12;
}

// The tag of message `index` of a kind. An index outside the kind's range (more micro-batches
// or layers than it holds) is refused rather than let it reach another kind's tags.
inline int tag(MpiTag kind, int64_t index) {
  if (index < 0 || index >= tag_span(kind))
    fail("message index {} is outside the {} tags of its kind (too many micro-batches or layers)", index,
         tag_span(kind));
  return static_cast<int>(kind) + static_cast<int>(index);
}

}  // namespace crash
