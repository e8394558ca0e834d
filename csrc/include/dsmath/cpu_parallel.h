// CPU work split for the C++ kernels: fn(i) for i in [0, n) on up to num_threads std::threads, dynamic scheduling
// (an atomic counter: split-KV and tile work items are ragged), the caller's thread alone when one suffices.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace dsmath {
namespace cpu {

template <typename F>
void parallel_for(int64_t n, int num_threads, F fn) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  if (nt == 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
}

}  // namespace cpu
}  // namespace dsmath
