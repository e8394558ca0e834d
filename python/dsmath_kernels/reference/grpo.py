"""Reference for the GRPO policy loss (DeepSeekMath §4.1, with the DAPO / Dr. GRPO aggregations): group-normalized
advantages, per-token log-probabilities from full logits, the clipped-ratio surrogate and the k3 KL estimator.
This is the naive version: it materializes the [B, T, V] logits, which the fused ops in `dsmath_kernels.grpo`
never do. Tests run it in float64 as the oracle; the bench runs it in the input dtype as the baseline.

Formulas follow TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, `_compute_loss` and `_generate_and_score_completions`):
    A_i      = (r_i - mean(r_group)) / (std(r_group) + eps)            torch.std: unbiased (n - 1), as TRL
    ratio    = exp(logp - old)                                        old = logp.detach() when not given
    l_t      = -w_t * min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
               + beta * (exp(ref - logp) - (ref - logp) - 1)          k3 estimator, only when beta > 0 and ref given
    w_t      = token_weights (detached; 1 when not given): e.g. truncated importance weights
               min(pi_old / pi_sampler, C) correcting a sampler-trainer mismatch (TIS), or 0/1 sequence masks
    "grpo":    mean_b( sum_t m * l / max(sum_t m, 1) )
    "dapo":    sum m * l / max(sum m, 1)                             (TRL "bnpo"; TRL's "dapo" is the same per step)
    "dr_grpo": sum m * l / (B * T)                                   (TRL: B * max_completion_length)
Metrics are masked means over all tokens (as TRL logs them): kl, ratio, entropy, clip_low = ratio < 1 - eps_low
with A < 0, clip_high = ratio > 1 + eps_high with A > 0, clip = either; log_ratio_abs = mean |logp - old| and
log_ratio_abs_max = its masked max (0 without tokens) — with old = the sampler's log-probs on the first, on-policy
pass, the sampler-trainer log-prob gap."""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages_ref(rewards: torch.Tensor, group_size: int, *, normalize: str = "std",
                         eps: float = 1e-4) -> torch.Tensor:
    """rewards [B*G] (groups contiguous) -> advantages [B*G] float32 (float64 for float64 rewards).
    Zero-variance groups (including group_size == 1) get exactly zero advantage."""
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # [B, G]
    centered = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if normalize == "std":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # [B, 1] unbiased
        centered = centered / (std + eps)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # [B, 1] zero variance
    return torch.where(flat, torch.zeros_like(centered), centered).view(-1)


def token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float = 1.0) -> torch.Tensor:
    """hidden [B, T, H], weight [V, H], targets [B, T] -> log softmax(hidden @ weight.T / temperature)[targets]
    [B, T] in float32 (float64 for float64 inputs)."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden.to(dt) @ weight.to(dt).T) / temperature  # [B, T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [B, T]


def token_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T / temperature) per token, [B, T]."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logp = torch.log_softmax((hidden.to(dt) @ weight.to(dt).T) / temperature, dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)


def per_token_loss_ref(logp: torch.Tensor, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
                       ref_logprobs: torch.Tensor | None, beta: float, eps_low: float, eps_high: float,
                       token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp [B, T] (differentiable), advantages [B], token_weights [B, T] or None (multiplies the policy-gradient
    term) -> (loss [B, T], ratio [B, T], kl [B, T] or zeros)."""
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logp - old)  # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    if token_weights is not None:
        loss = loss * token_weights.to(logp.dtype)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        d = ref_logprobs.to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1  # [B, T] k3
        if beta > 0:
            loss = loss + beta * kl
    return loss, ratio, kl


def aggregate_ref(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """loss [B, T], mask [B, T] -> scalar per `loss_type` (see module docstring)."""
    m = mask.to(loss.dtype)
    loss = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    if loss_type == "grpo":
        return (loss.sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return loss.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return loss.sum() / mask.numel()
    raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {loss_type!r}")


def masked_mean_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1).to(x.dtype)


def masked_max_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of x >= 0 over the mask (0 when the mask is empty)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x)).amax() if x.numel() else x.new_zeros(())


def log_ratio_metrics_ref(logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """|logp - old| over the mask: mean and max (the sampler-trainer gap when old is the sampler's)."""
    d = (logp - old).abs()
    return {"log_ratio_abs": masked_mean_ref(d, mask), "log_ratio_abs_max": masked_max_ref(d, mask)}


def grpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  advantages: torch.Tensor, *, old_logprobs: torch.Tensor | None = None,
                  ref_logprobs: torch.Tensor | None = None, beta: float = 0.04, eps_low: float = 0.2,
                  eps_high: float = 0.2, temperature: float = 1.0, loss_type: str = "grpo",
                  token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """hidden [B, T, H], weight [V, H], targets [B, T], mask [B, T] bool, advantages [B], old/ref/token_weights
    [B, T] -> (scalar loss, metrics {kl, ratio, clip_low, clip_high, clip, entropy, log_ratio_abs,
    log_ratio_abs_max} as 0-d tensors)."""
    logp = token_logprobs_ref(hidden, weight, targets, temperature=temperature)  # [B, T]
    loss_t, ratio, kl = per_token_loss_ref(logp, advantages, old_logprobs, ref_logprobs, beta, eps_low, eps_high,
                                           token_weights)
    loss = aggregate_ref(loss_t, mask, loss_type)
    with torch.no_grad():
        adv = advantages.to(logp.dtype).unsqueeze(1)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logp.dtype)
        ent = token_entropy_ref(hidden, weight, temperature=temperature)
        metrics = {"kl": masked_mean_ref(kl, mask), "ratio": masked_mean_ref(ratio, mask),
                   "clip_low": masked_mean_ref(low, mask), "clip_high": masked_mean_ref(high, mask),
                   "clip": masked_mean_ref(torch.maximum(low, high), mask), "entropy": masked_mean_ref(ent, mask),
                   **log_ratio_metrics_ref(logp, logp if old_logprobs is None else old_logprobs.to(logp.dtype),
                                           mask)}
    return loss, {k: v.detach() for k, v in metrics.items()}
