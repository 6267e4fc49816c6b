// A model on a DP x PP x TP grid against the single-process run of the same model, on every
// rank: logits and hidden states, loss, every parameter's gradient (gathered over TP) and the
// weights after three AdamW steps. Run under mpirun; rank 0 prints the verdict.
#include <boost/program_options.hpp>
#include <torch/torch.h>

#include <iostream>

#include "framework/distributed_lm.h"
#include "parallel/world.h"

using namespace crash;

namespace {

struct Check {
  std::string name;
  double error = 0;
  double tolerance = 1e-5;
};

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return a.numel() == 0 ? 0.0 : (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// The reference parameter a stage's parameter stands for (a tied lm_head is the embedding).
torch::Tensor reference_of(const std::string& name, const std::map<std::string, torch::Tensor>& ref, bool tied,
                           const std::string& embed_name) {
  auto it = ref.find(name);
  if (it != ref.end()) return it->second;
  if (tied && name == "lm_head.weight") return ref.at(embed_name);
  throw std::runtime_error("no reference parameter " + name);
}

}  // namespace

int main(int argc, char** argv) {
  World& world = World::init(&argc, &argv);
  namespace po = boost::program_options;
  po::options_description o("grid_equivalence");
  o.add_options()("model", po::value<std::string>()->required(), "")("golden", po::value<std::string>()->required(),
                                                                     "")("tp", po::value<int>()->default_value(1), "")(
      "pp", po::value<int>()->default_value(1), "");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  torch::set_num_threads(1);

  CheckpointReader ckpt(vm["model"].as<std::string>());
  SafetensorsFile golden(vm["golden"].as<std::string>());
  const ModelConfig& cfg = ckpt.config();
  const bool tied = cfg.tie_word_embeddings;
  const std::string embed_name = cfg.embedding_name();

  // Four rows, right- and left-padded.
  auto ids = torch::cat({golden.read("right_ids"), golden.read("left_ids").narrow(0, 0, 1)});
  auto mask = torch::cat({golden.read("right_mask"), golden.read("left_mask").narrow(0, 0, 1)});

  auto grid = ProcessGrid::create({vm["tp"].as<int>(), vm["pp"].as<int>()});
  const int64_t rows = ids.size(0) / grid->dp();
  auto my_ids = ids.narrow(0, grid->dp_rank() * rows, rows), my_mask = mask.narrow(0, grid->dp_rank() * rows, rows);
  const int micro = rows % 2 == 0 ? 2 : 1;

  // The reference: the whole model in this process.
  torch::manual_seed(0);
  auto ref = load_model(ckpt);
  DistributedLM dist(ckpt, grid);
  std::vector<Check> checks;

  {  // Inference: logits on the last stage, hidden states where the layers live.
    torch::NoGradGuard ng;
    auto want = ref->forward(ids, mask, true);
    auto got = dist.forward(my_ids, my_mask, micro, true);
    auto keep = my_mask.to(torch::kBool).unsqueeze(-1);
    // fp32 rounding of the TP partial sums grows with the residual stream (|h| reaches 16 in
    // qwen2_bias): each hidden state's difference is taken relative to max(1, its largest |h|).
    Check logits{"logits"}, hidden{"hidden states (relative to max(1, |h|))"};
    if (grid->last_stage())
      logits.error = max_diff(got.logits.masked_select(keep),
                              want.logits.narrow(0, grid->dp_rank() * rows, rows).masked_select(keep));
    for (auto& [l, h] : got.hidden) {
      auto w = want.hidden_states[l].narrow(0, grid->dp_rank() * rows, rows).masked_select(keep);
      const double scale = std::max(1.0, w.numel() ? w.abs().max().item<double>() : 0.0);
      hidden.error = std::max(hidden.error, max_diff(h.masked_select(keep), w) / scale);
    }
    checks.push_back(logits);
    checks.push_back(hidden);
  }

  auto ref_loss = [&] {
    auto logits = ref->forward(ids, mask).logits;
    auto targets = causal_targets(ids, mask);
    auto count = (targets != -100).sum();
    return torch::nn::functional::cross_entropy(
               logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}),
               torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum)) /
           count;
  };
  auto ref_params = [&] {
    std::map<std::string, torch::Tensor> m;
    for (auto& item : ref->named_parameters()) m[item.key()] = item.value();
    return m;
  };

  {  // Loss and gradients.
    auto want = ref_loss();
    want.backward();
    double got = dist.forward_backward(my_ids, my_mask, micro);
    checks.push_back({"loss", std::abs(got - want.item<double>())});
    Check grads{"gradients"};
    auto ref_map = ref_params();
    for (auto& [name, g] : dist.stage().gather_tp_state(true))
      grads.error = std::max(grads.error, max_diff(g, reference_of(name, ref_map, tied, embed_name).grad()));
    checks.push_back(grads);
  }

  {  // Three AdamW steps (the first uses the gradients above), with fine-tuning settings.
     // Adam divides each gradient by its own magnitude, so a weight moves by about lr times the
     // gradient's relative rounding error: OPT's key bias, whose gradient is zero in exact
     // arithmetic (softmax ignores a shift shared by all keys), would move by whole lr steps of
     // random sign with eps 1e-8 in any two runs. eps 1e-6 keeps noise-sized gradients at noise
     // level; lr 1e-4 bounds what fp32 rounding of real gradients can do.
    auto opts = torch::optim::AdamWOptions(1e-4).weight_decay(0.01).eps(1e-6);
    torch::optim::AdamW ref_opt(ref->parameters(), opts), dist_opt(dist.parameters(), opts);
    for (int step = 0; step < 3; ++step) {
      if (step > 0) {
        ref_opt.zero_grad();
        dist_opt.zero_grad();
        ref_loss().backward();
        dist.forward_backward(my_ids, my_mask, micro);
      }
      ref_opt.step();
      dist_opt.step();
    }
    Check weights{"weights after 3 AdamW steps"};
    auto ref_map = ref_params();
    for (auto& [name, w] : dist.stage().gather_tp_state(false))
      weights.error = std::max(weights.error, max_diff(w, reference_of(name, ref_map, tied, embed_name)));
    checks.push_back(weights);
  }

  int failed = 0;
  for (auto& c : checks) {
    auto e = torch::full({1}, c.error, torch::kFloat64);
    grid->world()->allreduce(e, ReduceOp::Max);
    c.error = e.item<double>();
    failed += c.error > c.tolerance;
    if (world.rank() == 0)
      std::cout << (c.error <= c.tolerance ? "ok   " : "FAIL ") << cfg.model_type << " " << grid->describe() << ": "
                << c.name << " max abs diff " << c.error << "\n";
  }
  if (world.rank() == 0) std::cout << checks.size() - failed << " passed, " << failed << " failed" << std::endl;
  return failed ? 1 : 0;
}
