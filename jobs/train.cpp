// train: fine-tunes a model (an emulator's adapter layers by default) on any DP x PP x TP grid
// with checkpoints that resume exactly (framework/trainer.h).
#include <sstream>

#include "framework/trainer.h"
#include "jobs/job.h"

namespace crash {

void train_options(po::options_description& o) {
  o.add_options()("model", po::value<std::string>()->required(),
                  "Hugging Face model folder (an emulator with crash_plan.json)")(
      "data", po::value<std::string>()->required(),
      "prepared task folder (multiple choice or text), or JSON Lines of {\"tokens\"}")(
      "out", po::value<std::string>()->required(), "output folder: model/, train_log.jsonl, checkpoints/")(
      "val-data", po::value<std::string>()->default_value(""),
      "validation data (same forms as --data); keeps the best model")("steps", po::value<int64_t>()->default_value(100),
                                                                      "optimiser steps")(
      "batch-size", po::value<int64_t>()->default_value(8),
      "examples per optimiser step, over all data-parallel ranks")("micro-batches", po::value<int>()->default_value(1),
                                                                   "pipeline micro-batches per forward/backward pass")(
      "grad-accum", po::value<int>()->default_value(1), "forward/backward passes per optimiser step")(
      "lr", po::value<double>()->default_value(1e-4), "peak learning rate")(
      "warmup", po::value<int64_t>()->default_value(0), "warm-up steps (linear), then linear decay to 0")(
      "weight-decay", po::value<double>()->default_value(0.0), "AdamW decoupled weight decay")(
      "clip", po::value<double>()->default_value(1.0), "clip the global gradient norm to this (0: no clipping)")(
      "adam-eps", po::value<double>()->default_value(1e-8), "AdamW epsilon")(
      "seed", po::value<uint64_t>()->default_value(0), "seed of the data order and the dropout masks")(
      "dropout", po::value<double>(),
      "dropout rate P in [0, 1) of the residual branches (attention and MLP outputs), replacing config.json's "
      "`dropout`; attention probabilities keep its `attention_dropout`. Training passes only; masks depend on "
      "--seed, the step and the example, not on the grid")("eval-every", po::value<int64_t>()->default_value(0),
                                                           "validate every N steps (and at the end)")(
      "save-every", po::value<int64_t>()->default_value(0), "checkpoint every N steps (and at the end)")(
      "log-interval", po::value<int64_t>()->default_value(10),
      "a log line every N steps, the first and the last: mean loss since the last line, lr, grad norm, tokens/s, "
      "time left (train_log.jsonl has every step)")("keep-checkpoints", po::value<int>()->default_value(2),
                                                    "newest checkpoints kept")(
      "train-all", po::bool_switch(), "train every parameter, not only the emulator's adapter layers")(
      "train-last", po::value<int64_t>(),
      "train the last K decoder layers instead of the plan's adapter layers (healing a pruned model)")(
      "train-head", po::bool_switch(), "also train the final norm and the LM head (a tied head: the embedding)")(
      "resume", po::bool_switch(), "continue from the newest complete checkpoint in OUT/checkpoints")(
      "overwrite", po::bool_switch(), "replace an existing OUT")(
      "distill-from", po::value<std::string>()->default_value(""), "full model folder: knowledge distillation teacher")(
      "kd-alpha", po::value<double>()->default_value(0.5), "weight of the distillation term")(
      "kd-temperature", po::value<double>()->default_value(2.0), "distillation temperature")(
      "stop-after", po::value<int64_t>()->default_value(0), "end after N steps of this run, as if killed (tests)")(
      "sift-selection-passes", po::value<int>()->default_value(4),
      "SIFT: backward passes over the first micro-batch that select the mask, each holding the dense gradients of "
      "about 1/N of the parameters")(
      "sparse-increment", po::value<double>(),
      "SIFT: train only each tensor's top floor(RHO numel) + 1 entries by the first step's |gradient|, 0 < RHO <= 1")(
      "save-increments", po::value<std::string>()->default_value(""),
      "SIFT: write the increments (index + trained - base) to this .safetensors file at the end")(
      "recompute", po::value<std::string>()->default_value("none"),
      "activation recomputation, as Megatron-LM's: none; full (each decoder layer keeps only its input and runs "
      "again in backward); selective (only attention's scores, softmax and probabilities @ V run again). The "
      "gradients are those of none, bit for bit")(
      "distributed-optimizer", po::bool_switch(),
      "shard the fp32 master weights and AdamW moments over the data-parallel ranks (ZeRO-1, as Megatron-LM's "
      "distributed optimizer): gradients reduce-scattered, parameters all-gathered; the same numbers as without")(
      "lora-rank", po::value<int64_t>(),
      "LoRA of rank R (PEFT's parameterisation) on the trainable layers (all with --train-all); the base weights "
      "stay frozen. OUT/model is the merged model, OUT/adapter the adapter in PEFT's format")(
      "lora-alpha", po::value<double>(), "LoRA scaling alpha: the update is (alpha / R) B A (default 8, as PEFT's)")(
      "lora-dropout", po::value<double>(),
      "LoRA dropout rate in [0, 1) on the adapters' input (default 0); masks follow --seed, the step and the "
      "example, not the grid")(
      "lora-targets", po::value<std::string>(),
      "comma-separated linears LoRA adapts: q, k, v, o, gate, up, down (OPT: up = fc1, down = fc2); default q,v")(
      "lora-init", po::value<std::string>(),
      "start LoRA from this PEFT adapter folder instead of a random A and B = 0");
  add_grid_options(o, "compute dtype: float32, bfloat16 or float16 (master weights fp32)");
}

int train_run(const po::variables_map& vm) {
  TrainOptions t;
  t.model = vm["model"].as<std::string>();
  t.data = vm["data"].as<std::string>();
  t.out = vm["out"].as<std::string>();
  t.val_data = vm["val-data"].as<std::string>();
  t.steps = vm["steps"].as<int64_t>();
  t.batch_size = vm["batch-size"].as<int64_t>();
  t.micro_batches = vm["micro-batches"].as<int>();
  t.grad_accum = vm["grad-accum"].as<int>();
  t.lr = vm["lr"].as<double>();
  t.warmup = vm["warmup"].as<int64_t>();
  t.weight_decay = vm["weight-decay"].as<double>();
  t.clip = vm["clip"].as<double>();
  t.eps = vm["adam-eps"].as<double>();
  t.seed = vm["seed"].as<uint64_t>();
  if (vm.count("dropout")) t.dropout = vm["dropout"].as<double>();
  t.eval_every = vm["eval-every"].as<int64_t>();
  t.save_every = vm["save-every"].as<int64_t>();
  t.log_interval = vm["log-interval"].as<int64_t>();
  t.keep_checkpoints = vm["keep-checkpoints"].as<int>();
  t.train_all = vm["train-all"].as<bool>();
  if (vm.count("train-last")) t.train_last = vm["train-last"].as<int64_t>();
  t.train_head = vm["train-head"].as<bool>();
  const GridChoice grid = grid_choice(vm);
  t.dtype = grid.model.dtype;
  t.grid = grid.sizes;
  t.pp_layers = grid.model.pp_layers;
  t.resume = vm["resume"].as<bool>();
  t.overwrite = vm["overwrite"].as<bool>();
  t.distill_from = vm["distill-from"].as<std::string>();
  t.kd_alpha = vm["kd-alpha"].as<double>();
  t.kd_temperature = vm["kd-temperature"].as<double>();
  t.stop_after = vm["stop-after"].as<int64_t>();
  if (vm.count("sparse-increment")) t.sparse_increment = vm["sparse-increment"].as<double>();
  t.sift_selection_passes = vm["sift-selection-passes"].as<int>();
  t.save_increments = vm["save-increments"].as<std::string>();
  t.recompute = vm["recompute"].as<std::string>();
  t.distributed_optimizer = vm["distributed-optimizer"].as<bool>();
  if (vm.count("lora-rank")) t.lora.rank = vm["lora-rank"].as<int64_t>();
  if (vm.count("lora-alpha")) t.lora.alpha = vm["lora-alpha"].as<double>();
  if (vm.count("lora-dropout")) t.lora.dropout = vm["lora-dropout"].as<double>();
  if (vm.count("lora-targets")) {
    std::stringstream list(vm["lora-targets"].as<std::string>());
    for (std::string item; std::getline(list, item, ',');) t.lora.targets.push_back(item);
    if (t.lora.targets.empty()) t.lora.targets.push_back("");
  }
  if (vm.count("lora-init")) t.lora.init = vm["lora-init"].as<std::string>();
  // Every option is checked in one place: check_train_options (framework/trainer.h).
  Trainer(t).run();
  return 0;
}

}  // namespace crash
