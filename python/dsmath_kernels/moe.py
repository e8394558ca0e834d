"""MoE expert layer ops: `moe_permute` (group the T*K (token, slot) pairs by expert), `grouped_gemm` (one GEMM
per expert over contiguous row segments) and `moe_experts` (the whole routed-expert layer: permute, gate-up GEMM,
SiLU-and-mul, down GEMM, weighted combine). Each is a torch custom op (`torch.ops.dsmath.*`) with a fake
implementation; `grouped_gemm` and `moe_experts` are differentiable. Spec: reference/moe.py.

Layout — "contiguous segments" (prefill, training, and decode; every shape below is static given T, K, E, so the
ops are CUDA-graph safe):
  pairs      f = t*K + j numbers the (token t, slot j) pairs of `ids` [T, K]; P = T*K.
  order      [R] int32: order[r] = the pair f held by permuted row r, or -1 for a padding row. Expert e owns the
             rows [expert_offsets[e], expert_offsets[e+1]): its pairs in ascending f (deterministic), then padding
             up to a multiple of `block_m`. R = P + min(E, P) * (block_m - 1) (R = P when block_m = 1); rows at or
             past expert_offsets[E] are padding as well. Token of row r: order[r] // K.
  expert_offsets [E+1] int32, expert_offsets[0] = 0, non-decreasing, each a multiple of block_m.
  inverse    [T, K] int32: the row of pair (t, j), so out[t] = sum_j weights[t, j] * y[inverse[t, j]] (combine).

Backends: permutation — CUDA kernels (histogram + last-block scan, then a stable scatter; csrc/moe_permute.cu),
C++ on CPU (csrc/moe_permute_cpu.cpp), else the reference. GEMMs — Triton on CUDA (grouped_gemm_triton.py,
persistent tile scheduler); on CPU one torch.matmul per expert segment (MKL/oneDNN beat any hand-written C++ GEMM
we could write here, so there is no C++ GEMM). `DSMATH_GROUPED_GEMM=torch|triton` overrides the choice (triton on
CPU runs the Triton interpreter, for tests).

Checks: shapes, dtypes and devices are always checked. Checking values (ids in [0, E), expert_offsets monotone
and within [0, M]) needs the data on the host: done for CPU tensors always and for CUDA tensors only when the
environment variable DSMATH_CHECK_IDS=1 (it syncs the stream, so it is off by default and must stay off under CUDA
graph capture); never inside torch.compile (not traceable). Unchecked bad ids on CUDA cannot make a kernel write
out of bounds (the kernels skip them) but the result is then undefined."""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsmath_kernels import _dispatch, _ext
from dsmath_kernels._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor
from dsmath_kernels._registry import register_backend
from dsmath_kernels.reference.moe import grouped_gemm_ref, moe_experts_ref, moe_permute_ref

INDEX_DTYPES = (torch.int32, torch.int64)


class MoePermutation(NamedTuple):
    order: torch.Tensor  # [R] int32, pair index per permuted row, -1 = padding
    expert_offsets: torch.Tensor  # [E+1] int32
    inverse: torch.Tensor  # [T, K] int32, permuted row per pair


# ---------------------------------------------------------------- backends

MAX_EXPERTS = 1 << 16  # num_experts above this is refused (expert_offsets alone would be huge)


def _choose_permute(device: torch.device, E: int = 256) -> _dispatch.Choice:
    forced = _dispatch.forced("moe_permute")
    if forced:
        return forced
    choice = _dispatch.device_kernel("moe_permute", device)
    if choice.backend == "cuda" and E > _ext.C().moe_max_experts_cuda:
        lim = _ext.C().moe_max_experts_cuda
        return _dispatch.fallback("moe_permute", "reference", f"E = {E} exceeds the CUDA kernel's {lim} experts "
                                  "(per-warp histograms in shared memory)", f"use at most {lim} experts per rank")
    return choice


def _permute_backend(device: torch.device, E: int = 256) -> str:
    return _choose_permute(device, E).backend


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _forced_gemm(op: str, env_name: str) -> _dispatch.Choice | None:
    """The choice DSMATH_FORCE_REFERENCE=1 or `env_name`=torch|triton makes (triton on a CPU runs the interpreter,
    for tests), else None."""
    forced = _dispatch.forced(op)
    if forced:
        return forced
    env = os.environ.get(env_name, "")
    if env in ("torch", "triton"):
        if env == "torch" or _triton_ok():
            return _dispatch.by_design(op, env, f"{env_name}={env}")
        return _dispatch.fallback(op, "torch", f"{env_name}=triton but triton is not installed", "pip install triton")
    return None


def _choose_gemm(op: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> _dispatch.Choice:
    """Grouped GEMM backend: Triton on GPU, torch.matmul per segment on CPU (its design), the reference when
    forced; DSMATH_GROUPED_GEMM=torch|triton overrides (triton on CPU runs the interpreter, for tests)."""
    forced = _forced_gemm(op, "DSMATH_GROUPED_GEMM")
    if forced:
        return forced
    if dtype == torch.float64:
        return _dispatch.by_design(op, "torch", "float64: torch.matmul per segment")
    if device.type == "cuda":
        if _triton_ok():
            return _dispatch.kernel(op, "triton")
        return _dispatch.no_triton(op, "torch")
    if device.type == "cpu":
        return _dispatch.by_design(op, "torch", "CPU design: torch.matmul per expert segment")
    return _dispatch.no_device_kernel(op, device, "torch")


def _gemm_backend(device: torch.device) -> str:
    return _choose_gemm("grouped_gemm", device).backend


def _choose_experts(device: torch.device, dtype: torch.dtype, E: int) -> _dispatch.Choice:
    p, g = _choose_permute(device, E), _choose_gemm("moe_experts", device, dtype)
    if p.backend == "reference" and g.backend == "reference":
        return _dispatch.Choice("moe_experts", "reference", p.reason)
    bad = p if p.fallback else g
    return _dispatch.Choice("moe_experts", f"permute {p.backend}, gemm {g.backend}", bad.reason, bad.fix,
                            p.fallback or g.fallback)


register_backend("moe_permute", lambda d: _permute_backend(d))
register_backend("grouped_gemm", _gemm_backend)
register_backend("moe_experts", lambda d: _choose_experts(d, torch.bfloat16, 256).backend)


def _check_values(device: torch.device) -> bool:
    if torch.compiler.is_compiling():  # data-dependent checks cannot be traced
        return False
    return device.type == "cpu" or os.environ.get("DSMATH_CHECK_IDS", "0") == "1"


def _num_rows(P: int, E: int, block_m: int) -> int:
    return P + min(E, P) * (block_m - 1)


# ---------------------------------------------------------------- permutation

def _permute_impl(ids: torch.Tensor, E: int, block_m: int,
                  choice: _dispatch.Choice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = ids.shape
    backend = (choice or _choose_permute(ids.device, E)).backend
    if backend == "reference":
        return moe_permute_ref(ids, E, block_m)
    ids = ids.to(torch.int32).contiguous()
    P = T * K
    order = torch.empty(_num_rows(P, E, block_m), dtype=torch.int32, device=ids.device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=ids.device)
    inverse = torch.empty(T, K, dtype=torch.int32, device=ids.device)
    if backend == "cpu":
        _ext.C().moe_permute_cpu(_ext.ptr(ids), P, E, block_m, _ext.ptr(order), _ext.ptr(offsets), _ext.ptr(inverse))
    else:
        ws = torch.empty(_ext.C().moe_permute_workspace(P, E), dtype=torch.int32, device=ids.device)
        with torch.cuda.device(ids.device):
            _ext.C().moe_permute_cuda(_ext.ptr(ids), P, E, block_m, _ext.ptr(order), _ext.ptr(offsets),
                                      _ext.ptr(inverse), _ext.ptr(ws), _ext.ptr(_ext.bounds_flags(ids.device)),
                                      _ext.stream_of(ids))
    return order, offsets, inverse


@torch.library.custom_op("dsmath::moe_permute", mutates_args=())
def _moe_permute_op(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    choice = _dispatch.take(_choose_permute(ids.device, num_experts))
    return _permute_impl(ids, num_experts, block_m, choice)


@_moe_permute_op.register_fake
def _(ids, num_experts, block_m):
    T, K = ids.shape
    R = _num_rows(T * K, num_experts, block_m)
    i32 = torch.int32
    return ids.new_empty(R, dtype=i32), ids.new_empty(num_experts + 1, dtype=i32), ids.new_empty(T, K, dtype=i32)


def _check_ids(ids: torch.Tensor, E: int) -> None:
    if ids.numel() and _check_values(ids.device):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"ids: expert ids must lie in [0, {E}), found values in [{lo}, {hi}]")


def moe_permute(ids: torch.Tensor, num_experts: int, *, block_m: int = 1) -> MoePermutation:
    """ids [T, K] int32/int64 -> MoePermutation(order [R] int32, expert_offsets [E+1] int32, inverse [T, K] int32)
    in the contiguous-segment layout of the module docstring (segments padded to multiples of block_m)."""
    check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES)
    check_int("num_experts", num_experts, lo=1, hi=MAX_EXPERTS)
    check_int("block_m", block_m, lo=1, hi=4096)
    _check_ids(ids, num_experts)
    return MoePermutation(*_moe_permute_op(ids, num_experts, block_m))


# ---------------------------------------------------------------- grouped GEMM

def _segments(expert_offsets: torch.Tensor, M: int) -> list[tuple[int, int, int]]:
    off = [min(max(int(o), 0), M) for o in expert_offsets.tolist()]
    return [(i, s, e) for i, (s, e) in enumerate(itertools.pairwise(off)) if e > s]


def _use_triton(x: torch.Tensor) -> bool:
    return _choose_gemm("grouped_gemm", x.device, x.dtype).backend == "triton"


def _gemm_impl(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows=None, topk: int = 1) -> torch.Tensor:
    """y [R, N] = per-segment x[rows // topk] @ w[i].T (rows: pair indices, -1 = a zero row; None: R = M, all of
    x); w may be any strided view (backward passes w.transpose(1, 2))."""
    if _use_triton(x):
        from dsmath_kernels import grouped_gemm_triton

        return grouped_gemm_triton.grouped_gemm(x, w, offsets, rows=rows, topk=topk)
    x = x if rows is None else _gather(x, rows, topk)
    M, N = x.shape[0], w.shape[1]
    y = x.new_empty(M, N)
    segs = _segments(offsets, M)
    first, last = (segs[0][1], segs[-1][2]) if segs else (M, M)
    y[:first] = 0  # rows outside every segment are 0 (segments are contiguous between them)
    y[last:] = 0
    for i, s, e in segs:
        torch.matmul(x[s:e], w[i].T, out=y[s:e])
    return y


def _wgrad_impl(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, E: int, rows=None,
                topk: int = 1) -> torch.Tensor:
    """dw [E, N, K] with dw[i] = dy[s:e].T @ x[rows // topk][s:e] on expert i's segment (zero for empty experts)."""
    if _use_triton(x):
        from dsmath_kernels import grouped_gemm_triton

        return grouped_gemm_triton.grouped_wgrad(dy, x, offsets, E, rows=rows, topk=topk)
    x = x if rows is None else _gather(x, rows, topk)
    dw = dy.new_empty(E, dy.shape[1], x.shape[1])
    missing = set(range(E))
    for i, s, e in _segments(offsets, x.shape[0]):
        torch.matmul(dy[s:e].T, x[s:e], out=dw[i])
        missing.discard(i)
    for i in missing:  # experts without rows; a boolean-mask fill here passed over all of dw (CPU, E 128, H 2048,
        dw[i].zero_()  # I 768, T 256, bf16: forward + backward 1.92 s -> 1.55 s CPU time without it)
    return dw


def _gather(x: torch.Tensor, rows: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """x[rows // topk] with rows = -1 giving zero rows (they index an appended zero row)."""
    x0 = torch.cat([x, x.new_zeros(1, x.shape[1])])  # [M + 1, K]
    return x0[torch.where(rows >= 0, torch.div(rows, topk, rounding_mode="floor"), x.shape[0]).long()]


@torch.library.custom_op("dsmath::grouped_gemm", mutates_args=())
def _grouped_gemm_op(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    _dispatch.take(_choose_gemm("grouped_gemm", x.device, x.dtype))
    return _gemm_impl(x, w, expert_offsets)


@_grouped_gemm_op.register_fake
def _(x, w, expert_offsets):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("dsmath::grouped_gemm_wgrad", mutates_args=())
def _grouped_wgrad_op(dy: torch.Tensor, x: torch.Tensor, expert_offsets: torch.Tensor, num_experts: int,
                      rows: torch.Tensor | None = None, topk: int = 1) -> torch.Tensor:
    """Internal (no autograd): dw [E, N, K], dw[i] = dy[seg].T @ x[rows // topk][seg]."""
    return _wgrad_impl(dy, x, expert_offsets, num_experts, rows=rows, topk=topk)


@_grouped_wgrad_op.register_fake
def _(dy, x, expert_offsets, num_experts, rows=None, topk=1):
    return dy.new_empty(num_experts, dy.shape[1], x.shape[1])


def _gemm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _gemm_backward(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_gemm_op(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None  # [M, K]
    dw = _grouped_wgrad_op(dy, x, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None  # [E, N, K]
    return dx, dw, None


_grouped_gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup)


def _check_offsets(expert_offsets: torch.Tensor, E: int, M: int) -> None:
    check_tensor("expert_offsets", expert_offsets, ndim=1, dtypes=INDEX_DTYPES)
    check_shape("expert_offsets", expert_offsets, [E + 1])
    if not _check_values(expert_offsets.device):
        return
    off = expert_offsets.tolist()
    if off[0] != 0 or off[-1] > M or any(b < a for a, b in itertools.pairwise(off)):
        raise ValueError(f"expert_offsets: must start at 0, be non-decreasing and end <= M = {M}; got {off}")


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] with rows grouped by expert, w [E, N, K], expert_offsets [E+1] int32/int64 -> y [M, N] (dtype of
    x): y[s:e] = x[s:e] @ w[i].T for expert i's segment [s, e) = [off[i], off[i+1]); rows >= off[E] are 0.
    fp32/fp16/bf16, fp32 accumulation. Differentiable w.r.t. x and w (dx = dy @ w[i], dw[i] = dy_i.T @ x_i)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor("w", w, ndim=3, dtypes=(x.dtype,), device=x.device)
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w: expected shape [E, N, {x.shape[1]}] (K must match x), got {list(w.shape)}")
    if expert_offsets.device != x.device:
        raise ValueError(f"expert_offsets: on device {expert_offsets.device}, expected {x.device}")
    _check_offsets(expert_offsets, w.shape[0], x.shape[0])
    if _dispatch.force_reference():
        _dispatch.take(_choose_gemm("grouped_gemm", x.device, x.dtype))
        return grouped_gemm_ref(x, w, expert_offsets)
    return _grouped_gemm_op(x, w, expert_offsets)


# ---------------------------------------------------------------- expert layer

def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _silu_mul(h: torch.Tensor) -> torch.Tensor:
    g, u = h.to(_acc(h)).chunk(2, dim=-1)  # [R, I] each
    return (F.silu(g) * u).to(h.dtype)


def _gate_up_forward(x, w_gate_up, ids):
    """Permute, gate-up GEMM on gathered rows, SiLU-mul. Returns h [R, 2I], a = silu(g) * u [R, I] and the
    permutation (order [R], offsets [E+1], inverse [T, K])."""
    order, offsets, inverse = _permute_impl(ids, w_gate_up.shape[0], 1)
    if _use_triton(x):  # one GEMM writes both h and a = silu(g) * u
        from dsmath_kernels import grouped_gemm_triton

        a, h = grouped_gemm_triton.gate_up_train(x, w_gate_up, offsets, order, ids.shape[1])
    else:
        h = _gemm_impl(x, w_gate_up, offsets, rows=order, topk=ids.shape[1])  # [R, 2I]  x rows gathered
        a = _silu_mul(h)  # [R, I]
    return h, a, order, offsets, inverse


def _chunks(T: int, K: int, H: int):
    """Token ranges whose [t, K, H] fp32 temporaries stay near 64 MB (T*K*H at V3 prefill would be many GB)."""
    step = max(1, 2**24 // max(1, K * H))
    return [(s, min(T, s + step)) for s in range(0, T, step)]


def _combine(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[inverse[t, j]] (weights None: plain sum), accumulated in fp32 and in
    token order, so the result is deterministic (no atomics). One Triton kernel where the GEMMs run in Triton."""
    if _use_triton(y):
        from dsmath_kernels import grouped_gemm_triton

        return grouped_gemm_triton.combine(y, inverse, weights)
    T, K = inverse.shape
    acc = _acc(y)
    out = y.new_empty(T, y.shape[1])  # [T, H]
    for s, e in _chunks(T, K, y.shape[1]):
        rows = y[inverse[s:e].long()].to(acc)  # [t, K, H]
        if weights is not None:
            rows = rows * weights[s:e, :, None].to(acc)
        out[s:e] = rows.sum(dim=1)
    return out


@torch.library.custom_op("dsmath::moe_combine", mutates_args=())
def _combine_op(y: torch.Tensor, weights: torch.Tensor | None, inverse: torch.Tensor) -> torch.Tensor:
    """Internal: _combine as an opaque op, so a compiled backward does not trace into the Triton launch."""
    return _combine(y, weights, inverse)


@_combine_op.register_fake
def _(y, weights, inverse):
    return y.new_empty(inverse.shape[0], y.shape[1])


def _row_dots(dout: torch.Tensor, y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """d weights[t, j] = <dout[t], y[inverse[t, j]]>, fp32. [T, K]"""
    T, K = inverse.shape
    acc = _acc(y)
    out = torch.empty(T, K, dtype=torch.float32, device=y.device)
    for s, e in _chunks(T, K, y.shape[1]):
        out[s:e] = (y[inverse[s:e].long()].to(acc) * dout[s:e, None, :].to(acc)).sum(dim=-1)
    return out


@torch.library.custom_op("dsmath::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    _dispatch.take(_choose_experts(x.device, x.dtype, w_gate_up.shape[0]))
    if _use_triton(x):
        from dsmath_kernels import grouped_gemm_triton

        order, offsets, inverse = _permute_impl(ids, w_gate_up.shape[0], 1)
        y = grouped_gemm_triton.moe_experts_fused(x, w_gate_up, w_down, weights, order, offsets)  # [R, H] weighted
        return _combine(y, None, inverse)
    _h, a, _order, offsets, inverse = _gate_up_forward(x, w_gate_up, ids)
    return _combine(_gemm_impl(a, w_down, offsets), weights, inverse)  # [R, H] unweighted -> [T, H]


@_moe_experts_op.register_fake
def _(x, w_gate_up, w_down, weights, ids):
    return torch.empty_like(x)


@torch.library.custom_op("dsmath::moe_down_backward", mutates_args=())
def _down_backward_op(dy: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor,
                      h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal: d a = dy @ w_down[e] per segment, then the SwiGLU backward: returns (dh [R, 2I], a [R, I])."""
    if _use_triton(dy):
        from dsmath_kernels import grouped_gemm_triton

        return grouped_gemm_triton.down_backward(dy, w_down, offsets, h)
    acc = _acc(dy)
    da = _gemm_impl(dy, w_down.transpose(1, 2), offsets).to(acc)  # [R, I]
    g, u = h.to(acc).chunk(2, dim=-1)
    sg = torch.sigmoid(g)
    dg = da * u * sg * (1 + g * (1 - sg))  # d silu(g) = sg (1 + g (1 - sg))
    du = da * g * sg
    return torch.cat([dg, du], dim=-1).to(dy.dtype), (g * sg * u).to(dy.dtype)


@_down_backward_op.register_fake
def _(dy, w_down, offsets, h):
    return dy.new_empty(dy.shape[0], h.shape[1]), dy.new_empty(dy.shape[0], h.shape[1] // 2)


# Training runs as two custom ops, two autograd nodes, in the order of transformers' two grouped GEMMs: the down
# node's backward returns d w_down (and d h, d weights), autograd accumulates d w_down into its .grad and frees it,
# then the gate-up node computes d w_gate_up (and d x). One node returning both weight gradients held both at once:
# +403 MB of peak at Qwen3-30B-A3B's layer (bench/RESULTS.md, fix1).
@torch.library.custom_op("dsmath::moe_experts_gate_up", mutates_args=())
def _gate_up_train_op(x: torch.Tensor, w_gate_up: torch.Tensor,
                      ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward, first node: x [T, H], w_gate_up [E, 2I, H], ids [T, K] int32 -> h [R, 2I], a [R, I],
    order [R], offsets [E+1], inverse [T, K] (R = T K). Backward: d x and d w_gate_up from d h. a = silu(g) * u is
    an output only so the down node need not recompute it; its gradient reaches d h through the down node (which
    differentiates SiLU-mul from the saved h), so the d a this node receives is ignored (None or zeros)."""
    _dispatch.take(_choose_experts(x.device, x.dtype, w_gate_up.shape[0]))
    return _gate_up_forward(x, w_gate_up, ids)


@_gate_up_train_op.register_fake
def _(x, w_gate_up, ids):
    T, K = ids.shape
    E, I2, _H = w_gate_up.shape
    i32 = torch.int32
    return (x.new_empty(T * K, I2), x.new_empty(T * K, I2 // 2), ids.new_empty(T * K, dtype=i32),
            ids.new_empty(E + 1, dtype=i32), ids.new_empty(T, K, dtype=i32))


def _gate_up_setup(ctx, inputs, output):
    x, w_gate_up, _ids = inputs
    _h, _a, order, offsets, inverse = output
    ctx.save_for_backward(x, w_gate_up, order, offsets, inverse)


def _gate_up_backward(ctx, dh, _da, *unused):
    x, w_gate_up, order, offsets, inverse = ctx.saved_tensors
    dh = dh.contiguous()  # [R, 2I]
    dx = dw_gate_up = None
    if ctx.needs_input_grad[0]:
        dxs = _grouped_gemm_op(dh, w_gate_up.transpose(1, 2), offsets)  # [R, H]
        dx = _combine_op(dxs, None, inverse)  # [T, H]
    if ctx.needs_input_grad[1]:
        dw_gate_up = _grouped_wgrad_op(dh, x, offsets, w_gate_up.shape[0], order, inverse.shape[1])  # [E, 2I, H]
    return dx, dw_gate_up, None


_gate_up_train_op.register_autograd(_gate_up_backward, setup_context=_gate_up_setup)


@torch.library.custom_op("dsmath::moe_experts_down", mutates_args=())
def _down_train_op(h: torch.Tensor, a: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                   order: torch.Tensor, offsets: torch.Tensor,
                   inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward, second node: the gate-up node's outputs (h [R, 2I], a [R, I], the permutation), w_down
    [E, H, I], weights [T, K] float32 -> out [T, H] = sum_j weights[t, j] y[inverse[t, j]] and y = a @ w_down[e]
    [R, H] (unweighted, saved for d weights). h is read only by the backward: d h = SwiGLU backward of
    d a = d y @ w_down[e] from h, so d a itself is never returned. Backward: d h, d w_down, d weights."""
    y = _gemm_impl(a, w_down, offsets)  # [R, H]
    return _combine(y, weights, inverse), y


@_down_train_op.register_fake
def _(h, a, w_down, weights, order, offsets, inverse):
    return h.new_empty(inverse.shape[0], w_down.shape[1]), h.new_empty(h.shape[0], w_down.shape[1])


def _down_setup(ctx, inputs, output):
    h, _a, w_down, weights, order, offsets, inverse = inputs
    _out, y = output
    ctx.save_for_backward(h, w_down, weights, y, order, offsets, inverse)


def _down_backward(ctx, dout, *unused):
    h, w_down, weights, y, order, offsets, inverse = ctx.saved_tensors
    K = weights.shape[1]
    src = order.long()  # [R]  (block_m = 1: every row holds a pair)
    acc = _acc(h)
    dout = dout.to(acc)  # [T, H]
    dweights = _row_dots(dout, y, inverse) if ctx.needs_input_grad[3] else None  # [T, K]
    dy = (dout[src // K] * weights.reshape(-1)[src][:, None].to(acc)).to(h.dtype)  # [R, H]
    dh, a = _down_backward_op(dy, w_down, offsets, h)  # [R, 2I], [R, I] (a recomputed from the saved h)
    dw_down = _grouped_wgrad_op(dy, a, offsets, w_down.shape[0]) if ctx.needs_input_grad[2] else None  # [E, H, I]
    return dh, None, dw_down, dweights, None, None, None


_down_train_op.register_autograd(_down_backward, setup_context=_down_setup)


def _check_experts(x, w_gate_up, w_down, weights, ids) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    T, H = x.shape
    check_tensor("w_gate_up", w_gate_up, ndim=3, dtypes=(x.dtype,), device=x.device)
    E, I2 = w_gate_up.shape[0], w_gate_up.shape[1]
    if I2 % 2 or w_gate_up.shape[2] != H:
        raise ValueError(f"w_gate_up: expected shape [E, 2I, {H}] (gate rows then up rows), got "
                         f"{list(w_gate_up.shape)}")
    check_tensor("w_down", w_down, ndim=3, dtypes=(x.dtype,), device=x.device)
    check_shape("w_down", w_down, [E, H, I2 // 2])
    _check_routing(x, weights, ids, E)


def _check_routing(x, weights, ids, E: int) -> None:
    """ids [T, K] int32/int64 in [0, E) and weights [T, K] float32, one row per token of x, on x's device."""
    T = x.shape[0]
    check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    if ids.shape[0] != T:
        raise ValueError(f"ids: expected shape [{T}, K] (one row per token of x), got {list(ids.shape)}")
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=x.device)
    check_shape("weights", weights, list(ids.shape))
    _check_ids(ids, E)


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """Routed-expert layer. x [T, H], w_gate_up [E, 2I, H] (gate rows, then up rows), w_down [E, H, I],
    weights [T, K] float32, ids [T, K] int32 (from route_topk) -> out [T, H] in x's dtype:
        out[t] = sum_j weights[t, j] * w_down[e] @ (silu(g) * u),  [g; u] = w_gate_up[e] @ x[t],  e = ids[t, j].
    Differentiable w.r.t. x, w_gate_up, w_down and weights. Without gradients (inference) the fused path runs:
    the gather is folded into the gate-up GEMM, SiLU-and-mul into its epilogue."""
    _check_experts(x, w_gate_up, w_down, weights, ids)
    if _dispatch.force_reference():
        _dispatch.take(_choose_experts(x.device, x.dtype, w_gate_up.shape[0]))
        return moe_experts_ref(x, w_gate_up, w_down, weights, ids)
    ids = ids.to(torch.int32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, weights))
    if needs_grad:  # two autograd nodes: d w_down is accumulated and freed before d w_gate_up is computed
        h, a, order, offsets, inverse = _gate_up_train_op(x, w_gate_up, ids)
        return _down_train_op(h, a, w_down, weights, order, offsets, inverse)[0]
    return _moe_experts_op(x, w_gate_up, w_down, weights, ids)
