// The machine's GEMM rate as crash-hpc's own libraries reach it: LibTorch's products (its BLAS)
// and, where the build found oneDNN, oneDNN's matmul, on the MLP shapes of an OPT-125m layer
// (x [rows, K] times W^T, K x N = 768 x 3072 and 3072 x 768) in float32 and bfloat16, and the
// float64 [out, rows] x [rows, out] product of SFSD's statistics. Each kernel's rate is its best
// of --repeats timed groups. Prints the LibTorch build (version, BLAS) and one JSON line; run by
// the bench/*.py drivers next to bench/gemm.py (the same shapes with the Python torch).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <boost/program_options.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include <chrono>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#ifdef CRASH_HAVE_DNNL
#include <dnnl.hpp>
#endif

namespace {

using Clock = std::chrono::steady_clock;

double best_rate(const std::function<void()>& fn, double flops, int repeats, double min_seconds = 0.2) {
  const auto w0 = Clock::now();
  fn();  // kernel selection, packing, page faults
  if (std::chrono::duration<double>(Clock::now() - w0).count() > min_seconds)
    repeats = 1;  // slow: one call says enough
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    int n = 0;
    const auto t0 = Clock::now();
    double dt = 0;
    do {
      fn();
      ++n;
      dt = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (dt < min_seconds);
    best = std::max(best, flops * n / dt / 1e9);
  }
  return best;
}

const std::vector<std::pair<int64_t, int64_t>> kShapes = {{768, 3072}, {3072, 768}};

// Rate over both MLP shapes: total FLOPs over the sum of each shape's best time.
double pair_rate(const std::function<std::function<void()>(int64_t, int64_t)>& make, int64_t rows, int repeats) {
  double secs = 0, flops = 0;
  for (auto [k, n] : kShapes) {
    const double f = 2.0 * rows * k * n;
    secs += f / (best_rate(make(k, n), f, repeats) * 1e9);
    flops += f;
  }
  return flops / secs / 1e9;
}

#ifdef CRASH_HAVE_DNNL
// oneDNN matmul with the weights in the layout oneDNN picks (reordered once, as a prepacked
// inference weight would be).
double onednn_rate(int64_t rows, dnnl::memory::data_type type, int repeats) {
  using dims = dnnl::memory::dims;
  using tag = dnnl::memory::format_tag;
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return pair_rate(
      [&](int64_t k, int64_t n) -> std::function<void()> {
        dnnl::memory::desc x(dims{rows, k}, type, tag::ab), w_any(dims{k, n}, type, tag::any),
            y(dims{rows, n}, type, tag::ab), w_plain(dims{k, n}, type, tag::ba);
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(x, w_any, y), engine);
        auto xm = std::make_shared<dnnl::memory>(x, engine), ym = std::make_shared<dnnl::memory>(y, engine);
        auto wm = std::make_shared<dnnl::memory>(pd.weights_desc(), engine);
        dnnl::memory plain(w_plain, engine);
        dnnl::stream stream(engine);
        dnnl::reorder(plain, *wm).execute(stream, plain, *wm);
        stream.wait();
        auto product = std::make_shared<dnnl::matmul>(pd);
        return [=] {
          dnnl::stream s(engine);
          product->execute(s, {{DNNL_ARG_SRC, *xm}, {DNNL_ARG_WEIGHTS, *wm}, {DNNL_ARG_DST, *ym}});
          s.wait();
        };
      },
      rows, repeats);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  po::options_description o("bench_gemm");
  o.add_options()("threads", po::value<int>()->default_value(2), "")("rows", po::value<int64_t>()->default_value(1024),
                                                                     "rows of x (tokens of a pass)")(
      "dtypes", po::value<std::string>()->default_value("float32,bfloat16"), "comma-separated")(
      "repeats", po::value<int>()->default_value(3), "timed groups per kernel");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, o), vm);
  po::notify(vm);
  torch::set_num_threads(vm["threads"].as<int>());
  torch::NoGradGuard no_grad;
  const int64_t rows = vm["rows"].as<int64_t>();
  const int repeats = vm["repeats"].as<int>();

  nlohmann::json out;
  out["rows"] = rows;
  out["threads"] = at::get_num_threads();
  out["libtorch_headers"] = TORCH_VERSION;
  const std::string config = at::show_config();
  auto setting = [&](const std::string& key) {
    const auto at = config.find(key + "=");
    if (at == std::string::npos) return std::string();
    const auto from = at + key.size() + 1;
    return config.substr(from, config.find_first_of(",\n", from) - from);
  };
  out["blas"] = setting("BLAS_INFO");
  out["libtorch_mkldnn"] = setting("USE_MKLDNN");
#ifdef CRASH_HAVE_DNNL
  const auto* v = dnnl::version();
  out["onednn"] = std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
#else
  out["onednn"] = nullptr;
#endif

  std::stringstream list(vm["dtypes"].as<std::string>());
  std::string name;
  torch::manual_seed(0);
  while (std::getline(list, name, ',')) {
    nlohmann::json r;
    if (name == "float64") {
      double secs = 0, flops = 0;
      for (int64_t out_dim : {768, 3072}) {
        auto y = torch::randn({rows, out_dim}, torch::kFloat64);
        auto acc = torch::zeros({out_dim, out_dim}, torch::kFloat64);
        const double f = 2.0 * rows * out_dim * out_dim;
        secs += f / (best_rate([&] { acc.addmm_(y.t(), y); }, f, repeats) * 1e9);
        flops += f;
      }
      r["LibTorch addmm_ (BLAS)"] = flops / secs / 1e9;
      out["rates"][name] = r;
      continue;
    }
    if (name != "float32" && name != "bfloat16") {
      std::cerr << "bench_gemm: unknown dtype '" << name << "' (expected float32, bfloat16 or float64)\n";
      return 2;
    }
    const auto type = name == "float32" ? torch::kFloat32 : torch::kBFloat16;
    r[name == "float32" ? "LibTorch linear (BLAS)" : "LibTorch linear"] = pair_rate(
        [&](int64_t k, int64_t n) -> std::function<void()> {
          auto x = torch::randn({rows, k}).to(type), w = torch::randn({n, k}).to(type);
          return [x, w] { torch::linear(x, w); };
        },
        rows, repeats);
#ifdef CRASH_HAVE_DNNL
    try {
      r["oneDNN matmul"] = onednn_rate(
          rows, type == torch::kFloat32 ? dnnl::memory::data_type::f32 : dnnl::memory::data_type::bf16, repeats);
    } catch (const dnnl::error& e) {  // no kernel for this type on this CPU
      r["oneDNN matmul"] = nullptr;
    }
#endif
    out["rates"][name] = r;
  }
  std::cout << out.dump() << std::endl;
}
