"""`route_topk` — fused MoE gating: scores, optional group-limited selection, top-k, renormalize, scale, in one
kernel (CUDA: a warp per token; CPU: C++ threads), registered as the custom op `dsmath::route_topk` with a fake
implementation (torch.compile) and autograd through the weights. Spec: reference/routing.py."""

from __future__ import annotations

import math

import torch

from dsmath_kernels import _dispatch, _ext
from dsmath_kernels._checks import FLOAT_DTYPES, check_choice, check_int, check_tensor
from dsmath_kernels._registry import register_backend
from dsmath_kernels.reference.routing import route_topk_ref

MAX_EXPERTS, MAX_TOPK, MAX_GROUPS = 512, 16, 32  # kernel limits (csrc/include/dsmath/routing.h); beyond: reference
_SCORING = {"softmax": 0, "sigmoid": 1}


def _choose(device: torch.device, E: int = 256, K: int = 8, n_group: int = 1) -> _dispatch.Choice:
    """Backend of one call: the device's kernel (CUDA, or C++ on CPU) within its limits, else the reference."""
    forced = _dispatch.forced("route_topk")
    if forced:
        return forced
    choice = _dispatch.device_kernel("route_topk", device)
    if choice.fallback:
        return choice
    for what, v, lim in (("E", E, MAX_EXPERTS), ("top_k", K, MAX_TOPK), ("n_group", n_group, MAX_GROUPS)):
        if v > lim:
            return _dispatch.fallback("route_topk", "reference", f"{what} = {v} exceeds the {choice.backend} "
                                      f"kernel's limit of {lim}",
                                      f"the kernels take E <= {MAX_EXPERTS}, top_k <= {MAX_TOPK}, n_group <= "
                                      f"{MAX_GROUPS}; beyond that only the PyTorch reference exists")
    return choice


def _backend(device: torch.device, E: int = 256, K: int = 8, n_group: int = 1) -> str:
    return _choose(device, E, K, n_group).backend


register_backend("route_topk", lambda device: _backend(device))


def _check_args(T: int, E: int, top_k, scoring, n_group, topk_group, routed_scaling_factor) -> None:
    """Checks on the integers and scalars of a call (the public op and the raw torch.ops.dsmath.route_topk both
    run them: a bad top_k or group split must never reach a kernel)."""
    check_choice("scoring", scoring, tuple(_SCORING))
    check_int("top_k", top_k, lo=1, hi=max(E, 1))
    check_int("n_group", n_group, lo=1)
    check_int("topk_group", topk_group, lo=1, hi=n_group)
    if E % n_group:
        raise ValueError(f"n_group: {E} experts are not divisible into {n_group} groups")
    if n_group > 1 and scoring == "sigmoid" and E // n_group < 2:
        raise ValueError(f"n_group: sigmoid group scores sum each group's top-2, but groups have {E // n_group} expert")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"top_k: {top_k} exceeds the {topk_group * (E // n_group)} experts left after keeping "
                         f"{topk_group} of {n_group} groups")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)) \
            or not math.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor: expected a finite float, got {routed_scaling_factor!r}")


@torch.library.custom_op("dsmath::route_topk", mutates_args=())
def _route_topk_op(logits: torch.Tensor, top_k: int, scoring: str, bias: torch.Tensor | None, n_group: int,
                   topk_group: int, renormalize: bool,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    _check_args(T, E, top_k, scoring, n_group, topk_group, routed_scaling_factor)
    backend = _dispatch.take(_choose(logits.device, E, top_k, n_group)).backend
    if backend == "reference":
        w, i = route_topk_ref(logits, top_k, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group,
                              renormalize=renormalize, routed_scaling_factor=routed_scaling_factor)
        return w.detach().contiguous(), i.contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    args = (_ext.ptr(logits), _ext.dtype_code(logits), T, E, logits.stride(0), _ext.ptr(bias32), top_k, n_group,
            topk_group, _SCORING[scoring], renormalize, float(routed_scaling_factor), _ext.ptr(weights), _ext.ptr(ids))
    if backend == "cuda":
        with torch.cuda.device(logits.device):
            _ext.C().route_topk_cuda(*args, _ext.stream_of(logits))
    else:
        _ext.C().route_topk_cpu(*args, torch.get_num_threads())
    return weights, ids


@_route_topk_op.register_fake
def _(logits, top_k, scoring, bias, n_group, topk_group, renormalize, routed_scaling_factor):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int32))


def _setup_context(ctx, inputs, output):
    logits, top_k, scoring, bias, n_group, topk_group, renormalize, scale = inputs
    weights, ids = output
    ctx.save_for_backward(logits, ids, weights)
    ctx.scoring, ctx.renormalize, ctx.scale = scoring, renormalize, scale
    ctx.set_materialize_grads(True)


def _backward(ctx, grad_w, grad_ids):
    logits, ids, out = ctx.saved_tensors
    x = logits.float()  # [T, E]
    s = torch.softmax(x, dim=-1) if ctx.scoring == "softmax" else torch.sigmoid(x)  # [T, E]
    idx = ids.long()  # [T, K]
    g = grad_w.float()  # [T, K]
    if ctx.renormalize:
        # out_j = c * s_j / D with D = sum_k s_k + 1e-20  =>  ds_i = (c / D) * (g_i - sum_j g_j out_j / c)
        D = s.gather(1, idx).sum(dim=-1, keepdim=True) + 1e-20  # [T, 1]
        c = ctx.scale
        inner = (g * out).sum(dim=-1, keepdim=True) / c if c != 0 else torch.zeros_like(D)
        ds_sel = (c / D) * (g - inner)  # [T, K]
    else:
        ds_sel = g * ctx.scale
    ds = torch.zeros_like(s).scatter_(1, idx, ds_sel)  # [T, E]
    if ctx.scoring == "softmax":
        dx = s * (ds - (ds * s).sum(dim=-1, keepdim=True))
    else:
        dx = ds * s * (1 - s)
    return dx.to(logits.dtype), None, None, None, None, None, None, None


_route_topk_op.register_autograd(_backward, setup_context=_setup_context)


def route_topk(
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
    """Fused MoE gating. Returns `weights` [T, top_k] float32 and `ids` [T, top_k] int32, each row sorted by
    descending weight (ties: lower id).

    scoring="softmax": softmax over the E experts, top-k (Mixtral, Qwen-MoE, DeepSeek-V2); with n_group > 1,
    DeepSeek-V2's group-limited greedy (keep the topk_group groups with the highest max score).
    scoring="sigmoid": DeepSeek-V3 — sigmoid scores, selection on score + bias (groups ranked by the sum of their
    top-2 biased scores), weights from the unbiased scores. Then weights / (sum + 1e-20) if renormalize, then
    * routed_scaling_factor. Scores are computed in fp32 whatever the logits dtype. NaN scores rank below every
    number: ids stay valid, NaN weights propagate (a softmax row with a NaN logit is all NaN).
    Differentiable w.r.t. logits through weights."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E = logits.shape
    if E == 0:
        raise ValueError("logits: expected at least one expert (dim 1), got 0")
    _check_args(T, E, top_k, scoring, n_group, topk_group, routed_scaling_factor)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=logits.device)
        if bias.shape[0] != E:
            raise ValueError(f"bias: expected shape [{E}] (one per expert), got {list(bias.shape)}")
        if scoring != "sigmoid":
            raise ValueError("bias: only used with scoring='sigmoid' (DeepSeek-V3 e_score_correction_bias)")
    return _route_topk_op(logits, top_k, scoring, bias, n_group, topk_group, bool(renormalize),
                          float(routed_scaling_factor))
