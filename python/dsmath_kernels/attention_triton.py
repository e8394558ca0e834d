"""Triton kernels on the paged KV cache: varlen prefill (paged_prefill / mla_prefill on GPU) and a tensor-core
split-KV decode (paged_decode / mla_decode with DSMATH_DECODE_BACKEND=triton); spec in reference/attention.py.

Prefill: one program = BLOCK_M query tokens of one sequence x one query head; it walks the sequence's keys BLOCK_N
at a time through the block table (per-key block lookup, so any block size works; the block size is a
compile-time constant, a shift for powers of two), with a base-2 online softmax (FlashAttention-2). The head dim
is split into a power-of-two part and a remainder (576 = 512 + 64 for MLA; no padding to 1024). Causal: query at
position L - n + i sees keys <= that position, and the key loop stops at the tile's last query.
Decode: one program = one KV split x BLOCK_H query heads of one kv head (the M dim of the MMA); partial (o, lse)
per split, merged by log-sum-exp. In the interpreter (TRITON_INTERPRET=1) operands are upcast to fp32 before
tl.dot, whose bf16 path is broken there."""

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prec(q: torch.Tensor) -> str:
    """tl.dot precision: exact fp32 products for fp32 inputs (not TF32); 16-bit inputs ignore it."""
    return "ieee" if q.dtype == torch.float32 or _interpreting() else "tf32"


@functools.cache
def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _tile_scores(q_a, q_b, K, k_off, n_mask, offs_a, offs_b, D, DA: tl.constexpr, HAS_B: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr):
        """q . k for a key tile: the [0, DA) part plus the [DA, D) remainder. -> [BLOCK_M, BLOCK_N] fp32."""
        ka = tl.load(K + k_off[None, :] + offs_a[:, None], mask=n_mask[None, :] & (offs_a[:, None] < D), other=0.0)
        if UPCAST:
            ka = ka.to(tl.float32)
        s = tl.dot(q_a, ka, input_precision=PREC)
        if HAS_B:
            kb = tl.load(K + k_off[None, :] + DA + offs_b[:, None],
                         mask=n_mask[None, :] & (DA + offs_b[:, None] < D), other=0.0)
            if UPCAST:
                kb = kb.to(tl.float32)
            s += tl.dot(q_b, kb, input_precision=PREC)
        return s

    @triton.jit
    def _checked_len(SL, b, FLAGS, max_blocks, BS: tl.constexpr):
        """seq_lens[b], or 0 with the kBadSeqLen flag (2) when negative or beyond the block-table row."""
        L = tl.load(SL + b)
        bad = (L < 0) | (L > max_blocks * BS)
        if bad:
            tl.atomic_or(FLAGS, 2)
        return tl.where(bad, 0, L)

    @triton.jit
    def _checked_blocks(BT, row, offs_n, n_mask, NB, BS: tl.constexpr):
        """Block ids of key positions offs_n (int64 row offset `row`), the mask of the valid ones and of the bad
        ones: an id outside [0, NB) is an absent key (the caller ORs the bad mask up and flags it once)."""
        blk = tl.load(BT + row + offs_n // BS, mask=n_mask, other=0)
        bad = n_mask & ((blk < 0) | (blk >= NB))
        return blk.to(tl.int64), n_mask & (bad == 0), bad

    @triton.jit
    def _flag_bad_blocks(FLAGS, seen):
        """kBadBlockId (1) when any key of the loop had a bad block id (one atomic per program, after the loop)."""
        if tl.max(seen.to(tl.int32), 0) > 0:
            tl.atomic_or(FLAGS, 1)

    @triton.jit
    def _prefill_fwd_kernel(Q, K, V, Out, BT, CU, SL, FLAGS, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_t,
                            so_h, s_bt, scale_log2, G, D, DV, NB, max_blocks, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_B: tl.constexpr,
                            BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(1)
        h = tl.program_id(2)
        q0 = tl.load(CU + b)
        n = tl.load(CU + b + 1) - q0
        L = _checked_len(SL, b, FLAGS, max_blocks, BS)
        mt = tl.program_id(0)
        if mt == 0:  # max_seqlen_q (grid.x) below this sequence's queries: flag 16, the rows past it stay unwritten
            if n > tl.num_programs(0) * BLOCK_M:
                tl.atomic_or(FLAGS, 16)
        if mt * BLOCK_M < n:
            _prefill_tile(Q, K, V, Out, BT, FLAGS, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_t, so_h, s_bt,
                          scale_log2, G, D, DV, NB, b, h, mt, q0, n, L, BS, BLOCK_M, BLOCK_N, DA, BLOCK_DB, HAS_B,
                          BLOCK_DV, CAUSAL, UPCAST, PREC)

    @triton.jit
    def _prefill_tile(Q, K, V, Out, BT, FLAGS, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_t, so_h, s_bt,
                      scale_log2, G, D, DV, NB, b, h, mt, q0, n, L, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_B: tl.constexpr,
                      BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """One BLOCK_M tile of sequence b's queries for query head h."""
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence's new tokens
        m_mask = offs_m < n
        qpos = L - n + offs_m  # absolute positions
        rows = (q0 + offs_m).to(tl.int64)
        offs_a = tl.arange(0, DA)
        offs_b = tl.arange(0, BLOCK_DB)
        offs_v = tl.arange(0, BLOCK_DV)
        q_ptr = Q + rows[:, None] * sq_t + h * sq_h
        q_a = tl.load(q_ptr + offs_a[None, :], mask=m_mask[:, None] & (offs_a[None, :] < D), other=0.0)
        q_b = tl.load(q_ptr + DA + offs_b[None, :], mask=m_mask[:, None] & (DA + offs_b[None, :] < D), other=0.0)
        if UPCAST:
            q_a = q_a.to(tl.float32)
            q_b = q_b.to(tl.float32)
        kvh = h // G
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        hi = L
        if CAUSAL:
            hi = L - n + tl.minimum((mt + 1) * BLOCK_M, n)
        bt_row = b.to(tl.int64) * s_bt  # int64: B x max_blocks may pass 2**31
        seen = tl.zeros([BLOCK_N], tl.int1)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            blk, n_mask, bad = _checked_blocks(BT, bt_row, offs_n, offs_n < hi, NB, BS)
            seen = seen | bad
            slot = (offs_n % BS).to(tl.int64)
            k_off = blk * sk_b + slot * sk_t + kvh * sk_h
            s = _tile_scores(q_a, q_b, K, k_off, n_mask, offs_a, offs_b, D, DA, HAS_B, UPCAST, PREC) * scale_log2
            keep = n_mask[None, :] & m_mask[:, None]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= qpos[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_off = blk * sv_b + slot * sv_t + kvh * sv_h
            v = tl.load(V + v_off[:, None] + offs_v[None, :], mask=n_mask[:, None] & (offs_v[None, :] < DV),
                        other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        _flag_bad_blocks(FLAGS, seen)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = Out + rows[:, None] * so_t + h * so_h + offs_v[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & (offs_v[None, :] < DV))


if triton is not None:

    @triton.jit
    def _decode_fwd_kernel(Q, K, V, Out, PO, PLSE, BT, SL, FLAGS, sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                           s_bt, scale_log2, Hq, G, D, DV, num_splits, chunk, NB, max_blocks, BS: tl.constexpr,
                           BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_B: tl.constexpr,
                           BLOCK_DV: tl.constexpr, SHARED_V: tl.constexpr, UPCAST: tl.constexpr,
                           PREC: tl.constexpr):
        """One split of one sequence for BLOCK_H query heads of one kv head; heads are the M dim of tl.dot."""
        s_id = tl.program_id(1)
        tiles = tl.cdiv(G, BLOCK_H)
        kvh = tl.program_id(0) // tiles  # head tiles of one (split, kv head) adjacent: they share L2
        g = (tl.program_id(0) % tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = g < G
        heads = kvh * G + g
        b = tl.program_id(2)
        L = _checked_len(SL, b, FLAGS, max_blocks, BS)  # positions fit int32; addresses below are int64
        begin = s_id * chunk
        end = tl.where(s_id == num_splits - 1, L, tl.minimum(L, begin + chunk))
        begin = tl.minimum(begin, end)
        offs_a = tl.arange(0, DA)
        offs_b = tl.arange(0, BLOCK_DB)
        offs_v = tl.arange(0, BLOCK_DV)
        q_ptr = Q + b.to(tl.int64) * sq_b + heads[:, None] * sq_h
        q_a = tl.load(q_ptr + offs_a[None, :], mask=h_mask[:, None] & (offs_a[None, :] < D), other=0.0)
        q_b = tl.load(q_ptr + DA + offs_b[None, :], mask=h_mask[:, None] & (DA + offs_b[None, :] < D), other=0.0)
        if UPCAST:
            q_a = q_a.to(tl.float32)
            q_b = q_b.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        bt_row = b.to(tl.int64) * s_bt  # int64: B x max_blocks may pass 2**31
        seen = tl.zeros([BLOCK_N], tl.int1)
        for start in range(begin, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            blk, n_mask, bad = _checked_blocks(BT, bt_row, offs_n, offs_n < end, NB, BS)
            seen = seen | bad
            slot = (offs_n % BS).to(tl.int64)
            k_off = blk * sk_b + slot * sk_t + kvh * sk_h
            ka = tl.load(K + k_off[None, :] + offs_a[:, None], mask=n_mask[None, :] & (offs_a[:, None] < D),
                         other=0.0)
            if UPCAST:
                ka = ka.to(tl.float32)
            sc = tl.dot(q_a, ka, input_precision=PREC)
            if HAS_B:
                kb = tl.load(K + k_off[None, :] + DA + offs_b[:, None],
                             mask=n_mask[None, :] & (DA + offs_b[:, None] < D), other=0.0)
                if UPCAST:
                    kb = kb.to(tl.float32)
                sc += tl.dot(q_b, kb, input_precision=PREC)
            sc = tl.where(n_mask[None, :], sc * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if SHARED_V:  # MLA: values are the first DV (= DA) columns of the key rows just loaded
                v = tl.trans(ka)
            else:
                v_off = blk * sv_b + slot * sv_t + kvh * sv_h
                v = tl.load(V + v_off[:, None] + offs_v[None, :], mask=n_mask[:, None] & (offs_v[None, :] < DV),
                            other=0.0)
                if UPCAST:
                    v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        _flag_bad_blocks(FLAGS, seen)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        rows = b.to(tl.int64) * Hq + heads  # [BLOCK_H]
        o_mask = h_mask[:, None] & (offs_v[None, :] < DV)
        if num_splits == 1:
            tl.store(Out + rows[:, None] * DV + offs_v[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
        else:
            prow = rows * num_splits + s_id
            tl.store(PO + prow[:, None] * DV + offs_v[None, :], out, mask=o_mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(PLSE + prow, lse, mask=h_mask)


MAX_GRID_YZ = 65535  # CUDA's limit on grid.y / grid.z: larger batches launch in slices of sequences


def _batch_slices(B: int):
    return [(b0, min(B, b0 + MAX_GRID_YZ)) for b0 in range(0, B, MAX_GRID_YZ)]


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, num_splits: int, chunk: int,
                        flags: torch.Tensor | None = None) -> torch.Tensor:
    """Split-KV decode on tensor cores: q [B, Hq, D], caches [NB, BS, Hkv, D | Dv] (v may be a view of k: MLA)
    -> [B, Hq, Dv]. Partials (o, lse) of the splits merge by log-sum-exp in plain torch ops (graph safe).
    flags: int32 [1] the kernel ORs bounds bits into (bad block id 1, bad length 2); a bad id or length is an
    absent token / an empty sequence."""
    B, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    G = Hq // Hkv
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    sl = seq_lens.contiguous()
    flags = torch.zeros(1, dtype=torch.int32, device=q.device) if flags is None else flags
    da, db = _dim_split(D)
    shared_v = v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and Dv == da
    block_h, block_n, warps = (16, 16, 4) if _interpreting() else _decode_tiles(G, D, Dv, q.dtype)
    po = plse = out
    if num_splits > 1:
        po = torch.empty(B, Hq, num_splits, Dv, dtype=torch.float32, device=q.device)
        plse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    for b0, b1 in _batch_slices(B):
        ob, pob, plb = out[b0:b1], (po[b0:b1] if num_splits > 1 else out[b0:b1]), \
            (plse[b0:b1] if num_splits > 1 else out[b0:b1])
        grid = (Hkv * triton.cdiv(G, block_h), num_splits, b1 - b0)
        _decode_fwd_kernel[grid](
            q[b0:b1], k_cache, v_cache, ob, pob, plb, bt[b0:b1], sl[b0:b1], flags, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), bt.stride(0), float(scale) * math.log2(math.e), Hq, G, D, Dv,
            num_splits, chunk, k_cache.shape[0], bt.shape[1], BS=k_cache.shape[1], BLOCK_H=block_h, BLOCK_N=block_n,
            DA=da, BLOCK_DB=max(db, 16), HAS_B=db > 0,
            BLOCK_DV=max(16, triton.next_power_of_2(Dv)), SHARED_V=shared_v, UPCAST=_interpreting(), PREC=_prec(q),
            num_warps=warps, num_stages=2,
        )
    if num_splits > 1:
        m = plse.amax(-1, keepdim=True)  # [B, Hq, 1]
        w = torch.exp2(plse - torch.where(m == float("-inf"), 0.0, m))  # [B, Hq, S]; empty splits -> 0
        merged = (po * w[..., None]).sum(2) / w.sum(-1, keepdim=True).clamp_min(1e-30)
        out.copy_(merged)
    return out


def _decode_tiles(G: int, D: int, Dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps) of the decode kernel: the G heads of a kv head are the M dim of the MMA (16 or
    32 rows); 64 keys per step, 32 for rows wider than 256 (MLA) with 32 heads (ptxas held the 16-head MLA tile to
    128 registers and spilled at 32 keys, not at 64). fp32 (exact FMA dots, no tensor cores) rows wider than 128
    take 16 keys and 8 warps: the 16-bit tiles spill 2-3 KB per thread there. Every branch is compiled for sm_90 by
    `python -m dsmath_kernels.compile_report`."""
    block_h = min(32, max(16, triton.next_power_of_2(G)))
    if dtype == torch.float32 and max(D, Dv) > 128:
        return block_h, 16, 8
    wide = max(D, Dv) > 256
    return block_h, (32 if wide and block_h == 32 else 64), (8 if Dv > 256 else 4)


def _dim_split(D: int) -> tuple[int, int]:
    """D = DA + rest with DA the largest power of two <= D (>= 16); rest padded to a power of two >= 16 (0: none)."""
    da = max(16, 1 << (D.bit_length() - 1))
    rest = D - da
    return da, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def _tiles(Dv: int, D: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """Prefill (BLOCK_M, BLOCK_N, num_warps): tiny in the interpreter; wide value rows (MLA, Dv 512) get a 32-row tile
    so the fp32 accumulator stays in registers; head dims 192 / 256 take 8 warps (4 sat at 254 registers on sm_90).
    fp32 (exact FMA dots) takes small tiles: the 16-bit ones spill 4-80 KB per thread. Every branch is compiled for
    sm_90 by `python -m dsmath_kernels.compile_report`."""
    if _interpreting():
        return 16, 16, 4
    wide, mid = Dv > 256 or D > 256, Dv > 128 or D > 128
    if dtype == torch.float32:
        return (16, 16, 8) if wide else (32, 16, 8) if mid or max(D, Dv) > 64 else (32, 32, 4)
    if wide:
        return 32, 32, 8
    if mid:
        return 64, 32, 8
    return 128, 64, 8


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool,
                         max_q: int, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher: q [Nq, Hq, D], k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv] (any strides with a unit last
    stride; v may be a view of k) -> [Nq, Hq, Dv]. Argument checks are done by attention.paged_prefill. max_q must be
    >= every sequence's query count: it sizes grid.x (one program per BLOCK_M queries; a loop over tiles instead
    cost 70 registers), and a sequence with more queries sets flag 16 (its rows past max_q are not written). More
    than 65,535 sequences launch in slices (grid.y). flags: as paged_decode_triton."""
    Nq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty(Nq, Hq, Dv, dtype=q.dtype, device=q.device)
    if Nq == 0 or B == 0:
        return out.zero_()
    if Hq > MAX_GRID_YZ:
        raise ValueError(f"q: {Hq} heads exceed the grid's {MAX_GRID_YZ}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache / v_cache: last dim must be contiguous")
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    cu, sl = cu_seqlens_q.contiguous(), seq_lens.contiguous()
    flags = torch.zeros(1, dtype=torch.int32, device=q.device) if flags is None else flags
    da, db = _dim_split(D)
    bm, bn, warps = _tiles(Dv, D, q.dtype)
    for b0, b1 in _batch_slices(B):
        grid = (max(1, triton.cdiv(max_q, bm)), b1 - b0, Hq)
        _prefill_fwd_kernel[grid](
            q, k_cache, v_cache, out, bt[b0:b1], cu[b0:b1 + 1], sl[b0:b1], flags,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), bt.stride(0),
            float(scale) * math.log2(math.e), Hq // Hkv, D, Dv, k_cache.shape[0], bt.shape[1], BS=k_cache.shape[1],
            BLOCK_M=bm, BLOCK_N=bn, DA=da, BLOCK_DB=max(db, 16), HAS_B=db > 0,
            BLOCK_DV=max(16, triton.next_power_of_2(Dv)), CAUSAL=bool(causal), UPCAST=_interpreting(), PREC=_prec(q),
            num_warps=warps, num_stages=2,
        )
    return out
