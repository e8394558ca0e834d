// CPU token permutation for the MoE expert layer: histogram of the T*K expert ids, prefix sum into (block_m
// padded) expert offsets, then a stable scatter in pair order, so expert e's rows hold its pairs in ascending
// pair index. One pass each; serial, because at T*K <= 256K pairs it runs in well under a millisecond.
#include <algorithm>
#include <vector>

#include "dsmath/launchers.h"
#include "dsmath/moe.h"

namespace dsmath {

int moe_permute_cpu(const int32_t* ids, int64_t P, int E, int block_m, int32_t* order, int32_t* offsets,
                    int32_t* inverse) {
  if (P < 0 || E < 1 || block_m < 1) return kBadArgument;
  const int64_t R = moe::num_rows(P, E, block_m);
  if (R > INT32_MAX) return kUnsupported;
  std::vector<int64_t> pos(E, 0);
  for (int64_t f = 0; f < P; ++f) {
    const int32_t e = ids[f];
    if (e < 0 || e >= E) return kBadArgument;
    ++pos[e];
  }
  int64_t run = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e] = static_cast<int32_t>(run);
    const int64_t c = pos[e];
    pos[e] = run;
    run += (c + block_m - 1) / block_m * block_m;
  }
  offsets[E] = static_cast<int32_t>(run);
  std::fill(order, order + R, -1);
  for (int64_t f = 0; f < P; ++f) {
    const int64_t r = pos[ids[f]]++;
    order[r] = static_cast<int32_t>(f);
    inverse[f] = static_cast<int32_t>(r);
  }
  return kOk;
}

}  // namespace dsmath
