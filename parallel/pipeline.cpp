#include "parallel/pipeline.h"

#include <algorithm>
#include <numeric>

#include "parallel/errors.h"
#include "parallel/tags.h"

namespace crash {

std::vector<std::pair<int64_t, int64_t>> split_layers(int64_t layers, int stages, const std::vector<int64_t>& counts) {
  if (layers < stages) fail("the model has {} layers, fewer than the {} pipeline stages (--pp)", layers, stages);
  std::vector<int64_t> n(static_cast<size_t>(stages), layers / stages);
  if (counts.empty()) {
    for (int64_t s = 0; s < layers % stages; ++s) ++n[static_cast<size_t>(s)];
  } else {
    if (static_cast<int>(counts.size()) != stages)
      fail("--pp-layers gives {} stages but --pp is {}", counts.size(), stages);
    if (std::any_of(counts.begin(), counts.end(), [](int64_t c) { return c < 1; }))
      fail("--pp-layers: every stage needs at least one layer");
    if (std::accumulate(counts.begin(), counts.end(), int64_t(0)) != layers)
      fail("--pp-layers adds up to {} layers but the model has {}",
           std::accumulate(counts.begin(), counts.end(), int64_t(0)), layers);
    n = counts;
  }
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t first = 0;
  for (int64_t c : n) {
    out.emplace_back(first, first + c);
    first += c;
  }
  return out;
}

namespace {

struct InFlight {
  torch::Tensor input;   // received activation (requires grad) on stages after the first
  torch::Tensor output;  // stage output, or the loss on the last stage
};

}  // namespace

double run_1f1b(const CommPtr& pp, int M, const StageStep& step) {
  const int stage = pp->rank(), stages = pp->size();
  const bool first = stage == 0, last = stage == stages - 1;
  std::vector<InFlight> flight(static_cast<size_t>(M));
  double loss_sum = 0;

  auto forward = [&](int mb) {
    InFlight& f = flight[static_cast<size_t>(mb)];
    torch::Tensor x;
    if (first) {
      x = step.input(mb);
    } else {
      x = step.empty_activation(mb);
      pp->recv(x, stage - 1, tag(MpiTag::kActivation, mb));
      x.requires_grad_(true);
      f.input = x;
    }
    auto y = step.run(x, mb);
    if (last) {
      f.output = step.loss(y, mb);
      loss_sum += f.output.item<double>();
    } else {
      pp->send(y.detach(), stage + 1, tag(MpiTag::kActivation, mb));
      f.output = y;
    }
  };
  auto backward = [&](int mb) {
    InFlight& f = flight[static_cast<size_t>(mb)];
    if (last) {
      f.output.backward();
    } else {
      auto grad = torch::empty_like(f.output);
      pp->recv(grad, stage + 1, tag(MpiTag::kGradient, mb));
      torch::autograd::backward({f.output}, {grad});
    }
    if (!first) pp->send(f.input.grad(), stage - 1, tag(MpiTag::kGradient, mb));
    f = InFlight{};  // frees the micro-batch's activations
  };

  const int warmup = std::min(stages - stage - 1, M);
  for (int mb = 0; mb < warmup; ++mb) forward(mb);
  for (int i = 0; i < M - warmup; ++i) {
    forward(warmup + i);
    backward(i);
  }
  for (int mb = M - warmup; mb < M; ++mb) backward(mb);
  pp->wait_sends();
  return loss_sum;
}

void run_forward(const CommPtr& pp, int M, const StageStep& step) {
  const int stage = pp->rank(), stages = pp->size();
  for (int mb = 0; mb < M; ++mb) {
    torch::Tensor x;
    if (stage == 0) {
      x = step.input(mb);
    } else {
      x = step.empty_activation(mb);
      pp->recv(x, stage - 1, tag(MpiTag::kActivation, mb));
    }
    auto y = step.run(x, mb);
    if (stage == stages - 1) {
      if (step.output) step.output(y, mb);
    } else {
      pp->send(y, stage + 1, tag(MpiTag::kActivation, mb));
    }
  }
  pp->wait_sends();
}

}  // namespace crash
