// The one way a job opens a model on its grid, in the order every job needs: the config, the
// grid's checks and the tokenizer first (so inputs are checked before any weight is read), then
// the communicators, then this rank's shard.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "framework/checkpoint.h"
#include "framework/distributed_lm.h"
#include "framework/tokenizer.h"
#include "jobs/job.h"
#include "parallel/grid.h"

namespace crash {

class JobModel {
 public:
  // Reads `model_dir`'s config.json and tokenizer.json (if any) and checks the grid of `choice`
  // against the world and the model. `grid`: an existing grid to load on (another model of the
  // same job); none: made by grid().
  JobModel(const std::string& model_dir, const GridChoice& choice, std::shared_ptr<ProcessGrid> grid = nullptr);

  const std::string& dir() const { return checkpoint_.dir(); }
  const CheckpointReader& checkpoint() const { return checkpoint_; }
  const ModelConfig& config() const { return checkpoint_.config(); }
  // The model's tokenizer.json, or nullptr when the folder has none (inputs are then token ids).
  const Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }
  const GridChoice& choice() const { return choice_; }

  // Collective over the world: the communicators (made on the first call).
  const std::shared_ptr<ProcessGrid>& grid();
  // Collective over the world: this rank's stage with its TP slices (loaded on the first call).
  DistributedLM& model();

 private:
  CheckpointReader checkpoint_;
  GridChoice choice_;
  GridLayout layout_;
  std::optional<Tokenizer> tokenizer_;
  std::shared_ptr<ProcessGrid> grid_;
  std::unique_ptr<DistributedLM> model_;
};

}  // namespace crash
