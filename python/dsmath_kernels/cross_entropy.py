"""`linear_cross_entropy` — the causal-LM loss from final hidden states and the LM head weight, without the [N, V]
logits: -log softmax(hidden @ weight.T)[target] per token, from `token_logprobs` (grpo.py), which streams over vocab
chunks with an online log-sum-exp forward and recomputes each chunk in the backward. Targets equal to
`ignore_index` (-100, as transformers' labels) contribute nothing. What transformers' patched causal-LM forward
(`dsmath_kernels.hf`) calls when labels are given. Spec: reference/grpo.py `token_logprobs_ref` (negated)."""

from __future__ import annotations

import torch

from dsmath_kernels._checks import FLOAT_DTYPES, check_choice, check_tensor
from dsmath_kernels.grpo import INDEX_DTYPES, token_logprobs

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", temperature: float = 1.0,
                         backend: str | None = None) -> torch.Tensor:
    """hidden [..., H], weight [V, H] (same float dtype), targets [...] int (ids in [0, V) or `ignore_index`)
    -> cross entropy of softmax(hidden @ weight.T / temperature) against targets, in float32:
    "none": [...] per token (0 where ignored); "sum": 0-d sum; "mean": 0-d sum / number of non-ignored targets
    (0 when every target is ignored, where torch's cross_entropy gives NaN). Never materializes [N, V] logits;
    differentiable w.r.t. hidden and weight. backend: None (auto), "triton" or "torch" (as token_logprobs)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, device=hidden.device)
    check_choice("reduction", reduction, REDUCTIONS)
    if hidden.dim() < 1 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: expected shape {list(hidden.shape[:-1])} (hidden without its last dim), got "
                         f"{list(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    H = hidden.shape[-1]
    valid = targets != ignore_index  # [...]
    t = torch.where(valid, targets, torch.zeros_like(targets))
    logp = token_logprobs(hidden.reshape(1, -1, H), weight, t.reshape(1, -1), temperature=temperature,
                          backend=backend)  # [1, N] fp32
    nll = torch.where(valid, -logp.view(targets.shape), torch.zeros_like(logp).view(targets.shape))  # [...]
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)
