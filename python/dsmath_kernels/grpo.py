"""Fused GRPO loss: `group_advantages`, `token_logprobs` and `grpo_loss` computed from the final hidden states and
the LM head without ever holding the [B*T, V] logits (DeepSeek's vocab is 102,400: at 8k tokens the fp32 logits
alone are 3.4 GB, and the naive backward holds several such tensors).

How: `token_logprobs` is one differentiable custom op (`dsmath::token_logprobs_fwd`, backward
`dsmath::token_logprobs_bwd`). The forward streams over vocab chunks with an online log-sum-exp (and the entropy
sum, which comes free with it) and keeps only per-token lse / target logit. The backward recomputes each chunk's
logits, forms d logits = g * (onehot(target) - softmax) / temperature for the chunk, and multiplies it straight into
d hidden and d weight. The GRPO surrogate, KL and aggregation act on [B, T] log-probs (negligible next to the
GEMMs) and go through ordinary autograd, so `token_logprobs` is also usable with any other per-token loss.

Backends: "triton" (grpo_triton.py, CUDA; also runs in the Triton interpreter on CPU for tests) and "torch" (the
same algorithm chunked in PyTorch: CPU, or CUDA without Triton). Spec: reference/grpo.py."""

from __future__ import annotations

import functools
import math

import torch

from dsmath_kernels import _dispatch
from dsmath_kernels._checks import FLOAT_DTYPES, check_choice, check_int, check_shape, check_tensor
from dsmath_kernels._linalg import mm_f32 as _mm_f32
from dsmath_kernels._registry import register_backend
from dsmath_kernels.reference.grpo import (
    LOSS_TYPES,
    aggregate_ref,
    group_advantages_ref,
    log_ratio_metrics_ref,
    masked_mean_ref,
    per_token_loss_ref,
    token_entropy_ref,
    token_logprobs_ref,
)

MIN_TEMPERATURE = 1e-6  # below it 1 / temperature times a logit overflows fp32 long before anything useful

BACKENDS = ("triton", "torch")
CHUNK_ELEMS = 1 << 21  # torch path: fp32 elements of one [N, Vc] logits chunk (8 MiB)
CUDA_CHUNK_ELEMS = 1 << 25  # same on CUDA (128 MiB): fewer, larger GEMMs
MIN_CHUNK = 128  # torch path: fewest vocab columns per chunk
INDEX_DTYPES = (torch.int64, torch.int32)


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _choose(op: str, device: torch.device, backend: str | None = None) -> _dispatch.Choice:
    """Triton on GPU, the chunked torch path on CPU (its design); the reference (full logits) when forced."""
    forced = _dispatch.forced(op)
    if forced:
        return forced
    if backend is not None:
        return _dispatch.by_design(op, backend, f"backend={backend!r} argument")
    if device.type == "cuda":
        if _has_triton():
            return _dispatch.kernel(op, "triton")
        return _dispatch.no_triton(op, "torch")
    if device.type == "cpu":
        return _dispatch.by_design(op, "torch", "CPU design: the chunked torch path")
    return _dispatch.no_device_kernel(op, device, "torch")


def _auto_backend(device: torch.device) -> str:
    return _choose("token_logprobs", device).backend


register_backend("grpo_loss", _auto_backend)
register_backend("token_logprobs", _auto_backend)


# ---------------------------------------------------------------------------------------------- torch (chunked) path
def _vocab_chunk(N: int, V: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_ELEMS if device.type == "cuda" else CHUNK_ELEMS
    return max(MIN_CHUNK, min(V, budget // max(N, 1)))


def _torch_fwd(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, inv_temp: float):
    """h [N, H], w [V, H], t [N] -> (logp, lse, entropy) [N] fp32, one [N, Vc] chunk at a time."""
    N, V = h.shape[0], w.shape[0]
    h = h if h.is_cuda else h.float()  # CPU: fp32 GEMMs (no fast half GEMMs there); [N, H], no copy for fp32
    m = torch.full((N,), float("-inf"), device=h.device)  # running max
    s = torch.zeros(N, device=h.device)  # running sum exp(z - m)
    u = torch.zeros(N, device=h.device)  # running sum exp(z - m) * z  (entropy = lse - u / s)
    tz = torch.zeros(N, device=h.device)  # target logit
    Vc = _vocab_chunk(N, V, h.device)
    for v0 in range(0, V, Vc):
        z = _mm_f32(h, w[v0:v0 + Vc].to(h.dtype).T)  # [N, Vc] fp32
        z.mul_(inv_temp)
        m_new = torch.maximum(m, z.amax(1))
        scale = torch.exp(m - m_new)
        hit = (t >= v0) & (t < v0 + z.shape[1])
        tz = torch.where(hit, z.gather(1, (t - v0).clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1), tz)
        e = (z - m_new.unsqueeze(1)).exp_()  # [N, Vc]
        s = s * scale + e.sum(1)
        u = u * scale + e.mul_(z).sum(1)
        m = m_new
        del z, e
    lse = m + torch.log(s)
    return tz - lse, lse, lse - u / s


def _torch_bwd(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
               inv_temp: float, need_dh: bool, need_dw: bool):
    """d logp [N] -> (d hidden [N, H] fp32 or None, d weight [V, H] in w.dtype or None), chunk by chunk:
    d z = g * (onehot(t) - softmax(z)) * inv_temp, never more than one [N, Vc] chunk. Half-precision CUDA inputs
    multiply d z in the input dtype (as a bf16 autograd would, and the Triton "split" mode does)."""
    N, V = h.shape[0], w.shape[0]
    h = h if h.is_cuda else h.float()
    gs = (g.float() * inv_temp).unsqueeze(1)  # [N, 1]
    dh = torch.zeros(N, h.shape[1], device=h.device) if need_dh else None
    dw = torch.empty_like(w) if need_dw else None
    Vc = _vocab_chunk(N, V, h.device)
    for v0 in range(0, V, Vc):
        wc = w[v0:v0 + Vc].to(h.dtype)  # [Vc, H]
        dz = _mm_f32(h, wc.T)  # [N, Vc] fp32
        dz.mul_(inv_temp).sub_(lse.unsqueeze(1)).exp_().mul_(-gs)  # -g * p
        hit = (t >= v0) & (t < v0 + wc.shape[0])
        col = (t - v0).clamp(0, wc.shape[0] - 1).unsqueeze(1)  # [N, 1]
        dz.scatter_add_(1, col, torch.where(hit.unsqueeze(1), gs, 0.0))  # + g at the target (no host sync)
        dz = dz.to(h.dtype)
        if need_dh:
            dh += _mm_f32(dz, wc)
        if need_dw:
            dw[v0:v0 + Vc] = dz.T @ h
        del dz, wc
    return dh, dw


# ------------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dsmath::token_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], targets [N] -> (logp, lse, entropy) [N] fp32."""
    if backend == "triton":
        from dsmath_kernels import grpo_triton

        return grpo_triton.lse_forward(hidden, weight, targets, 1.0 / temperature)
    return _torch_fwd(hidden, weight, targets, 1.0 / temperature)


@_fwd_op.register_fake
def _(hidden, weight, targets, temperature, backend):
    N = hidden.shape[0]
    return tuple(hidden.new_empty(N, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("dsmath::token_logprobs_bwd", mutates_args=())
def _bwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
            grad: torch.Tensor, temperature: float, backend: str, need_dh: bool,
            need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d logp [N] -> (d hidden [N, H] in hidden.dtype, d weight [V, H] in weight.dtype); an unneeded one is empty."""
    if backend == "triton":
        from dsmath_kernels import grpo_triton

        dh, dw = grpo_triton.lse_backward(hidden, weight, targets, lse, grad, 1.0 / temperature, need_dh, need_dw)
    else:
        dh, dw = _torch_bwd(hidden, weight, targets, lse, grad, 1.0 / temperature, need_dh, need_dw)
    dh = dh.to(hidden.dtype) if need_dh else hidden.new_empty(0)
    dw = dw.to(weight.dtype) if need_dw else weight.new_empty(0)
    return dh, dw


@_bwd_op.register_fake
def _(hidden, weight, targets, lse, grad, temperature, backend, need_dh, need_dw):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, backend = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, targets, lse)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(lse, ent)


def _backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, targets, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_logp is None or not (need_dh or need_dw):
        return None, None, None, None, None
    dh, dw = _bwd_op(hidden, weight, targets, lse, g_logp.contiguous(), ctx.temperature, ctx.backend, need_dh,
                     need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------- boundary checks
def _check_lm_inputs(hidden, weight, targets, temperature, backend):
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_tensor("targets", targets, ndim=2, dtypes=INDEX_DTYPES, device=hidden.device)
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (hidden size of `hidden`), got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if V == 0:
        raise ValueError("weight: vocab size is 0")
    check_shape("targets", targets, [B, T])
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature: expected a finite float >= {MIN_TEMPERATURE}, got {temperature!r}")
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
        if backend == "triton" and not _has_triton():
            raise ValueError("backend: 'triton' requested but triton is not installed")
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():  # on GPU this check
        lo, hi = int(targets.min()), int(targets.max())  # would cost a sync (and no trace takes it): kernels never
        # index memory with targets, a bad id only gives -lse
        if lo < 0 or hi >= V:
            raise ValueError(f"targets: ids must be in [0, {V}) (vocab size of weight), got min {lo} max {hi}")
    return B, T, H, V


def _per_token(name, t, B, T, device):
    if t is None:
        return None
    check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    check_shape(name, t, [B, T])
    return t.float()


def _check_float(name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite float, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        raise ValueError(f"{name}: must be in [{lo}, {'inf' if hi is None else hi}), got {v}")
    return float(v)


# ------------------------------------------------------------------------------------------------------- public ops
def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize: str = "std",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [B*G] (each prompt's G completions contiguous) -> advantages [B*G] float32:
    r - mean(group), divided by std(group) + eps when normalize="std" (DeepSeekMath, TRL `scale_rewards`),
    left undivided when "none" (Dr. GRPO). std is torch.std, the unbiased (G - 1) estimator, as TRL.
    Groups whose rewards are all equal (and every group when G == 1) get exactly 0. Computed in float64 (any finite
    fp32 rewards work); NaN / inf rewards raise ValueError (a host sync on GPU: rewards are a small vector)."""
    check_tensor("rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,) + INDEX_DTYPES + (torch.bool,))
    check_int("group_size", group_size, lo=1)
    check_choice("normalize", normalize, ("std", "none"))
    _check_float("eps", eps, lo=0.0)
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} rewards do not split into groups of group_size={group_size}")
    if rewards.dtype.is_floating_point and not bool(rewards.isfinite().all()):
        i = int((~rewards.isfinite()).nonzero()[0])
        raise ValueError(f"rewards: entry {i} is {rewards[i].item()} (rewards must be finite)")
    # float64 inside: differences and squares of fp32 rewards near 3e38 would overflow
    return group_advantages_ref(rewards.double(), group_size, normalize=normalize, eps=eps).float()


def _logprobs(op, hidden, weight, targets, temperature, backend):
    B, T, H = hidden.shape
    backend = _dispatch.take(_choose(op, hidden.device, backend)).backend
    if backend == "reference":  # DSMATH_FORCE_REFERENCE: full [B, T, V] logits
        return (token_logprobs_ref(hidden, weight, targets, temperature=temperature).float(),
                token_entropy_ref(hidden, weight, temperature=temperature).float())
    logp, _, ent = _fwd_op(hidden.reshape(B * T, H), weight, targets.reshape(B * T), float(temperature), backend)
    return logp.view(B, T), ent.view(B, T)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   backend: str | None = None) -> torch.Tensor:
    """hidden [B, T, H], weight [V, H] (same float dtype), targets [B, T] int -> [B, T] float32
    log softmax(hidden @ weight.T / temperature)[targets], in vocab chunks (never [B*T, V]).
    Differentiable w.r.t. hidden and weight. backend: None (auto), "triton" or "torch"."""
    _check_lm_inputs(hidden, weight, targets, temperature, backend)
    return _logprobs("token_logprobs", hidden, weight, targets, temperature, backend)[0]


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, *, old_logprobs: torch.Tensor | None = None,
              ref_logprobs: torch.Tensor | None = None, beta: float = 0.04, eps_low: float = 0.2,
              eps_high: float = 0.2, temperature: float = 1.0, loss_type: str = "grpo",
              backend: str | None = None,
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy loss from hidden states [B, T, H] and LM head weight [V, H]; targets [B, T] int, mask [B, T]
    bool (or int 0/1), advantages [B], optional old_logprobs / ref_logprobs [B, T] (detached inputs; their values at
    masked-out positions are ignored, padding there may be anything).
    Per token: ratio = exp(logp - old) (old = logp.detach() if None), l = -min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A) + beta*k3(ref, logp) when beta > 0 and ref given; optional token_weights [B, T] (detached, >= 0)
    multiply the policy-gradient term per token — truncated importance weights min(pi_old / pi_sampler, C) for a
    sampler-trainer mismatch, or 0/1 to drop sequences from it — in the same pass (they reach the vocab kernels'
    backward through d logp; no extra pass, no [B*T, V] tensor). loss_type: "grpo" (per-sequence mean, then mean),
    "dapo" (token mean), "dr_grpo" (sum / (B*T)). Returns (loss 0-d fp32, metrics): 0-d fp32 detached tensors
    (no host sync; call .item() to log) kl (k3; 0 without ref_logprobs), ratio, clip_low (ratio < 1 - eps_low with
    A < 0), clip_high (ratio > 1 + eps_high with A > 0), clip (either), entropy (of softmax(logits / temperature),
    from the same online log-sum-exp pass) — masked means over all tokens, as TRL logs them — and log_ratio_abs /
    log_ratio_abs_max (mean / max of |logp - old| over the mask: the sampler-trainer log-prob gap when old holds the
    sampler's log-probs on an on-policy pass).
    Exact formulas: reference/grpo.py."""
    B, T, _, _ = _check_lm_inputs(hidden, weight, targets, temperature, backend)
    if B == 0:
        raise ValueError("hidden: no sequences (B = 0); the loss of an empty batch is undefined")
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool, torch.uint8) + INDEX_DTYPES, device=hidden.device)
    check_shape("mask", mask, [B, T])
    check_tensor("advantages", advantages, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=hidden.device)
    check_shape("advantages", advantages, [B])
    old = _per_token("old_logprobs", old_logprobs, B, T, hidden.device)
    ref = _per_token("ref_logprobs", ref_logprobs, B, T, hidden.device)
    tw = _per_token("token_weights", token_weights, B, T, hidden.device)
    beta = _check_float("beta", beta, lo=0.0)
    eps_low = _check_float("eps_low", eps_low, lo=0.0, hi=1.0)
    eps_high = _check_float("eps_high", eps_high, lo=0.0)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    mask = mask.bool()

    logp, ent = _logprobs("grpo_loss", hidden, weight, targets, temperature, backend)  # [B, T] fp32
    adv = advantages.float()
    if old is not None:  # masked-out positions may hold padding (even inf/nan): make them inert
        old = torch.where(mask, old, logp.detach())
    if ref is not None:
        ref = torch.where(mask, ref, logp.detach())
    if tw is not None:
        tw = torch.where(mask, tw.detach(), 1.0)
    loss_t, ratio, kl = per_token_loss_ref(logp, adv, old, ref, beta, eps_low, eps_high, tw)  # [B, T]
    loss = aggregate_ref(loss_t, mask, loss_type)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv.unsqueeze(1) < 0)
        high = (ratio > 1 + eps_high) & (adv.unsqueeze(1) > 0)
        metrics = {"kl": kl, "ratio": ratio, "clip_low": low.float(), "clip_high": high.float(),
                   "clip": (low | high).float(), "entropy": ent}
        metrics = {k: masked_mean_ref(v, mask) for k, v in metrics.items()}
        metrics.update(log_ratio_metrics_ref(logp, logp if old is None else old, mask))
    return loss, {k: v.detach() for k, v in metrics.items()}


def _explain_advantages(*args, **kwargs) -> _dispatch.Choice:
    group_advantages(*args, **kwargs)  # the checks of a real call
    return _dispatch.by_design("group_advantages", "torch", "a few vector ops on [B*G] rewards (no kernel)")


_dispatch.register_explain("group_advantages", _explain_advantages)
