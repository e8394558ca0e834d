"""Reference for `route_topk` (MoE gating): softmax / sigmoid scores, optional group-limited selection, top-k,
renormalization and scaling — as in DeepSeek-V2 (softmax, group-limited greedy), DeepSeek-V3 (sigmoid + bias,
groups ranked by their top-2 sum) and Qwen3-MoE / Mixtral (softmax top-k).

Tie and NaN rules (the kernels follow them exactly): ranking is by value, larger first, ties broken by the lower
expert id; a NaN ranks below every number. Rows come out sorted by descending weight (ties: lower id)."""

from __future__ import annotations

import torch


def _rank(key: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices sorting each row by (eligible first, key descending, index ascending). key: [T, N] float."""
    key = key.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [T, N]
    if eligible is not None:
        elig_sorted = eligible.gather(-1, order).to(torch.int8)
        order = order.gather(-1, torch.sort(elig_sorted, dim=-1, descending=True, stable=True).indices)
    return order


def route_topk_ref(
    logits: torch.Tensor,  # [T, E]
    top_k: int,
    *,
    scoring: str = "softmax",
    bias: torch.Tensor | None = None,  # [E]
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [T, K] float32, ids [T, K] int32). Differentiable w.r.t. logits through weights."""
    T, E = logits.shape
    x = logits.float()  # [T, E]
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)  # [T, E]
    choice = scores + bias.float() if (scoring == "sigmoid" and bias is not None) else scores  # [T, E]
    choice = choice.detach()

    eligible = None
    if n_group > 1:
        key = choice.nan_to_num(nan=float("-inf")).view(T, n_group, E // n_group)  # [T, G, E/G]
        if scoring == "softmax":
            group_scores = key.max(dim=-1).values  # [T, G]
        else:
            group_scores = key.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]  top-2 sum (DeepSeek-V3)
        groups = _rank(group_scores)[:, :topk_group]  # [T, topk_group]
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, groups, True)
        eligible = group_mask.repeat_interleave(E // n_group, dim=1)  # [T, E]

    ids = _rank(choice, eligible)[:, :top_k]  # [T, K]  selection order
    ids = ids.sort(dim=-1).values  # ascending ids, so the stable sort below breaks weight ties by lower id
    weights = scores.gather(1, ids)  # [T, K]
    order = _rank(weights.detach())
    ids = ids.gather(1, order)
    weights = weights.gather(1, order)  # [T, K] descending

    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def route_topk_weights_ref(
    logits: torch.Tensor,  # [T, E]
    ids: torch.Tensor,  # [T, K] given experts (routing replay)
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Gating weights [T, K] float32 of the given experts, in the given order: scores[ids], / (sum + 1e-20) if
    renormalize, * routed_scaling_factor — route_topk_ref's weights without its selection. Differentiable."""
    x = logits.float()  # [T, E]
    scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)  # [T, E]
    weights = scores.gather(1, ids.long())  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor
