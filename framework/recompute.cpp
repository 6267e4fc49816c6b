#include "framework/recompute.h"

#include <torch/csrc/autograd/custom_function.h>

#include "parallel/errors.h"
#include "parallel/tensor_parallel.h"

namespace crash {

Recompute parse_recompute(const std::string& name, const std::string& option) {
  if (name == "none") return Recompute::None;
  if (name == "full") return Recompute::Full;
  if (name == "selective") return Recompute::Selective;
  fail("{} must be none, full or selective, got '{}'", option, name);
}

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::Full: return "full";
    case Recompute::Selective: return "selective";
    default: return "none";
  }
}

namespace {

// ctx->saved_data holds IValues: the function travels in a capsule.
struct Recipe : torch::CustomClassHolder {
  explicit Recipe(RecomputedFn f) : fn(std::move(f)) {}
  RecomputedFn fn;
};

class Recomputation : public torch::autograd::Function<Recomputation> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const c10::intrusive_ptr<Recipe>& recipe,
                               at::TensorList inputs) {
    ctx->saved_data["recipe"] = c10::IValue::make_capsule(recipe);
    ctx->save_for_backward(inputs.vec());
    torch::NoGradGuard no_grad;
    TrainingKernelsGuard same_kernels;
    return recipe->fn(inputs.vec());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto recipe = c10::static_intrusive_pointer_cast<Recipe>(ctx->saved_data["recipe"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    // Fresh leaves: backward through the rerun stops at them and leaves their gradients there.
    std::vector<torch::Tensor> inputs;
    for (const auto& x : saved) inputs.push_back(x.detach().requires_grad_(x.requires_grad()));
    torch::Tensor out;
    {
      torch::AutoGradMode grad(true);
      out = recipe->fn(inputs);
    }
    if (out.requires_grad()) torch::autograd::backward({out}, {grad_out[0]});
    torch::autograd::variable_list grads = {torch::Tensor()};  // the recipe
    for (const auto& x : inputs) grads.push_back(x.requires_grad() ? x.grad() : torch::Tensor());
    return grads;
  }
};

}  // namespace

torch::Tensor recomputed(RecomputedFn fn, const std::vector<torch::Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  std::vector<torch::Tensor> in = inputs;
  // A Function whose inputs need no gradient makes no graph, and then fn's parameters would get
  // none either: the first input stands in (its own gradient is computed and dropped).
  if (std::none_of(in.begin(), in.end(), [](const torch::Tensor& x) { return x.requires_grad(); }))
    in.front() = in.front().detach().requires_grad_(true);
  return Recomputation::apply(c10::make_intrusive<Recipe>(std::move(fn)), at::TensorList(in));
}

}  // namespace crash
