"""Triton grouped GEMM for the MoE expert layer (Hopper: tl.dot lowers to wgmma).

`_gemm_kernel`: y[r] = x[src(r)] @ w[g].T for the rows r of expert g's segment [off[g], off[g+1]). Persistent:
the grid is a fixed number of programs (2 per SM, or fewer when there are fewer tiles) that walk the (expert,
m-tile, n-tile) space with stride `num_programs`. Each program loads the E+1 offsets as one vector, turns them into
a prefix sum of tiles per expert, and maps a tile to its expert with a vector compare — no serial walk over the
experts, no host sync, so the launch is CUDA-graph safe. m-tiles are the fast index inside an expert, so programs
running together share the same weight tile in L2. A virtual group E covers the rows past off[E] and writes zeros.
Switches (tl.constexpr), with rows[r] = the pair index f = t * topk + j held by row r (`order`, -1 = padding):
GATHER — A row r is x[rows[r] // topk] (the permutation folded into the A load; padding rows read zeros);
ACT — w holds 2N rows (gate then up), the tile computes both and stores silu(g) * u (the SwiGLU epilogue);
SCALE — multiply row r by scale[rows[r]] (the routing weight, scale = weights.view(-1));
UPCAST — fp32 dot, for the interpreter whose bf16 tl.dot is broken.
`_wgrad_kernel`: dw[g] = dy[seg].T @ x[seg], one program per (expert, n-tile, k-tile), looping over the segment.

Autotuning is keyed on (N, K, E, rows-per-expert bucket, epilogue) over a small config list pruned by the bucket
(decode-size segments get BM 16, small prefill BM 32-64, prefill BM 128), so the first call of a new shape compiles
and times at most two configs.
Under TRITON_INTERPRET=1 one small fixed config runs (no autotune)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsmath_kernels.triton_common import gathered_rows, mma, segment_schedule, segment_tile

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, off_ptr, rows_ptr, scale_ptr, h_ptr, a_ptr, M, N, K, E, mbucket, topk,
                 sxm, sxk, swe, swn, swk, sym, syn, shm, sam,
                 GATHER: tl.constexpr, ACT: tl.constexpr, SCALE: tl.constexpr, STORE_H: tl.constexpr,
                 DACT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    # Tile schedule (triton_common.segment_schedule): group g < E is expert g's segment, group E the rows past
    # off[E] (zero-filled).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ar, lo, hi, num_m, tiles, cum, total = segment_schedule(off_ptr, M, E, N, EP, BM, BN)
    for t in range(pid, total, nprog):
        g, start, end, m_tile, n_tile = segment_tile(t, ar, lo, hi, num_m, tiles, cum)
        rows = start + m_tile * BM + tl.arange(0, BM)  # [BM]
        mask_m = rows < end
        pair, a_ok, src = gathered_rows(rows_ptr, rows, mask_m, topk, GATHER, GATHER or SCALE)
        cols = n_tile * BN + tl.arange(0, BN)  # [BN]
        mask_n = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        w_base = w_ptr + tl.cast(g, tl.int64) * swe
        k_iters = tl.where(g < E, tl.cdiv(K, BK), 0)  # the tail group only writes zeros
        for kk in range(k_iters):
            ks = kk * BK + tl.arange(0, BK)  # [BK]
            mask_k = ks < K
            a = tl.load(x_ptr + src[:, None] * sxm + ks[None, :] * sxk, mask=a_ok[:, None] & mask_k[None, :],
                        other=0.0)  # [BM, BK]
            b_ptrs = w_base + cols[None, :].to(tl.int64) * swn + ks[:, None] * swk  # [BK, BN]
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = mma(a, b, acc, UPCAST, IEEE)
            if ACT:  # up rows sit N rows below the gate rows
                bu = tl.load(b_ptrs + N * swn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc_u = mma(a, bu, acc_u, UPCAST, IEEE)
        mask_mn = mask_m[:, None] & mask_n[None, :]
        r64 = rows[:, None].to(tl.int64)
        if STORE_H:  # training forward: keep the gate / up pre-activations for backward
            h_ptrs = h_ptr + r64 * shm + cols[None, :]
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask_mn)
            tl.store(h_ptrs + N, acc_u.to(h_ptr.dtype.element_ty), mask=mask_mn)
        if ACT:
            acc = acc * tl.sigmoid(acc) * acc_u
        if SCALE:
            acc = acc * tl.load(scale_ptr + tl.maximum(pair, 0), mask=mask_m & (pair >= 0), other=0.0)[:, None]
        y_ptrs = y_ptr + r64 * sym + cols[None, :] * syn
        if DACT:  # backward: acc = d a; write d h = [d g, d u] and the recomputed a = silu(g) * u
            h_ptrs = h_ptr + r64 * shm + cols[None, :]
            g = tl.load(h_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
            u = tl.load(h_ptrs + N, mask=mask_mn, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            tl.store(a_ptr + r64 * sam + cols[None, :], (g * sg * u).to(a_ptr.dtype.element_ty), mask=mask_mn)
            tl.store(y_ptrs, (acc * u * sg * (1 + g * (1 - sg))).to(y_ptr.dtype.element_ty), mask=mask_mn)
            tl.store(y_ptrs + N * syn, (acc * g * sg).to(y_ptr.dtype.element_ty), mask=mask_mn)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _wgrad_kernel(dy_ptr, x_ptr, dw_ptr, off_ptr, rows_ptr, M, N, K, mbucket, topk,
                  sdym, sdyn, sxm, sxk, swe, swn, swk,
                  GATHER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    num_k = tl.cdiv(K, BK)
    g = pid // (num_n * num_k)
    rest = pid % (num_n * num_k)
    n_tile = rest // num_k
    k_tile = rest % num_k
    start = tl.minimum(tl.maximum(tl.load(off_ptr + g).to(tl.int32), 0), M)
    end = tl.minimum(tl.maximum(tl.load(off_ptr + g + 1).to(tl.int32), start), M)
    cols = n_tile * BN + tl.arange(0, BN)  # [BN]
    ks = k_tile * BK + tl.arange(0, BK)  # [BK]
    mask_n = cols < N
    mask_k = ks < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        mask_m = rows < end
        r64 = rows.to(tl.int64)
        dyt = tl.load(dy_ptr + r64[None, :] * sdym + cols[:, None] * sdyn, mask=mask_n[:, None] & mask_m[None, :],
                      other=0.0)  # [BN, BM]
        if GATHER:
            pair = tl.load(rows_ptr + rows, mask=mask_m, other=-1)
            x_ok = mask_m & (pair >= 0)
            src = (tl.maximum(pair, 0) // topk).to(tl.int64)
        else:
            x_ok = mask_m
            src = r64
        xt = tl.load(x_ptr + src[:, None] * sxm + ks[None, :] * sxk, mask=x_ok[:, None] & mask_k[None, :],
                     other=0.0)  # [BM, BK]
        acc = mma(dyt, xt, acc, UPCAST, IEEE)
    dw_ptrs = dw_ptr + tl.cast(g, tl.int64) * swe + cols[:, None] * swn + ks[None, :] * swk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


# ---------------------------------------------------------------- configs and autotuning

def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


# Configs per rows-per-expert bucket (decode <= 16, small prefill <= 64, prefill / training), two per bucket so a new
# shape compiles and times at most two. 16-bit operands run on tensor cores (wgmma for BM >= 64, mma.sync below);
# fp32 operands use exact IEEE dots (FMA, no tensor cores), so they get their own small tiles: the 16-bit tiles
# need up to 408 KB of shared memory and spill tens of KB per thread in fp32. Every config a launch can select is
# compiled for sm_90 by `python -m dsmath_kernels.compile_report` in CI: it must fit (<= 227 KB shared memory) and a
# 16-bit launch must not spill.
_GEMM_CONFIGS = [
    _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 8, 4),  # decode: weight-bandwidth bound, small M tiles
    _cfg(32, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 4),  # small prefill
    _cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3),  # prefill / training (wgmma 64xN per warpgroup)
]
_GEMM_CONFIGS_FP32 = [
    _cfg(16, 64, 32, 4, 3), _cfg(16, 32, 64, 4, 3),
    _cfg(32, 64, 32, 4, 3), _cfg(64, 32, 32, 4, 3),
    _cfg(128, 32, 32, 8, 3), _cfg(128, 64, 32, 8, 3),
]
_WGRAD_CONFIGS = [_cfg(64, 128, 64, 4, 4), _cfg(64, 128, 128, 8, 3)]


def _bucket(rows: int, experts: int) -> int:
    """Rows per expert, rounded to a power of two and capped: the autotune key, so new token counts reuse it."""
    return min(1 << max(int(rows / max(experts, 1)), 1).bit_length(), 4096)


def _prune_gemm(configs, named_args, **kwargs):
    """The configs one launch may take: by bucket and operand dtype, then narrowed for the register-heavy epilogues
    (sm_90 compile figures in bench/RESULTS.md): SwiGLU (ACT, two accumulators) and its backward (DACT, three
    outputs) take BN <= 128 (fp32: 32 at BM 128) and 8 warps at BM 64 (4 sat at 255 registers); storing the
    pre-activations (STORE_H) also takes BN 64 at BM 128; DACT takes BN 64, BM <= 64 and 8 warps from BM 64 (BM 128
    with BN 64 sits at 255 registers)."""
    b = named_args["mbucket"]
    flag = lambda k: bool(kwargs.get(k, named_args.get(k, False)))  # noqa: E731
    bms = (16,) if b <= 16 else (32, 64) if b <= 64 else (128,)
    if named_args["x_ptr"].dtype == torch.float32:
        wide = flag("ACT") or flag("DACT")
        return [c for c in _GEMM_CONFIGS_FP32 if c.kwargs["BM"] in bms and not (wide and c.kwargs["BN"] > 32 and
                                                                                 c.kwargs["BM"] == 128)]
    out = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        warps, stages = c.num_warps, c.num_stages
        if bm not in bms or ((flag("ACT") or flag("DACT")) and bn > 128):
            continue
        if flag("STORE_H") and bm >= 64:
            bn, warps = (64, 8) if bm == 128 else (bn, 8)
        elif flag("ACT") and bm == 64:
            warps = 8
        if flag("DACT"):
            bn = min(bn, 64)
            if bm >= 64:
                bm, warps = 64, 8
        cfg = _cfg(bm, bn, bk, warps, stages)
        if all(cfg.kwargs != o.kwargs or cfg.num_warps != o.num_warps or cfg.num_stages != o.num_stages for o in out):
            out.append(cfg)
    return out


_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["N", "K", "E", "mbucket", "ACT", "GATHER", "STORE_H", "DACT"],
                              prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_kernel)
_wgrad_tuned = triton.autotune(_WGRAD_CONFIGS, key=["N", "K", "mbucket", "GATHER"])(_wgrad_kernel)

_INTERP_GEMM = {"BM": 16, "BN": 32, "BK": 32}
_INTERP_WGRAD = {"BM": 16, "BN": 32, "BK": 32}


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------- launchers

def _gemm(x, w, offsets, *, rows=None, topk=1, gather=True, scale=None, act=False, store_h=False, dact_h=None):
    """y [R, N] (N = w.shape[1] // 2 with act) for x [M, K], w [E, N(*2), K] (any strides), offsets [E+1].
    rows [R] int32 pair indices (-1 = padding): with gather, A row r = x[rows[r] // topk]; scale [P] f32 multiplies
    row r by scale[rows[r]]. Without rows, R = M and A = x. Returns y, or (y, h [R, 2N]) with store_h (act only),
    or (dh [R, 2N], a [R, N]) with dact_h = the saved h (SwiGLU backward in the epilogue)."""
    E, NW, K = w.shape
    N = NW // 2 if act else NW
    R = rows.shape[0] if rows is not None and gather else x.shape[0]
    y = torch.empty(R, 2 * N if dact_h is not None else N, dtype=x.dtype, device=x.device)
    h = torch.empty(R, 2 * N, dtype=x.dtype, device=x.device) if store_h else dact_h
    a = torch.empty(R, N, dtype=x.dtype, device=x.device) if dact_h is not None else None
    out = (y, h) if store_h else (y, a) if dact_h is not None else y
    if R == 0 or N == 0:
        return out
    if h is not None and h.stride(1) != 1:
        h = h.contiguous()
    upcast = INTERPRET and x.dtype == torch.bfloat16
    ieee = x.dtype in (torch.float32, torch.float64) or upcast
    dummy = offsets
    opt = [t if t is not None else dummy for t in (rows, scale, h, a)]
    args = (x, w, y, offsets, *opt, R, N, K, E, _bucket(R, E), topk, x.stride(0), x.stride(1), w.stride(0),
            w.stride(1), w.stride(2), y.stride(0), y.stride(1), 0 if h is None else h.stride(0),
            0 if a is None else a.stride(0))
    flags = {"GATHER": rows is not None and gather, "ACT": act, "SCALE": scale is not None, "STORE_H": store_h,
             "DACT": dact_h is not None, "UPCAST": upcast, "IEEE": ieee, "EP": triton.next_power_of_2(E + 1)}
    progs = _num_programs(x.device)
    if INTERPRET or x.dtype == torch.float64:
        cfg = dict(_INTERP_GEMM) if INTERPRET else {"BM": 32, "BN": 32, "BK": 32}
        tiles = (triton.cdiv(R, cfg["BM"]) + E + 1) * triton.cdiv(N, cfg["BN"])
        _gemm_kernel[(min(progs, tiles),)](*args, **flags, **cfg)
        return out

    def grid(meta):
        return (min(progs * 2, (triton.cdiv(R, meta["BM"]) + E + 1) * triton.cdiv(N, meta["BN"])),)

    _gemm_tuned[grid](*args, **flags)
    return out


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows=None, topk: int = 1) -> torch.Tensor:
    """y [R, N] = per-segment x[rows // topk] @ w[g].T (w any strided [E, N, K] view; rows None = all of x, R = M);
    rows past offsets[E] are 0."""
    if x.dtype == torch.float64:
        raise TypeError("x: float64 is not supported by the Triton grouped GEMM")
    return _gemm(x, w, offsets, rows=rows, topk=topk)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, E: int, rows=None,
                  topk: int = 1) -> torch.Tensor:
    """dw [E, N, K] with dw[g] = dy[seg_g].T @ x[seg_g] (zero for empty experts); with rows [M] (int32 pair
    indices, -1 = zero row) the x rows are gathered: x[rows[seg_g] // topk]."""
    M, N = dy.shape
    K = x.shape[1]
    dw = torch.empty(E, N, K, dtype=dy.dtype, device=dy.device)
    if dw.numel() == 0:
        return dw
    upcast = INTERPRET and dy.dtype == torch.bfloat16
    ieee = dy.dtype == torch.float32 or upcast
    args = (dy, x, dw, offsets, rows if rows is not None else offsets, M, N, K, _bucket(M, E), topk, dy.stride(0),
            dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2))
    if INTERPRET:
        cfg = _INTERP_WGRAD
        grid = (E * triton.cdiv(N, cfg["BN"]) * triton.cdiv(K, cfg["BK"]),)
        _wgrad_kernel[grid](*args, GATHER=rows is not None, UPCAST=upcast, IEEE=ieee, **cfg)
        return dw

    def grid(meta):
        return (E * triton.cdiv(N, meta["BN"]) * triton.cdiv(K, meta["BK"]),)

    _wgrad_tuned[grid](*args, GATHER=rows is not None, UPCAST=False, IEEE=ieee)
    return dw


def gate_up_train(x, w_gate_up, offsets, order, topk):
    """Training forward of the gate-up GEMM: a = silu(g) * u [R, I] and the pre-activations h = [g, u] [R, 2I],
    x rows gathered through order."""
    return _gemm(x, w_gate_up, offsets, rows=order, topk=topk, act=True, store_h=True)


def down_backward(dy, w_down, offsets, h):
    """d a = dy @ w_down[e] per segment with the SwiGLU backward in the epilogue: returns (dh [R, 2I], a [R, I])."""
    return _gemm(dy, w_down.transpose(1, 2), offsets, dact_h=h)


def moe_experts_fused(x, w_gate_up, w_down, weights, order, offsets):
    """Inference expert layer on the contiguous layout, up to the combine: gate-up GEMM with the gather folded into
    the A load and SiLU-and-mul in the epilogue, then the down GEMM with the routing weight in the epilogue.
    Returns the weighted expert outputs [R, H] in permuted order (combine() sums each token's K rows)."""
    K = weights.shape[1]
    a = _gemm(x, w_gate_up, offsets, rows=order, topk=K, act=True)  # [R, I]
    return _gemm(a, w_down, offsets, rows=order, gather=False, scale=weights.reshape(-1))  # [R, H]


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, H, sy, so, TOPK: tl.constexpr, WEIGHTED: tl.constexpr,
                    BH: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = cols < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(inv_ptr + t * TOPK + j)
        ok = mask & ((cols * 0 + r) >= 0)  # padding slot (r = -1) adds nothing
        v = tl.load(y_ptr + tl.maximum(r, 0).to(tl.int64) * sy + cols, mask=ok, other=0.0)
        v = v.to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + t * TOPK + j)
        acc += v
    tl.store(out_ptr + tl.cast(t, tl.int64) * so + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H] = sum_j (weights[t, j] *) y[inverse[t, j]], fp32 accumulation in slot order, one kernel."""
    T, K = inverse.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    if y.stride(1) != 1:
        y = y.contiguous()
    inv = inverse.contiguous()
    w = weights.contiguous() if weights is not None else inv
    BH = 128 if INTERPRET else min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, BH))](y, inv, w, out, H, y.stride(0), out.stride(0), TOPK=K,
                                               WEIGHTED=weights is not None, BH=BH)
    return out
