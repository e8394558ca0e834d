"""`grpo_compute_loss` — TRL's GRPOTrainer loss with dsmath's fused `grpo_loss` from the policy's last hidden states.

It has the signature of `GRPOTrainer.compute_loss(self, model, inputs, return_outputs=False,
num_items_in_batch=None)`, so a TRL user swaps it in with two lines (TRL is never imported here):

    class DsmathGRPOTrainer(trl.GRPOTrainer):
        compute_loss = dsmath_kernels.hf.grpo_compute_loss

The backbone runs once on prompt + completion; the hidden states at the positions that predict the completion
tokens [B, C, H] go with the LM head weight into `grpo_loss`, which never holds the [B, C, V] logits (TRL's own
path scores them in vocab tiles too, but then applies the loss in PyTorch). Same loss as TRL's `_compute_loss` for
loss_type "grpo", "bnpo", "dr_grpo" and "dapo" with token-level importance sampling, including beta > 0 (k3 KL),
vLLM's sampler-mismatch importance-sampling correction (grpo_loss's token_weights), the temperature, tool masks,
gradient-accumulation scaling and the MoE router aux loss; logs entropy, kl and the
clip_ratio/{low,high,region}_mean metrics as TRL does (not clip_ratio/low_min and high_max). Anything else (cispo,
sapo, vespo, luspo, sequence-level importance sampling, two-sided clipping `delta`, the off-policy mask, entropy
masks or bonus, bias-corrected KL, vision inputs) warns and runs TRL's own
`_compute_loss`. Recipe and a runnable script: examples/trl_grpo.py."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from dsmath_kernels.grpo import grpo_loss
from dsmath_kernels.hf import layers

_LOSS_TYPES = {"grpo": "grpo", "bnpo": "dapo", "dr_grpo": "dr_grpo", "dapo": "dapo"}  # TRL's name -> grpo_loss's
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                "mm_token_type_ids", "image_position_ids", "spatial_shapes")


def unsupported(trainer, inputs) -> str | None:
    """Why the fused path cannot reproduce TRL's loss for this trainer configuration and batch (None: it can)."""
    args = getattr(trainer, "args", None)
    checks = [
        (trainer.loss_type not in _LOSS_TYPES, f"loss_type={trainer.loss_type!r}"),
        (getattr(trainer, "importance_sampling_level", "token") != "token", "sequence-level importance sampling"),
        (getattr(args, "delta", None) is not None, "two-sided clipping (delta)"),
        (getattr(trainer, "off_policy_mask_threshold", None) is not None, "the off-policy sequence mask"),
        (getattr(trainer, "top_entropy_quantile", 1.0) < 1.0, "the high-entropy token mask"),
        (getattr(trainer, "_entropy_bonus_enabled", False), "the entropy bonus"),
        (_vllm_is(trainer) and trainer.loss_type == "vespo", "vLLM importance sampling with vespo"),
        (trainer.beta != 0.0 and getattr(args, "use_bias_correction_kl", False), "bias-corrected KL"),
        (inputs["advantages"].dim() != 1, "per-token advantages"),
        (any(inputs.get(k) is not None for k in _VISION_KEYS), "vision inputs"),
    ]
    return next((why for bad, why in checks if bad), None)


def grpo_compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Drop-in for TRL GRPOTrainer.compute_loss (see module docstring). inputs: TRL's batch dict — prompt_ids /
    prompt_mask [B, P], completion_ids / completion_mask [B, C], advantages [B], optional old_per_token_logps /
    ref_per_token_logps [B, C], tool_mask [B, C], num_items_in_batch. Returns the scalar loss, scaled for gradient
    accumulation as TRL scales it."""
    if return_outputs:
        raise ValueError("The GRPOTrainer does not support returning outputs")
    why = unsupported(trainer, inputs)
    if why is not None:
        layers.fallback("grpo_loss", f"TRL GRPO with {why}",
                        "use loss_type grpo/bnpo/dr_grpo/dapo with token-level importance sampling, or TRL's loss")
        return trainer._compute_loss(model, inputs)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # [B, C]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # [B, P + C]
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    C = completion_ids.size(1)
    mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
    policy = trainer.accelerator.unwrap_model(model)
    if hasattr(policy, "get_base_model"):  # PEFT
        policy = policy.get_base_model()
    backbone = getattr(policy, policy.base_model_prefix)
    extra = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
    autocast = trainer.accelerator.autocast() if hasattr(trainer.accelerator, "autocast") else nullcontext()
    with autocast:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        head = policy.get_output_embeddings().weight  # [V, H]
        hidden, weight = layers.head_operands(out.last_hidden_state[:, -C - 1:-1], head)  # [B, C, H]
    ref = inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None
    tw = None
    if _vllm_is(trainer):  # TRL multiplies the policy term (not the KL) by the sampler-mismatch IS ratio
        tw = inputs["importance_sampling_ratio"].expand(completion_ids.shape)  # [B, C] or [B, 1] -> [B, C]
    loss, metrics = grpo_loss(hidden, weight, completion_ids, mask, inputs["advantages"],
                              old_logprobs=inputs.get("old_per_token_logps"), ref_logprobs=ref, beta=trainer.beta,
                              eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high,
                              temperature=trainer.temperature, loss_type=_LOSS_TYPES[trainer.loss_type],
                              token_weights=tw)
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer.loss_type == "dr_grpo":  # grpo_loss divides by B * C, TRL by B * max_completion_length
        loss = loss * C / trainer.max_completion_length
    if trainer.loss_type == "dapo":  # TRL: sum over tokens / the generation batch's token count per window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / trainer.args.steps_per_generation
        loss = loss * mask.sum().clamp(min=1) / normalizer
    else:
        loss = loss / accumulation
    if trainer.aux_loss_enabled:
        aux = _aux_loss(policy, out, attention_mask)
        loss = loss + trainer.router_aux_loss_coef * aux / accumulation
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux.detach()).mean().item())
    _log(trainer, mode, metrics, mask)
    return loss


def _vllm_is(trainer) -> bool:
    return bool(getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False))


def _aux_loss(policy, out, attention_mask) -> torch.Tensor:
    fn = layers.aux_loss_fn(layers.class_forward(policy))
    if fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as fn  # as TRL does
    cfg = policy.config.get_text_config()
    return fn(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)


def _log(trainer, mode: str, metrics: dict, mask: torch.Tensor) -> None:
    """TRL's global masked means: sum of (local mean * local token count) over processes / total count."""
    count = mask.sum().float()
    names = {"entropy": "entropy", "clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
             "clip": "clip_ratio/region_mean"}
    if trainer.beta != 0.0:
        names["kl"] = "kl"
    for key, name in names.items():
        totals = trainer.accelerator.reduce(torch.stack([metrics[key] * count, count]), reduction="sum")
        trainer._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())
