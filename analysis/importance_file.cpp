#include "analysis/importance_file.h"

#include <fmt/ranges.h>
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "analysis/hdf5.h"
#include "parallel/errors.h"

namespace crash {

namespace {

const char* kLastState =
    "hidden_states[L] as HF reports it: the last layer's output after the final norm (and OPT's project_out), so the "
    "last layer's scores compare its input with the normed output";

void check_shape(const std::string& path, const std::string& name, const torch::Tensor& t,
                 const std::vector<int64_t>& shape) {
  if (t.sizes().vec() != shape || t.scalar_type() != torch::kFloat64)
    fail("{}: /{} must be float64 [{}] for {} layers", path, name, fmt::format("{}", fmt::join(shape, ", ")),
         shape.front());
}

}  // namespace

std::vector<std::string> importance_methods(const ImportanceRecord& r) {
  std::vector<std::string> out;
  if (r.block_influence.defined()) out.push_back("block_influence");
  if (r.angular_distance.defined()) out.push_back("angular_distance");
  if (r.cka_importance.defined()) out.push_back("cka_importance");
  if (r.sleb_order.defined()) out.push_back("sleb");
  return out;
}

void write_importance_file(const std::string& path, const ImportanceRecord& r, bool overwrite) {
  const auto methods = importance_methods(r);
  H5Writer out(path, overwrite);
  if (r.block_influence.defined()) {
    const std::string d = "block_influence";
    out.write(d, r.block_influence.to(torch::kFloat64));
    out.attribute(d, "method", d);
    out.attribute(d, "reference", "ShortGPT (Men et al. 2024, arXiv 2403.03853)");
    out.attribute(d, "definition", "BI_l = 1 - mean over tokens of cos(h_l, h_{l+1}); NaN where the widths differ");
    out.attribute(d, "hidden_states",
                  "h_l = hidden_states[l] (input of layer l), h_{l+1} its output; every real token of every example");
    out.attribute(d, "prune", "lowest first (higher: more important)");
    out.attribute(d, "num_examples", r.num_examples);
    out.attribute(d, "num_tokens", r.num_tokens);
    out.attribute(d, "archive", r.archive);
  }
  if (r.angular_distance.defined()) {
    const std::string d = "angular_distance";
    out.write(d, r.angular_distance.to(torch::kFloat64));
    out.attribute(d, "method", d);
    out.attribute(d, "reference", "Gromov et al. 2024, arXiv 2403.17887");
    out.attribute(d, "definition",
                  "[l][n-1] = d(l, n) = mean over examples of arccos(cos(h_l, h_{l+n})) / pi: the block of n layers "
                  "l..l+n-1; NaN where l + n > L or the widths differ");
    out.attribute(d, "hidden_states",
                  "h_l = hidden_states[l], h_{l+n} = hidden_states[l+n]; each example's last token");
    out.attribute(d, "prune", "for a block size n, the lowest d(l, n) first");
    out.attribute(d, "num_examples", r.num_examples);
    out.attribute(d, "archive", r.archive);
  }
  if (r.cka_importance.defined()) {
    const std::string d = "cka_importance";
    out.write(d, r.cka_importance.to(torch::kFloat64));
    out.attribute(d, "method", d);
    out.attribute(d, "reference", "CRaSh (Zhang et al. 2023, arXiv 2310.15477): adjacent-layer linear CKA");
    out.attribute(d, "definition", "1 - CKA(h_l, h_{l+1}) from the similarity job's /cka");
    out.attribute(d, "hidden_states", "h_l = hidden_states[l], h_{l+1} = hidden_states[l+1]; rows of cka_pooling");
    out.attribute(d, "prune", "lowest first (higher: more important)");
    out.attribute(d, "cka_file", r.cka_file);
    out.attribute(d, "cka_method", r.cka_method);
    out.attribute(d, "cka_pooling", r.cka_pooling);
    out.attribute(d, "num_examples", r.cka_examples);
  }
  if (r.sleb_order.defined()) {
    out.write("sleb_order", r.sleb_order.to(torch::kInt64));
    out.write("sleb_perplexity", r.sleb_perplexity.to(torch::kFloat64));
    for (const std::string d : {"sleb_order", "sleb_perplexity"}) {
      out.attribute(d, "method", "sleb");
      out.attribute(d, "reference", "SLEB (Song et al. 2024, arXiv 2402.09025)");
      out.attribute(d, "definition",
                    "greedy: repeat, for each remaining layer the calibration perplexity with it removed; remove the "
                    "layer with the lowest; sleb_perplexity[i] is the perplexity after removing sleb_order[0..i]");
      out.attribute(d, "prune", "in sleb_order");
      out.attribute(d, "calibration", r.sleb_calibration);
      out.attribute(d, "num_examples", r.sleb_examples);
    }
    out.attribute("sleb_perplexity", "base_perplexity", fmt::format("{}", r.sleb_base_perplexity));
  }
  out.attribute("/", "format", kImportanceFormat);
  out.attribute("/", "methods", nlohmann::json(methods).dump());
  out.attribute("/", "num_layers", r.num_layers);
  out.attribute("/", "model", r.model);
  out.attribute("/", "model_type", r.model_type);
  out.attribute("/", "num_examples", r.num_examples ? r.num_examples : r.cka_examples);
  out.attribute("/", "archive", r.archive);
  out.attribute("/", "last_hidden_state", kLastState);
  out.attribute("/", "tool_version", r.tool_version);
  out.commit();
}

ImportanceRecord read_importance_file(const std::string& path) {
  if (!std::filesystem::exists(path)) fail("{}: no such file (make it with crash-hpc importance)", path);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  ImportanceRecord r;
  std::vector<std::string> methods;
  {
    H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    if (file.get() < 0) fail("{}: not an HDF5 file", path);
    if (h5_text_attribute(file, "format") != kImportanceFormat)
      fail("{}: not an importance file of crash-hpc importance (no format '{}')", path, kImportanceFormat);
    r.num_layers = h5_int_attribute(file, "num_layers", -1);
    r.model = h5_text_attribute(file, "model");
    r.model_type = h5_text_attribute(file, "model_type");
    r.num_examples = h5_int_attribute(file, "num_examples", 0);
    r.archive = h5_text_attribute(file, "archive");
    r.tool_version = h5_text_attribute(file, "tool_version");
    auto j = nlohmann::json::parse(h5_text_attribute(file, "methods"), nullptr, false);
    if (!j.is_array()) fail("{}: attribute 'methods' is not a JSON list", path);
    for (const auto& m : j) methods.push_back(m.is_string() ? m.get<std::string>() : "");
    H5Id bi(H5Dopen2(file, "block_influence", H5P_DEFAULT), H5Dclose);
    if (bi.get() >= 0) r.num_tokens = h5_int_attribute(bi, "num_tokens", 0);
    H5Id cka(H5Dopen2(file, "cka_importance", H5P_DEFAULT), H5Dclose);
    H5Id sleb(H5Dopen2(file, "sleb_order", H5P_DEFAULT), H5Dclose);
    if (sleb.get() >= 0) {
      r.sleb_calibration = h5_text_attribute(sleb, "calibration");
      r.sleb_examples = h5_int_attribute(sleb, "num_examples", 0);
    }
    if (cka.get() >= 0) {
      r.cka_file = h5_text_attribute(cka, "cka_file");
      r.cka_method = h5_text_attribute(cka, "cka_method");
      r.cka_pooling = h5_text_attribute(cka, "cka_pooling");
      r.cka_examples = h5_int_attribute(cka, "num_examples", 0);
    }
  }
  if (r.num_layers < 1) fail("{}: attribute num_layers missing or not positive", path);
  const int64_t L = r.num_layers;
  for (const auto& m : methods) {
    if (m == "block_influence") {
      r.block_influence = h5_read(path, m);
      check_shape(path, m, r.block_influence, {L});
    } else if (m == "angular_distance") {
      r.angular_distance = h5_read(path, m);
      check_shape(path, m, r.angular_distance, {L, L});
    } else if (m == "cka_importance") {
      r.cka_importance = h5_read(path, m);
      check_shape(path, m, r.cka_importance, {L});
    } else if (m == "sleb") {
      r.sleb_order = h5_read(path, "sleb_order");
      r.sleb_perplexity = h5_read(path, "sleb_perplexity");
      const auto n = r.sleb_order.dim() == 1 ? r.sleb_order.size(0) : -1;
      if (r.sleb_order.scalar_type() != torch::kInt64 || n < 1 || n >= L || r.sleb_order.min().item<int64_t>() < 0 ||
          r.sleb_order.max().item<int64_t>() >= L || std::get<0>(at::_unique(r.sleb_order)).numel() != n)
        fail("{}: /sleb_order must be int64 [n], n < {}, of distinct layers 0..{}", path, L, L - 1);
      check_shape(path, "sleb_perplexity", r.sleb_perplexity, {n});
    } else {
      fail("{}: unknown method '{}' in attribute 'methods'", path, m);
    }
  }
  return r;
}

}  // namespace crash
