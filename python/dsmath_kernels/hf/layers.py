"""The forwards that `dsmath_kernels.patch` puts in place of transformers' own, and the checks that decide whether a
module can take them. Nothing here imports transformers: modules are recognised by class name (anywhere in their
MRO, so FSDP2's wrapper classes still match) and by their attributes.

- router:  transformers 5 MoE routers return (router_logits [T, E], weights [T, K], ids [T, K]); `router_forward`
  computes the same logits with the module's own weight and replaces scoring + (group-limited) top-k +
  renormalize + scale with `route_topk`. Which gating mode: a `RoutePlan`, read from the module (set from the
  config by transformers).
- experts: transformers 5 experts modules hold fused `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
  `down_proj` [E, H, I] and take (hidden [T, H], ids [T, K], weights [T, K]); `experts_forward` runs them through
  `moe_experts` (permutation + grouped GEMM, forward and backward) on those very tensors, no copy.
- causal LM: `make_causal_lm_forward` wraps a *ForCausalLM forward; with labels in training mode it runs the
  backbone and takes the loss from the final hidden states with `linear_cross_entropy` (no [B, T, V] logits, and
  `logits` is None in the output); otherwise it is the original forward.
A module patched at class level (`patch_class`) that turns out not to fit (e.g. a non-SiLU expert) takes its
original forward with a warning naming the op, the reason and the fix."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsmath_kernels.cross_entropy import linear_cross_entropy
from dsmath_kernels.moe import moe_experts
from dsmath_kernels.routing import route_topk

MARK = "_dsmath_kernel"  # attribute naming the kernel on every forward defined here
ORIGINAL = "_dsmath_original"  # on a class-level replacement: the class's own forward it replaced


# ---------------------------------------------------------------------------------------------------- fallbacks
def fallback(op: str, reason: str, fix: str) -> None:
    """Tell the user a patched module takes transformers' own forward (DEVGUIDE principle 5: no silent fallback)."""
    warnings.warn(f"dsmath {op}: {reason}; running transformers' own forward instead. Fix: {fix}", RuntimeWarning,
                  stacklevel=3)


def class_forward(module: torch.nn.Module):
    """The forward the module's class defines (unwrapping a dsmath class-level patch), as a plain function."""
    for cls in type(module).__mro__:
        f = cls.__dict__.get("forward")
        if f is not None:
            return getattr(f, ORIGINAL, f)
    raise TypeError(f"{type(module).__name__} has no forward")


def class_names(module: torch.nn.Module) -> list[str]:
    return [c.__name__ for c in type(module).__mro__]


# ------------------------------------------------------------------------------------------------------- router
class RoutePlan(NamedTuple):
    """route_topk arguments for one router, plus the dtype conventions of its module."""
    scoring: str  # "softmax" | "sigmoid"
    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scale: float  # routed_scaling_factor
    bias: str | None  # attribute holding the selection bias (DeepSeek-V3 e_score_correction_bias), or None
    logits_fp32: bool  # logits = linear(x.float(), W.float()) (DeepSeek) rather than linear(x, W) (Qwen)
    weights_fp32: bool  # weights returned in fp32 (DeepSeek) rather than in the logits dtype (Qwen)

    def describe(self) -> str:
        s = f"route_topk({self.scoring}, top_k={self.top_k}"
        if self.n_group > 1:
            s += f", n_group={self.n_group}, topk_group={self.topk_group}"
        if self.bias:
            s += f", bias={self.bias}"
        s += f", renormalize={self.renormalize}"
        if self.scale != 1.0:
            s += f", scale={self.scale:g}"
        return s + ")"


def _deepseek_v2_plan(r) -> RoutePlan | str:
    method = getattr(r, "topk_method", None)
    if method not in ("greedy", "group_limited_greedy"):
        return f"topk_method={method!r} (dsmath serves 'greedy' and 'group_limited_greedy')"
    grouped = method == "group_limited_greedy"
    return RoutePlan("softmax", r.top_k, r.num_group if grouped else 1, r.topk_group if grouped else 1, False,
                     float(r.routed_scaling_factor), None, True, True)


def _deepseek_v3_plan(r) -> RoutePlan | str:
    return RoutePlan("sigmoid", r.top_k, r.num_group, r.topk_group, bool(r.norm_topk_prob),
                     float(r.routed_scaling_factor), "e_score_correction_bias", True, True)


def _qwen_plan(r) -> RoutePlan | str:
    return RoutePlan("softmax", r.top_k, 1, 1, bool(r.norm_topk_prob), 1.0, None, False, False)


# Routers whose forward we have read (transformers 5.17 and 5.24): class name -> plan from the module's attributes.
KNOWN_ROUTERS = {
    "DeepseekV2TopkRouter": _deepseek_v2_plan,
    "DeepseekV3TopkRouter": _deepseek_v3_plan,
    "Qwen3MoeTopKRouter": _qwen_plan,
}


def known_route_plan(router: torch.nn.Module) -> RoutePlan | str | None:
    """Plan of a router class we know (None for any other class), or the reason it cannot be served."""
    for name in class_names(router):
        if name in KNOWN_ROUTERS:
            try:
                return KNOWN_ROUTERS[name](router)
            except AttributeError as e:
                return f"{name} lacks an attribute dsmath reads ({e})"
    return None


def candidate_route_plans(router: torch.nn.Module, config, logits_fp32: bool, weights_fp32: bool,
                          top_k: int) -> list[RoutePlan]:
    """Gating modes an unknown router may implement, from its attributes and the model config (DeepSeek-V3-style
    when it holds an e_score_correction_bias or the config says scoring_func="sigmoid"; DeepSeek-V2-style when it
    has a topk_method; else softmax top-k with or without renormalization). The patcher keeps the one that
    reproduces the module's own outputs on a probe batch."""
    def attr(*names, default=None):
        for n in names:
            for src in (router, config):
                v = getattr(src, n, None)
                if v is not None:
                    return v
        return default

    scale = float(attr("routed_scaling_factor", default=1.0))
    n_group = int(attr("num_group", "n_group", default=1))
    topk_group = int(attr("topk_group", default=1))
    norm = attr("norm_topk_prob")
    norms = [bool(norm), not bool(norm)] if norm is not None else [True, False]
    plans = []
    if getattr(router, "e_score_correction_bias", None) is not None or attr("scoring_func") == "sigmoid":
        bias = "e_score_correction_bias" if getattr(router, "e_score_correction_bias", None) is not None else None
        plans += [RoutePlan("sigmoid", top_k, n_group, topk_group, n, scale, bias, logits_fp32, weights_fp32)
                  for n in norms]
    method = attr("topk_method")
    if method == "group_limited_greedy":
        plans += [RoutePlan("softmax", top_k, n_group, topk_group, n, scale, None, logits_fp32, weights_fp32)
                  for n in norms]
    plans += [RoutePlan("softmax", top_k, 1, 1, n, scale, None, logits_fp32, weights_fp32) for n in norms]
    return plans


def route(router: torch.nn.Module, plan: RoutePlan, hidden_states: torch.Tensor):
    """(router_logits [T, E], weights [T, K], ids [T, K] int64) as transformers' routers return them."""
    w = router.weight  # [E, H]
    x = hidden_states.reshape(-1, w.shape[1])  # [T, H]
    logits = F.linear(x.float(), w.float()) if plan.logits_fp32 else F.linear(x, w)  # [T, E]
    bias = getattr(router, plan.bias) if plan.bias else None
    weights, ids = route_topk(logits, plan.top_k, scoring=plan.scoring, bias=bias, n_group=plan.n_group,
                              topk_group=plan.topk_group, renormalize=plan.renormalize,
                              routed_scaling_factor=plan.scale)  # [T, K] fp32, [T, K] int32
    if not plan.weights_fp32:
        weights = weights.to(logits.dtype)
    return logits, weights, ids.long()  # int64 as torch.topk gives (an unpatched experts module one-hots them)


def router_forward(self, hidden_states):
    """Replacement forward of a transformers MoE router (see module docstring)."""
    plan = self.__dict__.get("_dsmath_plan")
    if plan is None:  # class-level patch: read the plan from the instance
        plan = known_route_plan(self)
        if not isinstance(plan, RoutePlan):
            fallback("route_topk", f"{type(self).__name__}: {plan or 'unknown router class'}",
                     "patch this model with dsmath_kernels.patch(model), which probes and reports unknown routers")
            return class_forward(self)(self, hidden_states)
    return route(self, plan, hidden_states)


setattr(router_forward, MARK, "route_topk")


# ------------------------------------------------------------------------------------------------------ experts
def compute_dtype(t: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype transformers' F.linear calls compute in: autocast's under autocast, else `default` (the
    weights')."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else default


def _is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def experts_problem(experts: torch.nn.Module) -> str | None:
    """Why `moe_experts` cannot run this experts module on its own tensors (None: it can)."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)):
        return ("no fused gate_up_proj/down_proj tensors (transformers < 5 keeps a ModuleList of per-expert MLPs; "
                "dsmath needs transformers >= 5)")
    if gu.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj {list(gu.shape)} / down_proj {list(down.shape)} are not 3-D [E, ., .] tensors"
    if getattr(experts, "is_transposed", False) or getattr(experts, "experts_are_transposed", False):
        return "transposed expert layout [E, H, 2I] (dsmath takes [E, 2I, H])"
    if not getattr(experts, "is_concatenated", True):
        return "interleaved gate/up rows (dsmath takes gate rows, then up rows)"
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        return "expert biases (dsmath's expert GEMMs have none)"
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        return "experts without a gated (SwiGLU) MLP or with a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert-parallel sharding (sentinel expert ids)"
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return f"custom gate activation {type(experts).__name__}._apply_gate"
    if not _is_silu(getattr(experts, "act_fn", None)):
        return f"activation {type(getattr(experts, 'act_fn', None)).__name__} (dsmath's experts use SiLU)"
    E, I2, H = gu.shape
    if I2 % 2 or list(down.shape) != [E, H, I2 // 2]:
        return f"gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} are not [E, 2I, H] and [E, H, I]"
    if gu.dtype != down.dtype:
        return f"gate_up_proj ({gu.dtype}) and down_proj ({down.dtype}) differ in dtype"
    return None


def run_experts(experts: torch.nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' experts call -> moe_experts on the module's own tensors; out [T, H] in hidden's dtype."""
    w1, w2 = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
    dt = compute_dtype(hidden_states, w1.dtype)
    x, w1, w2 = hidden_states.to(dt), w1.to(dt), w2.to(dt)  # [T, H]
    weights = top_k_weights.float()  # [T, K]
    if weights.shape != top_k_index.shape:  # dense [T, E] routing weights
        weights = weights.gather(1, top_k_index.long())
    return moe_experts(x, w1, w2, weights, top_k_index).to(hidden_states.dtype)


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Replacement forward of a transformers 5 experts module (see module docstring)."""
    problem = experts_problem(self)
    if problem is not None:
        fallback("moe_experts", f"{type(self).__name__}: {problem}",
                 "leave experts unpatched for this model: dsmath_kernels.patch(model, experts=False)")
        return class_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return run_experts(self, hidden_states, top_k_index, top_k_weights)


setattr(experts_forward, MARK, "moe_experts")


# ------------------------------------------------------------------------------------------------- causal LM loss
LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def lm_loss_problem(model: torch.nn.Module) -> str | None:
    """Why the fused loss cannot replace this causal LM's (None: it can)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        return "no nn.Linear LM head (not a *ForCausalLM)"
    if head.bias is not None:
        return "LM head with a bias"
    fwd = class_forward(model)
    params = inspect.signature(fwd).parameters
    if "labels" not in params or not hasattr(model, getattr(model, "base_model_prefix", "") or "model"):
        return f"{type(model).__name__}.forward has no labels argument or no backbone attribute"
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in LOGIT_SCALES:
        if getattr(text_cfg, name, None) not in (None, 1.0):
            return f"logits are scaled or soft-capped (config.{name})"
    loss_fn = getattr(model, "loss_function", None)
    if getattr(loss_fn, "__name__", "") != "ForCausalLMLoss":
        return f"loss function {getattr(loss_fn, '__name__', loss_fn)!r} is not transformers' ForCausalLMLoss"
    if hasattr(model, "router_aux_loss_coef") and (aux_loss_fn(fwd) is None or not hasattr(model, "num_experts")
                                                   or not hasattr(model, "num_experts_per_tok")):
        return "a router aux loss dsmath does not know how to compute (no load_balancing_loss_func)"
    return None


def aux_loss_fn(fwd):
    return getattr(sys.modules.get(getattr(fwd, "__module__", ""), None), "load_balancing_loss_func", None)


def _output_class(fwd):
    cls = inspect.signature(fwd).return_annotation
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and "loss" in {f.name for f in dataclasses.fields(cls)}:
        return cls
    from transformers.modeling_outputs import CausalLMOutputWithPast  # only reached when patching is called

    return CausalLMOutputWithPast


def head_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and LM head weight in the dtype the unpatched nn.Linear would multiply them in: the autocast dtype
    under autocast, else the weight's (a DTensor weight, FSDP2-sharded, is gathered first)."""
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    dt = compute_dtype(hidden, weight.dtype)
    return hidden.to(dt), weight.to(dt)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch=None,
                   ignore_index: int = -100) -> torch.Tensor:
    """transformers' ForCausalLMLoss (position t predicts labels[t + 1], or shift_labels[t] when given; mean over
    non-ignored targets, or sum / num_items_in_batch) from hidden [B, T, H] and the head weight [V, H]."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # [B, T]
    hidden, weight = head_operands(hidden, weight)
    shift_labels = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, shift_labels, ignore_index=ignore_index)
    total = linear_cross_entropy(hidden, weight, shift_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def make_causal_lm_forward(orig):
    """A *ForCausalLM forward around `orig` (transformers' own, the can_return_tuple-wrapped function): with labels
    in training mode (or `skip_logits=True`) the loss comes from `causal_lm_loss` and `logits` is None; otherwise
    (generation, eval, no labels, `skip_logits=False`) it is `orig` unchanged."""
    names = list(inspect.signature(orig).parameters)[1:]  # without self; positional order of orig
    out_cls = _output_class(orig)
    out_fields = [f.name for f in dataclasses.fields(out_cls)]
    aux_fn = aux_loss_fn(orig)

    @functools.wraps(orig)  # keeps orig's signature visible: generate() inspects it (logits_to_keep, kwargs)
    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        call = dict(zip(names, args))
        call.update(kwargs)
        labels = call.get("labels")
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        if not skip_logits:
            return orig(self, *args, **kwargs)
        if labels is None and call.get("shift_labels") is None:
            raise ValueError("skip_logits=True needs labels (the fused loss is the only output without logits)")
        keep = call.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            fallback("linear_cross_entropy", f"logits_to_keep={keep!r} with labels", "pass logits_to_keep=0")
            return orig(self, *args, **kwargs)
        return _fused_causal_lm(self, call, out_cls, out_fields, aux_fn, "output_router_logits" in names)

    setattr(forward, MARK, "linear_cross_entropy")
    setattr(forward, ORIGINAL, orig)
    return forward


def _fused_causal_lm(self, call: dict, out_cls, out_fields, aux_fn, has_router_arg: bool):
    cfg = self.config
    return_dict = call.pop("return_dict", None)
    return_dict = getattr(cfg, "return_dict", True) if return_dict is None else return_dict
    labels = call.pop("labels")
    if has_router_arg and call.get("output_router_logits") is None:
        call["output_router_logits"] = getattr(cfg, "output_router_logits", False)
    # as the original forward: every other argument (num_items_in_batch, shift_labels, ...) goes to the backbone too
    out = getattr(self, self.base_model_prefix)(**call)
    loss = causal_lm_loss(out[0], self.get_output_embeddings().weight, labels, shift_labels=call.get("shift_labels"),
                          num_items_in_batch=call.get("num_items_in_batch"),
                          ignore_index=call.get("ignore_index", -100))
    aux = None
    if call.get("output_router_logits") and hasattr(self, "router_aux_loss_coef"):
        aux = aux_fn(out.router_logits, self.num_experts, self.num_experts_per_tok, call.get("attention_mask"))
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
    fields = {f: getattr(out, f, None) for f in out_fields if f not in ("loss", "aux_loss", "logits")}
    fields = {k: v for k, v in fields.items() if v is not None}
    if "aux_loss" in out_fields:
        fields["aux_loss"] = aux
    output = out_cls(loss=loss, logits=None, **fields)
    return output if return_dict else output.to_tuple()
