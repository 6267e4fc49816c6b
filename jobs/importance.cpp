// importance: per-layer (and per-block) importance scores of the layer-pruning baselines
// (analysis/importance.h): Block Influence and angular distance from a token-level activation
// archive, its examples split among all ranks; CRaSh's adjacent CKA from the similarity job's
// output; SLEB's greedy removal order by calibration perplexity, its forward passes on the grid.
// Rank 0 writes one HDF5 file (analysis/importance_file.h) and, with --plot, a figure.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "analysis/archive.h"
#include "analysis/cka.h"
#include "analysis/hdf5.h"
#include "analysis/importance.h"
#include "analysis/importance_file.h"
#include "analysis/pruning.h"
#include "framework/emulator.h"
#include "framework/json_fields.h"
#include "framework/prepared.h"
#include "jobs/job.h"
#include "jobs/job_model.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/progress.h"
#include "parallel/world.h"

namespace crash {

namespace {

const std::vector<std::string> kMethods = {"block_influence", "angular_distance", "cka", "sleb"};

// Who made a set of hidden states: the model's config.json as recorded (compared as JSON, so a
// copy of the model elsewhere matches), else its folder's path.
struct ModelOf {
  std::string path, config;
  int64_t layers = -1;  // decoder layers
};

bool same_model(const ModelOf& a, const ModelOf& b) {
  if (!a.config.empty() && !b.config.empty())
    return nlohmann::json::parse(a.config, nullptr, false) == nlohmann::json::parse(b.config, nullptr, false);
  std::error_code ec;
  return std::filesystem::weakly_canonical(a.path, ec) == std::filesystem::weakly_canonical(b.path, ec);
}

ModelOf archive_model(const ArchiveReader& a) {
  return {a.attribute("model"), a.attribute("config"), a.num_layers() - 1};
}

// The similarity file's model: its archive's config when that archive is still there.
ModelOf cka_model(const std::string& path, const CkaFile& cka) {
  H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  ModelOf m{h5_text_attribute(file, "model"), "", cka.cka.size(0) - 1};
  if (cka.archives.size() == 1 && std::filesystem::exists(cka.archives[0])) {
    try {
      m.config = ArchiveReader(cka.archives[0]).attribute("config");
    } catch (const UserError&) {
    }
  }
  return m;
}

std::set<std::string> parse_methods(const std::string& text, bool archive, bool cka, bool calibration) {
  std::set<std::string> out;
  std::stringstream in(text);
  for (std::string m; std::getline(in, m, ',');) {
    if (m == "all") {
      if (archive) out.insert({"block_influence", "angular_distance"});
      if (cka) out.insert("cka");
      continue;
    }
    if (std::find(kMethods.begin(), kMethods.end(), m) == kMethods.end())
      fail("--methods: unknown method '{}' (expected block_influence, angular_distance, cka, sleb or all)", m);
    if (m == "sleb") {
      if (!calibration) fail("--methods sleb needs --model, --calibration (a prepared task) and --ratio");
      out.insert(m);
      continue;
    }
    if (m == "cka" && !cka) fail("--methods cka needs --cka (the similarity job's output)");
    if (m != "cka" && !archive) fail("--methods {} needs --archive (collect --pooling none)", m);
    out.insert(m);
  }
  if (out.empty()) fail("--methods '{}': no method to compute", text);
  return out;
}

}  // namespace

void importance_options(po::options_description& o) {
  o.add_options()("archive", po::value<std::string>(),
                  "token-level activation archive (crash-hpc collect --pooling none); one pooled with 'last' gives "
                  "angular distance only")("cka", po::value<std::string>(),
                                           "the similarity job's output (/cka of one archive): 1 - adjacent CKA")(
      "model", po::value<std::string>(), "Hugging Face model folder: the inputs must come from this model (checked)")(
      "out", po::value<std::string>()->required(), "output HDF5 file")(
      "methods", po::value<std::string>()->default_value("all"),
      "comma-separated: block_influence, angular_distance, cka, or all (every score the inputs give)")(
      "chunk-tokens", po::value<int64_t>()->default_value(8192), "archive rows read at once per hidden state")(
      "plot", po::bool_switch(), "also draw every score over depth (OUT with the extension .png)")(
      "overwrite", po::bool_switch(), "replace an existing output file")(
      "calibration", po::value<std::string>(), "sleb: a prepared task whose examples' perplexity decides")(
      "calibration-examples", po::value<int64_t>()->default_value(64), "sleb: examples of --calibration used")(
      "ratio", po::value<double>(), "sleb: remove round(RATIO * layers), one at a time")(
      "batch-size", po::value<int64_t>()->default_value(8), "sleb: sequences per forward pass");
  add_grid_options(o);
}

int importance_run(const po::variables_map& vm) {
  const auto out_path = vm["out"].as<std::string>();
  const bool overwrite = vm["overwrite"].as<bool>();
  const int64_t chunk = vm["chunk-tokens"].as<int64_t>();
  if (chunk <= 0) fail("--chunk-tokens must be positive, got {}", chunk);
  const bool have_archive = vm.count("archive") != 0, have_cka = vm.count("cka") != 0;
  const bool sleb_ready = vm.count("calibration") && vm.count("model") && vm.count("ratio");
  if (!have_archive && !have_cka && !vm.count("calibration"))
    fail("nothing to score: give --archive (collect --pooling none) and/or --cka, or --calibration for sleb");
  const auto methods = parse_methods(vm["methods"].as<std::string>(), have_archive, have_cka, sleb_ready);
  if (!overwrite && std::filesystem::exists(out_path))
    fail("{}: output exists (pass --overwrite to replace it)", out_path);

  ImportanceRecord record;
  record.tool_version = kVersion;
  std::unique_ptr<ArchiveReader> archive;
  ImportanceOptions options;
  options.block_influence = methods.count("block_influence") != 0;
  options.angular_distance = methods.count("angular_distance") != 0;
  options.chunk_tokens = chunk;
  const bool scores_from_archive = options.block_influence || options.angular_distance;
  if (have_archive) {
    archive = std::make_unique<ArchiveReader>(vm["archive"].as<std::string>());
    // "all" on an archive pooled with 'last' means what it can give: angular distance.
    if (vm["methods"].as<std::string>() == "all" && archive->pooled() && archive->attribute("pooling") == "last")
      options.block_influence = false;
    if (scores_from_archive) check_importance_archive(*archive, options);
  }

  std::optional<ModelOf> model;
  if (vm.count("model")) {
    const auto dir = vm["model"].as<std::string>();
    const auto config_path = (std::filesystem::path(dir) / "config.json").string();
    if (!std::filesystem::exists(config_path)) fail("--model {}: no config.json there", dir);
    const auto config = read_json_file(config_path);
    model = ModelOf{dir, config.dump(), -1};
    record.model = dir;
    record.model_type = config.value("model_type", "");
  }
  if (archive) {
    const ModelOf a = archive_model(*archive);
    if (model && !same_model(*model, a))
      fail("{}: an archive of another model ({}), not --model {}", archive->path(), a.path, model->path);
    if (record.model.empty()) record.model = a.path;
    if (record.model_type.empty()) record.model_type = archive->attribute("model_type");
    record.num_layers = a.layers;
  }
  CkaFile cka;
  if (methods.count("cka")) {
    const auto cka_path = vm["cka"].as<std::string>();
    cka = read_cka_file(cka_path);
    if (cka.archives.size() > 1 || cka.cka.size(0) != cka.cka.size(1))
      fail("{}: a CKA of two archives; the CKA score needs one archive against itself", cka_path);
    const ModelOf c = cka_model(cka_path, cka);
    if (archive && (c.layers != record.num_layers || !same_model(c, archive_model(*archive))))
      fail("{}: CKA of another model ({}, {} layers) than the archive {} ({}, {} layers)", cka_path, c.path, c.layers,
           archive->path(), archive->attribute("model"), record.num_layers);
    if (model && !archive && !same_model(*model, c))
      fail("{}: CKA of another model ({}), not --model {}", cka_path, c.path, model->path);
    record.cka_importance = adjacent_cka_importance(cka.cka);
    record.cka_file = cka_path;
    record.cka_method = cka.method;
    H5Id file(H5Fopen(cka_path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    record.cka_pooling = h5_text_attribute(file, "pooling");
    record.cka_examples = h5_int_attribute(file, "num_examples", 0);
    if (record.model.empty()) record.model = c.path;
    record.num_layers = c.layers;
  }
  if (model && !archive && !methods.count("cka")) {
    record.num_layers = read_json_file((std::filesystem::path(model->path) / "config.json").string())
                            .value("num_hidden_layers", int64_t(0));
  }
  if (model) {
    const int64_t layers = read_json_file((std::filesystem::path(model->path) / "config.json").string())
                               .value("num_hidden_layers", record.num_layers);
    if (layers != record.num_layers)
      fail("--model {}: {} layers, but the inputs hold {}", model->path, layers, record.num_layers);
  }

  auto comm = ProcessGrid::create(GridSizes{})->world();
  if (archive && scores_from_archive) {
    const int64_t N = archive->num_examples();
    spdlog::info("importance: {} ({} layers), {} examples, {} rows of {}, {} rank(s)", record.model, record.num_layers,
                 N, archive->num_rows(), archive->pooled() ? "last tokens" : "tokens", comm->size());
    const int64_t mine = N * (comm->rank() + 1) / comm->size() - N * comm->rank() / comm->size();
    Progress progress("importance (this rank's share)", mine, "examples");
    options.progress = [&](int64_t n) { progress.advance(n); };
    const auto start = std::chrono::steady_clock::now();
    const HiddenStateScores scores = archive_importance(*archive, options, comm);
    progress.finish();
    spdlog::info("importance: hidden-state scores in {:.2f} s",
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    record.block_influence = scores.block_influence;
    record.angular_distance = scores.angular_distance;
    record.archive = archive->path();
    record.num_examples = scores.num_examples;
    record.num_tokens = scores.num_tokens;
  }

  if (methods.count("sleb")) {
    // Each candidate (the layers removed so far and one more) is written as a pruned folder
    // next to the output and run on the grid.
    GridChoice choice = grid_choice(vm);
    choice.model.pp_layers.clear();
    JobModel full(model->path, choice);
    const int64_t L = full.config().num_layers, remove = layers_for_ratio(vm["ratio"].as<double>(), L);
    const int64_t batch = vm["batch-size"].as<int64_t>(), n = vm["calibration-examples"].as<int64_t>();
    if (batch < 1) fail("--batch-size must be positive, got {}", batch);
    if (n < 1) fail("--calibration-examples must be positive, got {}", n);
    const auto calib = vm["calibration"].as<std::string>();
    const auto task = read_prepared(calib, n, full.config().vocab_size);
    std::vector<std::vector<int64_t>> seqs;
    for (const auto& e : task.examples) {
      auto t = e.tokens;
      if (static_cast<int64_t>(t.size()) > full.config().max_positions)
        t.erase(t.begin(), t.end() - full.config().max_positions);
      if (t.size() >= 2) seqs.push_back(t);
    }
    if (seqs.empty()) fail("{}: no calibration example of two tokens or more", calib);
    const std::string candidate_dir = out_path + ".sleb-candidate";
    const auto start = std::chrono::steady_clock::now();
    int64_t runs = 0;
    auto perplexity = [&](const std::vector<int64_t>& removed) {
      ++runs;
      if (removed.empty()) return calibration_perplexity(full.model(), seqs, batch);
      if (comm->rank() == 0) write_emulator_folder(full.checkpoint(), plan_prune(L, removed, 0), candidate_dir);
      comm->barrier();
      JobModel pruned(candidate_dir, choice, full.grid());
      const double p = calibration_perplexity(pruned.model(), seqs, batch);
      spdlog::debug("sleb: without layers {}: perplexity {:.6f}", fmt::join(removed, ","), p);
      return p;
    };
    const auto result = sleb_search(L, remove, perplexity);
    if (comm->rank() == 0) std::filesystem::remove_all(candidate_dir);
    for (size_t i = 0; i < result.order.size(); ++i)
      spdlog::info("sleb: removed layer {} -> perplexity {:.4f}", result.order[i], result.perplexity[i]);
    spdlog::info("sleb: {} forward runs over {} examples in {:.2f} s (full model: perplexity {:.4f})", runs,
                 seqs.size(), std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                 result.base_perplexity);
    record.sleb_order = torch::tensor(result.order, torch::kInt64);
    record.sleb_perplexity = torch::tensor(result.perplexity, torch::kFloat64);
    record.sleb_base_perplexity = result.base_perplexity;
    record.sleb_calibration = std::filesystem::absolute(calib).string();
    record.sleb_examples = static_cast<int64_t>(seqs.size());
    if (record.model_type.empty()) record.model_type = full.config().model_type;
  }

  if (comm->rank() == 0) {
    write_importance_file(out_path, record, overwrite);
    spdlog::info("wrote {} ({})", out_path, nlohmann::json(importance_methods(record)).dump());
    if (vm["plot"].as<bool>()) {
      const auto png = plot_path(out_path);
      if (run_plot_script({out_path, "--out", png})) spdlog::info("wrote {}", png);
    }
  }
  comm->barrier();
  return 0;
}

}  // namespace crash
