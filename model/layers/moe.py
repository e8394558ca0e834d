"""Feed-forward blocks: the SiLU-gated MLP (dense layers, DeepSeek's shared experts) and the MoE block
(router -> dsmath_kernels.route_topk -> dsmath_kernels.moe_experts, plus shared experts).

Expert weights are stored fused as transformers holds them in memory: gate_up_proj [E, 2I, H] (gate rows first,
then up) and down_proj [E, H, I]; the loader fills them from per-expert checkpoint tensors. FP8 checkpoints
(cfg.quant) get FP8 linears and experts (layers/fp8.py).
Letters: T tokens, H hidden, E experts, K top-k, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dsmath_kernels as dk

from ..config import ModelConfig
from .fp8 import FP8Experts, linear


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, bias: bool = False, cfg: ModelConfig | None = None):
        super().__init__()
        make = (lambda i, o: linear(cfg, i, o, bias)) if cfg is not None else (lambda i, o: nn.Linear(i, o, bias))
        self.gate_proj = make(hidden, inter)
        self.up_proj = make(hidden, inter)
        self.down_proj = make(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """gate.weight [E, H]; DeepSeek-V3 adds e_score_correction_bias [E] (a buffer: updated by load balancing,
    not by gradients). DeepSeek computes the logits in float32 (transformers keeps gate.weight in fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.scoring == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E]."""
        if self.cfg.router_fp32:
            return F.linear(x.float(), self.weight.float())  # [T, E]
        return F.linear(x, self.weight.to(x.dtype))  # [T, E]

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gating's own choice: logits [T, E] -> weights [T, K] float32, ids [T, K] int32."""
        c = self.cfg
        return dk.route_topk(logits, c.num_experts_per_tok, scoring=c.scoring, bias=self.e_score_correction_bias,
                             n_group=c.n_group, topk_group=c.topk_group, renormalize=c.renormalize,
                             routed_scaling_factor=c.routed_scaling_factor)

    def replay(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routing replay: weights [T, K] float32 of the given experts ids [T, K], from these logits, renormalised
        and scaled exactly as `select` does (differentiable: the router still gets gradients)."""
        c = self.cfg
        return dk.route_topk_weights(logits, ids, scoring=c.scoring, renormalize=c.renormalize,
                                     routed_scaling_factor=c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, K] float32, ids [T, K] int32."""
        return self.select(self.logits(x))


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))  # [E, H, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return dk.moe_experts(x, self.gate_up_proj, self.down_proj, weights, ids)  # weights float32


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = FP8Experts(cfg) if cfg.quant is not None else Experts(cfg)
        n = cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n, cfg.mlp_bias, cfg) if n else None

    def route(self, x: torch.Tensor, routing: torch.Tensor | None = None, return_routing: bool = False):
        """x [T, H] -> (weights [T, K] float32, ids [T, K] int32 used, the gate's own ids or None): the gate's
        top-k, or with routing [..., K] the replayed experts (weights from the logits at them)."""
        logits = self.gate.logits(x)  # [T, E]
        if routing is None:
            weights, ids = self.gate.select(logits)  # [T, K]
            return weights, ids, ids
        ids = routing.reshape(-1, routing.shape[-1]).to(torch.int32)  # [T, K]
        own = self.gate.select(logits.detach())[1] if return_routing else None
        return self.gate.replay(logits, ids), ids, own

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None,
                return_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [..., H] -> [..., H]. routing [..., K] int: replay — use these experts instead of the gate's top-k,
        with weights recomputed from the router logits at those ids. return_routing: also return the ids [..., K]
        int32 the gate's own top-k picks (with routing given: computed from the same logits, not used)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids, own = self.route(x, routing, return_routing)  # [T, K]
        out = self.experts(x, weights, ids)  # [T, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        out = out.view(shape)
        return (out, own.view(*shape[:-1], own.shape[-1])) if return_routing else out
