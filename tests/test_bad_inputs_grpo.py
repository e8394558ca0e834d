"""Bad inputs to group_advantages, token_logprobs and grpo_loss: each raises TypeError / ValueError naming the
argument (dtypes, shapes, mismatched sizes, out-of-range targets both ways, NaN / inf / tiny scalars, empty
batches, huge rewards), or has documented behaviour that is tested here."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.reference.grpo import group_advantages_ref
from dsmath_kernels.testing import assert_names_argument

B, T, H, V = 2, 3, 16, 40
HID, W = torch.randn(B, T, H), torch.randn(V, H)
TGT = torch.randint(0, V, (B, T))
MASK = torch.ones(B, T, dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])

LM = {  # bad (hidden, weight, targets, kwargs) shared by token_logprobs and grpo_loss
    "hidden int": (HID.int(), W, TGT, {}),
    "hidden 2-D": (HID[0], W, TGT, {}),
    "weight dtype differs": (HID, W.double(), TGT, {}),
    "weight hidden size": (HID, torch.randn(V, H + 1), TGT, {}),
    "weight empty vocab": (HID, W[:0], TGT, {}),
    "targets float": (HID, W, TGT.float(), {}),
    "targets shape": (HID, W, TGT[:, :2], {}),
    "targets = V": (HID, W, torch.full((B, T), V), {}),
    "targets -1": (HID, W, torch.full((B, T), -1), {}),
    "targets -2**40": (HID, W, torch.full((B, T), -(2**40)), {}),
    "temperature 0": (HID, W, TGT, {"temperature": 0.0}),
    "temperature 1e-40": (HID, W, TGT, {"temperature": 1e-40}),
    "temperature nan": (HID, W, TGT, {"temperature": float("nan")}),
    "temperature inf": (HID, W, TGT, {"temperature": float("inf")}),
    "temperature negative": (HID, W, TGT, {"temperature": -1.0}),
    "backend unknown": (HID, W, TGT, {"backend": "cuda"}),
}

LOSS = {
    "mask float": dict(mask=MASK.float()),
    "mask shape": dict(mask=MASK[:, :2]),
    "advantages shape": dict(advantages=ADV[:1]),
    "advantages int": dict(advantages=ADV.int()),
    "old_logprobs shape": dict(old_logprobs=torch.zeros(B, T + 1)),
    "ref_logprobs int": dict(ref_logprobs=torch.zeros(B, T, dtype=torch.int64)),
    "beta nan": dict(beta=float("nan")),
    "beta negative": dict(beta=-0.1),
    "eps_low 1": dict(eps_low=1.0),
    "eps_high inf": dict(eps_high=float("inf")),
    "loss_type unknown": dict(loss_type="ppo"),
}

ADVANTAGES = {
    "rewards 2-D": lambda: dk.group_advantages(torch.ones(2, 4), 2),
    "rewards not divisible": lambda: dk.group_advantages(torch.ones(5), 2),
    "rewards nan": lambda: dk.group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2),
    "rewards inf": lambda: dk.group_advantages(torch.tensor([1.0, float("inf"), 0.0, 1.0]), 2),
    "group_size 0": lambda: dk.group_advantages(torch.ones(4), 0),
    "normalize unknown": lambda: dk.group_advantages(torch.ones(4), 2, normalize="mad"),
    "eps negative": lambda: dk.group_advantages(torch.ones(4), 2, eps=-1.0),
    "eps nan": lambda: dk.group_advantages(torch.ones(4), 2, eps=float("nan")),
}


@pytest.mark.parametrize("name", list(LM))
@pytest.mark.parametrize("op", ["token_logprobs", "grpo_loss"])
def test_lm_bad_input(op, name):
    hid, w, tgt, kw = LM[name]
    fn = getattr(dk, op)
    with pytest.raises((TypeError, ValueError)) as e:
        if op == "token_logprobs":
            fn(hid, w, tgt, **kw)
        else:
            fn(hid, w, tgt, MASK[: hid.shape[0]] if hid.dim() == 3 else MASK, ADV, **kw)
    assert_names_argument(e.value, fn)


@pytest.mark.parametrize("name", list(LOSS))
def test_grpo_loss_bad_input(name):
    kw = dict(mask=MASK, advantages=ADV)
    kw.update(LOSS[name])
    with pytest.raises((TypeError, ValueError)) as e:
        dk.grpo_loss(HID, W, TGT, **kw)
    assert_names_argument(e.value, dk.grpo_loss)


@pytest.mark.parametrize("name", list(ADVANTAGES))
def test_group_advantages_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        ADVANTAGES[name]()
    assert_names_argument(e.value, dk.group_advantages)


def test_grpo_loss_with_no_sequences_raises_instead_of_nan():
    with pytest.raises(ValueError, match="^hidden"):
        dk.grpo_loss(HID[:0], W, TGT[:0], MASK[:0], ADV[:0])
    assert dk.token_logprobs(HID[:0], W, TGT[:0]).shape == (0, T)  # per-token log-probs of nothing: empty


def test_group_advantages_near_float32_max_stay_finite():
    """Rewards near 3e38 overflowed fp32 differences and squares: the op computes in float64."""
    r = torch.tensor([3e38, -3e38, 1e38, 3e38, 0.0, 0.0], dtype=torch.float32)
    a = dk.group_advantages(r, 2)
    assert a.isfinite().all()
    expect = group_advantages_ref(r.double(), 2).float()
    torch.testing.assert_close(a, expect)
    assert a[0] > 0 > a[1] and a[2] < 0 < a[3] and a[4] == 0 == a[5]


def test_tiny_but_valid_temperature_is_accepted():
    lp = dk.token_logprobs(HID, W, TGT, temperature=1e-6)
    assert lp.isfinite().all()
