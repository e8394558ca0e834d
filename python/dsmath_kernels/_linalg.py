"""Small torch helpers shared by the GRPO paths (grpo.py's chunked torch path and grpo_triton.py's launchers), so
neither imports the other for them."""

from __future__ import annotations

import torch


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. Half-precision CUDA operands: one GEMM with fp32 output (torch.mm out_dtype) where available,
    else (and on CPU) an fp32 GEMM of the upcast operands — never a result rounded to half precision."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()
