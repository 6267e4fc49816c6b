// similarity: linear CKA between every pair of layers of an activation archive (or of two
// archives of the same examples), the rows shared among all ranks (analysis/cka.h). Rank 0
// writes /cka [La, Lb] to HDF5, a JSON summary next to it and, with --plot, a heat map.
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "analysis/archive.h"
#include "analysis/cka.h"
#include "analysis/hdf5.h"
#include "framework/atomic_file.h"
#include "jobs/job.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

void similarity_options(po::options_description& o) {
  o.add_options()("archive", po::value<std::string>()->required(), "activation archive (crash-hpc collect)")(
      "archive-b", po::value<std::string>(), "a second archive of the same examples: CKA of A's layers against B's")(
      "out", po::value<std::string>()->required(), "output HDF5 file (/cka); a JSON summary goes next to it")(
      "method", po::value<std::string>()->default_value("auto"),
      "auto (gram when rows < features, else feature), gram, feature or minibatch (unbiased, Nguyen et al. 2021)")(
      "batch-size", po::value<int64_t>()->default_value(256),
      "minibatch rows (at least 4; memory grows as layers x batch^2)")(
      "plot", po::bool_switch(), "also draw a heat map, OUT with .png (needs python3-matplotlib)")(
      "overwrite", po::bool_switch(), "replace existing outputs");
}

int similarity_run(const po::variables_map& vm) {
  const auto out_path = vm["out"].as<std::string>();
  const auto summary_path = plot_path(out_path, ".json");
  const bool overwrite = vm["overwrite"].as<bool>();
  CkaOptions options;
  options.method = parse_cka_method(vm["method"].as<std::string>());
  options.batch_size = vm["batch-size"].as<int64_t>();
  if (options.method == CkaMethod::Minibatch && options.batch_size < 4)
    fail("--batch-size: minibatch CKA needs at least 4 examples per batch, got {}", options.batch_size);
  if (summary_path == out_path)
    fail("--out {}: expected an .h5 name (the JSON summary goes to OUT with .json)", out_path);
  for (const auto& p : {out_path, summary_path})
    if (!overwrite && std::filesystem::exists(p)) fail("{}: output exists (pass --overwrite to replace it)", p);

  // Every rank opens the archives read-only and reads only its share.
  ArchiveReader a(vm["archive"].as<std::string>());
  std::unique_ptr<ArchiveReader> b;
  if (vm.count("archive-b")) b = std::make_unique<ArchiveReader>(vm["archive-b"].as<std::string>());
  auto grid = ProcessGrid::create(GridSizes{});
  const auto comm = grid->world();
  spdlog::info("similarity: {} layers x {} layers, {} rows ({}), {} rank(s)", a.num_layers(),
               b ? b->num_layers() : a.num_layers(), a.num_rows(), a.pooled() ? "examples" : "tokens", comm->size());
  const auto start = std::chrono::steady_clock::now();
  const CkaMatrix result = archive_cka(a, b.get(), options, comm);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("similarity: {} form, {:.2f} s", cka_method_name(result.method), secs);
  if (comm->rank() != 0) return 0;

  nlohmann::json archives = nlohmann::json::array({a.path()});
  if (b) archives.push_back(b->path());
  H5Writer out(out_path, overwrite);
  out.write("cka", result.cka);
  out.attribute("/", "method", cka_method_name(result.method));
  out.attribute("/", "archives", archives.dump());
  out.attribute("/", "num_examples", a.num_examples());
  out.attribute("/", "rows", result.rows);
  out.attribute("/", "pooling", a.attribute("pooling"));
  out.attribute("/", "model", a.attribute("model"));
  if (b) out.attribute("/", "model_b", b->attribute("model"));
  if (result.method == CkaMethod::Minibatch) out.attribute("/", "batch_size", options.batch_size);
  out.attribute("/", "tool_version", std::string(kVersion));

  // The summary: adjacent-layer CKA of a self-similarity (what CRaSh clusters on), or the
  // diagonal of a comparison of two archives of the same depth.
  const auto cka = result.cka;
  nlohmann::json summary = {{"method", cka_method_name(result.method)},
                            {"shape", {cka.size(0), cka.size(1)}},
                            {"archives", archives},
                            {"num_examples", a.num_examples()},
                            {"rows", result.rows},
                            {"pooling", a.attribute("pooling")},
                            {"cka", out_path}};
  if (!b) {
    std::vector<double> adjacent;
    for (int64_t l = 0; l + 1 < cka.size(0); ++l) adjacent.push_back(cka[l][l + 1].item<double>());
    summary["adjacent"] = adjacent;
  } else if (cka.size(0) == cka.size(1)) {
    std::vector<double> diagonal;
    for (int64_t l = 0; l < cka.size(0); ++l) diagonal.push_back(cka[l][l].item<double>());
    summary["diagonal"] = diagonal;
  }
  // The summary is staged first and renamed last, after the HDF5 file it names.
  const std::string tmp = staging_path(summary_path);
  write_text(tmp, summary.dump(2) + "\n");
  out.commit();
  rename_into_place(tmp, summary_path);
  spdlog::info("wrote {} and {}", out_path, summary_path);
  if (vm["plot"].as<bool>()) {
    const auto png = plot_path(out_path);
    if (run_plot_script({out_path, "--out", png})) spdlog::info("wrote {}", png);
  }
  return 0;
}

}  // namespace crash
