"""`patch(model)`: dsmath kernels inside a loaded transformers model, in place, without copying a weight.

Found by walking the modules (so the same code serves DeepSeek-V2/V3, Qwen3-MoE and any other transformers 5 MoE
with the same layout):
  experts   a module holding 3-D `gate_up_proj` / `down_proj` tensors (transformers 5's fused layout);
  router    its parent's `gate` (or `router`) module;
  LM head   the model itself when it is a *ForCausalLM whose forward takes labels.
Routers of the three named families use the gating mode read from their attributes; any other router gets the
mode its attributes and the config suggest, kept only if it reproduces the module's own outputs on a probe batch
(seeded, no gradients, RNG state untouched). Experts are checked for layout (no bias, not transposed, SiLU gate)
and probed the same way. Everything is decided first; only then are modules changed, so a refusal leaves the model
as it was. The report lists every patched module path with its kernel, and what was left and why.

Patching binds a forward on each instance (`module.forward`), as Liger-Kernel's instance patching does;
`unpatch(model)` removes them. `patch_class("deepseek_v3")` replaces the forwards on the classes, for models not
loaded yet (as Liger's `apply_liger_kernel_to_*`); `unpatch_class` restores them."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
from collections import Counter

import torch

from dsmath_kernels.hf import layers
from dsmath_kernels.hf.layers import MARK, ORIGINAL, RoutePlan

PROBE_TOKENS = 64
SUPPORTED = "DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Qwen3MoeForCausalLM"
MODEL_TYPES = {  # patch_class: model_type -> (router class, experts class, causal LM class)
    "deepseek_v2": ("DeepseekV2TopkRouter", "DeepseekV2Experts", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3TopkRouter", "DeepseekV3Experts", "DeepseekV3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeTopKRouter", "Qwen3MoeExperts", "Qwen3MoeForCausalLM"),
}
NO_RMSNORM = "dsmath_kernels has no fused RMSNorm kernel (torch.compile fuses transformers' RMSNorm well)"


class UnsupportedModelError(ValueError):
    """The model has nothing dsmath can patch; it was left unchanged."""


@dataclasses.dataclass
class PatchReport:
    """What `patch` / `patch_class` did. patched: (module path or class, what, kernel); left: (module path or
    class, what, reason)."""
    model: str
    patched: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def paths(self, what: str | None = None) -> list[str]:
        return [p for p, w, _ in self.patched if what is None or w == what]

    def __str__(self) -> str:
        lines = [f"dsmath_kernels.patch({self.model}): {len(self.patched)} patched, {len(self.left)} left"]
        for title, rows in (("patched", self.patched), ("left", self.left)):
            groups = Counter((w, k) for _, w, k in rows)
            for (what, detail), n in groups.items():
                first = next(p for p, w, k in rows if (w, k) == (what, detail))
                lines.append(f"  {title:7s} {what:8s} x{n:<4d} e.g. {first or '(model)'}: {detail}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ discovery
def _experts_modules(model: torch.nn.Module):
    """(path, experts module, router path, router module or None) for each MoE layer."""
    found = []
    for path, parent in model.named_modules():
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        router, rname = None, None
        for name in ("gate", "router"):
            cand = getattr(parent, name, None)
            if isinstance(cand, torch.nn.Module):
                router, rname = cand, name
                break
        prefix = f"{path}." if path else ""
        found.append((f"{prefix}experts", experts, f"{prefix}{rname}" if router is not None else None, router))
    return found


def _rmsnorms(model: torch.nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def _first_param(module: torch.nn.Module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None)


def _probe_input(module: torch.nn.Module, width: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # a private generator: the user's RNG streams are untouched
    p = _first_param(module)
    return torch.randn(PROBE_TOKENS, width, generator=g).to(device=p.device, dtype=dtype)


def _dense(weights: torch.Tensor, ids: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], E, dtype=torch.float64, device=ids.device).scatter(1, ids.long(),
                                                                                       weights.double())


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


@torch.no_grad()
def _probe_router(router, plan: RoutePlan, x: torch.Tensor) -> str | None:
    """None when `plan` reproduces the router's own forward on x, else what differs."""
    ref = layers.class_forward(router)(router, x)
    if not (isinstance(ref, tuple) and len(ref) == 3):
        return "its forward does not return (router_logits, weights, ids)"
    logits0, w0, ids0 = ref
    if logits0.dim() != 2 or w0.shape != ids0.shape or ids0.shape[1] != plan.top_k:
        return f"its outputs have shapes {[list(t.shape) for t in ref]}, not [T, E], [T, K], [T, K]"
    try:
        logits1, w1, ids1 = layers.route(router, plan, x)
    except (ValueError, TypeError) as e:
        return f"route_topk refuses its configuration ({e})"
    if logits1.dtype != logits0.dtype or w1.dtype != w0.dtype:
        return f"dtypes differ (logits {logits0.dtype} vs {logits1.dtype}, weights {w0.dtype} vs {w1.dtype})"
    if not torch.allclose(logits1, logits0, rtol=_tol(logits0.dtype), atol=_tol(logits0.dtype)):
        return "its router logits are not linear(x, gate.weight)"
    E, tol = logits0.shape[1], _tol(w0.dtype) * max(w0.abs().max().item(), 1e-30)
    diff = (_dense(w1, ids1, E) - _dense(w0, ids0, E)).abs().amax(1)  # [T]
    # Rows may differ where experts tie on the selection key (common with bf16 logits: torch.topk breaks ties its
    # own way, route_topk by lower id): fine when both picks have equal keys and equal sorted weights.
    key = _selection_key(router, plan, logits0)  # [T, E]
    same_keys = (key.gather(1, ids0.long()).sort(1).values == key.gather(1, ids1.long()).sort(1).values).all(1)
    same_w = (w0.double().sort(1).values - w1.double().sort(1).values).abs().amax(1) <= tol
    bad = (diff > tol) & ~(same_keys & same_w)
    if bad.any():
        return (f"its routing weights or chosen experts differ from {plan.describe()} on {int(bad.sum())} of "
                f"{len(bad)} probe tokens (max abs diff {diff.max().item():.3g})")
    return None


def _selection_key(router, plan: RoutePlan, logits: torch.Tensor) -> torch.Tensor:
    """The score experts are ranked by: the logit (softmax is monotone), or sigmoid + bias (DeepSeek-V3)."""
    x = logits.float()
    if plan.scoring == "softmax":
        return x
    key = torch.sigmoid(x)
    return key + getattr(router, plan.bias).float() if plan.bias else key


def _plan_router(router, config, dtype) -> tuple[RoutePlan | None, str]:
    """(plan, kernel description) or (None, reason)."""
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or router.weight.dim() != 2:
        return None, f"{type(router).__name__} has no [E, H] weight"
    known = layers.known_route_plan(router)
    if isinstance(known, str):
        return None, known
    if router.weight.is_meta:
        return (known, known.describe()) if known else (None, "unknown router on the meta device (cannot probe)")
    x = _probe_input(router, router.weight.shape[1], dtype)
    if known is not None:
        problem = _probe_router(router, known, x)
        return (None, f"{type(router).__name__}: {problem}") if problem else (known, known.describe())
    with torch.no_grad():
        ref = layers.class_forward(router)(router, x)
    if not (isinstance(ref, tuple) and len(ref) == 3 and ref[2].dim() == 2):
        return None, f"{type(router).__name__}'s forward does not return (router_logits, weights, ids)"
    logits_fp32, weights_fp32 = ref[0].dtype == torch.float32, ref[1].dtype == torch.float32
    for plan in layers.candidate_route_plans(router, config, logits_fp32, weights_fp32, ref[2].shape[1]):
        if _probe_router(router, plan, x) is None:
            return plan, plan.describe() + " (probed)"
    return None, f"{type(router).__name__}: its outputs match none of dsmath's routing modes on a probe batch"


@torch.no_grad()
def _probe_experts(experts, plan: RoutePlan | None, router, dtype) -> str | None:
    """None when moe_experts reproduces this (layout-checked) experts module's own forward on a probe batch."""
    gu = experts.gate_up_proj
    if gu.is_meta:
        return None
    E, _, H = gu.shape
    x = _probe_input(experts, H, gu.dtype)
    if router is not None and plan is not None:
        _, w, ids = layers.route(router, plan, x.to(dtype))
    else:  # a fixed routing: each token to K distinct experts with positive weights
        K = min(2, E)
        ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(i))[:K] for i in range(len(x))])
        ids, w = ids.to(gu.device), torch.full(ids.shape, 1.0 / K, device=gu.device)
    ref = layers.class_forward(experts)(experts, x, ids, w)
    out = layers.run_experts(experts, x, ids, w)
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    if not (err <= _tol(gu.dtype)):
        return f"{type(experts).__name__}: moe_experts differs from its forward on a probe batch (rel err {err:.3g})"
    return None


# -------------------------------------------------------------------------------------------------------- binding
def _is_ours(fn) -> bool:
    return getattr(getattr(fn, "__func__", fn), MARK, None) is not None


def _instance_patched(module) -> bool:
    return _is_ours(module.__dict__.get("forward")) or _is_ours(type(module).forward)


def _bind(module: torch.nn.Module, fn, **state) -> None:
    if "forward" in module.__dict__:
        module.__dict__["_dsmath_prev_forward"] = module.__dict__["forward"]
    module.__dict__.update({f"_dsmath_{k}": v for k, v in state.items()})
    module.forward = types.MethodType(fn, module)


def _unbind(module: torch.nn.Module) -> bool:
    if not _is_ours(module.__dict__.get("forward")):
        return False
    del module.__dict__["forward"]
    prev = module.__dict__.pop("_dsmath_prev_forward", None)
    if prev is not None:
        module.forward = prev
    for k in [k for k in module.__dict__ if k.startswith("_dsmath_")]:
        del module.__dict__[k]
    return True


# --------------------------------------------------------------------------------------------------------- public
def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a transformers PreTrainedModel (torch.nn.Module), got {type(model).__name__}")


def _model_dtype(model) -> torch.dtype:
    p = next((p for n, p in model.named_parameters() if p.is_floating_point() and "gate.weight" not in n), None)
    return p.dtype if p is not None else torch.float32


def patch(model: torch.nn.Module, *, routing: bool = True, experts: bool = True, rms_norm: bool = True,
          loss: bool = True) -> PatchReport:
    """Put dsmath kernels into a loaded transformers model, in place, without copying weights:
    routing -> each MoE router's scoring + (group-limited) top-k + renormalize + scale by `route_topk`;
    experts -> each routed-experts module by `moe_experts` (permutation + grouped GEMM, forward and backward) on its
    own fused [E, 2I, H] / [E, H, I] tensors; loss -> with labels in training mode, the causal-LM loss from the
    final hidden states by `linear_cross_entropy` (no [B, T, V] logits; outputs carry logits=None; pass
    skip_logits=False to get logits and the usual loss); rms_norm -> left (dsmath has no fused RMSNorm kernel).
    Returns a PatchReport (patched module paths and kernels; what was left and why). Patching twice is harmless;
    `unpatch(model)` undoes it. Raises UnsupportedModelError (model unchanged) when routing or experts are
    requested and no MoE layer can take them. transformers >= 5 (fused expert tensors); tested with 5.17 and 5.24."""
    _check_model(model)
    report = PatchReport(type(model).__name__)
    config = getattr(model, "config", None)
    dtype = _model_dtype(model)
    todo = []  # (module, forward, state) applied only after every decision is made
    probed: dict[type, str | None] = {}  # experts class -> problem: the (costlier) experts probe runs once a class
    moe = _experts_modules(model) if (routing or experts) else []
    for epath, emod, rpath, rmod in moe:
        plan = None
        if rmod is not None:  # every router is planned and probed (cheap: one [64, E] routing)
            done = _instance_patched(rmod)
            plan, kernel = (None, "") if done else _plan_router(rmod, config, dtype)
            if routing:
                if done:
                    report.patched.append((rpath, "router", "route_topk (already patched)"))
                elif plan is None:
                    report.left.append((rpath, "router", kernel))
                else:
                    todo.append((rmod, layers.router_forward, {"plan": plan}))
                    report.patched.append((rpath, "router", kernel))
        elif routing:
            report.left.append((epath, "router", "no `gate` / `router` module beside the experts"))
        if experts:
            if _instance_patched(emod):
                report.patched.append((epath, "experts", "moe_experts (already patched)"))
                continue
            problem = layers.experts_problem(emod)
            if problem is not None:
                problem = f"{type(emod).__name__}: {problem}"
            elif type(emod) not in probed:
                probed[type(emod)] = _probe_experts(emod, plan, rmod if plan else None, dtype)
            problem = problem or probed[type(emod)]
            if problem is None:
                todo.append((emod, layers.experts_forward, {}))
                report.patched.append((epath, "experts", "moe_experts (permute + grouped GEMM)"))
            else:
                report.left.append((epath, "experts", problem))
    if (routing or experts) and not report.patched:
        reasons = "; ".join(sorted({r for _, _, r in report.left})) or "no module holds MoE experts"
        raise UnsupportedModelError(
            f"dsmath_kernels.patch: {type(model).__name__} has no MoE layer dsmath can serve ({reasons}). Supported: "
            f"{SUPPORTED} and other transformers 5 MoE models with the same router and fused-experts layout. "
            "The model was not changed.")
    if loss:
        problem = layers.lm_loss_problem(model)
        if _instance_patched(model):
            report.patched.append(("", "loss", "linear_cross_entropy (already patched)"))
        elif problem is None:
            todo.append((model, layers.make_causal_lm_forward(layers.class_forward(model)), {}))
            report.patched.append(("", "loss", "linear_cross_entropy (fused LM head + cross entropy)"))
        else:
            report.left.append(("", "loss", problem))
    if rms_norm:
        report.left += [(p, "rms_norm", NO_RMSNORM) for p in _rmsnorms(model)]
    for module, fn, state in todo:
        _bind(module, fn, **state)
    return report


def unpatch(model: torch.nn.Module) -> list[str]:
    """Undo `patch(model)`: every module takes its class's forward again. Returns the module paths restored."""
    _check_model(model)
    return [p for p, m in model.named_modules() if _unbind(m)]


# ------------------------------------------------------------------------------------------------ class patching
def _modeling(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {list(MODEL_TYPES)}, got {model_type!r}")
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _set_class_forward(cls, fn) -> None:
    if _is_ours(cls.__dict__.get("forward")):
        return
    orig = cls.__dict__["forward"]

    @functools.wraps(orig)
    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    setattr(forward, MARK, getattr(fn, MARK))
    setattr(forward, ORIGINAL, orig)
    cls.forward = forward


def patch_class(model_type: str, *, routing: bool = True, experts: bool = True, rms_norm: bool = True,
                loss: bool = True) -> PatchReport:
    """Patch transformers' classes of `model_type` ("deepseek_v2", "deepseek_v3", "qwen3_moe") before a model is
    loaded, as Liger-Kernel's apply_liger_kernel_to_*: every instance, present and future, takes the dsmath
    forwards. An instance that does not fit (e.g. a non-SiLU expert) warns and runs transformers' forward.
    `unpatch_class(model_type)` restores the classes."""
    mod = _modeling(model_type)
    router_cls, experts_cls, lm_cls = (getattr(mod, n) for n in MODEL_TYPES[model_type])
    report = PatchReport(model_type)
    if routing:
        _set_class_forward(router_cls, layers.router_forward)
        report.patched.append((router_cls.__name__, "router", "route_topk"))
    if experts:
        _set_class_forward(experts_cls, layers.experts_forward)
        report.patched.append((experts_cls.__name__, "experts", "moe_experts"))
    if loss:
        if not _is_ours(lm_cls.__dict__.get("forward")):
            fwd = layers.make_causal_lm_forward(lm_cls.__dict__["forward"])
            lm_cls.forward = fwd
        report.patched.append((lm_cls.__name__, "loss", "linear_cross_entropy"))
    if rms_norm:
        report.left += [(n, "rms_norm", NO_RMSNORM) for n in dir(mod) if n.endswith("RMSNorm")]
    return report


def unpatch_class(model_type: str) -> list[str]:
    """Restore the forwards `patch_class(model_type)` replaced. Returns the class names restored."""
    mod = _modeling(model_type)
    restored = []
    for name in MODEL_TYPES[model_type]:
        cls = getattr(mod, name)
        f = cls.__dict__.get("forward")
        if _is_ours(f):
            cls.forward = getattr(f, ORIGINAL)
            restored.append(name)
    return restored
