"""Tests for the fused GRPO ops (dsmath_kernels.grpo): loss, d hidden, d weight and metrics against the naive
float64 full-logits reference for every loss_type, with / without old and ref log-probs, temperature != 1, sequences
with no unmasked token, vocab sizes that are not multiples of the chunk; the Triton kernels in the interpreter;
agreement with TRL's GRPO formulas; boundary checks. Shapes are tiny (the interpreter is slow)."""

import pytest
import torch

from dsmath_kernels import grpo, grpo_loss, token_logprobs
from dsmath_kernels.reference.grpo import LOSS_TYPES, grpo_loss_ref, token_logprobs_ref
from dsmath_kernels.testing import assert_close


def _inputs(B, T, H, V, dtype=torch.float32, *, p_mask=0.7, with_old=True, with_ref=True):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) * (2.0 / H**0.5)).to(dtype)  # logits of a few units: a peaked, realistic softmax
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < p_mask
    adv = torch.randn(B)
    lp = token_logprobs_ref(hidden.double(), weight.double(), targets).float()
    old = (lp + 0.3 * torch.randn(B, T)) if with_old else None  # ratios spread across both clip edges
    ref = (lp + 0.2 * torch.randn(B, T)) if with_ref else None
    return hidden, weight, targets, mask, adv, old, ref


def _tis_weights(B, T):
    """Truncated importance weights as the trainer makes them: min(exp(noise), 2) — many below 1, some cut at 2."""
    return torch.exp(0.5 * torch.randn(B, T)).clamp(max=2.0)


def _check_against_ref(inputs, *, loss_type, temperature=1.0, beta=0.04, backend="torch", atol=1e-5, rtol=1e-4,
                       grad_atol=None, token_weights=None):
    hidden, weight, targets, mask, adv, old, ref = inputs
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, met = grpo_loss(h, w, targets, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=beta,
                          temperature=temperature, loss_type=loss_type, backend=backend, token_weights=token_weights)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    d = (lambda t: None if t is None else t.double())
    loss64, met64 = grpo_loss_ref(h64, w64, targets, mask, adv.double(), old_logprobs=d(old), ref_logprobs=d(ref),
                                  beta=beta, temperature=temperature, loss_type=loss_type,
                                  token_weights=d(token_weights))
    dh64, dw64 = torch.autograd.grad(loss64, (h64, w64))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss64, atol=atol, rtol=rtol, name="loss")
    gscale = max(dh64.abs().max().item(), dw64.abs().max().item(), 1e-12)  # grads: error relative to their scale
    ga = grad_atol if grad_atol is not None else atol
    assert_close(dh, dh64, atol=ga * gscale, rtol=rtol, name="d hidden")
    assert_close(dw, dw64, atol=ga * gscale, rtol=rtol, name="d weight")
    assert set(met) == set(met64)
    for k in met:
        assert met[k].dim() == 0 and not met[k].requires_grad
        assert_close(met[k], met64[k], atol=atol * 10, rtol=rtol * 10, name=f"metrics[{k}]")


@pytest.fixture
def small_chunks(monkeypatch):
    """Torch path: 37-column vocab chunks, so V is never a multiple of the chunk."""
    monkeypatch.setattr(grpo, "CHUNK_ELEMS", 1)
    monkeypatch.setattr(grpo, "MIN_CHUNK", 37)


# --------------------------------------------------------------------------------------------- torch (CPU) path
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old,ref", [(False, False), (True, False), (False, True), (True, True)])
def test_grpo_loss_torch(small_chunks, loss_type, old, ref):
    _check_against_ref(_inputs(3, 7, 24, 131, with_old=old, with_ref=ref), loss_type=loss_type)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_torch_temperature_and_empty_rows(small_chunks, loss_type):
    inputs = list(_inputs(4, 6, 16, 100))
    inputs[3][1] = False  # sequence 1 has no unmasked token
    inputs[3][2] = True  # sequence 2 fully unmasked
    _check_against_ref(tuple(inputs), loss_type=loss_type, temperature=0.7, beta=0.1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_token_weights_torch(small_chunks, loss_type):
    """Per-token weights on the policy-gradient term (TIS): loss, d hidden, d weight vs the float64 reference."""
    inputs = _inputs(3, 7, 24, 131)
    _check_against_ref(inputs, loss_type=loss_type, token_weights=_tis_weights(3, 7))


def test_token_weights_scale_only_the_policy_gradient_term():
    """Weights w: d loss = w * d(surrogate) + d(beta * KL) per token — checked by pulling the two terms apart."""
    hidden, weight, targets, mask, adv, old, ref = _inputs(2, 5, 16, 60, p_mask=1.0)
    tw = _tis_weights(2, 5)

    def grad(**kw):
        h = hidden.clone().requires_grad_()
        loss, _ = grpo_loss(h, weight, targets, mask, adv, old_logprobs=old, ref_logprobs=ref, loss_type="dapo",
                            **kw)
        return torch.autograd.grad(loss, (h,))[0]

    only_kl = grad(beta=0.5) - grad(beta=0.0)  # zero weights leave only the KL term
    assert_close(grad(beta=0.5, token_weights=torch.zeros(2, 5)), only_kl, atol=1e-6, rtol=1e-5, name="w = 0")
    pg = grad(beta=0.0, token_weights=tw)
    one_token = torch.zeros(2, 5)
    one_token[1, 3] = 1.0
    assert (pg - grad(beta=0.0) != 0).any()  # the weights change the gradient
    scaled = grad(beta=0.0, token_weights=one_token * tw[1, 3])
    assert_close(scaled, tw[1, 3] * grad(beta=0.0, token_weights=one_token), atol=1e-7, rtol=1e-5, name="linear")


def test_grpo_loss_all_masked(small_chunks):
    inputs = list(_inputs(2, 3, 8, 50))
    inputs[3] = torch.zeros(2, 3, dtype=torch.bool)
    for lt in LOSS_TYPES:
        _check_against_ref(tuple(inputs), loss_type=lt)


def test_grpo_loss_single_chunk_default():
    _check_against_ref(_inputs(2, 5, 32, 300), loss_type="grpo", temperature=1.3)


def test_grpo_loss_bf16_torch():
    """bf16 inputs, fp32 accumulation: compare with the float64 reference on the same (bf16-rounded) values."""
    _check_against_ref(_inputs(2, 5, 32, 200, torch.bfloat16), loss_type="dapo", atol=1e-4, rtol=1e-3,
                       grad_atol=1e-2)


def test_token_logprobs_torch(small_chunks):
    hidden, weight, targets, *_ = _inputs(3, 5, 16, 150)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp = token_logprobs(h, w, targets, temperature=0.6)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64 = token_logprobs_ref(h64, w64, targets, temperature=0.6)
    assert lp.shape == (3, 5) and lp.dtype == torch.float32
    assert_close(lp, lp64, atol=1e-5, rtol=1e-5, name="logp")
    g = torch.randn(3, 5)  # any downstream loss: the op's backward takes a general d logp
    dh, dw = torch.autograd.grad(lp, (h, w), g)
    dh64, dw64 = torch.autograd.grad(lp64, (h64, w64), g.double())
    assert_close(dh, dh64, atol=1e-5, rtol=1e-4, name="d hidden")
    assert_close(dw, dw64, atol=1e-5, rtol=1e-4, name="d weight")


def test_token_logprobs_no_grad_and_frozen_head():
    hidden, weight, targets, *_ = _inputs(2, 3, 8, 40)
    with torch.no_grad():
        lp = token_logprobs(hidden, weight, targets)
    assert not lp.requires_grad
    h = hidden.clone().requires_grad_()
    lp = token_logprobs(h, weight, targets)  # weight frozen: only d hidden
    (dh,) = torch.autograd.grad(lp.sum(), (h,))
    h64 = hidden.double().requires_grad_()
    (dh64,) = torch.autograd.grad(token_logprobs_ref(h64, weight.double(), targets).sum(), (h64,))
    assert_close(dh, dh64, atol=1e-5, rtol=1e-4, name="d hidden")


def test_masked_padding_is_inert():
    """old / ref values at masked-out positions (padding) never reach the loss, the grads or the metrics."""
    inputs = list(_inputs(2, 4, 8, 30))
    mask = inputs[3]
    h = inputs[0].clone().requires_grad_()
    loss, met = grpo_loss(h, inputs[1], inputs[2], mask, inputs[4], old_logprobs=inputs[5], ref_logprobs=inputs[6])
    (dh,) = torch.autograd.grad(loss, (h,))
    old = inputs[5].masked_fill(~mask, float("nan"))
    ref = inputs[6].masked_fill(~mask, float("-inf"))
    h2 = inputs[0].clone().requires_grad_()
    loss2, met2 = grpo_loss(h2, inputs[1], inputs[2], mask, inputs[4], old_logprobs=old, ref_logprobs=ref,
                            token_weights=torch.ones(2, 4).masked_fill(~mask, float("nan")))
    (dh2,) = torch.autograd.grad(loss2, (h2,))
    assert_close(loss2, loss, atol=0, rtol=0, name="loss")
    assert_close(dh2, dh, atol=0, rtol=0, name="d hidden")
    for k in met:
        assert_close(met2[k], met[k], atol=0, rtol=0, name=k)


def test_custom_op_opcheck():
    hidden, weight, targets, *_ = _inputs(2, 3, 8, 40)
    h = hidden.reshape(6, 8).requires_grad_()
    torch.library.opcheck(grpo._fwd_op, (h, weight, targets.reshape(6), 0.9, "torch"))


# ------------------------------------------------------------------------------------------------ TRL agreement
def test_matches_trl_formulas():
    """Per-token loss and aggregations as TRL's GRPOTrainer._compute_loss writes them (trl/trainer/grpo_trainer.py):
        per_token_kl = exp(ref - logp) - (ref - logp) - 1
        coef_1 = exp(logp - old); coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * per_token_kl
        grpo:    ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        bnpo:    (per_token_loss * mask).sum() / mask.sum().clamp(min=1)            (our "dapo")
        dr_grpo: (per_token_loss * mask).sum() / (B * max_completion_length)         (T here)
    and the advantages: (r - mean_grouped) / (std_grouped + 1e-4) with torch.std (unbiased)."""
    B, T, H, V = 8, 6, 16, 64
    hidden, weight, targets, mask, adv, old, ref = _inputs(B, T, H, V)
    old = old + 0.3 * torch.randn(B, T)
    beta, el, eh = 0.04, 0.2, 0.28
    logp = token_logprobs_ref(hidden.double(), weight.double(), targets)
    kl = torch.exp(ref.double() - logp) - (ref.double() - logp) - 1
    c1 = torch.exp(logp - old.double())
    c2 = torch.clamp(c1, 1 - el, 1 + eh)
    A = adv.double().unsqueeze(1)
    ptl = -torch.min(c1 * A, c2 * A) + beta * kl
    m = mask.double()
    trl = {"grpo": ((ptl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean(),
           "dapo": (ptl * m).sum() / m.sum().clamp(min=1.0),
           "dr_grpo": (ptl * m).sum() / (B * T)}
    for lt, expected in trl.items():
        loss, met = grpo_loss(hidden, weight, targets, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=beta,
                              eps_low=el, eps_high=eh, loss_type=lt)
        assert_close(loss, expected, atol=1e-5, rtol=1e-4, name=lt)
    assert_close(met["kl"], (kl * m).sum() / m.sum(), atol=1e-6, rtol=1e-4, name="kl")
    low = ((c1 < 1 - el) & (A < 0)).double()
    high = ((c1 > 1 + eh) & (A > 0)).double()
    assert_close(met["clip_low"], (low * m).sum() / m.sum(), atol=1e-6, rtol=0, name="clip_low")
    assert_close(met["clip_high"], (high * m).sum() / m.sum(), atol=1e-6, rtol=0, name="clip_high")
    assert met["clip_low"] > 0 and met["clip_high"] > 0  # the test inputs do exercise both clip edges


def test_on_policy_gradient_is_advantage_weighted_logprob_grad():
    """old = None, beta = 0: ratio == 1 and d loss = -A * d logp / n (the REINFORCE-with-baseline form)."""
    hidden, weight, targets, mask, adv, *_ = _inputs(2, 4, 8, 30, p_mask=1.0)
    h = hidden.clone().requires_grad_()
    loss, met = grpo_loss(h, weight, targets, mask, adv, beta=0.0, loss_type="dapo")
    (dh,) = torch.autograd.grad(loss, (h,))
    h2 = hidden.clone().requires_grad_()
    lp = token_logprobs(h2, weight, targets)
    (dh2,) = torch.autograd.grad(-(adv.unsqueeze(1) * lp).sum() / lp.numel(), (h2,))
    assert_close(dh, dh2, atol=1e-6, rtol=1e-5, name="d hidden")
    assert met["ratio"].item() == 1.0 and met["clip"].item() == 0.0 and met["kl"].item() == 0.0


# ------------------------------------------------------------------------------------------------- boundary checks
def test_errors_name_the_argument():
    hidden, weight, targets, mask, adv, old, ref = _inputs(2, 3, 8, 20)
    cases = [
        ({"hidden": hidden[0]}, "hidden"),
        ({"weight": weight[:, :4]}, "weight"),
        ({"weight": weight.double()}, "weight"),
        ({"targets": targets.float()}, "targets"),
        ({"targets": targets[:, :2]}, "targets"),
        ({"targets": targets.clone().fill_(20)}, "targets"),
        ({"targets": targets.clone().fill_(-1)}, "targets"),
        ({"mask": mask.float()}, "mask"),
        ({"mask": mask[:1]}, "mask"),
        ({"advantages": adv[:1]}, "advantages"),
        ({"old_logprobs": old[:, :1]}, "old_logprobs"),
        ({"ref_logprobs": ref.long()}, "ref_logprobs"),
        ({"token_weights": ref[:1]}, "token_weights"),
        ({"token_weights": ref.bool()}, "token_weights"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"temperature": 0.0}, "temperature"),
        ({"beta": -1.0}, "beta"),
        ({"eps_low": 1.0}, "eps_low"),
        ({"backend": "cuda"}, "backend"),
    ]
    base = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "advantages": adv}
    for change, name in cases:
        kw = {**base, **change}
        args = [kw.pop(k) for k in ("hidden", "weight", "targets", "mask", "advantages")]
        with pytest.raises((ValueError, TypeError), match=name):
            grpo_loss(*args, **kw)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets + 20)


def test_zero_tokens():
    for backend in ("torch", "triton"):
        h = torch.randn(2, 0, 8, requires_grad=True)
        w = torch.randn(20, 8, requires_grad=True)
        t = torch.zeros(2, 0, dtype=torch.long)
        loss, met = grpo_loss(h, w, t, torch.zeros(2, 0, dtype=torch.bool), torch.randn(2), backend=backend)
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0 and dh.shape == h.shape and (dw == 0).all() and met["entropy"].item() == 0.0


# ------------------------------------------------------------------------------------ Triton kernels (interpreter)
@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_triton(monkeypatch, mode, loss_type):
    """fp32; V = 70 is not a multiple of the 32-column tile; 3 vocab splits in the forward."""
    monkeypatch.setenv("DSMATH_GRPO_BWD", mode)
    inputs = list(_inputs(2, 5, 24, 70))
    inputs[3][0] = False  # sequence 0 has no unmasked token
    _check_against_ref(tuple(inputs), loss_type=loss_type, temperature=0.8, backend="triton")


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_grpo_loss_triton_token_weights(monkeypatch, mode):
    """TIS weights through the Triton kernels (interpreter): the weighted d logp drives their backward."""
    monkeypatch.setenv("DSMATH_GRPO_BWD", mode)
    _check_against_ref(_inputs(2, 5, 24, 70), loss_type="dapo", backend="triton", token_weights=_tis_weights(2, 5))


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_grpo_loss_triton_on_policy_no_ref(monkeypatch, mode):
    monkeypatch.setenv("DSMATH_GRPO_BWD", mode)
    _check_against_ref(_inputs(3, 4, 16, 45, with_old=False, with_ref=False), loss_type="grpo", backend="triton")


@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("dtype,atol,grad_atol", [(torch.float16, 1e-4, 2e-3), (torch.bfloat16, 1e-4, 1e-2)])
def test_token_logprobs_triton_half(monkeypatch, mode, dtype, atol, grad_atol):
    """Half-precision inputs, fp32 accumulation: logp to fp32 accuracy on the rounded inputs; the grads carry the
    output rounding (and, in "split" mode, the half-precision d logits buffer, as a bf16 autograd would)."""
    from dsmath_kernels import grpo_triton

    monkeypatch.setenv("DSMATH_GRPO_BWD", mode)
    monkeypatch.setattr(grpo_triton, "SPLIT_BYTES", 1)  # split mode: 32-column super-chunks, the last one partial
    hidden, weight, targets, *_ = _inputs(2, 5, 24, 70, dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp = token_logprobs(h, w, targets, temperature=1.2, backend="triton")
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp64 = token_logprobs_ref(h64, w64, targets, temperature=1.2)
    assert_close(lp, lp64, atol=atol, rtol=1e-4, name="logp")
    g = torch.randn(2, 5)
    dh, dw = torch.autograd.grad(lp, (h, w), g)
    dh64, dw64 = torch.autograd.grad(lp64, (h64, w64), g.double())
    assert dh.dtype == dtype and dw.dtype == dtype
    scale = max(dh64.abs().max().item(), dw64.abs().max().item())
    assert_close(dh, dh64, atol=grad_atol * scale, rtol=1e-2, name="d hidden")
    assert_close(dw, dw64, atol=grad_atol * scale, rtol=1e-2, name="d weight")


def test_triton_matches_torch_path_entropy_and_lse():
    from dsmath_kernels import grpo_triton

    hidden, weight, targets, *_ = _inputs(1, 9, 16, 100)
    h, t = hidden[0], targets[0]
    a = grpo_triton.lse_forward(h, weight, t, 1 / 0.9)
    b = grpo._torch_fwd(h, weight, t, 1 / 0.9)
    for x, y, name in zip(a, b, ("logp", "lse", "entropy")):
        assert_close(x, y, atol=1e-5, rtol=1e-5, name=name)


# ------------------------------------------------------------------------------------------------------ GPU (CUDA)
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["triton-split", "triton-fused", "torch"])
@pytest.mark.parametrize("dtype,grad_atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_grpo_loss_cuda(monkeypatch, variant, dtype, grad_atol, launches):
    """Compiled kernels at a realistic tile count (several splits and super-chunks, odd V) and the torch path's
    CUDA branch (half-precision GEMMs with fp32 output), vs float64 on the GPU."""
    from dsmath_kernels import grpo_triton

    backend, _, mode = variant.partition("-")
    monkeypatch.setenv("DSMATH_GRPO_BWD", mode or "split")
    monkeypatch.setattr(grpo, "CUDA_CHUNK_ELEMS", 384 * 1000)  # torch path: several vocab chunks
    monkeypatch.setattr(grpo_triton, "SPLIT_BYTES", 1 << 20)
    torch.manual_seed(0)
    B, T, H, V = 4, 96, 256, 5003
    hidden, weight, targets, mask, adv, old, ref = (None if t is None else t.cuda()
                                                    for t in _inputs(B, T, H, V, dtype))
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    tw = _tis_weights(B, T).cuda()
    loss, met = grpo_loss(h, w, targets, mask, adv, old_logprobs=old, ref_logprobs=ref, temperature=0.9,
                          backend=backend, token_weights=tw)
    launches.assert_ran("grpo_loss", backend)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, met64 = grpo_loss_ref(h64, w64, targets, mask, adv.double(), old_logprobs=old.double(),
                                  ref_logprobs=ref.double(), temperature=0.9, token_weights=tw.double())
    dh64, dw64 = torch.autograd.grad(loss64, (h64, w64))
    assert_close(loss, loss64, atol=1e-4, rtol=1e-3, name="loss")
    scale = max(dh64.abs().max().item(), dw64.abs().max().item())
    assert_close(dh, dh64, atol=grad_atol * scale, rtol=1e-2, name="d hidden")
    assert_close(dw, dw64, atol=grad_atol * scale, rtol=1e-2, name="d weight")
    for k in met:
        assert_close(met[k], met64[k], atol=1e-3, rtol=1e-3, name=f"metrics[{k}]")
