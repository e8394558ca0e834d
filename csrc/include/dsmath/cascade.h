// Tiled paged attention for decode and shared-prefix (cascade) decode: the parameters of one pass and the shared
// __host__ __device__ helpers (per-sequence KV splits, fp8-e4m3 decoding). The C++ CPU kernel is
// attn_cascade_cpu.cpp; the GPU kernel is the Triton _attend_kernel (python/dsmath_kernels/mla_decode_triton.py),
// which follows the same work decomposition:
//   - per-sequence pass: work item = (sequence b, kv head, split) over tokens [start[b], seq_lens[b]);
//   - shared pass: work item = (tile, split), tiles[t] = (table row, member begin, member end, first head, length):
//     query rows = members[begin:end] x heads [first, first + heads_per_tile), tokens [0, length) read through the
//     table row (all members share those blocks).
// Each pass writes (o, lse) partials (lse in log2 units: scores are pre-multiplied by scale * log2 e) into slots
// [slot0, slot0 + num_splits) of part_o [B, Hq, nslot, Dv] / part_lse [B, Hq, nslot], or the output directly.
#pragma once
#include <cstdint>

#include "dsmath/attention.h"
#include "dsmath/common.h"

namespace dsmath {
namespace attn {

constexpr int kFloat8E4M3 = 6;  // dtype code of an fp8-e4m3 (e4m3fn) cache; python/dsmath_kernels/_ext.py
constexpr int kTileCols = 5;    // tiles[t] = (table row, member begin, member end, first head, length)

struct AttendParams {
  const void* q;  // [B, Hq, D], dtype q_dtype
  int64_t q_sb, q_sh;
  int q_dtype;
  const void* k;  // [NB, BS, Hkv, D], dtype kv_dtype
  int64_t k_sblk, k_stok, k_sh;
  const void* v;  // [NB, BS, Hkv, Dv] (may alias k: MLA)
  int64_t v_sblk, v_stok, v_sh;
  int kv_dtype;
  const float* k_scale;  // fp8 caches: per-token scale [NB, BS] at row stride ks_sblk (values = fp8 * scale)
  int64_t ks_sblk;
  const int32_t* block_tables;  // [B, bt_width]
  int64_t bt_sb;
  int bt_width;
  const int32_t* seq_lens;  // [B]
  const int32_t* start;     // [B] first token of the per-sequence pass, or nullptr (0)
  const int32_t* tiles;     // [num_tiles, kTileCols] shared pass, or nullptr (per-sequence pass)
  int num_tiles;
  const int32_t* members;  // rows listed by the tiles
  int heads_per_tile;
  void* out;       // [B, Hq, Dv] in q_dtype, written when part_o is nullptr
  float* part_o;   // [B, Hq, nslot, Dv]
  float* part_lse; // [B, Hq, nslot]
  int slot0, nslot;
  int B, Hq, Hkv, D, Dv, block_size, num_blocks;
  float scale;
  int num_splits, min_chunk;
  int64_t* bad;  // [3]: first invalid block-table read found (row, index, value; value -1: index past the row)
  int engine;    // CPU kernel choice, kCpuEngine* (0: the widest GEMM engine the CPU runs)
};

// CPU kernel choices (AttendParams::engine; python/dsmath_kernels/cascade.py CPU_ENGINES): the GEMM engine at most
// as wide as named, or the row-block kernel for the per-sequence pass (the shared pass always runs the engine).
constexpr int kCpuEngineAuto = 0, kCpuEngineAvx2 = 1, kCpuEnginePortable = 2, kCpuEngineRows = 3;

// fp8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities, S.1111.111 = NaN) -> float.
DSM_HD float fp8e4m3_to_float(uint8_t x) {
  const uint32_t sign = static_cast<uint32_t>(x & 0x80u) << 24;
  const uint32_t exp = (x >> 3) & 0xfu;
  const uint32_t man = x & 0x7u;
  if (exp == 0xfu && man == 0x7u) return bits_to_float(sign | 0x7fc00000u);
  if (exp == 0) {  // subnormal: man * 2^-9
    const float v = static_cast<float>(man) * 0.001953125f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// Token range [begin, end) of split s of [lo, hi): equal chunks of whole `align`-token runs, at least min_chunk
// tokens (splits past the end are empty). Sized from the sequence's own length, so one plan serves any length.
DSM_HD void adaptive_split(int64_t lo, int64_t hi, int s, int num_splits, int min_chunk, int align, int64_t& begin,
                           int64_t& end) {
  const int64_t n = hi - lo;
  int64_t chunk = (n + num_splits - 1) / num_splits;
  chunk = (chunk + align - 1) / align * align;
  if (chunk < min_chunk) chunk = min_chunk;
  begin = lo + static_cast<int64_t>(s) * chunk;
  end = begin + chunk < hi ? begin + chunk : hi;
  if (begin > end) begin = end;
}

}  // namespace attn
}  // namespace dsmath
