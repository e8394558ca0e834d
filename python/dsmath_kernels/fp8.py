"""FP8 block-scaled ops (DeepSeek-V3 checkpoints, DeepGEMM's format): per-token activation quantisation, the dense
FP8 GEMM, the grouped FP8 GEMM and the FP8 routed-expert layer. Each is a torch custom op (`torch.ops.dsmath.*`)
with a fake implementation (torch.compile); inference only (FP8 weights are frozen, no autograd). Spec and formats:
reference/fp8.py — weights e4m3 [.., N, K] with one fp32 scale per 128 x 128 block (`weight_scale_inv`),
activations e4m3 with one scale per token per 128 channels.

Backends (`python -m dsmath_kernels` prints them):
- "triton" (CUDA): fp8_gemm_triton.py. sm_89+ (wgmma FP8 on sm_90): W8A8 — activations quantised per token per 128
  on the fly (the MoE layer quantises once per token before the gather and re-quantises SiLU(g) * u in the
  gate-up GEMM's epilogue), fp32 accumulation with both scales applied in the main loop. sm_80: weight-only — the
  weight tile is converted to bf16 in registers and scaled per block (dequantise-then-bf16, never materialised).
- "torch" (CPU, and anything else): dequantise the weight to fp32 (one expert / one matrix at a time) and matmul;
  the reference semantics the tests use.
`activation` ("auto", "fp8", "native") picks W8A8 ("fp8": activations quantised) or weight-only ("native"); "auto"
is "fp8" where the device has FP8 MMA (sm_89+) and "native" elsewhere (CPU, sm_80), or the environment variable
DSMATH_FP8_ACT=fp8|native. `DSMATH_FP8_GEMM=torch|triton` forces a backend (triton on a CPU runs the interpreter,
for tests)."""

from __future__ import annotations

import os

import torch

from dsmath_kernels import _dispatch
from dsmath_kernels._checks import FLOAT_DTYPES, check_choice, check_shape, check_tensor
from dsmath_kernels._registry import register_backend
from dsmath_kernels.moe import (
    _check_offsets,
    _check_routing,
    _combine,
    _forced_gemm,
    _permute_impl,
    _segments,
    _triton_ok,
)
from dsmath_kernels.reference.fp8 import (
    BLOCK,
    FP8,
    dequantize_blocks_ref,
    dequantize_fp8_groups_ref,
    fp8_gemm_ref,
    grouped_gemm_fp8_ref,
    moe_experts_fp8_ref,
    quantize_blocks_ref,
    quantize_fp8_groups_ref,
)

ACTIVATIONS = ("auto", "fp8", "native")


def _fp8_dot(device: torch.device) -> bool:
    from dsmath_kernels.fp8_gemm_triton import fp8_dot_supported

    return fp8_dot_supported(device)


def _choose(op: str, device: torch.device, activation: str = "native") -> _dispatch.Choice:
    """Triton on CUDA (W8A8 needs FP8 MMA: sm_89+), dequantise-and-matmul on CPU (its design), the reference when
    forced; DSMATH_FP8_GEMM=torch|triton overrides (triton on CPU runs the interpreter, for tests). activation: the
    resolved one ("fp8" or "native")."""
    forced = _forced_gemm(op, "DSMATH_FP8_GEMM")
    if forced:
        return forced
    if device.type == "cuda":
        if not _triton_ok():
            return _dispatch.no_triton(op, "torch")
        if activation == "fp8" and not _fp8_dot(device):
            cc = "".join(map(str, torch.cuda.get_device_capability(device)))
            return _dispatch.fallback(op, "torch", f"e4m3 activations need FP8 MMA and conversions (sm_89 or newer), "
                                      f"this GPU is sm_{cc}", "activation='native' (weight-only: the sm_80 Triton "
                                      "kernel)")
        return _dispatch.kernel(op, "triton", f"activations {activation}")
    if device.type == "cpu":
        return _dispatch.by_design(op, "torch", "CPU design: dequantise one matrix (one expert) at a time, matmul")
    return _dispatch.no_device_kernel(op, device, "torch")


def resolve_activation(activation: str, device: torch.device) -> str:
    """"auto" -> "fp8" (W8A8) where the device has FP8 MMA (sm_89+) and the Triton kernels run, else "native"
    (weight-only); DSMATH_FP8_ACT=fp8|native overrides "auto"."""
    check_choice("activation", activation, ACTIVATIONS)
    if activation != "auto":
        return activation
    env = os.environ.get("DSMATH_FP8_ACT", "")
    if env in ("fp8", "native"):
        return env
    return "fp8" if device.type == "cuda" and _triton_ok() and _fp8_dot(device) else "native"


def _describe(device: torch.device) -> str:
    act = resolve_activation("auto", device)
    return f"{_choose('fp8_gemm', device, act).backend}, activations {act}"


for _op in ("quantize_fp8_groups", "fp8_gemm", "grouped_gemm_fp8", "moe_experts_fp8"):
    register_backend(_op, _describe)


def _nb(n: int) -> int:
    return -(-n // BLOCK)


# ---------------------------------------------------------------- activation quantisation

@torch.library.custom_op("dsmath::quantize_fp8_groups", mutates_args=())
def _quantize_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _dispatch.take(_choose("quantize_fp8_groups", x.device, "fp8")).backend == "triton":  # e4m3 out: sm_89+
        from dsmath_kernels import fp8_gemm_triton

        return fp8_gemm_triton.quantize(x)
    q, s = quantize_fp8_groups_ref(x)
    return q, s.contiguous()


@_quantize_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], _nb(x.shape[1]), dtype=torch.float32)


def quantize_fp8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] e4m3, scale [M, ceil(K/128)] fp32): per token per 128 channels,
    scale = max(amax, 1e-10) / 448, q = x / scale rounded to nearest even (x = q * scale up to e4m3 rounding)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    return _quantize_op(x)


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight quantisation (offline, model.quantize): w [..., N, K] float -> (q [..., N, K] e4m3,
    scale_inv [..., ceil(N/128), ceil(K/128)] fp32), W = q * scale_inv per 128 x 128 block (DeepSeek-V3 format)."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES)
    if w.dim() < 2:
        raise ValueError(f"w: expected a matrix (or a stack of them), got shape {list(w.shape)}")
    if block != BLOCK:
        raise ValueError(f"block: only {BLOCK} x {BLOCK} blocks are supported (DeepSeek-V3 / DeepGEMM), got {block}")
    _dispatch.take(_offline("quantize_fp8_blocks"))
    return quantize_blocks_ref(w, block)


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """q [..., N, K] e4m3, scale_inv [..., ceil(N/128), ceil(K/128)] -> [..., N, K] fp32."""
    _check_weight("q", "scale_inv", q, scale_inv, q.dim())
    _dispatch.take(_offline("dequantize_fp8_blocks"))
    return dequantize_blocks_ref(q, scale_inv)


def _offline(op: str) -> _dispatch.Choice:
    return _dispatch.forced(op) or _dispatch.by_design(op, "torch", "offline weight (de)quantisation in PyTorch")


# ---------------------------------------------------------------- dense GEMM

def _check_weight(wname: str, sname: str, w, s, ndim: int, device=None) -> None:
    check_tensor(wname, w, ndim=ndim, dtypes=(FP8,), device=device)
    check_tensor(sname, s, ndim=ndim, dtypes=(torch.float32,), device=w.device)
    check_shape(sname, s, [*w.shape[:-2], _nb(w.shape[-2]), _nb(w.shape[-1])])


def _check_act(a, a_scale, K: int) -> None:
    if a_scale is None:
        check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    else:
        check_tensor("a", a, ndim=2, dtypes=(FP8,))
        check_tensor("a_scale", a_scale, ndim=2, dtypes=(torch.float32,), device=a.device)
        check_shape("a_scale", a_scale, [a.shape[0], _nb(K)])
    if a.shape[1] != K:
        raise ValueError(f"a: expected shape [M, {K}] (K must match the weight), got {list(a.shape)}")


def _out_dtype(a: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if a.dtype == FP8 else a.dtype


def _dequant_act(a, a_scale):
    return a.float() if a_scale is None else dequantize_fp8_groups_ref(a, a_scale)


@torch.library.custom_op("dsmath::fp8_gemm", mutates_args=())
def _fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    backend = _dispatch.take(_choose("fp8_gemm", a.device, "native" if a_scale is None else "fp8")).backend
    if backend == "triton":
        from dsmath_kernels import fp8_gemm_triton

        return fp8_gemm_triton.gemm(a, w[None], w_scale[None], a_scale=a_scale, out_dtype=out_dtype)
    if backend == "reference":
        return fp8_gemm_ref(a, w, w_scale, a_scale, out_dtype=out_dtype)
    y = _dequant_act(a, a_scale) @ dequantize_blocks_ref(w, w_scale).T  # [M, N] fp32
    return y.to(out_dtype)


@_fp8_gemm_op.register_fake
def _(a, a_scale, w, w_scale, out_dtype):
    return a.new_empty(a.shape[0], w.shape[0], dtype=out_dtype)


def fp8_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, *, a_scale: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [M, N] = A @ W.T with W = w * w_scale per 128 x 128 block (w [N, K] e4m3, w_scale [ceil(N/128),
    ceil(K/128)] fp32) and A = a (float [M, K]: weight-only) or a * a_scale (e4m3 [M, K] with a_scale
    [M, ceil(K/128)] from quantize_fp8_groups: W8A8). fp32 accumulation; output out_dtype (default: a's dtype, bf16 for
    an e4m3 a)."""
    check_tensor("w", w, ndim=2, dtypes=(FP8,))
    _check_weight("w", "w_scale", w, w_scale, 2)
    _check_act(a, a_scale, w.shape[1])
    check_tensor("a", a, device=w.device)
    out_dtype = out_dtype or _out_dtype(a)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: {out_dtype} not supported (float32, float16, bfloat16)")
    return _fp8_gemm_op(a, a_scale, w, w_scale, out_dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
               activation: str = "auto") -> torch.Tensor:
    """nn.Linear with an FP8 block-scaled weight: x [..., K] float, w [N, K] e4m3, w_scale [ceil(N/128),
    ceil(K/128)] -> [..., N] in x's dtype. activation "fp8" quantises x per token per 128 first (W8A8), "native"
    keeps it (weight-only), "auto" picks by device (module docstring)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_activation(activation, x.device) == "fp8":
        q, s = quantize_fp8_groups(x2)
        y = fp8_gemm(q, w, w_scale, a_scale=s, out_dtype=x.dtype)
    else:
        y = fp8_gemm(x2, w, w_scale)
    if bias is not None:
        y = y + bias
    return y.view(*lead, w.shape[0])


def _explain_linear(x, w, w_scale, bias=None, *, activation: str = "auto") -> _dispatch.Choice:
    """fp8_linear is quantize_fp8_groups (W8A8) then fp8_gemm: its choice is the GEMM's."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    return _choose("fp8_gemm", x.device, resolve_activation(activation, x.device))


_dispatch.register_explain("fp8_linear", _explain_linear)


# ---------------------------------------------------------------- grouped GEMM

def _grouped_torch(a, a_scale, w, w_scale, offsets, out_dtype):
    """Per expert segment: dequantise that expert's weight only, matmul; rows outside every segment are 0."""
    M, N = a.shape[0], w.shape[1]
    y = torch.zeros(M, N, dtype=out_dtype, device=a.device)
    for e, s, t in _segments(offsets[: w.shape[0] + 1], M):
        A = _dequant_act(a[s:t], None if a_scale is None else a_scale[s:t])
        y[s:t] = (A @ dequantize_blocks_ref(w[e], w_scale[e]).T).to(out_dtype)
    return y


@torch.library.custom_op("dsmath::grouped_gemm_fp8", mutates_args=())
def _grouped_op(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor,
                expert_offsets: torch.Tensor) -> torch.Tensor:
    act = "native" if a_scale is None else "fp8"
    backend = _dispatch.take(_choose("grouped_gemm_fp8", a.device, act)).backend
    if backend == "triton":
        from dsmath_kernels import fp8_gemm_triton

        return fp8_gemm_triton.gemm(a, w, w_scale, expert_offsets, a_scale=a_scale, out_dtype=_out_dtype(a))
    if backend == "reference":
        return grouped_gemm_fp8_ref(a, w, w_scale, expert_offsets, a_scale)
    return _grouped_torch(a, a_scale, w, w_scale, expert_offsets, _out_dtype(a))


@_grouped_op.register_fake
def _(a, a_scale, w, w_scale, expert_offsets):
    return a.new_empty(a.shape[0], w.shape[1], dtype=_out_dtype(a))


def grouped_gemm_fp8(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, expert_offsets: torch.Tensor, *,
                     a_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped fp8_gemm: a [M, K] rows grouped by expert (float, or e4m3 with a_scale [M, ceil(K/128)]), w [E, N, K]
    e4m3, w_scale [E, ceil(N/128), ceil(K/128)], expert_offsets [E+1] -> y [M, N]: y[s:t] = A[s:t] @ W[e].T on
    expert e's segment [off[e], off[e+1]); rows >= off[E] are 0."""
    check_tensor("w", w, ndim=3, dtypes=(FP8,))
    _check_weight("w", "w_scale", w, w_scale, 3)
    _check_act(a, a_scale, w.shape[2])
    check_tensor("a", a, device=w.device)
    check_tensor("expert_offsets", expert_offsets, device=a.device)
    _check_offsets(expert_offsets, w.shape[0], a.shape[0])
    return _grouped_op(a, a_scale, w, w_scale, expert_offsets)


# ---------------------------------------------------------------- routed-expert layer

def experts_forward(x, w_gate_up, s_gate_up, w_down, s_down, weights, ids, activation: str, x_scale=None,
                    out_dtype=None, backend: str | None = None) -> torch.Tensor:
    """The routed-expert layer without checks (callers validated): FP8 experts when s_gate_up is given, else the
    float experts of dsmath_kernels.moe. ids [T, K] may hold -1 = "skip this slot" (expert parallelism: the
    expert lives on another rank); those slots go to a virtual last group that is never computed. x may arrive
    already quantised (e4m3 with x_scale [T, ceil(H/128)], e.g. dispatched across ranks in FP8); out_dtype is then
    the output's dtype (else x's). backend: the FP8 choice the caller took; None (model.parallel's expert-parallel
    layer) takes it here, through _dispatch like the public ops (moe_experts_fp8 / moe_experts): a fallback warns,
    strict mode raises, a forced reference runs the dequantise-and-matmul path (the reference's semantics)."""
    E, I2, _ = w_gate_up.shape
    T, K = ids.shape
    out_dtype = out_dtype or x.dtype
    act = resolve_activation(activation, x.device) if s_gate_up is not None else "native"
    if backend is None:
        from dsmath_kernels import moe

        choice = (_choose("moe_experts_fp8", x.device, act) if s_gate_up is not None
                  else moe._choose_experts(x.device, x.dtype, E))
        backend = _dispatch.take(choice).backend
    skip = ids < 0
    ids = torch.where(skip, E, ids).to(torch.int32)  # virtual group E: its rows are past off[E], written as zeros
    order, offsets, inverse = _permute_impl(ids, E + 1, 1)
    offsets = offsets[: E + 1]
    if x_scale is not None and act != "fp8":
        x, x_scale = dequantize_fp8_groups_ref(x, x_scale).to(out_dtype), None
    if s_gate_up is None:  # float experts (dsmath_kernels.moe's fused path)
        from dsmath_kernels import moe

        if moe._use_triton(x):
            from dsmath_kernels import grouped_gemm_triton

            y = grouped_gemm_triton.moe_experts_fused(x, w_gate_up, w_down, weights, order, offsets)
            return _combine(y, None, inverse)
        h = moe._gemm_impl(x, w_gate_up, offsets, rows=order, topk=K)  # [R, 2I]
        y = moe._gemm_impl(moe._silu_mul(h), w_down, offsets)  # [R, H]
        return _combine(y, weights, inverse)
    nb = s_gate_up.shape[1] // 2  # gate blocks, then up blocks
    if backend == "triton":
        from dsmath_kernels import fp8_gemm_triton as ft

        rw = weights.reshape(-1).float()
        if act == "fp8":
            xq, xs = (x, x_scale) if x_scale is not None else quantize_fp8_groups(x)  # once per token, then gathered
            aq, as_ = ft.gemm(xq, w_gate_up, s_gate_up, offsets, a_scale=xs, rows=order, topk=K, act=True,
                              up_blocks=nb, quant_out=True)  # SiLU(g) * u re-quantised in the epilogue
            y = ft.gemm(aq, w_down, s_down, offsets, a_scale=as_, rows=order, gather=False, route_w=rw,
                        out_dtype=out_dtype)
        else:
            a = ft.gemm(x, w_gate_up, s_gate_up, offsets, rows=order, topk=K, act=True, up_blocks=nb,
                        out_dtype=x.dtype)
            y = ft.gemm(a, w_down, s_down, offsets, rows=order, gather=False, route_w=rw, out_dtype=out_dtype)
        return _combine(y, None, inverse)
    xf = dequantize_fp8_groups_ref(x, x_scale) if x_scale is not None else x
    y = _experts_torch(xf, w_gate_up, s_gate_up, w_down, s_down, order, offsets, K, act == "fp8")
    return _combine(y.to(out_dtype), weights, inverse)


def _experts_torch(x, w_gate_up, s_gate_up, w_down, s_down, order, offsets, topk: int, quant: bool):
    """CPU path: per expert segment, dequantise that expert's weights and run gate-up, SiLU-mul, down in fp32
    (activations quantised and dequantised per token per 128 first when quant). Returns y [R, H] unweighted."""
    R, H = order.shape[0], x.shape[1]
    inter, nb = w_gate_up.shape[1] // 2, s_gate_up.shape[1] // 2
    q = (lambda t: dequantize_fp8_groups_ref(*quantize_fp8_groups_ref(t))) if quant else (lambda t: t.float())
    xq = q(x)  # [T, H] fp32
    y = torch.zeros(R, H, dtype=x.dtype, device=x.device)
    for e, s, t in _segments(offsets, R):
        rows = order[s:t].long()
        a = xq[torch.div(rows.clamp_min(0), topk, rounding_mode="floor")]  # [m, H]
        g = a @ dequantize_blocks_ref(w_gate_up[e, :inter], s_gate_up[e, :nb]).T  # [m, I]
        u = a @ dequantize_blocks_ref(w_gate_up[e, inter:], s_gate_up[e, nb:]).T
        h = q(torch.nn.functional.silu(g) * u)
        y[s:t] = (h @ dequantize_blocks_ref(w_down[e], s_down[e]).T).to(x.dtype)
    return y


@torch.library.custom_op("dsmath::moe_experts_fp8", mutates_args=())
def _moe_experts_fp8_op(x: torch.Tensor, w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor,
                        s_down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        activation: str) -> torch.Tensor:
    act = resolve_activation(activation, x.device)
    backend = _dispatch.take(_choose("moe_experts_fp8", x.device, act)).backend
    if backend == "reference":
        return moe_experts_fp8_ref(x, w_gate_up, s_gate_up, w_down, s_down, weights, ids, act == "fp8")
    return experts_forward(x, w_gate_up, s_gate_up, w_down, s_down, weights, ids, act, backend=backend)


@_moe_experts_fp8_op.register_fake
def _(x, w_gate_up, s_gate_up, w_down, s_down, weights, ids, activation):
    return torch.empty_like(x)


def moe_experts_fp8(x: torch.Tensor, w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor,
                    s_down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *,
                    activation: str = "auto") -> torch.Tensor:
    """Routed-expert layer with FP8 experts (inference). x [T, H] float, w_gate_up [E, 2I, H] e4m3 (gate rows, then
    up rows) with s_gate_up [E, 2 * ceil(I/128), ceil(H/128)] (gate blocks, then up blocks: each projection keeps
    its own blocks, as checkpoints store them), w_down [E, H, I] e4m3 with s_down [E, ceil(H/128), ceil(I/128)],
    weights [T, K] fp32, ids [T, K] int32 in [0, E) -> out [T, H] in x's dtype:
        out[t] = sum_j weights[t, j] * Wd[e] @ (silu(g) * u),  [g; u] = Wgu[e] @ x[t],  e = ids[t, j]
    with activations quantised per token per 128 (before the gate-up GEMM and after SiLU-mul) when activation
    resolves to "fp8". Spec: reference.fp8.moe_experts_fp8_ref."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, H = x.shape
    check_tensor("w_gate_up", w_gate_up, ndim=3, dtypes=(FP8,), device=x.device)
    E, I2 = w_gate_up.shape[:2]
    if I2 % 2 or w_gate_up.shape[2] != H:
        raise ValueError(f"w_gate_up: expected shape [E, 2I, {H}], got {list(w_gate_up.shape)}")
    check_tensor("s_gate_up", s_gate_up, ndim=3, dtypes=(torch.float32,), device=x.device)
    check_shape("s_gate_up", s_gate_up, [E, 2 * _nb(I2 // 2), _nb(H)])
    check_tensor("w_down", w_down, ndim=3, dtypes=(FP8,), device=x.device)
    check_shape("w_down", w_down, [E, H, I2 // 2])
    _check_weight("w_down", "s_down", w_down, s_down, 3)
    _check_routing(x, weights, ids, E)
    return _moe_experts_fp8_op(x, w_gate_up, s_gate_up, w_down, s_down, weights, ids.to(torch.int32),
                               check_choice("activation", activation, ACTIVATIONS))
