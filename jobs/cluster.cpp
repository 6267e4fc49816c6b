// cluster: groups decoder layers into K clusters from the similarity job's CKA matrix
// (analysis/cluster.h) and writes the clusters JSON the emulate job reads, plus /clusters in
// HDF5 next to it and, with --plot, the segments over depth and the heat map with their bounds.
#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "analysis/cka.h"
#include "analysis/cluster.h"
#include "analysis/hdf5.h"
#include "framework/atomic_file.h"
#include "jobs/job.h"
#include "jobs/plot.h"
#include "jobs/version.h"
#include "parallel/errors.h"
#include "parallel/world.h"

namespace crash {

namespace {

// --layers FIRST:END, decoder layers [FIRST, END) of L.
std::pair<int64_t, int64_t> parse_layers(const std::string& text, int64_t L) {
  if (text.empty()) return {0, L};
  const auto colon = text.find(':');
  int64_t first = 0, end = 0;
  try {
    if (colon == std::string::npos) throw std::invalid_argument(text);
    size_t used = 0;
    first = std::stoll(text.substr(0, colon), &used);
    if (used != colon) throw std::invalid_argument(text);
    const std::string rest = text.substr(colon + 1);
    end = std::stoll(rest, &used);
    if (used != rest.size()) throw std::invalid_argument(text);
  } catch (const std::exception&) {
    fail("--layers: expected FIRST:END (decoder layers FIRST..END-1), got '{}'", text);
  }
  if (first < 0 || end > L || first >= end)
    fail("--layers {}: expected 0 <= FIRST < END <= {} (the model's decoder layers)", text, L);
  return {first, end};
}

}  // namespace

void cluster_options(po::options_description& o) {
  o.add_options()("cka", po::value<std::string>()->required(), "the similarity job's output (/cka)")(
      "k", po::value<int64_t>()->required(), "number of clusters")(
      "out", po::value<std::string>()->required(), "clusters JSON (read by emulate); /clusters goes to OUT with .h5")(
      "method", po::value<std::string>()->default_value("adjacent"),
      "adjacent (CRaSh: cut the K-1 weakest adjacent links), optimal (best contiguous segmentation) or average "
      "(average linkage, not contiguous)")("layers", po::value<std::string>()->default_value(""),
                                           "decoder layers FIRST:END to cluster (default: all)")(
      "plot", po::bool_switch(), "also draw the segments (OUT with .png) and the heat map with them (OUT_cka.png)")(
      "overwrite", po::bool_switch(), "replace existing outputs");
}

int cluster_run(const po::variables_map& vm) {
  const auto cka_path = vm["cka"].as<std::string>();
  const auto out_path = vm["out"].as<std::string>();
  const auto h5_path = plot_path(out_path, ".h5");
  const bool overwrite = vm["overwrite"].as<bool>();
  const int64_t k = vm["k"].as<int64_t>();
  const ClusterMethod method = parse_cluster_method(vm["method"].as<std::string>());
  if (h5_path == out_path) fail("--out {}: expected a .json name (/clusters goes to OUT with .h5)", out_path);
  // A small serial job. Only rank 0 looks for existing outputs: another rank could look after
  // rank 0 wrote them.
  if (World::get().rank() != 0) return 0;
  for (const auto& p : {out_path, h5_path})
    if (!overwrite && std::filesystem::exists(p)) fail("{}: output exists (pass --overwrite to replace it)", p);

  const CkaFile file = read_cka_file(cka_path);
  if (file.archives.size() > 1 || file.cka.size(0) != file.cka.size(1))
    fail("{}: compares two archives; clustering needs one model's self-similarity (similarity without --archive-b)",
         cka_path);
  const int64_t L = file.cka.size(0) - 1;  // hidden states 0..L: L decoder layers
  if (L < 1) fail("{}: /cka has {} entries: no decoder layer to cluster", cka_path, L + 1);
  const auto [first, end] = parse_layers(vm["layers"].as<std::string>(), L);
  // Decoder layer i is hidden-state index i + 1.
  const auto sim = file.cka.slice(0, first + 1, end + 1).slice(1, first + 1, end + 1);
  const Clustering c = cluster_chain(sim, k, method);

  std::vector<int64_t> layers, reps;
  std::vector<std::vector<int64_t>> clusters;
  for (int64_t i = first; i < end; ++i) layers.push_back(i);
  for (const auto& members : c.clusters) {
    clusters.emplace_back();
    for (int64_t m : members) clusters.back().push_back(first + m);
  }
  for (int64_t r : c.representatives) reps.push_back(first + r);
  nlohmann::json j = {{"format", "crash-hpc clusters 1"},
                      {"method", cluster_method_name(method)},
                      {"k", k},
                      {"layers", layers},
                      {"clusters", clusters},
                      {"representatives", reps},
                      {"score", c.score},
                      {"objective",
                       "mean over layers of the layer's mean CKA with its cluster, itself included "
                       "(= size-weighted mean over clusters of the mean within-cluster CKA)"},
                      {"cka", cka_path},
                      {"cka_method", file.method},
                      {"tool_version", kVersion}};

  auto ids = torch::empty({end - first}, torch::kInt64);
  for (size_t ci = 0; ci < clusters.size(); ++ci)
    for (int64_t l : clusters[ci]) ids[l - first] = static_cast<int64_t>(ci);
  H5Writer h5(h5_path, overwrite);
  h5.write("clusters", ids);
  h5.write("layers", torch::tensor(layers, torch::kInt64));
  h5.write("representatives", torch::tensor(reps, torch::kInt64));
  h5.attribute("/", "method", cluster_method_name(method));
  h5.attribute("/", "k", k);
  h5.attribute("/", "cka", cka_path);
  h5.attribute("/", "tool_version", std::string(kVersion));

  const std::string tmp = staging_path(out_path);
  write_text(tmp, j.dump(2) + "\n");
  h5.commit();
  rename_into_place(tmp, out_path);
  spdlog::info("cluster: {} layers into {} clusters ({}), score {:.4f}; representatives {}; wrote {}", end - first, k,
               cluster_method_name(method), c.score, nlohmann::json(reps).dump(), out_path);
  if (vm["plot"].as<bool>()) {
    const auto segments = plot_path(out_path);
    const auto heat =
        (std::filesystem::path(out_path).parent_path() / (std::filesystem::path(out_path).stem().string() + "_cka.png"))
            .string();
    if (run_plot_script({out_path, "--out", segments})) spdlog::info("wrote {}", segments);
    if (run_plot_script({cka_path, "--clusters", out_path, "--out", heat})) spdlog::info("wrote {}", heat);
  }
  return 0;
}

}  // namespace crash
