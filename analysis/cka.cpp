#include "analysis/cka.h"

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "analysis/named_choice.h"
#include "parallel/errors.h"
#include "parallel/progress.h"

namespace crash {

namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

// Rows [first, end) of `rows` that rank `rank` of `size` owns: contiguous, balanced.
std::pair<int64_t, int64_t> my_rows(int64_t rows, int rank, int size) {
  return {rows * rank / size, rows * (rank + 1) / size};
}

// HSIC_1 between every pair of representations of one minibatch ([n, d_i] each): [m, m].
// K~ flattened, its row sums and total give the three terms of every pair as matrix products.
torch::Tensor hsic1_matrix(const std::vector<torch::Tensor>& xs) {
  const int64_t m = static_cast<int64_t>(xs.size()), n = xs[0].size(0);
  auto flat = torch::empty({m, n * n}, kF64);
  auto sums = torch::empty({m, n}, kF64);
  for (int64_t i = 0; i < m; ++i) {
    auto k = xs[static_cast<size_t>(i)].mm(xs[static_cast<size_t>(i)].t());
    k.diagonal().zero_();
    flat[i].copy_(k.reshape(-1));
    sums[i].copy_(k.sum(1));
  }
  auto total = sums.sum(1, true);
  const double nd = static_cast<double>(n);
  return (flat.mm(flat.t()) + total.mm(total.t()) / ((nd - 1) * (nd - 2)) - sums.mm(sums.t()) * (2.0 / (nd - 2))) /
         (nd * (nd - 3));
}

// HSIC_1 is invariant to shifting the rows (U-centring removes it), so each minibatch is
// centred first: the same value, without the cancellation of large means.
torch::Tensor centred(const torch::Tensor& x) { return x - x.mean(0, true); }

std::string shape(const torch::Tensor& t) {
  std::string out;
  for (int64_t s : t.sizes()) out += (out.empty() ? "" : " x ") + std::to_string(s);
  return "[" + out + "]";
}

torch::Tensor as_f64(const torch::Tensor& x, const char* what) {
  if (x.dim() != 2) fail("CKA: {} must be a matrix [rows, features], got {} dimensions", what, x.dim());
  return x.to(torch::kFloat64);
}

}  // namespace

namespace {
const NamedChoices<CkaMethod> kCkaMethods = {{"auto", CkaMethod::Auto},
                                             {"gram", CkaMethod::Gram},
                                             {"feature", CkaMethod::Feature},
                                             {"minibatch", CkaMethod::Minibatch}};
}  // namespace

CkaMethod parse_cka_method(const std::string& name) {
  return parse_choice(kCkaMethods, name, "--method", "CKA method");
}

std::string cka_method_name(CkaMethod method) { return choice_name(kCkaMethods, method); }

double cka_from_sums(const HsicSums& s, const std::string& what) {
  const double norm = s.xx * s.yy;
  if (!(norm > 0))  // also NaN
    fail("{}: CKA undefined: HSIC(X,X) = {:.4g} and HSIC(Y,Y) = {:.4g} (a constant representation, or too few rows)",
         what, s.xx, s.yy);
  return s.xy / std::sqrt(norm);
}

double hsic_unbiased(const torch::Tensor& k, const torch::Tensor& l) {
  if (k.dim() != 2 || k.size(0) != k.size(1) || !k.sizes().equals(l.sizes()))
    fail("HSIC: expected two n x n Gram matrices, got {} and {}", shape(k), shape(l));
  const int64_t n = k.size(0);
  if (n < 4) fail("HSIC: the unbiased estimator needs at least 4 examples, got {}", n);
  auto kz = k.to(torch::kFloat64).clone(), lz = l.to(torch::kFloat64).clone();
  kz.diagonal().zero_();
  lz.diagonal().zero_();
  const double nd = static_cast<double>(n);
  const double trace = (kz * lz.t()).sum().item<double>();
  const double ones = kz.sum().item<double>() * lz.sum().item<double>();
  const double middle = kz.sum(0).dot(lz.sum(1)).item<double>();
  return (trace + ones / ((nd - 1) * (nd - 2)) - 2.0 / (nd - 2) * middle) / (nd * (nd - 3));
}

std::vector<std::pair<int64_t, int64_t>> minibatches(int64_t rows, int64_t batch_size) {
  if (batch_size < 4) fail("--batch-size: minibatch CKA needs at least 4 examples per batch, got {}", batch_size);
  if (rows < 4) fail("minibatch CKA needs at least 4 rows, got {}", rows);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t first = 0; first < rows; first += batch_size)
    out.emplace_back(first, std::min(rows, first + batch_size));
  if (out.size() > 1 && out.back().second - out.back().first < 4) {
    out[out.size() - 2].second = rows;
    out.pop_back();
  }
  return out;
}

HsicSums minibatch_hsic(const torch::Tensor& x, const torch::Tensor& y, int64_t batch_size) {
  auto xd = as_f64(x, "X"), yd = as_f64(y, "Y");
  if (xd.size(0) != yd.size(0)) fail("CKA: X has {} rows, Y has {}", xd.size(0), yd.size(0));
  HsicSums s;
  for (auto [first, end] : minibatches(xd.size(0), batch_size)) {
    auto h = hsic1_matrix({centred(xd.slice(0, first, end)), centred(yd.slice(0, first, end))});
    s.xy += h[0][1].item<double>();
    s.xx += h[0][0].item<double>();
    s.yy += h[1][1].item<double>();
  }
  return s;
}

double linear_cka(const torch::Tensor& x, const torch::Tensor& y, CkaMethod method, int64_t batch_size) {
  auto xd = as_f64(x, "X"), yd = as_f64(y, "Y");
  if (xd.size(0) != yd.size(0)) fail("CKA: X has {} rows, Y has {}", xd.size(0), yd.size(0));
  if (method == CkaMethod::Minibatch) return cka_from_sums(minibatch_hsic(xd, yd, batch_size), "CKA");
  if (method == CkaMethod::Auto)
    method = xd.size(0) < std::min(xd.size(1), yd.size(1)) ? CkaMethod::Gram : CkaMethod::Feature;
  auto xc = xd - xd.mean(0, true), yc = yd - yd.mean(0, true);
  HsicSums s;
  if (method == CkaMethod::Gram) {
    auto k = xc.mm(xc.t()), l = yc.mm(yc.t());
    s = {(k * l).sum().item<double>(), (k * k).sum().item<double>(), (l * l).sum().item<double>()};
  } else {
    s = {xc.t().mm(yc).square().sum().item<double>(), xc.t().mm(xc).square().sum().item<double>(),
         yc.t().mm(yc).square().sum().item<double>()};
  }
  return cka_from_sums(s, "CKA");
}

namespace {

// The layers of one or two archives in one list: A's, then B's.
struct Layers {
  std::vector<const ArchiveReader*> archive;
  std::vector<int64_t> index;
  int64_t size() const { return static_cast<int64_t>(index.size()); }
  torch::Tensor read(int64_t u, int64_t row, int64_t count) const {
    return archive[static_cast<size_t>(u)]->read(index[static_cast<size_t>(u)], row, count);
  }
  int64_t width(int64_t u) const { return archive[static_cast<size_t>(u)]->width(index[static_cast<size_t>(u)]); }
};

void check_same_examples(const ArchiveReader& a, const ArchiveReader& b) {
  if (a.pooled() != b.pooled())
    fail("{} and {}: one archive holds pooled examples, the other every token; compare archives of one kind", a.path(),
         b.path());
  if (a.num_examples() != b.num_examples())
    fail("{} has {} examples but {} has {}: CKA needs the same examples", a.path(), a.num_examples(), b.path(),
         b.num_examples());
  const auto ha = a.example_hashes(), hb = b.example_hashes();
  for (size_t i = 0; i < ha.size(); ++i)
    if (ha[i] != hb[i])
      fail("{} and {} hold different examples (example_hash differs at example {}); collect both from the same data",
           a.path(), b.path(), i);
  if (a.num_rows() != b.num_rows())
    fail("{} has {} rows but {} has {}: CKA needs the same rows", a.path(), a.num_rows(), b.path(), b.num_rows());
}

// Column means of every layer over all rows (each rank sums its rows; one allreduce).
std::vector<torch::Tensor> column_means(const Layers& layers, int64_t rows, const CkaOptions& opt, Communicator& comm) {
  std::vector<int64_t> widths;
  for (int64_t u = 0; u < layers.size(); ++u) widths.push_back(layers.width(u));
  std::vector<torch::Tensor> sums;
  for (int64_t w : widths) sums.push_back(torch::zeros({w}, kF64));
  const auto [first, end] = my_rows(rows, comm.rank(), comm.size());
  for (int64_t r = first; r < end; r += opt.chunk_rows) {
    const int64_t n = std::min(opt.chunk_rows, end - r);
    for (int64_t u = 0; u < layers.size(); ++u) sums[static_cast<size_t>(u)] += layers.read(u, r, n).sum(0);
  }
  auto all = torch::cat(sums);
  comm.allreduce(all);
  all /= static_cast<double>(rows);
  auto parts = all.split_with_sizes(widths);
  return {parts.begin(), parts.end()};
}

// Gram form: the N x N Gram matrices in tiles (a, b), a <= b, of at most T rows a side, dealt
// round robin to the ranks. Tile (a, b) of Kc is Xc[a] Xc[b]^T; <Kc, Lc> sums over tiles
// (twice for a < b, by symmetry). No rank ever holds an N x N matrix.
torch::Tensor gram_terms(const Layers& layers, int64_t rows, const std::vector<torch::Tensor>& mu,
                         const CkaOptions& opt, Communicator& comm) {
  const int64_t m = layers.size(), P = comm.size();
  const int64_t T = std::max<int64_t>(1, std::min(opt.max_tile_rows, (rows + P - 1) / P));
  const int64_t blocks = (rows + T - 1) / T, tiles = blocks * (blocks + 1) / 2;
  auto terms = torch::zeros({m, m}, kF64);
  Progress progress("similarity (Gram form)", tiles, "tiles");  // counts every rank's tiles
  int64_t t = 0;
  for (int64_t a = 0; a < blocks; ++a) {
    for (int64_t b = a; b < blocks; ++b, ++t) {
      if (t % P != comm.rank()) continue;
      const int64_t ra = a * T, na = std::min(T, rows - ra), rb = b * T, nb = std::min(T, rows - rb);
      auto flat = torch::empty({m, na * nb}, kF64);
      for (int64_t u = 0; u < m; ++u) {
        auto xa = layers.read(u, ra, na) - mu[static_cast<size_t>(u)];
        auto xb = a == b ? xa : layers.read(u, rb, nb) - mu[static_cast<size_t>(u)];
        flat[u].copy_(xa.mm(xb.t()).reshape(-1));
      }
      terms.add_(flat.mm(flat.t()), a == b ? 1.0 : 2.0);
      progress.update(t + 1);
    }
  }
  comm.allreduce(terms);
  progress.finish();
  return terms;
}

// Feature form: cross-covariances Xc_u^T Xc_v over each rank's rows, summed over ranks; the term
// is their squared Frobenius norm. Only the pairs needed, in groups that fit the budget (one
// pass over the rows per group).
torch::Tensor feature_terms(const Layers& layers, int64_t rows, int64_t la, bool two,
                            const std::vector<torch::Tensor>& mu, const CkaOptions& opt, Communicator& comm) {
  const int64_t m = layers.size();
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t u = 0; u < m; ++u)
    for (int64_t v = u; v < m; ++v)
      if (!two || u == v || (u < la && v >= la)) pairs.emplace_back(u, v);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> groups(1);
  int64_t bytes = 0;
  for (const auto& p : pairs) {
    const int64_t size = 8 * layers.width(p.first) * layers.width(p.second);
    if (!groups.back().empty() && bytes + size > opt.feature_budget_bytes) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(p);
    bytes += size;
  }
  auto terms = torch::zeros({m, m}, kF64);
  const auto [first, end] = my_rows(rows, comm.rank(), comm.size());
  Progress progress("similarity (feature form)", static_cast<int64_t>(groups.size()), "pair groups");
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& group = groups[g];
    std::vector<torch::Tensor> acc;
    std::vector<int64_t> sizes;
    for (const auto& [u, v] : group) {
      acc.push_back(torch::zeros({layers.width(u), layers.width(v)}, kF64));
      sizes.push_back(acc.back().numel());
    }
    for (int64_t r = first; r < end; r += opt.chunk_rows) {
      const int64_t n = std::min(opt.chunk_rows, end - r);
      std::map<int64_t, torch::Tensor> x;
      auto get = [&](int64_t u) -> const torch::Tensor& {
        auto it = x.find(u);
        if (it == x.end()) it = x.emplace(u, layers.read(u, r, n) - mu[static_cast<size_t>(u)]).first;
        return it->second;
      };
      for (size_t k = 0; k < group.size(); ++k) acc[k].addmm_(get(group[k].first).t(), get(group[k].second));
    }
    std::vector<torch::Tensor> flat;
    for (auto& t : acc) flat.push_back(t.reshape(-1));
    auto all = torch::cat(flat);
    acc.clear();
    flat.clear();
    comm.allreduce(all);
    auto parts = all.split_with_sizes(sizes);
    for (size_t k = 0; k < group.size(); ++k) {
      const double h = parts[k].square().sum().item<double>();
      terms[group[k].first][group[k].second] = h;
      terms[group[k].second][group[k].first] = h;
    }
    progress.update(static_cast<int64_t>(g) + 1);
  }
  progress.finish();
  return terms;
}

// Minibatch form: HSIC_1 of every pair per minibatch, minibatches dealt round robin to ranks.
torch::Tensor minibatch_terms(const Layers& layers, int64_t rows, const CkaOptions& opt, Communicator& comm) {
  const auto batches = minibatches(rows, opt.batch_size);
  const int64_t m = layers.size(), P = comm.size();
  auto terms = torch::zeros({m, m}, kF64);
  Progress progress("similarity (minibatch form)", static_cast<int64_t>(batches.size()), "minibatches");
  for (size_t k = 0; k < batches.size(); ++k) {
    if (static_cast<int64_t>(k) % P != comm.rank()) continue;
    const auto [first, end] = batches[k];
    std::vector<torch::Tensor> xs;
    for (int64_t u = 0; u < m; ++u) xs.push_back(centred(layers.read(u, first, end - first)));
    terms += hsic1_matrix(xs);
    progress.update(static_cast<int64_t>(k) + 1);
  }
  comm.allreduce(terms);
  progress.finish();
  return terms;
}

}  // namespace

CkaMatrix archive_cka(const ArchiveReader& a, const ArchiveReader* b, const CkaOptions& opt, const CommPtr& comm) {
  if (b) check_same_examples(a, *b);
  if (opt.chunk_rows <= 0 || opt.max_tile_rows <= 0) fail("CKA: chunk and tile sizes must be positive");
  const int64_t rows = a.num_rows(), la = a.num_layers(), lb = b ? b->num_layers() : la;
  Layers layers;
  int64_t min_width = std::numeric_limits<int64_t>::max();
  for (const ArchiveReader* ar : {&a, b}) {
    if (!ar) continue;
    for (int64_t l = 0; l < ar->num_layers(); ++l) {
      layers.archive.push_back(ar);
      layers.index.push_back(l);
      min_width = std::min(min_width, ar->width(l));
    }
  }
  CkaMatrix out;
  out.rows = rows;
  out.method = opt.method;
  if (out.method == CkaMethod::Auto) out.method = rows < min_width ? CkaMethod::Gram : CkaMethod::Feature;
  if (out.method != CkaMethod::Minibatch && rows < 2)
    fail("{}: CKA needs at least 2 rows, the archive has {}", a.path(), rows);
  torch::Tensor terms;
  if (out.method == CkaMethod::Minibatch) {
    terms = minibatch_terms(layers, rows, opt, *comm);
  } else {
    const auto mu = column_means(layers, rows, opt, *comm);
    terms = out.method == CkaMethod::Gram ? gram_terms(layers, rows, mu, opt, *comm)
                                          : feature_terms(layers, rows, la, b != nullptr, mu, opt, *comm);
  }
  auto h = terms.accessor<double, 2>();
  for (int64_t u = 0; u < layers.size(); ++u)
    if (!(h[u][u] > 0))
      fail("{}: /layers/{}: HSIC(X,X) = {:.4g}: CKA is undefined for it (a constant representation{})",
           layers.archive[static_cast<size_t>(u)]->path(), layers.index[static_cast<size_t>(u)], h[u][u],
           out.method == CkaMethod::Minibatch ? ", or minibatches too small: raise --batch-size" : "");
  out.cka = torch::empty({la, lb}, kF64);
  auto c = out.cka.accessor<double, 2>();
  for (int64_t i = 0; i < la; ++i)
    for (int64_t j = 0; j < lb; ++j) {
      const int64_t v = b ? la + j : j;
      c[i][j] = cka_from_sums({h[i][v], h[i][i], h[v][v]}, a.path());
    }
  return out;
}

CkaFile read_cka_file(const std::string& path) {
  if (!std::filesystem::exists(path)) fail("{}: no such file (make it with crash-hpc similarity)", path);
  CkaFile out;
  out.cka = h5_read(path, "cka");
  if (out.cka.dim() != 2 || out.cka.scalar_type() != torch::kFloat64)
    fail("{}: /cka must be a float64 matrix, got {} {}", path, c10::toString(out.cka.scalar_type()), shape(out.cka));
  H5Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  out.method = h5_text_attribute(file, "method");
  const std::string archives = h5_text_attribute(file, "archives");
  if (!archives.empty()) {
    auto j = nlohmann::json::parse(archives, nullptr, false);
    if (j.is_array())
      for (const auto& e : j)
        if (e.is_string()) out.archives.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace crash
