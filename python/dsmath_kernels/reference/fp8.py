"""Reference for FP8 block-scaled compute (DeepSeek-V3 / DeepGEMM format): the spec of the FP8 ops, readable,
plain PyTorch, computed in fp32.

Formats (e4m3 = torch.float8_e4m3fn, largest finite value 448):
- weights  w [.., N, K] e4m3 with w_scale [.., ceil(N/128), ceil(K/128)] fp32 (the checkpoint's
  `weight_scale_inv`): the real weight is  W[n, k] = w[n, k] * w_scale[n // 128, k // 128]  (one scale per
  128 x 128 block; edge blocks are partial).
- activations a [M, K] e4m3 with a_scale [M, ceil(K/128)] fp32, one scale per token per 128-channel group:
  A[m, k] = a[m, k] * a_scale[m, k // 128]; the scale is amax(|group|) / 448, so the group's largest value maps to
  +-448 (dynamic quantisation, DeepSeek's "activation_scheme: dynamic").
A GEMM y = A @ W.T of the dequantised operands is what every FP8 kernel computes (up to fp32 summation order)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128
EPS = 1e-10  # smallest amax used for a scale (an all-zero group gets scale EPS / 448 and quantises to 0)


def _blocks(n: int, b: int = BLOCK) -> int:
    return -(-n // b)


def quantize_fp8_groups_ref(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q [..., K] e4m3, scale [..., ceil(K/group)] fp32): per token per `group` channels,
    scale = max(amax, EPS) / 448, q = round_to_nearest_even(x / scale)."""
    K = x.shape[-1]
    pad = _blocks(K, group) * group - K
    xf = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, group))  # [..., G, group]
    scale = xf.abs().amax(dim=-1).clamp_min(EPS) / FP8_MAX  # [..., G]
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)[..., :K]
    return q, scale


def dequantize_fp8_groups_ref(q: torch.Tensor, scale: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """q [..., K] e4m3, scale [..., ceil(K/group)] -> [..., K] fp32 = q * scale[..., k // group]."""
    return q.float() * scale.repeat_interleave(group, dim=-1)[..., : q.shape[-1]]


def quantize_blocks_ref(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] e4m3, scale [..., ceil(N/block), ceil(K/block)] fp32), one scale per
    block x block tile: scale = max(amax, EPS) / 448 (DeepSeek-V3's weight format)."""
    N, K = w.shape[-2:]
    pn, pk = _blocks(N, block) * block - N, _blocks(K, block) * block - K
    wf = F.pad(w.float(), (0, pk, 0, pn))  # [..., Np, Kp]
    tiles = wf.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., nb, block, kb, block]
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(EPS) / FP8_MAX  # [..., nb, kb]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2).flatten(-3, -2)[..., :N, :K], scale


def dequantize_blocks_ref(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """q [..., N, K] e4m3, scale [..., ceil(N/block), ceil(K/block)] -> [..., N, K] fp32."""
    N, K = q.shape[-2:]
    s = scale.repeat_interleave(block, dim=-2)[..., :N, :].repeat_interleave(block, dim=-1)[..., :K]
    return q.float() * s


def fp8_gemm_ref(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [M, N] = A @ W.T in fp32, A = a (float, weight-only) or a * a_scale (e4m3 a, [M, ceil(K/128)] scales),
    W = w * w_scale per 128 x 128 block. Output dtype: out_dtype, else a's dtype (bf16 for an e4m3 a)."""
    A = a.float() if a_scale is None else dequantize_fp8_groups_ref(a, a_scale)
    y = A @ dequantize_blocks_ref(w, w_scale).T  # [M, N]
    return y.to(out_dtype or (torch.bfloat16 if a.dtype == FP8 else a.dtype))


def grouped_gemm_fp8_ref(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, expert_offsets: torch.Tensor,
                         a_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Grouped version: w [E, N, K] e4m3, w_scale [E, ceil(N/128), ceil(K/128)]; rows [off[e], off[e+1]) of a use
    expert e; rows outside every segment are 0. y [M, N]."""
    M, N = a.shape[0], w.shape[1]
    y = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    off = expert_offsets.tolist()
    for e in range(w.shape[0]):
        s, t = off[e], off[e + 1]
        if t > s:
            y[s:t] = fp8_gemm_ref(a[s:t], w[e], w_scale[e], None if a_scale is None else a_scale[s:t],
                                  out_dtype=torch.float32)
    return y.to(out_dtype or (torch.bfloat16 if a.dtype == FP8 else a.dtype))


def moe_experts_fp8_ref(x: torch.Tensor, w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor,
                        s_down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        quantize_activations: bool) -> torch.Tensor:
    """Routed-expert layer with FP8 experts: x [T, H], w_gate_up [E, 2I, H] e4m3 with s_gate_up
    [E, 2 * ceil(I/128), ceil(H/128)] (gate blocks, then up blocks: the two projections are quantised separately,
    as checkpoints store them), w_down [E, H, I] e4m3 with s_down [E, ceil(H/128), ceil(I/128)], weights [T, K]
    fp32, ids [T, K] -> out [T, H] (dtype of x):
        out[t] = sum_j weights[t, j] * Wd[e] @ Q(silu(g) * u),  [g; u] = Wgu[e] @ Q(x[t]),  e = ids[t, j]
    with W* the dequantised weights and Q the per-token-per-128 activation round trip (quantise then dequantise)
    when quantize_activations, else the identity (weight-only: the CPU / sm_80 semantics)."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    inter = I2 // 2
    nb = _blocks(inter)

    def q(t):  # the activation round trip (or none)
        return dequantize_fp8_groups_ref(*quantize_fp8_groups_ref(t)) if quantize_activations else t.float()

    xq = q(x)  # [T, H]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(E):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        wg = dequantize_blocks_ref(w_gate_up[e, :inter], s_gate_up[e, :nb])  # [I, H]
        wu = dequantize_blocks_ref(w_gate_up[e, inter:], s_gate_up[e, nb:])  # [I, H]
        g, u = xq[tok] @ wg.T, xq[tok] @ wu.T  # [m, I]
        y = q(F.silu(g) * u) @ dequantize_blocks_ref(w_down[e], s_down[e]).T  # [m, H]
        out = out.index_add(0, tok, y * weights[tok, slot].float()[:, None])
    return out.to(x.dtype)
