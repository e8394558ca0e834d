"""Reference for the MoE expert layer: token permutation (group the T*K (token, slot) pairs by expert), grouped
GEMM over contiguous per-expert row segments, and the whole expert layer
    out[t] = sum_j weights[t, j] * w_down[e] @ (silu(g) * u),   [g; u] = w_gate_up[e] @ x[t],   e = ids[t, j]
(DeepSeek-V2/V3, Qwen-MoE, Mixtral experts; gate rows first, then up rows, in w_gate_up). Plain loops over
experts: readable, slow, the oracle for the kernels. Layouts are documented in dsmath_kernels/moe.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_permute_ref(ids: torch.Tensor, num_experts: int, block_m: int = 1):
    """ids [T, K] -> (order [R] int32, expert_offsets [E+1] int32, inverse [T, K] int32).
    Pairs are numbered f = t*K + j; expert e's segment is rows [off[e], off[e+1]) holding its pairs in ascending f,
    then padding (order = -1) up to a multiple of block_m. R = T*K + min(E, T*K) * (block_m - 1) rows (an upper
    bound known without looking at ids); rows >= off[E] are padding too."""
    T, K = ids.shape
    P = T * K
    flat = ids.reshape(-1).long()  # [P]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(padded, 0)  # [E+1]
    R = P + min(num_experts, P) * (block_m - 1)
    order = torch.full((R,), -1, dtype=torch.long, device=ids.device)
    inverse = torch.empty(P, dtype=torch.long, device=ids.device)
    sorted_f = torch.sort(flat, stable=True).indices  # [P] pairs grouped by expert, ascending f inside each
    rank = torch.arange(P, device=ids.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    rows = offsets[:-1].repeat_interleave(counts) + rank  # [P] row of each sorted pair
    order[rows] = sorted_f
    inverse[sorted_f] = rows
    return order.int(), offsets.int(), inverse.view(T, K).int()


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grouped_gemm_ref(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K], w [E, N, K], expert_offsets [E+1] -> y [M, N]: y[s:e] = x[s:e] @ w[i].T on expert i's segment
    [s, e) = [off[i], off[i+1]); rows outside every segment are 0. Accumulates in fp32 (fp64 for fp64)."""
    M, E, N = x.shape[0], w.shape[0], w.shape[1]
    acc = _acc_dtype(x)
    off = expert_offsets.tolist()
    y = torch.zeros(M, N, dtype=acc, device=x.device)  # [M, N]
    for i in range(E):
        s, e = off[i], off[i + 1]
        if e > s:
            y[s:e] = x[s:e].to(acc) @ w[i].to(acc).T  # [m_i, K] @ [K, N]
    return y.to(x.dtype)


def moe_experts_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], weights [T, K], ids [T, K] -> out [T, H] (dtype of x).
    Computed in fp32 (fp64 for fp64 inputs); differentiable by autograd in every float input."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    acc = _acc_dtype(x)
    out = torch.zeros(T, H, dtype=acc, device=x.device)  # [T, H]
    for e in range(E):
        tok, slot = torch.where(ids == e)  # pairs routed to e
        if tok.numel() == 0:
            continue
        h = x[tok].to(acc) @ w_gate_up[e].to(acc).T  # [m, 2I]
        g, u = h[:, : I2 // 2], h[:, I2 // 2 :]
        y = (F.silu(g) * u) @ w_down[e].to(acc).T  # [m, H]
        out = out.index_add(0, tok, y * weights[tok, slot].to(acc)[:, None])
    return out.to(x.dtype)
