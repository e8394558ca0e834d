// CPU kernel for route_topk: rows split across std::threads, each row routed by routing::route_row (the same
// __host__ __device__ math the CUDA kernel uses).
#include <algorithm>
#include <thread>
#include <vector>

#include "dsmath/routing.h"
#include "dsmath/launchers.h"

namespace dsmath {

int route_topk_cpu(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                   float* weights, int32_t* ids, int num_threads) {
  if (!routing::params_ok(p)) return kBadArgument;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(p.E), choice(p.E);
    float w[routing::kMaxTopK];
    int id[routing::kMaxTopK];
    for (int64_t t = begin; t < end; ++t) {
      routing::route_row(logits, t * stride_t, dtype, bias, p, scores.data(), choice.data(), w, id);
      for (int k = 0; k < p.K; ++k) {
        weights[t * p.K + k] = w[k];
        ids[t * p.K + k] = id[k];
      }
    }
  };
  // ~E*K compares per row: below ~256 rows a thread costs more than it saves.
  int64_t n = std::max<int64_t>(1, std::min<int64_t>(num_threads, p.T / 256));
  if (n <= 1) {
    work(0, p.T);
    return kOk;
  }
  std::vector<std::thread> pool;
  int64_t chunk = (p.T + n - 1) / n;
  for (int64_t i = 0; i < n; ++i) {
    int64_t b = i * chunk, e = std::min(p.T, b + chunk);
    if (b < e) pool.emplace_back(work, b, e);
  }
  for (auto& th : pool) th.join();
  return kOk;
}

}  // namespace dsmath
