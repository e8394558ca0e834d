"""Small @triton.jit helpers shared by the Triton kernels (grouped GEMM, FP8 GEMM, GRPO loss)."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: convert the operands to fp32 first (the Triton interpreter's
    bf16 dot returns garbage); IEEE: exact fp32 products instead of TF32 for fp32 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def gathered_rows(rows_ptr, rows, mask_m, topk, GATHER: tl.constexpr, LOAD_PAIRS: tl.constexpr):
    """The A rows of an MoE GEMM tile: rows [BM] of the permuted layout -> (pair [BM] (pair index f = t * topk + j,
    -1 = padding; loaded when LOAD_PAIRS), a_ok [BM] (row holds data), src [BM] int64 (row of A to read)).
    GATHER: A row r is x[pair // topk] (the permutation folded into the load); else A row r is row r."""
    pair = rows * 0 - 1
    if LOAD_PAIRS:
        pair = tl.load(rows_ptr + rows, mask=mask_m, other=-1)
    if GATHER:
        return pair, mask_m & (pair >= 0), (tl.maximum(pair, 0) // topk).to(tl.int64)
    return pair, mask_m, rows.to(tl.int64)


@triton.jit
def segment_schedule(off_ptr, M, E, N, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Tiles of a grouped GEMM over contiguous row segments: group g < E is [off[g], off[g+1]) clamped to [0, M],
    group E the rows past off[E] (a zero-filled tail). Returns per-group vectors over ar = 0..EP-1
    (EP = next power of two >= E + 1): (ar, lo, hi, num_m, tiles, cum) and the total tile count. Computed from the
    offsets in registers (no serial walk over the experts, no host sync: CUDA-graph safe)."""
    ar = tl.arange(0, EP)
    lo = tl.load(off_ptr + ar, mask=ar <= E, other=0).to(tl.int32)
    hi = tl.load(off_ptr + ar + 1, mask=ar < E, other=0).to(tl.int32)
    lo = tl.minimum(tl.maximum(lo, 0), M)
    hi = tl.where(ar == E, M, hi)
    hi = tl.where(ar <= E, tl.minimum(tl.maximum(hi, lo), M), lo)
    num_m = tl.cdiv(hi - lo, BM)  # [EP]
    tiles = num_m * tl.cdiv(N, BN)
    cum = tl.cumsum(tiles, 0)  # [EP] inclusive
    return ar, lo, hi, num_m, tiles, cum, tl.sum(tiles, 0)


@triton.jit
def segment_tile(t, ar, lo, hi, num_m, tiles, cum):
    """Tile t of segment_schedule -> (group g, segment start, end, m_tile, n_tile); m is the fast index inside a
    group, so programs running together share the same weight tile in L2."""
    g = tl.sum((cum <= t).to(tl.int32), 0)  # group holding tile t
    sel = ar == g
    local = t - tl.sum(tl.where(sel, cum - tiles, 0), 0)
    start = tl.sum(tl.where(sel, lo, 0), 0)
    end = tl.sum(tl.where(sel, hi, 0), 0)
    nm = tl.sum(tl.where(sel, num_m, 0), 0)
    return g, start, end, local % nm, local // nm
