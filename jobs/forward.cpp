// forward: run a model on token ids; write logits and every hidden state to HDF5.
#include <spdlog/spdlog.h>

#include "analysis/hdf5.h"
#include "framework/checkpoint.h"
#include "framework/models/decoder.h"
#include "framework/token_input.h"
#include "jobs/job.h"
#include "jobs/version.h"
#include "parallel/errors.h"

namespace crash {

void forward_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "input", po::value<std::string>()->required(), "JSON Lines file, one {\"tokens\": [...]} per line")(
      "out", po::value<std::string>()->required(), "output HDF5 file")(
      "batch-size", po::value<int64_t>()->default_value(8), "sequences per forward pass")(
      "padding", po::value<std::string>()->default_value("right"), "pad batches on the 'left' or the 'right'")(
      "dtype", po::value<std::string>()->default_value("float32"), "compute dtype: float32, bfloat16 or float16")(
      "no-hidden-states", po::bool_switch(), "write logits only")(
      "overwrite", po::bool_switch(), "replace an existing output file");
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  fail("--dtype: unknown type '{}' (expected float32, bfloat16 or float16)", name);
}

int forward_run(const po::variables_map& vm) {
  const auto model_dir = vm["model"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const auto padding = vm["padding"].as<std::string>();
  const int64_t batch_size = vm["batch-size"].as<int64_t>();
  if (padding != "left" && padding != "right") fail("--padding: expected 'left' or 'right', got '{}'", padding);
  if (batch_size <= 0) fail("--batch-size must be positive, got {}", batch_size);
  const auto dtype = parse_dtype(vm["dtype"].as<std::string>());
  const bool hidden = !vm["no-hidden-states"].as<bool>();

  H5Writer out(out_path, vm["overwrite"].as<bool>());  // fails early if the output exists
  CheckpointReader ckpt(model_dir);
  const ModelConfig& cfg = ckpt.config();
  auto seqs = read_token_lines(vm["input"].as<std::string>(), cfg.vocab_size, cfg.max_positions);
  auto model = load_model(ckpt, {}, dtype);
  spdlog::info("{}: {} {} layers, {} parameters; {} sequences", model_dir, cfg.model_type, cfg.num_layers,
               cfg.parameter_count(), seqs.size());

  torch::InferenceMode guard;
  int64_t longest = 0;
  for (const auto& s : seqs) longest = std::max<int64_t>(longest, static_cast<int64_t>(s.size()));
  const bool left = padding == "left";
  std::vector<torch::Tensor> ids, masks, logits;
  std::vector<std::vector<torch::Tensor>> states;
  for (size_t b = 0; b < seqs.size(); b += static_cast<size_t>(batch_size)) {
    size_t e = std::min(seqs.size(), b + static_cast<size_t>(batch_size));
    // Every batch is padded to the longest sequence of the file so the outputs stack.
    auto batch = pad_batch(seqs, b, e, cfg.pad_token_id, left, longest);
    auto result = model->forward(batch.ids, batch.mask, hidden);
    ids.push_back(batch.ids);
    masks.push_back(batch.mask);
    logits.push_back(result.logits.to(torch::kFloat32));
    states.resize(result.hidden_states.size());
    for (size_t l = 0; l < result.hidden_states.size(); ++l) states[l].push_back(result.hidden_states[l].to(torch::kFloat32));
    spdlog::info("forward: {}/{} sequences", e, seqs.size());
  }
  out.write("input_ids", torch::cat(ids));
  out.write("attention_mask", torch::cat(masks));
  out.write("logits", torch::cat(logits));
  for (size_t l = 0; l < states.size(); ++l) out.write(fmt::format("hidden_states/{}", l), torch::cat(states[l]));
  out.attribute("/", "model", model_dir);
  out.attribute("/", "model_type", cfg.model_type);
  out.attribute("/", "dtype", vm["dtype"].as<std::string>());
  out.attribute("/", "padding", padding);
  out.attribute("/", "num_examples", static_cast<int64_t>(seqs.size()));
  out.attribute("/", "num_hidden_states", static_cast<int64_t>(states.size()));
  out.attribute("/", "tool_version", kVersion);
  out.commit();
  spdlog::info("wrote {}", out_path);
  return 0;
}

}  // namespace crash
