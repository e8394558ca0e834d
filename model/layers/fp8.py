"""FP8 block-scaled layers (DeepSeek-V3 checkpoints, config `quantization_config`): the weights stay e4m3 in
memory with their fp32 `weight_scale_inv` (one per 128 x 128 block), exactly as on disk, and every matmul goes
through dsmath_kernels' FP8 ops (W8A8 on sm_89+, weight-only on sm_80 and CPU). Inference only: the parameters
are frozen (requires_grad=False) and the ops have no autograd.

- FP8Linear: `weight` [N, K] e4m3, `weight_scale_inv` [ceil(N/128), ceil(K/128)] fp32, optional float `bias`.
- FP8Experts: `gate_up_proj` [E, 2I, H] e4m3 (gate rows, then up rows) with `gate_up_proj_scale_inv`
  [E, 2 * ceil(I/128), ceil(H/128)] (gate blocks, then up blocks: each projection keeps its own blocks, as the
  checkpoint stores them per expert), `down_proj` [E, H, I] e4m3 with `down_proj_scale_inv`.
`linear(cfg, ...)` builds an FP8Linear when the config is quantised, else an nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn

import dsmath_kernels as dk

from ..config import ModelConfig

FP8 = torch.float8_e4m3fn
BLOCK = 128


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _frozen(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(out_features, in_features, dtype=FP8)
        self.weight_scale_inv = _frozen(_blocks(out_features), _blocks(in_features), dtype=torch.float32)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        return dk.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [N, K], computed now and not kept (MLA's absorbed path uses kv_b_proj per head)."""
        return dk.dequantize_fp8_blocks(self.weight, self.weight_scale_inv).to(dtype)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Random N(0, std) weights, quantised (for random-weight models at real shapes)."""
        w = torch.empty(self.weight.shape, device=self.weight.device).normal_(0.0, std)
        q, s = dk.quantize_fp8_blocks(w)
        self.weight.copy_(q)
        self.weight_scale_inv.copy_(s)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


class FP8Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = _frozen(E, 2 * inter, H, dtype=FP8)  # [E, 2I, H]
        self.gate_up_proj_scale_inv = _frozen(E, 2 * _blocks(inter), _blocks(H), dtype=torch.float32)
        self.down_proj = _frozen(E, H, inter, dtype=FP8)  # [E, H, I]
        self.down_proj_scale_inv = _frozen(E, _blocks(H), _blocks(inter), dtype=torch.float32)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return dk.moe_experts_fp8(x, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                                  self.down_proj_scale_inv, weights, ids)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        E, I2, H = self.gate_up_proj.shape
        inter, nb, dev = I2 // 2, _blocks(I2 // 2), self.gate_up_proj.device
        for i in range(2):  # gate, then up: each quantised with its own blocks, as checkpoints store them
            q, s = dk.quantize_fp8_blocks(torch.empty(E, inter, H, device=dev).normal_(0.0, std))
            self.gate_up_proj[:, i * inter:(i + 1) * inter] = q
            self.gate_up_proj_scale_inv[:, i * nb:(i + 1) * nb] = s
        q, s = dk.quantize_fp8_blocks(torch.empty(self.down_proj.shape, device=dev).normal_(0.0, std))
        self.down_proj.copy_(q)
        self.down_proj_scale_inv.copy_(s)


def linear(cfg: ModelConfig, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """nn.Linear, or FP8Linear when the checkpoint is FP8 (cfg.quant)."""
    if cfg.quant is not None:
        return FP8Linear(in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def dense_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear's float weight: the parameter itself, or an FP8Linear's dequantised copy (transient)."""
    return mod.dequantized_weight(dtype) if isinstance(mod, FP8Linear) else mod.weight


def keep_float(model: nn.Module, patterns: list[str]) -> None:
    """Replace the FP8Linear modules whose qualified names contain one of `patterns` (quantization_config's
    modules_to_not_convert) by nn.Linear (on the same device: use on the meta device before materialising)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FP8Linear) and any(p in name for p in patterns):
            parent, _, child = name.rpartition(".")
            dev = mod.weight.device
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=dev)
            setattr(model.get_submodule(parent) if parent else model, child, new)


def fp8_param_ids(model: nn.Module) -> set[int]:
    """ids of the e4m3 weights and fp32 block scales: they keep their dtype when the model is cast."""
    return {id(p) for m in model.modules() if isinstance(m, (FP8Linear, FP8Experts))
            for p in m.parameters(recurse=False) if not p.requires_grad}
