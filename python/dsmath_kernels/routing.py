"""`route_topk` — fused MoE gating: scores, optional group-limited selection, top-k, renormalize, scale, in one
kernel (CUDA: a warp per token; CPU: C++ threads), registered as the custom op `dsmath::route_topk` with a fake
implementation (torch.compile) and autograd through the weights. `route_topk_weights` — routing replay: the same
gating weights for experts chosen elsewhere (`dsmath::route_topk_weights`, same kernels' math, same autograd).
Spec: reference/routing.py."""

from __future__ import annotations

import math

import torch

from dsmath_kernels import _dispatch, _ext
from dsmath_kernels._checks import FLOAT_DTYPES, check_choice, check_int, check_tensor
from dsmath_kernels._registry import register_backend
from dsmath_kernels.moe import _check_ids
from dsmath_kernels.reference.routing import route_topk_ref, route_topk_weights_ref

MAX_EXPERTS, MAX_TOPK, MAX_GROUPS = 512, 16, 32  # kernel limits (csrc/include/dsmath/routing.h); beyond: reference
_SCORING = {"softmax": 0, "sigmoid": 1}
ID_DTYPES = (torch.int16, torch.int32, torch.int64)


def _choose(device: torch.device, E: int = 256, K: int = 8, n_group: int = 1,
            op: str = "route_topk") -> _dispatch.Choice:
    """Backend of one call: the device's kernel (CUDA, or C++ on CPU) within its limits, else the reference."""
    forced = _dispatch.forced(op)
    if forced:
        return forced
    choice = _dispatch.device_kernel(op, device)
    if choice.fallback:
        return choice
    for what, v, lim in (("E", E, MAX_EXPERTS), ("top_k", K, MAX_TOPK), ("n_group", n_group, MAX_GROUPS)):
        if v > lim:
            return _dispatch.fallback(op, "reference", f"{what} = {v} exceeds the {choice.backend} "
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
    _check_scale(routed_scaling_factor)


def _check_scale(routed_scaling_factor) -> None:
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


def _grad_logits(logits: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, grad_w: torch.Tensor, scoring: str,
                 renormalize: bool, c: float) -> torch.Tensor:
    """d logits [T, E] of weights `out` [T, K] at experts `ids` [T, K] (route_topk and route_topk_weights alike)."""
    x = logits.float()  # [T, E]
    s = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)  # [T, E]
    idx = ids.long()  # [T, K]
    g = grad_w.float()  # [T, K]
    if renormalize:
        # out_j = c * s_j / D with D = sum_k s_k + 1e-20  =>  ds_i = (c / D) * (g_i - sum_j g_j out_j / c)
        D = s.gather(1, idx).sum(dim=-1, keepdim=True) + 1e-20  # [T, 1]
        inner = (g * out).sum(dim=-1, keepdim=True) / c if c != 0 else torch.zeros_like(D)
        ds_sel = (c / D) * (g - inner)  # [T, K]
    else:
        ds_sel = g * c
    ds = torch.zeros_like(s).scatter_add_(1, idx, ds_sel)  # [T, E]
    if scoring == "softmax":
        dx = s * (ds - (ds * s).sum(dim=-1, keepdim=True))
    else:
        dx = ds * s * (1 - s)
    return dx.to(logits.dtype)


def _backward(ctx, grad_w, grad_ids):
    logits, ids, out = ctx.saved_tensors
    dx = _grad_logits(logits, ids, out, grad_w, ctx.scoring, ctx.renormalize, ctx.scale)
    return dx, None, None, None, None, None, None, None


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


# ---------------------------------------------------------------------------------------------- routing replay
@torch.library.custom_op("dsmath::route_topk_weights", mutates_args=())
def _route_weights_op(logits: torch.Tensor, ids: torch.Tensor, scoring: str, renormalize: bool,
                      routed_scaling_factor: float) -> torch.Tensor:
    T, E = logits.shape
    K = ids.shape[1]
    backend = _dispatch.take(_choose(logits.device, E, K, op="route_topk_weights")).backend
    if backend == "reference":
        w = route_topk_weights_ref(logits, ids, scoring=scoring, renormalize=renormalize,
                                   routed_scaling_factor=routed_scaling_factor)
        return w.detach().contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    ids32 = ids.to(torch.int32).contiguous()
    weights = torch.empty(T, K, dtype=torch.float32, device=logits.device)
    if T == 0:
        return weights
    args = (_ext.ptr(logits), _ext.dtype_code(logits), T, E, logits.stride(0), _ext.ptr(ids32), K, _SCORING[scoring],
            renormalize, float(routed_scaling_factor), _ext.ptr(weights))
    if backend == "cuda":
        with torch.cuda.device(logits.device):
            _ext.C().route_weights_cuda(*args, _ext.stream_of(logits))
    else:
        _ext.C().route_weights_cpu(*args, torch.get_num_threads())
    return weights


@_route_weights_op.register_fake
def _(logits, ids, scoring, renormalize, routed_scaling_factor):
    return logits.new_empty(logits.shape[0], ids.shape[1], dtype=torch.float32)


def _weights_setup_context(ctx, inputs, output):
    logits, ids, scoring, renormalize, scale = inputs
    ctx.save_for_backward(logits, ids, output)
    ctx.scoring, ctx.renormalize, ctx.scale = scoring, renormalize, scale


def _weights_backward(ctx, grad_w):
    logits, ids, out = ctx.saved_tensors
    return _grad_logits(logits, ids, out, grad_w, ctx.scoring, ctx.renormalize, ctx.scale), None, None, None, None


_route_weights_op.register_autograd(_weights_backward, setup_context=_weights_setup_context)


def route_topk_weights(
    logits: torch.Tensor,  # [T, E]
    ids: torch.Tensor,  # [T, K]
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Routing replay: the gating weights [T, K] float32 of GIVEN experts `ids` [T, K] (int16/int32/int64, e.g. the
    ids route_topk chose in another forward pass), in the order given: scores (softmax / sigmoid of the logits, fp32)
    at those ids, / (sum + 1e-20) if renormalize, * routed_scaling_factor — exactly route_topk's gating, without its
    selection (so no bias, n_group or topk_group: they only decide which experts are picked). For the ids route_topk
    returned, the weights are bit-identical to its weights (same backend). Differentiable w.r.t. logits (the router
    keeps learning under replay). Ids must lie in [0, E) (checked on CPU; on CUDA with DSMATH_CHECK_IDS=1 — an
    unchecked bad id gives its row NaN weights, never an out-of-bounds read)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E = logits.shape
    check_tensor("ids", ids, ndim=2, dtypes=ID_DTYPES, device=logits.device)
    check_choice("scoring", scoring, tuple(_SCORING))
    if ids.shape[0] != T:
        raise ValueError(f"ids: expected shape [{T}, K] (one row per logits row), got {list(ids.shape)}")
    check_int("ids.shape[1]", ids.shape[1], lo=1, hi=E)
    _check_scale(routed_scaling_factor)
    _check_ids(ids, E)  # the policy of moe_experts: CPU always, CUDA under DSMATH_CHECK_IDS=1
    return _route_weights_op(logits, ids, scoring, bool(renormalize), float(routed_scaling_factor))
