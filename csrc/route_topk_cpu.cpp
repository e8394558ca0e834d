// CPU kernels for route_topk and route_topk_weights (replay): rows split across std::threads, each row routed by
// routing::route_row / routing::weights_for_ids (the same __host__ __device__ math the CUDA kernels use).
#include <algorithm>
#include <thread>
#include <vector>

#include "dsmath/routing.h"
#include "dsmath/launchers.h"

namespace dsmath {

namespace {

// Run work(begin, end) over [0, T) rows on up to num_threads threads (one when the rows are few).
template <typename F>
void parallel_rows(int64_t T, int num_threads, F work) {
  // ~E*K compares per row: below ~256 rows a thread costs more than it saves.
  int64_t n = std::max<int64_t>(1, std::min<int64_t>(num_threads, T / 256));
  if (n <= 1) {
    work(0, T);
    return;
  }
  std::vector<std::thread> pool;
  int64_t chunk = (T + n - 1) / n;
  for (int64_t i = 0; i < n; ++i) {
    int64_t b = i * chunk, e = std::min(T, b + chunk);
    if (b < e) pool.emplace_back(work, b, e);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

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
  parallel_rows(p.T, num_threads, work);
  return kOk;
}

int route_weights_cpu(const void* logits, int dtype, int64_t stride_t, const int32_t* ids,
                      const routing::Params& p, float* weights, int num_threads) {
  if (!routing::params_ok(p)) return kBadArgument;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(p.E);
    int id[routing::kMaxTopK];
    for (int64_t t = begin; t < end; ++t) {
      routing::row_scores(logits, t * stride_t, dtype, p.E, p.scoring, scores.data());
      for (int k = 0; k < p.K; ++k) id[k] = ids[t * p.K + k];
      routing::weights_for_ids(scores.data(), id, p, weights + t * p.K);
    }
  };
  parallel_rows(p.T, num_threads, work);
  return kOk;
}

}  // namespace dsmath
