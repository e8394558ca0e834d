"""Tests for `group_advantages`: DeepSeekMath / TRL normalization (torch.std, unbiased), Dr. GRPO (no division),
exact zeros for zero-variance groups, boundary checks."""

import pytest
import torch

from dsmath_kernels import group_advantages
from dsmath_kernels.testing import assert_close


@pytest.mark.parametrize("G", [2, 3, 8, 16])
def test_std_matches_trl(G):
    r = torch.rand(5 * G)
    a = group_advantages(r, G)
    g = r.view(-1, G)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)  # TRL, unbiased std
    assert a.dtype == torch.float32 and a.shape == r.shape
    assert_close(a, expected, atol=1e-6, rtol=1e-5, name="advantages")


def test_none_is_centered_only():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.25])
    assert_close(group_advantages(r, 3, normalize="none"), r - r.view(2, 3).mean(1).repeat_interleave(3),
                 atol=1e-7, rtol=0, name="advantages")


def test_zero_variance_groups_are_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 7.0, 7.0, 7.0])
    for norm in ("std", "none"):
        a = group_advantages(r, 3, normalize=norm)
        assert (a[:3] == 0).all() and (a[6:] == 0).all() and (a[3:6] != 0).all()
    assert (group_advantages(torch.rand(4), 1) == 0).all()  # one completion per prompt: no baseline, no signal


def test_bool_and_int_rewards():
    r = torch.tensor([True, False, False, True])
    assert_close(group_advantages(r, 4), group_advantages(r.float(), 4), atol=0, rtol=0, name="advantages")


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.rand(7), 2)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.rand(2, 4), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.rand(4), 0)
    with pytest.raises(ValueError, match="normalize"):
        group_advantages(torch.rand(4), 2, normalize="mean")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.rand(4), 2, eps=-1.0)
