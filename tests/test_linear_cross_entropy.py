"""linear_cross_entropy against torch's cross_entropy on full logits (float64 oracle): odd sizes, ignored targets,
every reduction, temperature, gradients w.r.t. hidden and weight, all-ignored batches, bad inputs by name."""

import pytest
import torch
import torch.nn.functional as F

from dsmath_kernels import linear_cross_entropy
from dsmath_kernels.testing import assert_close


def oracle(hidden, weight, targets, ignore_index=-100, reduction="mean", temperature=1.0):
    logits = hidden.double() @ weight.double().T / temperature  # [..., V]
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction).reshape(targets.shape if reduction == "none" else ())


@pytest.mark.parametrize("shape,V", [((1, 1), 7), ((2, 7), 131), ((19,), 300), ((3, 5, 4), 64)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cross_entropy_on_full_logits(shape, V, reduction):
    H = 24
    hidden = torch.randn(*shape, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, shape)
    targets.view(-1)[::3] = -100  # every third token ignored (the first one too)
    if (targets != -100).sum() == 0:
        targets.view(-1)[-1] = V - 1
    out = linear_cross_entropy(hidden, weight, targets, reduction=reduction, temperature=0.7)
    ref = oracle(hidden, weight, targets, reduction=reduction, temperature=0.7)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (gh, gw) = torch.autograd.grad(out, (hidden, weight), g.float())
    (rh, rw) = torch.autograd.grad(ref, (hidden, weight), g)
    assert_close(gh, rh, atol=1e-5, rtol=1e-4, name="d hidden")
    assert_close(gw, rw, atol=1e-5, rtol=1e-4, name="d weight")


def test_custom_ignore_index_and_all_ignored():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    targets = torch.tensor([[1, 5, 5], [5, 10, 0]])
    assert_close(linear_cross_entropy(hidden, weight, targets, ignore_index=5),
                 oracle(hidden, weight, targets, ignore_index=5), atol=1e-5, rtol=1e-5)
    none = torch.full((2, 3), -100)
    loss = linear_cross_entropy(hidden, weight, none)  # torch gives NaN here; a training step wants 0
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_bad_inputs_are_refused_by_name():
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:, :2])
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t + 11)  # id == V
    with pytest.raises(TypeError, match="targets"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(TypeError, match="weight"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(h, w, t, ignore_index=None)
