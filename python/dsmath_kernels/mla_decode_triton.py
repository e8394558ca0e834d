"""Tensor-core paged decode for MLA (all query heads per KV tile) and shared-prefix (cascade) decode for MLA and
GQA: Triton kernels, spec in reference/attention.py (`paged_decode_ref`, `cascade_decode_ref`).

Why Triton and not CUDA: the same source (1) runs numerically in Triton's interpreter on a CPU, so CI tests every
mode of the kernel (plain, suffix, shared-prefix tiles, fp8 cache, odd page sizes) without a GPU, and (2) compiles
for sm_90 on a CPU machine, so the test suite asserts what the hardware will run: wgmma main loops, registers, no
spills, shared memory (tests/test_mla_decode_tc.py). A hand-written wgmma CUDA kernel can be neither emulated by the
CPU thread shims nor checked numerically before a GPU run. The price: no TMA (paged rows are gathered through the
block table; TMA gather is Blackwell-only), so loads are cp.async, pipelined over `num_stages` by Triton.

One program = (work tile, KV split). A work tile is BLOCK_R query rows that read the same KV rows:
- plain / suffix pass: the heads of one sequence (MLA: all 16 heads of V2-Lite in one tile; V3's 128 heads in two
  64-head tiles, adjacent in the grid so their reads of the same KV share L2). KV range [start_b, seq_lens[b]).
- shared pass (cascade): the queries of several sequences x heads against their group's shared prefix blocks, read
  once per tile instead of once per sequence: `tiles[t] = (table row, member begin, member end, head begin, len)`,
  rows = members[begin:end] x heads [head begin, head begin + HT).
Both passes write (o, lse) partials into slots of one buffer and `merge` combines them by log-sum-exp; with one
split and no cascade the kernel writes the output directly.

Tensor-core shapes (wgmma needs M >= 64): tiles of <= 32 rows (16-head MLA, GQA heads of one kv head) run
transposed, S^T = K Q^T and O^T = V^T P^T, so the KV tile (64 tokens) and the 512-wide value are the M dimensions;
tiles of 64 rows (128-head MLA, shared-prefix tiles of members x heads) run S = Q K^T, O = P V with 8 warps (two
warpgroups split O's 512 columns: 128 fp32 accumulator registers per thread). The MLA value is the first Dc
columns of the key tile already loaded (no second load). Splits are sized per sequence from its actual length
(`num_splits` only fixes the grid), so one CUDA-graph plan serves any context length without starving short ones.

Block tables are validated on the fly: an id outside [0, NB) makes its tokens empty (never an out-of-bounds read)
and sets bit 1 of the device's bounds flag word (`_ext.BOUNDS_FLAGS`, read by `raise_device_errors`); a KV range
past the block-table row (or negative) sets bit 2. Each program ORs its bad-id lanes up across the loop and issues
one predicated atomic after it (none when everything is in range).
fp8-e4m3 caches carry one fp32 scale per token (`kv_scale [NB, BS]`): scores and probabilities are scaled per
token, so the fp8 rows are only converted, never dequantized in memory. In the interpreter operands are upcast to
fp32 before tl.dot (its bf16 dot is broken)."""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU-only installs
    triton = None

BLOCK_N = 64          # KV tokens per tile (the M dim of the transposed products)
TILE_ROWS = 64        # rows of a standard (non-transposed) tile: wgmma's M
MAX_TRANS_ROWS = 32   # tiles with at most this many rows run transposed
MIN_CHUNK = 256       # fewest tokens per split on GPU: partials stay a few % of the KV bytes


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return triton is not None


def tile_shape(num_q_heads: int, num_kv_heads: int, kernel: str) -> tuple[int, int]:
    """(heads per tile HT, rows per tile R) of a kernel's work tiles. "triton" (GPU): one sequence's heads of one
    kv head per tile, 64 heads at most; shared-prefix tiles pack R // HT sequences into 64 rows. "cpu" (C++
    kernel): every head of a kv head and every member of a group in one tile (R = 0: unbounded)."""
    G = num_q_heads // num_kv_heads
    if kernel != "triton":
        return G, 0
    ht = min(G, TILE_ROWS)
    return ht, max(ht, TILE_ROWS)


if triton is not None:

    @triton.jit
    def _split_range(lo, hi, split, num_splits, min_chunk, BLOCK: tl.constexpr):
        """Token range of split `split` of [lo, hi): equal chunks of whole BLOCK runs, at least min_chunk."""
        n = hi - lo
        chunk = tl.maximum(tl.cdiv(tl.cdiv(n, num_splits), BLOCK) * BLOCK, min_chunk)
        begin = lo + split * chunk
        end = tl.minimum(hi, begin + chunk)
        return begin, end

    @triton.jit
    def _length_bits(hi, W, BS: tl.constexpr):
        """Bounds bit 2 (seq_lens) when a KV range ending at hi is negative or runs past a W-entry table row."""
        bad = (hi < 0) | ((hi > 0) & ((hi - 1) // BS >= W))
        return bad.to(tl.int32) * 2

    @triton.jit
    def _tile_rows(t, TILES, MEMBERS, SL, START, Hq, G, HT: tl.constexpr, BLOCK_R: tl.constexpr, TILED: tl.constexpr,
                   MEMBERS_LIST: tl.constexpr, TILE_LEN: tl.constexpr, HAS_START: tl.constexpr):
        """Work tile t -> (block-table row, first head, KV range [lo, hi), per query row: sequence, head, valid).
        TILED: tiles[t] = (table row, member begin m0, member end m1, first head h0, KV length), query rows
        = members m0..m1 (MEMBERS[m] when MEMBERS_LIST, else sequence m itself) x heads h0..h0+HT; the KV range is
        [0, length) when TILE_LEN (shared prefix), else the table row's [start, seq_len). Otherwise tile t is
        head tile t % (Hq / HT) of sequence t // (Hq / HT)."""
        r = tl.arange(0, BLOCK_R)
        if TILED:
            row = tl.load(TILES + t * 5)
            m0 = tl.load(TILES + t * 5 + 1)
            m1 = tl.load(TILES + t * 5 + 2)
            h0 = tl.load(TILES + t * 5 + 3)
            mi = m0 + r // HT
            r_ok = mi < m1
            if MEMBERS_LIST:
                seq = tl.load(MEMBERS + mi, mask=r_ok, other=0)
            else:
                seq = mi
            heads = h0 + r % HT
        else:
            tiles_per_seq = tl.cdiv(Hq, HT)
            row = t // tiles_per_seq
            h0 = (t % tiles_per_seq) * HT
            heads = h0 + r
            r_ok = (r < HT) & (heads < Hq)
            seq = row + r * 0
        if TILE_LEN:
            hi = tl.load(TILES + t * 5 + 4)
            lo = hi * 0
        else:
            hi = tl.load(SL + row)
            lo = hi * 0
            if HAS_START:
                lo = tl.load(START + row)
        r_ok = r_ok & (heads < (h0 // G + 1) * G)  # a tile never crosses into the next kv head's heads
        return row, h0, lo, hi, seq, heads, r_ok

    @triton.jit
    def _attend_kernel(Q, K, V, KS, BT, SL, START, TILES, MEMBERS, Out, PO, PLSE, FLAGS,
                       sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, ss_b, s_bt, W, NB, Hq, G, scale_log2,
                       num_splits, slot0, nslot, min_chunk,
                       D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, HT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                       HAS_B: tl.constexpr,
                       BLOCK_DV: tl.constexpr, TRANS: tl.constexpr, SHARED_V: tl.constexpr, FP8: tl.constexpr,
                       TILED: tl.constexpr, MEMBERS_LIST: tl.constexpr, TILE_LEN: tl.constexpr,
                       HAS_START: tl.constexpr, DIRECT: tl.constexpr, PAGE_TILE: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr):
        t = tl.program_id(0)
        split = tl.program_id(1)
        row, h0, lo, hi, seq, heads, r_ok = _tile_rows(t, TILES, MEMBERS, SL, START, Hq, G, HT, BLOCK_R, TILED,
                                                       MEMBERS_LIST, TILE_LEN, HAS_START)
        kvh = h0 // G
        begin, end = _split_range(lo, hi, split, num_splits, min_chunk, BLOCK_N)
        if begin >= end:
            if not DIRECT:
                bits = _length_bits(hi, W, BS)
                tl.atomic_or(FLAGS, bits, mask=bits != 0)
                prow = (seq.to(tl.int64) * Hq + heads) * nslot + slot0 + split
                tl.store(PLSE + prow, tl.full([BLOCK_R], float("-inf"), tl.float32), mask=r_ok)
                return
        offs_a = tl.arange(0, DA)
        offs_b = tl.arange(0, DB)
        offs_v = tl.arange(0, BLOCK_DV)
        q_row = Q + seq.to(tl.int64) * sq_b + heads * sq_h  # [BLOCK_R] pointers of the query rows
        if TRANS:  # Q^T [D, R]
            qa = tl.load(q_row[None, :] + offs_a[:, None], mask=r_ok[None, :] & (offs_a[:, None] < D), other=0.0)
            if HAS_B:
                qb = tl.load(q_row[None, :] + DA + offs_b[:, None],
                             mask=r_ok[None, :] & (DA + offs_b[:, None] < D), other=0.0)
            m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_R], tl.float32)
            acc = tl.zeros([BLOCK_DV, BLOCK_R], tl.float32)
        else:  # Q [R, D]
            qa = tl.load(q_row[:, None] + offs_a[None, :], mask=r_ok[:, None] & (offs_a[None, :] < D), other=0.0)
            if HAS_B:
                qb = tl.load(q_row[:, None] + DA + offs_b[None, :],
                             mask=r_ok[:, None] & (DA + offs_b[None, :] < D), other=0.0)
            m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_R], tl.float32)
            acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        if UPCAST:
            qa = qa.to(tl.float32)
            if HAS_B:
                qb = qb.to(tl.float32)
        bt_row = BT + row.to(tl.int64) * s_bt
        b_ok = DA + offs_b < D
        bad_id = tl.zeros([BLOCK_N], tl.int1)  # lanes that met a block id outside [0, NB) (bounds bit 1)
        for start in range(begin, end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            ok = pos < end
            ok = ok & (pos // BS < W)  # never read past the table row
            if PAGE_TILE:  # the tile lies in one page: one block-table read
                blk = tl.load(bt_row + start // BS, mask=start // BS < W, other=-1) + pos * 0
            else:
                blk = tl.load(bt_row + pos // BS, mask=ok, other=-1)
            in_nb = (blk >= 0) & (blk < NB)
            bad_id = bad_id | (ok & (in_nb == 0))
            ok = ok & in_nb  # a bad block id reads nothing: its tokens are empty (and is flagged after the loop)
            slot = (pos % BS).to(tl.int64)
            base = tl.where(ok, blk, 0).to(tl.int64) * sk_b + slot * sk_t + kvh * sk_h  # [N]
            ka = tl.load(K + base[:, None] + offs_a[None, :], mask=ok[:, None], other=0.0)
            if FP8:
                ks = tl.load(KS + blk.to(tl.int64) * ss_b + slot, mask=ok, other=0.0)
                ka = ka.to(Q.dtype.element_ty)
            if UPCAST:
                ka = ka.to(tl.float32)
            if HAS_B:  # the columns past DA (MLA's 64 rope dims)
                kb = tl.load(K + base[:, None] + DA + offs_b[None, :], mask=ok[:, None] & b_ok[None, :], other=0.0)
                if FP8:
                    kb = kb.to(Q.dtype.element_ty)
                if UPCAST:
                    kb = kb.to(tl.float32)
            if SHARED_V:  # MLA: values are the first DV (= DA) columns of the key rows just loaded
                v = ka
            else:
                vbase = blk.to(tl.int64) * sv_b + slot * sv_t + kvh * sv_h
                v = tl.load(V + vbase[:, None] + offs_v[None, :], mask=ok[:, None] & (offs_v[None, :] < DV),
                            other=0.0)
                if FP8:
                    v = v.to(Q.dtype.element_ty)
                if UPCAST:
                    v = v.to(tl.float32)
            if TRANS:
                s = tl.dot(ka, qa, input_precision=PREC)  # [N, R]
                if HAS_B:
                    s += tl.dot(kb, qb, input_precision=PREC)
                if FP8:
                    s = s * ks[:, None]
                s = tl.where(ok[:, None], s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[None, :])
                l_i = l_i * alpha + tl.sum(p, 0)
                if FP8:
                    p = p * ks[:, None]
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=PREC)
            else:
                s = tl.dot(qa, tl.trans(ka), input_precision=PREC)  # [R, N]
                if HAS_B:
                    s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
                if FP8:
                    s = s * ks[None, :]
                s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if FP8:
                    p = p * ks[None, :]
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        # row ids and the range again rather than kept live through the loop (registers)
        _, _, _, hi, seq, heads, r_ok = _tile_rows(t, TILES, MEMBERS, SL, START, Hq, G, HT, BLOCK_R, TILED,
                                                   MEMBERS_LIST, TILE_LEN, HAS_START)
        bits = tl.max(bad_id.to(tl.int32), 0) | _length_bits(hi, W, BS)
        tl.atomic_or(FLAGS, bits, mask=bits != 0)  # one predicated atomic per program: bounds bits 1 / 2
        nsl = 1 if DIRECT else nslot
        prow = (seq.to(tl.int64) * Hq + heads) * nsl + slot0 + split  # output row of each query row
        obase = (slot0 + split) * DV
        orow = (seq.to(tl.int64) * Hq + heads) * nsl * DV
        if TRANS:
            o = acc * inv[None, :]  # [DV, R]
            omask = r_ok[None, :] & (offs_v[:, None] < DV)
            if DIRECT:
                tl.store(Out + obase + orow[None, :] + offs_v[:, None], o.to(Out.dtype.element_ty), mask=omask)
            else:
                tl.store(PO + obase + orow[None, :] + offs_v[:, None], o, mask=omask)
        else:
            o = acc * inv[:, None]  # [R, DV]
            omask = r_ok[:, None] & (offs_v[None, :] < DV)
            if DIRECT:
                tl.store(Out + obase + orow[:, None] + offs_v[None, :], o.to(Out.dtype.element_ty), mask=omask)
            else:
                tl.store(PO + obase + orow[:, None] + offs_v[None, :], o, mask=omask)
        if not DIRECT:
            tl.store(PLSE + prow, lse, mask=r_ok)

    @triton.jit
    def _merge_kernel(PO, PLSE, Out, nslot, DV, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
        """out[row] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); slots with lse = -inf are not read."""
        row = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_v = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
        lse = tl.load(PLSE + row * nslot + offs_s, mask=offs_s < nslot, other=float("-inf"))
        live = lse > float("-inf")
        mx = tl.max(lse, 0)
        w = tl.where(live, tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
        o = tl.load(PO + (row * nslot + offs_s[:, None]) * DV + offs_v[None, :],
                    mask=live[:, None] & (offs_v[None, :] < DV), other=0.0)
        den = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
        tl.store(Out + row * DV + offs_v, out.to(Out.dtype.element_ty), mask=offs_v < DV)


def _dim_split(D: int) -> tuple[int, int]:
    """D = DA + rest: DA the largest power of two <= D (>= 16), the rest padded to a power of two >= 16."""
    da = max(16, 1 << (D.bit_length() - 1))
    rest = D - da
    return da, (16 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def kernel_config(rows: int, Dv: int, capability: tuple[int, int] = (9, 0)) -> dict:
    """Compile-time shape of a launch with `rows` query rows per tile. Transposed tiles (<= 32 rows): 64 KV tokens
    per step (wgmma M); with a 512-wide value 8 warps (O^T's 512 rows split over two warpgroups: no spills; 4 warps
    spilled 64-112 bytes) and 2 cp.async stages of 72 KB (3 stages spilled under Triton 3.6). 64-row tiles: 8 warps
    (two warpgroups split O's columns), 16 tokens per step, 3 stages, which keeps the 128 accumulator registers per
    thread free of spills (sm_90 compile: <= 255 registers, no stack, Triton 3.6 and 3.9; 32 tokens spilled).
    Shared memory at MLA shapes: 165 KB / 128 KB. With two warpgroups, Triton
    gives the first (chained) product all warps along M, so both warpgroups compute S (the QK^T work doubles;
    the memory-bound 16-head decode hides it, the compute-bound 128-head one pays it: see bench/RESULTS.md)."""
    trans = rows <= MAX_TRANS_ROWS
    block_r = max(16, triton.next_power_of_2(rows)) if trans else TILE_ROWS
    if _interpreting():
        return dict(TRANS=trans, BLOCK_R=block_r, BLOCK_N=16, num_warps=4, num_stages=1)
    if trans:
        # before sm_90 (no wgmma; 163 KB of shared memory on sm_80): 32-token steps, 93 KB
        bn = BLOCK_N if capability[0] >= 9 or Dv <= 256 else 32
        return dict(TRANS=True, BLOCK_R=block_r, BLOCK_N=bn, num_warps=8 if Dv > 256 else 4,
                    num_stages=2 if Dv > 256 else 3)
    return dict(TRANS=False, BLOCK_R=block_r, BLOCK_N=16 if Dv > 256 else 32, num_warps=8 if Dv > 256 else 4,
                num_stages=3)


def attend(q, k_cache, v_cache, block_tables, seq_lens, scale: float, *, heads_per_tile: int, kv_scale=None,
           start=None, tiles=None, members=None, tile_len: bool = False, out=None, po=None, plse=None,
           slot0: int = 0, num_splits: int = 1, min_chunk: int = MIN_CHUNK,
           shared_v: bool | None = None, flags: torch.Tensor | None = None) -> None:
    """Launch one pass. q [B, Hq, D]; k_cache [NB, BS, Hkv, D]; v_cache [NB, BS, Hkv, Dv] (a view of k_cache for
    MLA); kv_scale [NB, BS] fp32 for fp8 caches. Work: tiles [T, 5] int32 (with members [M] int32 and
    tile_len=True: the shared pass over each tile's [0, length); without members: (b, b, b + 1, first head, 0)
    per-sequence tiles), or none (head tile t % (Hq / HT) of sequence t // (Hq / HT)); per-sequence KV range
    [start[b] or 0, seq_lens[b]). Writes `out` [B, Hq, Dv] directly when po is None (transposed tiles only: a
    ValueError otherwise), else partials po [B, Hq, nslot, Dv] / plse [B, Hq, nslot] at slots slot0 + split.
    shared_v: v_cache is k_cache's first Dv columns (default: detected from the pointers). flags: int32 [1] on q's
    device the kernel ORs bounds bits into (`_ext.BOUNDS_FLAGS`: 1 = a block id a sequence uses lies outside
    [0, NB), 2 = a KV range is negative or runs past its block-table row; on CUDA pass `_ext.bounds_flags(device)`,
    which `raise_device_errors()` reads); the bad tokens themselves are read as empty (never out of bounds).
    Default: a scratch word nobody reads."""
    B, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    HT = heads_per_tile
    T = tiles.shape[0] if tiles is not None else B * triton.cdiv(Hq, HT)
    if T == 0 or B == 0:
        return
    cap = _capability(q.device.index or 0) if q.device.type == "cuda" else (9, 0)
    cfg = kernel_config(TILE_ROWS if tiles is not None else HT, Dv, cap)
    if po is None and not cfg["TRANS"]:
        raise ValueError("out: a pass on 64-row tiles writes fp32 partials (po, plse) and merges them: its direct "
                         "16-bit epilogue spills at sm_90 (compile sweep)")
    da, db = _dim_split(D)
    if shared_v is None:  # values = the first Dv columns of the key rows (MLA): take them from the key tile
        shared_v = v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
    shared_v = bool(shared_v) and Dv == da
    direct = po is None
    fp8 = kv_scale is not None
    dummy = seq_lens
    if flags is None:
        flags = torch.zeros(1, dtype=torch.int32, device=q.device)
    elif flags.dtype != torch.int32 or flags.numel() < 1 or flags.device != q.device:
        raise ValueError(f"flags: expected an int32 [1] tensor on {q.device}, got {flags.dtype} "
                         f"{list(flags.shape)} on {flags.device}")
    interp = _interpreting()
    _attend_kernel[(T, num_splits)](
        q, k_cache, v_cache, kv_scale if fp8 else dummy, block_tables, seq_lens,
        start if start is not None else dummy, tiles if tiles is not None else dummy,
        members if members is not None else dummy, out if direct else dummy, po if not direct else dummy,
        plse if not direct else dummy, flags,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kv_scale.stride(0) if fp8 else 0,
        block_tables.stride(0), block_tables.shape[1], k_cache.shape[0], Hq, Hq // Hkv,
        float(scale) * math.log2(math.e), num_splits, slot0, 1 if direct else po.shape[2], min_chunk,
        D=D, DV=Dv, BS=k_cache.shape[1], HT=HT, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], DA=da, DB=db,
        HAS_B=D > da,
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)), TRANS=cfg["TRANS"], SHARED_V=shared_v, FP8=fp8,
        TILED=tiles is not None, MEMBERS_LIST=members is not None, TILE_LEN=tile_len, HAS_START=start is not None,
        DIRECT=direct, PAGE_TILE=k_cache.shape[1] % cfg["BLOCK_N"] == 0, UPCAST=interp,
        PREC="ieee" if (q.dtype == torch.float32 or interp) else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def merge(po: torch.Tensor, plse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [B, Hq, Dv] <- log-sum-exp merge of po [B, Hq, S, Dv] with plse [B, Hq, S] (empty slots: -inf)."""
    B, Hq, S, Dv = po.shape
    if B * Hq == 0:
        return out
    bdv = min(128, max(16, triton.next_power_of_2(Dv)))
    _merge_kernel[(B * Hq, triton.cdiv(Dv, bdv))](po, plse, out, S, Dv, BLOCK_S=max(2, triton.next_power_of_2(S)),
                                                  BLOCK_DV=bdv)
    return out


# ---------------------------------------------------------------------------------------------- sm_90 compile check
SPECS = {  # name -> (q heads, kv heads, D, Dv, pass, cache dtype): what the launchers pick at real shapes
    "mla_h16_bf16": (16, 1, 576, 512, "suffix", "bf16"),          # V2-Lite plain / suffix decode: transposed
    "mla_h128_bf16": (128, 1, 576, 512, "suffix", "bf16"),        # V3: two 64-head tiles per sequence
    "mla_shared_h16_bf16": (16, 1, 576, 512, "shared", "bf16"),   # V2-Lite cascade: 4 samples x 16 heads per tile
    "mla_shared_h128_bf16": (128, 1, 576, 512, "shared", "bf16"),
    "gqa_g4_bf16": (32, 8, 128, 128, "suffix", "bf16"),           # GQA 32 / 8 heads, D 128: cascade suffix pass
    "gqa_shared_g4_bf16": (32, 8, 128, 128, "shared", "bf16"),    # 16 samples x 4 heads per tile
    "mla_h16_fp8": (16, 1, 576, 512, "suffix", "fp8"),
    "mla_h128_fp8": (128, 1, 576, 512, "suffix", "fp8"),
}


def compile_sm90(name: str, page_size: int = 64, capability: int = 90, num_warps: int | None = None,
                 num_stages: int | None = None, **overrides) -> dict:
    """Compile one SPECS entry of _attend_kernel for sm_90 (Triton's bundled ptxas, no GPU) with the
    specialisation a real launch gets (16-divisible pointers and strides, unit last strides), and read the cubin's
    SASS (compile_report_cuda): registers, stack (spills), shared memory, and the main loop's HGMMA (wgmma) /
    HMMA (mma.sync) / cp.async (LDGSTS) / local-memory instruction counts. Not under the interpreter. num_warps /
    num_stages and constexpr overrides (BLOCK_N=32, ...) compile other configs than the launcher's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsmath_kernels.compile_report_cuda import sass_summary

    Hq, Hkv, D, Dv, mode, cache = SPECS[name]
    fn = _attend_kernel
    ht, rows = tile_shape(Hq, Hkv, "triton")
    cfg = kernel_config(rows if mode == "shared" else ht, Dv, divmod(capability, 10))
    da, db = _dim_split(D)
    kv = "*fp8e4nv" if cache == "fp8" else "*bf16"
    ptrs = {"Q": "*bf16", "K": kv, "V": kv, "KS": "*fp32", "BT": "*i32", "SL": "*i32", "START": "*i32",
            "TILES": "*i32", "MEMBERS": "*i32", "Out": "*bf16", "PO": "*fp32", "PLSE": "*fp32", "FLAGS": "*i32"}
    consts = {"D": D, "DV": Dv, "BS": page_size, "HT": ht, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_N": cfg["BLOCK_N"],
              "DA": da, "DB": db, "HAS_B": D > da, "BLOCK_DV": max(16, triton.next_power_of_2(Dv)),
              "TRANS": cfg["TRANS"], "SHARED_V": Hkv == 1 and Dv == da, "FP8": cache == "fp8",
              "TILED": mode == "shared" or not cfg["TRANS"], "MEMBERS_LIST": mode == "shared",
              "TILE_LEN": mode == "shared", "HAS_START": mode == "suffix", "DIRECT": False,
              "PAGE_TILE": page_size % cfg["BLOCK_N"] == 0, "UPCAST": False, "PREC": "tf32", **overrides}
    sig = {n: ptrs.get(n, "constexpr" if n in consts else ("fp32" if n == "scale_log2" else "i32"))
           for n in fn.arg_names}
    div16 = set(ptrs) | {"sq_b", "sq_h", "sk_b", "sk_t", "sk_h", "sv_b", "sv_t", "sv_h", "s_bt", "ss_b"}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": num_warps or cfg["num_warps"],
                                "num_stages": num_stages or cfg["num_stages"]})
    (s,) = sass_summary(k.asm["cubin"]).values()
    main = s["main_loop"] or {}
    return {"kernel": name, "page_size": page_size, "trans": cfg["TRANS"], "block_r": cfg["BLOCK_R"],
            "block_n": cfg["BLOCK_N"], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "registers": s.get("REG"), "stack": s.get("STACK"), "shared_bytes": k.metadata.shared,
            "ptx_wgmma": k.asm["ptx"].count("wgmma.mma_async"), "main_loop_hgmma": main.get("HGMMA", 0),
            "main_loop_hmma": main.get("HMMA", 0), "main_loop_cp_async": main.get("LDGSTS", 0),
            "main_loop_local": main.get("LDL", 0) + main.get("STL", 0), "local_instructions": s["spill_instructions"]}


def compile_report(page_sizes=(64,)) -> list[dict]:
    """compile_sm90 for every SPECS entry and page size (what `python -m dsmath_kernels.compile_report_cuda
    --triton` prints)."""
    return [compile_sm90(name, ps) for name in SPECS for ps in page_sizes]


# ---------------------------------------------------------------------------------------------- compile sweep plugin
def drive_compile_sweep(run) -> None:
    """The launches of this module at real shapes, for the Triton compile sweep (dsmath_kernels.compile_report,
    issue 12; family "tiled_decode", spill budget 0 for _attend_kernel): run(mode, launcher, *args, **kwargs)
    with meta tensors — MLA V2-Lite (16 heads, transposed tile) and V3 (128 heads, 64-head tiles), plain / suffix /
    shared-prefix passes, GQA 32 / 8 heads D 128, bf16 and fp16 caches, pages 16 and 64, and the merge. fp8
    caches are reported by compile_report() (they spill: bench/RESULTS.md, issue 16 follow-up)."""
    i32, f32 = torch.int32, torch.float32

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    B, NB, S = 16, 512, 4
    bt, sl, start, members = meta(B, 64, dtype=i32), meta(B, dtype=i32), meta(B, dtype=i32), meta(B, dtype=i32)
    for dt in (torch.bfloat16, torch.float16):
        for page in (16, 64):
            cases = [("mla", H, 1, 576, 512) for H in (16, 128)] + [("gqa", 32, 8, 128, 128)]
            for kind, Hq, Hkv, D, Dv in cases:
                if kind == "mla":
                    k = meta(NB, page, D, dtype=dt).unsqueeze(2)
                    v = k[..., :Dv]
                else:
                    k, v = meta(NB, page, Hkv, D, dtype=dt), meta(NB, page, Hkv, Dv, dtype=dt)
                q, out = meta(B, Hq, D, dtype=dt), meta(B, Hq, Dv, dtype=dt)
                po, plse = meta(B, Hq, 2 * S, Dv, dtype=f32), meta(B, Hq, 2 * S, dtype=f32)
                ht, _ = tile_shape(Hq, Hkv, "triton")
                plain = None if ht <= MAX_TRANS_ROWS else meta(B * triton.cdiv(Hq, ht), 5, dtype=i32)
                kw = dict(heads_per_tile=ht, shared_v=kind == "mla")
                tag = f"{kind} H{Hq} page {page}"
                if plain is None:  # transposed tiles write `out` directly
                    run(f"{tag} plain", attend, q, k, v, bt, sl, 0.1, out=out, **kw)
                else:  # 64-row tiles: fp32 partials, then the merge
                    run(f"{tag} plain", attend, q, k, v, bt, sl, 0.1, tiles=plain, po=po, plse=plse, **kw)
                run(f"{tag} suffix", attend, q, k, v, bt, sl, 0.1, tiles=plain, start=start, po=po, plse=plse,
                    slot0=S, num_splits=S, **kw)
                run(f"{tag} shared", attend, q, k, v, bt, sl, 0.1, tiles=meta(B, 5, dtype=i32), members=members,
                    tile_len=True, po=po, plse=plse, num_splits=S, **kw)
        run("merge", merge, meta(B, 16, 2 * S, 512, dtype=f32), meta(B, 16, 2 * S, dtype=f32),
            meta(B, 16, 512, dtype=dt))
