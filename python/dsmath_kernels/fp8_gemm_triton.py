"""Triton FP8 block-scaled GEMMs (DeepGEMM's format): dense and grouped (MoE experts), plus the per-token-per-128
activation quantiser. Spec: reference/fp8.py; public ops: fp8.py.

`_fp8_gemm_kernel`: y[r] = A[src(r)] @ W[g].T for the rows r of group g, where W = w * w_scale per 128 x 128 block
and A is either e4m3 with a per-row-per-128 scale (W8A8) or a float tensor (weight-only). The k loop walks BK
columns at a time; each k-step's partial product starts from zero and is added to the fp32 accumulator with its
scales applied ("promotion" in the main loop, as DeepGEMM does):
    acc += dot(a_tile, b_tile) * a_scale[rows, kb][:, None] * w_scale[g, cols // 128, kb][None, :]
so fp8 products never accumulate across scale blocks. BK divides 128, so kb = k0 // 128 is constant per step.
Modes (tl.constexpr):
  DENSE    — one group over all M rows (the tile index is the whole schedule); else grouped over contiguous
             segments [off[g], off[g+1]) with the persistent schedule of triton_common.segment_schedule (rows
             past off[E] are written as zeros).
  A_FP8    — A is e4m3 + scales: fp8 x fp8 MMA (sm_89+; wgmma on sm_90). Else A is float (weight-only): the B
             tile is converted exactly to A's dtype in registers — the dequantise-then-bf16 path of sm_80, where
             Triton has no e4m3 type and the weights arrive as bytes decoded in-kernel (W_BITS).
  GATHER   — A row r is a[rows[r] // topk] (the MoE permutation folded into the A load, scales gathered alike).
  ACT      — W holds gate rows then up rows (up rows start at row N, their scales at block row UPB); the tile
             computes both and keeps silu(g) * u (the SwiGLU epilogue).
  SCALE    — multiply row r by route_w[rows[r]] (the routing weight) in the epilogue.
  QUANT_OUT — quantise the output tile per row per 128 columns (BN = 128) and store e4m3 + scales: the next
             GEMM's activation quantisation fused into this epilogue.
  UPCAST   — interpreter mode: fp32 dots (its bf16 dot is broken) and e4m3 rounding done in fp32 (its fp8
             conversion drops the exponent carry).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsmath_kernels.triton_common import gathered_rows, mma, segment_schedule, segment_tile

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8_MAX = 448.0
EPS = 1e-10
_FP8_MAX = tl.constexpr(FP8_MAX)  # the kernels' copies (Triton reads constexpr globals only)
_EPS = tl.constexpr(EPS)


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """fp32 -> e4m3 (round to nearest even; callers clamp to +-448). EXACT: round in fp32 arithmetic first, so the
    conversion sees representable values only (the interpreter's own conversion drops the exponent carry:
    124.3 -> 64)."""
    if EXACT:
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3: 3 mantissa bits, smallest normal exponent -6
        ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = (tl.abs(x) / ulp + 12582912.0) - 12582912.0  # round to an integer, ties to even (1.5 * 2^23 trick)
        x = tl.where(bits < 0, -r, r) * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def _e4m3_decode(bits):
    """uint8 e4m3fn codes -> fp32 values, exactly (sm_80 has no fp8 type: the weights arrive as bytes). Normal:
    (-1)^s 2^(e-7) (1 + m/8); subnormal (e = 0): (-1)^s m 2^-9. NaN codes do not occur in quantised weights."""
    v = bits.to(tl.int32)
    e = (v >> 3) & 0xF
    m = v & 0x7
    normal = ((e + 120) << 23 | m << 20).to(tl.float32, bitcast=True)
    x = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((v & 0x80) != 0, -x, x)


@triton.jit
def _scaled_mma(a, b, sa, sb, acc, A_FP8: tl.constexpr, W_BITS: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr):
    """acc + (a @ b) * sa[:, None] * sb[None, :] with a fresh fp32 partial product. A_FP8: e4m3 x e4m3 (wgmma
    FP8 on sm_90); else weight-only: the e4m3 tile (or its bytes, W_BITS) converted exactly to a's dtype."""
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    if A_FP8:
        return acc + tl.dot(a, b, zero) * sa[:, None] * sb[None, :]
    if W_BITS:
        b = _e4m3_decode(b)
    return acc + mma(a, b.to(a.dtype), zero, UPCAST, IEEE) * sb[None, :]


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, y_ptr, ys_ptr, off_ptr, rows_ptr, rw_ptr,
                     M, N, K, E, topk, UPB, mbucket,
                     sam, sak, sasm, sask, sbe, sbn, sbk, sbse, sbsn, sbsk, sym, syn, sysm,
                     DENSE: tl.constexpr, A_FP8: tl.constexpr, W_BITS: tl.constexpr, GATHER: tl.constexpr,
                     ACT: tl.constexpr, SCALE: tl.constexpr, QUANT_OUT: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # mbucket (rows per group, rounded to a power of two) only keys the autotuning cache.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if DENSE:
        num_m = tl.cdiv(M, BM)
        total = num_m * tl.cdiv(N, BN)
    else:
        ar, lo, hi, num_ms, tiles, cum, total = segment_schedule(off_ptr, M, E, N, EP, BM, BN)
    for t in range(pid, total, nprog):
        if DENSE:
            g, start, end, m_tile, n_tile = 0, 0, M, t % num_m, t // num_m
        else:
            g, start, end, m_tile, n_tile = segment_tile(t, ar, lo, hi, num_ms, tiles, cum)
        rows = start + m_tile * BM + tl.arange(0, BM)  # [BM]
        mask_m = rows < end
        pair, a_ok, src = gathered_rows(rows_ptr, rows, mask_m, topk, GATHER, GATHER or SCALE)
        cols = n_tile * BN + tl.arange(0, BN)  # [BN]
        mask_n = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        g64 = tl.cast(g, tl.int64)
        b_base = b_ptr + g64 * sbe
        s_base = bs_ptr + g64 * sbse + (cols // 128) * sbsn  # [BN] this tile's gate scale rows
        sa = tl.zeros((BM,), dtype=tl.float32)
        k_iters = tl.where(g < E, tl.cdiv(K, BK), 0)  # the tail group only writes zeros
        for kk in range(k_iters):
            ks = kk * BK + tl.arange(0, BK)  # [BK]
            mask_k = ks < K
            kb = (kk * BK) // 128  # scale block of this k-step
            a = tl.load(a_ptr + src[:, None] * sam + ks[None, :] * sak, mask=a_ok[:, None] & mask_k[None, :],
                        other=0.0)  # [BM, BK]
            if A_FP8:
                sa = tl.load(as_ptr + src * sasm + kb * sask, mask=a_ok, other=0.0)  # [BM]
            b_ptrs = b_base + cols[None, :].to(tl.int64) * sbn + ks[:, None] * sbk  # [BK, BN]
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            sb = tl.load(s_base + kb * sbsk, mask=mask_n, other=0.0)  # [BN]
            acc = _scaled_mma(a, b, sa, sb, acc, A_FP8, W_BITS, UPCAST, IEEE)
            if ACT:  # up rows sit N rows below the gate rows, their scales UPB block rows below
                bu = tl.load(b_ptrs + N * sbn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                sbu = tl.load(s_base + UPB * sbsn + kb * sbsk, mask=mask_n, other=0.0)
                acc_u = _scaled_mma(a, bu, sa, sbu, acc_u, A_FP8, W_BITS, UPCAST, IEEE)
        if ACT:
            acc = acc * tl.sigmoid(acc) * acc_u
        if SCALE:
            acc = acc * tl.load(rw_ptr + tl.maximum(pair, 0), mask=mask_m & (pair >= 0), other=0.0)[:, None]
        mask_mn = mask_m[:, None] & mask_n[None, :]
        r64 = rows[:, None].to(tl.int64)
        if QUANT_OUT:  # one 128-column group per tile (BN = 128): amax per row -> e4m3 + scale
            amax = tl.max(tl.where(mask_mn, tl.abs(acc), 0.0), axis=1)  # [BM]
            s = tl.maximum(amax, _EPS) / _FP8_MAX
            q = _to_e4m3(tl.clamp(acc / s[:, None], -_FP8_MAX, _FP8_MAX), UPCAST)
            tl.store(y_ptr + r64 * sym + cols[None, :] * syn, q, mask=mask_mn)
            tl.store(ys_ptr + rows.to(tl.int64) * sysm + n_tile, s, mask=mask_m)
        else:
            tl.store(y_ptr + r64 * sym + cols[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, sxm, sqm, ssm, EXACT: tl.constexpr, BM: tl.constexpr,
                  G: tl.constexpr):
    """Per row per G-column group: s = max(amax, EPS) / 448, q = x / s in e4m3. Grid (cdiv(M, BM), cdiv(K, G))."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    gi = tl.program_id(1)
    cols = gi * G + tl.arange(0, G)
    r64 = rows.to(tl.int64)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + r64[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), _EPS) / _FP8_MAX  # [BM]
    q = _to_e4m3(tl.clamp(x / s[:, None], -_FP8_MAX, _FP8_MAX), EXACT)
    tl.store(q_ptr + r64[:, None] * sqm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + r64 * ssm + gi, s, mask=rows < M)


# ---------------------------------------------------------------- configs

# (BM, BN, warps, stages, BK) per (A type, epilogue, rows-per-group bucket); two per bucket, so a new shape compiles
# and times at most two. W8A8: BK = 128, one scale block per k-step (DeepGEMM's granularity); BM 16 runs mma.sync
# (decode, weight-bandwidth bound), BM 64 / 128 wgmma on e4m3. The SwiGLU epilogue keeps four fp32 tiles live (gate,
# up and their partial products): at BM = 128 it spills (708 bytes on sm_90), so it runs BM = 64 over 8 warps.
# Weight-only (bf16 A, e4m3 B converted in registers): BK = 64 — the conversion's registers spill at BK = 128 on
# sm_80. Every entry compiles without spills (`python -m dsmath_kernels.compile_report --only fp8
# --target all`, in CI for sm_90).
_TABLES = {
    ("w8a8", False): {16: [(16, 64, 4, 4, 128), (16, 128, 4, 4, 128)], 64: [(64, 128, 4, 4, 128), (64, 64, 4, 4, 128)],
                      128: [(128, 128, 8, 3, 128), (128, 128, 8, 4, 128)]},
    ("w8a8", True): {16: [(16, 128, 4, 4, 128), (16, 64, 4, 4, 128)], 64: [(64, 128, 8, 3, 128), (64, 128, 8, 4, 128)],
                     128: [(64, 128, 8, 3, 128), (64, 128, 8, 4, 128)]},
    ("w8a16", False): {16: [(16, 64, 4, 4, 64), (16, 128, 4, 4, 64)], 64: [(64, 64, 4, 3, 64), (64, 128, 8, 3, 64)],
                       128: [(128, 64, 8, 3, 64), (64, 128, 8, 3, 64)]},
    ("w8a16", True): {16: [(16, 64, 4, 4, 64)], 64: [(64, 128, 8, 3, 64)], 128: [(64, 128, 8, 3, 64)]},
}
_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bm, bn, w, st, bk in sorted({c for t in _TABLES.values() for v in t.values() for c in v})]
_INTERP = {"BM": 32, "BN": 64, "BK": 128}  # few, large tiles: the interpreter pays per op, not per element


def _bucket(rows: int, groups: int) -> int:
    return min(1 << max(int(rows / max(groups, 1)), 1).bit_length(), 4096)


def configs_for(mbucket: int, a_fp8: bool, act: bool, quant_out: bool) -> list[tuple[int, int, int, int, int]]:
    """(BM, BN, warps, stages, BK) a launch may pick, by A type, epilogue (QUANT_OUT needs BN = 128) and rows per
    group."""
    table = _TABLES[("w8a8" if a_fp8 else "w8a16", act)]
    cands = table[16 if mbucket <= 16 else 64 if mbucket <= 64 else 128]
    return [c for c in cands if not quant_out or c[1] == 128]


def _prune(configs, named_args, **kwargs):
    def flag(k):
        return kwargs.get(k, named_args.get(k, False))

    keep = set(configs_for(named_args["mbucket"], flag("A_FP8"), flag("ACT"), flag("QUANT_OUT")))
    return [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages, c.kwargs["BK"]) in keep]


_tuned = triton.autotune(_CONFIGS, key=["N", "K", "E", "mbucket", "DENSE", "A_FP8", "GATHER", "ACT", "QUANT_OUT"],
                         prune_configs_by={"early_config_prune": _prune})(_fp8_gemm_kernel)


def fp8_dot_supported(device: torch.device) -> bool:
    """Native fp8 MMA: sm_89 and newer (and the interpreter, which emulates it)."""
    if device.type != "cuda":
        return INTERPRET
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _num_programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count * 2 if device.type == "cuda" else 4


# ---------------------------------------------------------------- launchers

def gemm(a, w, w_scale, offsets=None, *, a_scale=None, rows=None, topk=1, gather=True, act=False, up_blocks=0,
         route_w=None, quant_out=False, out_dtype=torch.bfloat16, w_bits=None, native=None):
    """y [R, N] for a [M, K] (e4m3 with a_scale [M, ceil(K/128)], or float: weight-only), w [E, N(*2), K] e4m3
    with w_scale [E, *, ceil(K/128)] (any strides). offsets None: dense (E = 1, all M rows); else [E+1] segments.
    rows [R] int32 pair indices (-1 = padding): with gather, A row r = a[rows[r] // topk]; route_w [P] fp32 scales
    row r by route_w[rows[r]]. act: SwiGLU epilogue (w has 2N rows; the up rows' scales start at block row
    up_blocks). quant_out: returns (q [R, N] e4m3, s [R, ceil(N/128)] fp32) instead of y. w_bits: pass the weight
    as bytes decoded in-kernel (default: where the device has no fp8 type, i.e. before sm_89). native: whether the
    target has FP8 MMA (default: the device's; the compile sweep passes it for meta tensors)."""
    E, NW, K = w.shape
    N = NW // 2 if act else NW
    R = rows.shape[0] if rows is not None and gather else a.shape[0]
    dev = a.device
    a_fp8 = a_scale is not None
    if quant_out:
        y = torch.empty(R, N, dtype=torch.float8_e4m3fn, device=dev)
        ys = torch.empty(R, -(-N // 128), dtype=torch.float32, device=dev)
        out = (y, ys)
    else:
        y = torch.empty(R, N, dtype=out_dtype, device=dev)
        ys = y
        out = y
    if R == 0 or N == 0:
        if quant_out:
            ys.fill_(EPS / FP8_MAX)
        return out
    native = fp8_dot_supported(dev) if native is None else native
    if (a_fp8 or quant_out) and not native:
        raise ValueError("activation: FP8 activations need FP8 MMA (sm_89 or newer); use the weight-only path "
                         f"(activation='native') on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}")
    w_bits = (not native) if w_bits is None else w_bits
    if w_bits:
        w = w.view(torch.uint8)
    upcast = INTERPRET  # fp32 dots (the interpreter's bf16 dot is broken) and exact e4m3 rounding
    ieee = a.dtype == torch.float32 or upcast
    dummy = w_scale
    ptrs = (a, a_scale if a_fp8 else dummy, w, w_scale, y, ys, offsets if offsets is not None else dummy,
            rows if rows is not None else dummy, route_w if route_w is not None else dummy)
    strides = (a.stride(0), a.stride(1), *((a_scale.stride(0), a_scale.stride(1)) if a_fp8 else (0, 0)),
               w.stride(0), w.stride(1), w.stride(2), w_scale.stride(0), w_scale.stride(1), w_scale.stride(2),
               y.stride(0), y.stride(1), ys.stride(0) if quant_out else 0)
    dense = offsets is None
    flags = {"DENSE": dense, "A_FP8": a_fp8, "W_BITS": w_bits, "GATHER": rows is not None and gather, "ACT": act,
             "SCALE": route_w is not None, "QUANT_OUT": quant_out, "UPCAST": upcast, "IEEE": ieee,
             "EP": triton.next_power_of_2(E + 1)}
    sizes = (R, N, K, E, topk, up_blocks, _bucket(R, E))
    progs = _num_programs(dev)

    def tiles(bm, bn):
        return (triton.cdiv(R, bm) + (0 if dense else E + 1)) * triton.cdiv(N, bn)

    if INTERPRET:
        cfg = dict(_INTERP, BN=128) if quant_out else _INTERP
        _fp8_gemm_kernel[(min(progs, tiles(cfg["BM"], cfg["BN"])),)](*ptrs, *sizes, *strides, **flags, **cfg)
        return out
    _tuned[lambda m: (min(progs, tiles(m["BM"], m["BN"])),)](*ptrs, *sizes, *strides, **flags)
    return out


def quantize(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (row stride any, unit column stride) -> (q [M, K] e4m3, s [M, ceil(K/group)] fp32)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, -(-K // group), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s
    if x.stride(1) != 1:
        x = x.contiguous()
    BM = 16 if INTERPRET else 32
    _quant_kernel[(triton.cdiv(M, BM), s.shape[1])](x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0),
                                                     EXACT=INTERPRET, BM=BM, G=group)
    return q, s
