#include "jobs/job_model.h"

#include "framework/token_input.h"
#include "parallel/world.h"

namespace crash {

JobModel::JobModel(const std::string& model_dir, const GridChoice& choice, std::shared_ptr<ProcessGrid> grid)
    : checkpoint_(model_dir),
      choice_(choice),
      layout_(grid ? grid->layout() : GridLayout(World::get().size(), choice.sizes)),
      grid_(std::move(grid)) {
  validate_model_grid(checkpoint_.config(), layout_, choice_.model.pp_layers);
  tokenizer_ = model_tokenizer(model_dir);
}

const std::shared_ptr<ProcessGrid>& JobModel::grid() {
  if (!grid_) grid_ = ProcessGrid::create(layout_);
  return grid_;
}

DistributedLM& JobModel::model() {
  if (!model_) model_ = std::make_unique<DistributedLM>(checkpoint_, grid(), choice_.model);
  return *model_;
}

}  // namespace crash
