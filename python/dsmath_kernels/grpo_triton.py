"""Triton kernels for `token_logprobs` / `grpo_loss` (dsmath_kernels.grpo): log-probabilities, log-sum-exp and
entropy of softmax(hidden @ weight.T / temperature) and their gradients, never holding the [N, V] logits.

Forward `_lse_fwd_kernel`: grid (token blocks, vocab splits). Each program streams its vocab range in BN-column
tiles: logits tile [BM, BN] = hidden tile @ weight tile.T (fp32 accumulation over H), online max / sum-exp, the
entropy sum Σ e^(z-m)·z (constexpr ENTROPY) and the target logit. The splits' partials are merged on the host
([splits, N] floats) — splits keep the GPU busy when there are few tokens.

Backward `_lse_bwd_kernel`: grid (token blocks, vocab tiles). Each program recomputes its logits tile, forms
d z = g · (onehot(target) - exp(z - lse)) / temperature on chip, then (constexpr WRITE_DZ):
  False ("fused"): multiplies it straight into d hidden (dz @ W_tile) and d weight (dzᵀ @ h_tile), one BK slice of
                   H at a time, with fp32 atomic adds (needs an fp32 [V, H] accumulator for half-precision weights);
  True  ("split"): stores the tile (input dtype) into a [N, Vc] buffer for one vocab super-chunk, and the host
                   multiplies each chunk with cuBLAS: dh += dz_c @ W_c (fp32), dW_c = dz_cᵀ @ h (complete, no
                   accumulator). Peak extra memory N·Vc + N·H fp32; no atomics.
Default "split" (env DSMATH_GRPO_BWD=fused|split overrides); bench/bench_grpo_loss.py times both.

bf16/fp16 inputs use fp32 accumulation; fp32 inputs use IEEE fp32 dots (torch's default matmul precision).
Interpreter (TRITON_INTERPRET=1): bf16 tl.dot is broken there, so operands are upcast to fp32 (constexpr UPCAST)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsmath_kernels._linalg import mm_f32 as _mm_f32
from dsmath_kernels.triton_common import mma

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SPLIT_BYTES = 256 << 20  # "split" backward: bytes of one [N, Vc] d-logits buffer


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_m, offs_n, row_ok, col_ok, H, s_hm, s_hk, s_wv, s_wk, inv_temp,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """[BM, BN] fp32 = hidden[offs_m] @ weight[offs_n].T * inv_temp (zeros outside the rows / columns)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rows_h = offs_m.to(tl.int64) * s_hm  # int64: V * H may pass 2**31
    rows_w = offs_n.to(tl.int64) * s_wv
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < H
        a = tl.load(h_ptr + rows_h[:, None] + offs_k[None, :] * s_hk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + rows_w[None, :] + offs_k[:, None] * s_wk, mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)  # [BK, BN]
        acc = mma(a, b, acc, UPCAST, IEEE)
    return acc * inv_temp


@triton.jit
def _lse_fwd_kernel(h_ptr, w_ptr, t_ptr, m_out, s_out, u_out, tz_out, N, V, H, s_hm, s_hk, s_wv, s_wk, inv_temp,
                    V_PER_SPLIT, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ENTROPY: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < N
    tgt = tl.load(t_ptr + offs_m, mask=row_ok, other=-1)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)  # running max
    s_i = tl.zeros((BM,), dtype=tl.float32)  # running Σ exp(z - m)
    u_i = tl.zeros((BM,), dtype=tl.float32)  # running Σ exp(z - m) · z
    tz = tl.zeros((BM,), dtype=tl.float32)  # target logit
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BN):
        offs_n = v0 + tl.arange(0, BN)
        col_ok = offs_n < v_hi
        z = _logits_tile(h_ptr, w_ptr, offs_m, offs_n, row_ok, col_ok, H, s_hm, s_hk, s_wv, s_wk, inv_temp,
                         BM, BN, BK, UPCAST, IEEE)
        tz += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new[:, None])  # [BM, BN], 0 outside the columns
        s_i = s_i * alpha + tl.sum(e, axis=1)
        if ENTROPY:
            u_i = u_i * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        m_i = m_new
    out = pid_s * N + offs_m
    tl.store(m_out + out, m_i, mask=row_ok)
    tl.store(s_out + out, s_i, mask=row_ok)
    tl.store(tz_out + out, tz, mask=row_ok)
    if ENTROPY:
        tl.store(u_out + out, u_i, mask=row_ok)


@triton.jit
def _lse_bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, dz_ptr, N, V, H, s_hm, s_hk, s_wv, s_wk,
                    s_dz, inv_temp, v_base, v_end, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    WRITE_DZ: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = v_base + pid_n * BN + tl.arange(0, BN)
    row_ok = offs_m < N
    col_ok = offs_n < v_end
    z = _logits_tile(h_ptr, w_ptr, offs_m, offs_n, row_ok, col_ok, H, s_hm, s_hk, s_wv, s_wk, inv_temp,
                     BM, BN, BK, UPCAST, IEEE)
    tgt = tl.load(t_ptr + offs_m, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0) * inv_temp  # d logp, times d z / d logits
    p = tl.exp(z - lse[:, None])
    dz = tl.where(offs_n[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p  # [BM, BN]
    ok = row_ok[:, None] & col_ok[None, :]
    dz = tl.where(ok, dz, 0.0)
    if WRITE_DZ:
        dz_ptrs = dz_ptr + offs_m.to(tl.int64)[:, None] * s_dz + (offs_n - v_base)[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=ok)
    else:
        if not UPCAST:
            dz = dz.to(h_ptr.dtype.element_ty)  # half-precision operands for the tensor cores, fp32 accumulation
        m64 = offs_m.to(tl.int64)
        n64 = offs_n.to(tl.int64)
        for k0 in range(0, H, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < H
            if NEED_DH:
                wt = tl.load(w_ptr + n64[:, None] * s_wv + offs_k[None, :] * s_wk,
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
                if UPCAST:
                    wt = wt.to(tl.float32)
                if IEEE:
                    part = tl.dot(dz, wt, input_precision="ieee")
                else:
                    part = tl.dot(dz, wt)  # [BM, BK]
                tl.atomic_add(dh_ptr + m64[:, None] * H + offs_k[None, :], part,
                              mask=row_ok[:, None] & k_ok[None, :])
            if NEED_DW:
                ht = tl.load(h_ptr + m64[:, None] * s_hm + offs_k[None, :] * s_hk,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                if UPCAST:
                    ht = ht.to(tl.float32)
                if IEEE:
                    part = tl.dot(tl.trans(dz), ht, input_precision="ieee")
                else:
                    part = tl.dot(tl.trans(dz), ht)  # [BN, BK]
                tl.atomic_add(dw_ptr + n64[:, None] * H + offs_k[None, :], part,
                              mask=col_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------------- launchers
def _config(device: torch.device, dtype: torch.dtype = torch.bfloat16, kind: str = "bwd") -> dict:
    """Tiles: small ones in the interpreter; on the GPU (and on meta tensors, for the compile report) per dtype and
    pass, compiled for sm_90 by `python -m dsmath_kernels.compile_report`: 16-bit forward 128 x 64 (the entropy sum
    made 128 x 128 spill), backward 128 x 128; fp32 (exact FMA dots, no tensor cores) 64 x 32 x 32 (the 16-bit
    tiles spill 37-85 KB per thread in fp32)."""
    if INTERPRET or device.type not in ("cuda", "meta"):
        return {"BM": 16, "BN": 32, "BK": 16}
    if dtype == torch.float32:
        return {"BM": 64, "BN": 32, "BK": 32, "num_warps": 4, "num_stages": 3}
    return {"BM": 128, "BN": 64 if kind == "fwd" else 128, "BK": 64, "num_warps": 8, "num_stages": 3}


def _flags(h: torch.Tensor) -> dict:
    return {"UPCAST": INTERPRET, "IEEE": h.dtype == torch.float32 and not INTERPRET}


def _check(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or t.shape != (h.shape[0],):
        raise ValueError(f"grpo_triton: expected hidden [N, H], weight [V, H], targets [N]; got {list(h.shape)}, "
                         f"{list(w.shape)}, {list(t.shape)}")
    if h.dtype != w.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"grpo_triton: hidden / weight dtypes {h.dtype} / {w.dtype} (need one of fp32, fp16, bf16)")
    if h.device.type not in ("cuda", "meta") and not INTERPRET:
        raise ValueError(f"grpo_triton: tensors on {h.device} need a CUDA GPU or TRITON_INTERPRET=1")
    return t.contiguous()


def lse_forward(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, inv_temp: float, entropy: bool = True):
    """h [N, H], w [V, H], t [N] -> (logp, lse, entropy) [N] fp32 (entropy zeros when entropy=False)."""
    t = _check(h, w, t)
    N, H = h.shape
    V = w.shape[0]
    cfg = _config(h.device, h.dtype, "fwd")
    BM, BN = cfg["BM"], cfg["BN"]
    n_m = triton.cdiv(N, BM)
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(V, BN), triton.cdiv(4 * sms, max(n_m, 1))))
    per = triton.cdiv(triton.cdiv(V, splits), BN) * BN  # vocab columns per split, a multiple of BN
    splits = triton.cdiv(V, per)
    part = torch.empty(4, splits, N, device=h.device, dtype=torch.float32)  # m, s, u, target logit
    if N:
        _lse_fwd_kernel[(n_m, splits)](h, w, t, part[0], part[1], part[2], part[3], N, V, H, h.stride(0),
                                       h.stride(1), w.stride(0), w.stride(1), inv_temp, per, ENTROPY=entropy,
                                       **cfg, **_flags(h))
    m, s, u, tz = part.unbind(0)
    mx = m.amax(0)  # [N]
    scale = torch.exp(m - mx)  # [splits, N]
    s_tot = (s * scale).sum(0)
    lse = mx + torch.log(s_tot)
    ent = lse - (u * scale).sum(0) / s_tot if entropy else torch.zeros_like(lse)
    return tz.sum(0) - lse, lse, ent


def _bwd_mode() -> str:
    mode = os.environ.get("DSMATH_GRPO_BWD", "split")
    if mode not in ("split", "fused"):
        raise ValueError(f"DSMATH_GRPO_BWD: expected 'split' or 'fused', got {mode!r}")
    return mode


def lse_backward(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                 inv_temp: float, need_dh: bool, need_dw: bool, mode: str | None = None):
    """d logp g [N] -> (d hidden [N, H] fp32 or None, d weight [V, H] or None)."""
    t = _check(h, w, t)
    mode = mode or _bwd_mode()
    N, H = h.shape
    V = w.shape[0]
    lse = lse.float().contiguous()
    g = g.float().contiguous()
    cfg = _config(h.device, h.dtype, "bwd")
    BM, BN = cfg["BM"], cfg["BN"]
    dh = torch.zeros(N, H, device=h.device, dtype=torch.float32) if need_dh else None
    if N == 0:
        return dh, (torch.zeros_like(w) if need_dw else None)
    common = (N, V, H, h.stride(0), h.stride(1), w.stride(0), w.stride(1))
    if mode == "fused":
        dw = None
        if need_dw:
            dw = torch.zeros(V, H, device=w.device, dtype=torch.float32)
        dummy = lse  # unused pointer slots
        grid = (triton.cdiv(N, BM), triton.cdiv(V, BN))
        _lse_bwd_kernel[grid](h, w, t, lse, g, dh if need_dh else dummy, dw if need_dw else dummy, dummy, *common, 0,
                              inv_temp, 0, V, WRITE_DZ=False, NEED_DH=need_dh, NEED_DW=need_dw, **cfg, **_flags(h))
        return dh, dw
    dw = torch.empty_like(w) if need_dw else None
    vc = max(BN, (SPLIT_BYTES // (N * w.element_size())) // BN * BN)  # vocab columns per super-chunk
    vc = min(vc, triton.cdiv(V, BN) * BN)
    dz = torch.empty(N, vc, device=h.device, dtype=w.dtype)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        grid = (triton.cdiv(N, BM), triton.cdiv(v1 - v0, BN))
        _lse_bwd_kernel[grid](h, w, t, lse, g, lse, lse, dz, *common, dz.stride(0), inv_temp, v0, v1, WRITE_DZ=True,
                              NEED_DH=need_dh, NEED_DW=need_dw, **cfg, **_flags(h))
        dzc = dz[:, : v1 - v0]
        if need_dh:
            dh += _mm_f32(dzc, w[v0:v1])
        if need_dw:
            dw[v0:v1] = dzc.T @ h
    return dh, dw
