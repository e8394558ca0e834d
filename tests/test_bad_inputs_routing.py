"""Bad inputs to route_topk: every one raises TypeError / ValueError naming the argument (never a crash, never a
silent wrong answer): dtypes, shapes, mismatched sizes, out-of-range counts both ways, NaN / inf scalars, empty,
huge sizes, strided and expanded views; plus the raw torch.ops entry and the launcher-level top_k check."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.testing import assert_names_argument

X = torch.randn(4, 64)

BAD = {
    "logits not a tensor": lambda: dk.route_topk([[1.0, 2.0]], 1),
    "logits int": lambda: dk.route_topk(torch.zeros(4, 8, dtype=torch.int32), 2),
    "logits float64": lambda: dk.route_topk(X.double(), 2),
    "logits 1-D": lambda: dk.route_topk(torch.randn(64), 2),
    "logits 3-D": lambda: dk.route_topk(torch.randn(2, 4, 64), 2),
    "zero experts": lambda: dk.route_topk(torch.randn(4, 0), 1),
    "top_k 0": lambda: dk.route_topk(X, 0),
    "top_k negative": lambda: dk.route_topk(X, -3),
    "top_k > E": lambda: dk.route_topk(X, 65),
    "top_k float": lambda: dk.route_topk(X, 2.0),
    "top_k bool": lambda: dk.route_topk(X, True),
    "top_k huge": lambda: dk.route_topk(X, 2**40),
    "scoring unknown": lambda: dk.route_topk(X, 2, scoring="relu"),
    "n_group 0": lambda: dk.route_topk(X, 2, n_group=0),
    "n_group not dividing": lambda: dk.route_topk(X, 2, n_group=5, topk_group=1),
    "topk_group > n_group": lambda: dk.route_topk(X, 2, n_group=4, topk_group=5),
    "topk_group 0": lambda: dk.route_topk(X, 2, n_group=4, topk_group=0),
    "top_k beyond kept groups": lambda: dk.route_topk(X, 17, n_group=8, topk_group=2),
    "sigmoid groups of one": lambda: dk.route_topk(X, 2, scoring="sigmoid", n_group=64, topk_group=2),
    "bias with softmax": lambda: dk.route_topk(X, 2, bias=torch.zeros(64)),
    "bias wrong size": lambda: dk.route_topk(X, 2, scoring="sigmoid", bias=torch.zeros(63)),
    "bias 2-D": lambda: dk.route_topk(X, 2, scoring="sigmoid", bias=torch.zeros(1, 64)),
    "bias int": lambda: dk.route_topk(X, 2, scoring="sigmoid", bias=torch.zeros(64, dtype=torch.int64)),
    "bias on meta": lambda: dk.route_topk(X, 2, scoring="sigmoid", bias=torch.zeros(64, device="meta")),
    "scale nan": lambda: dk.route_topk(X, 2, routed_scaling_factor=float("nan")),
    "scale inf": lambda: dk.route_topk(X, 2, routed_scaling_factor=float("inf")),
    "scale -inf": lambda: dk.route_topk(X, 2, routed_scaling_factor=float("-inf")),
    "scale string": lambda: dk.route_topk(X, 2, routed_scaling_factor="2.5"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name):
    with pytest.raises((TypeError, ValueError)) as e:
        BAD[name]()
    assert_names_argument(e.value, dk.route_topk)


def test_raw_custom_op_checks_top_k_and_groups():
    """torch.ops.dsmath.route_topk skips the public wrapper: its own checks stop a top_k beyond the kept experts."""
    with pytest.raises(ValueError, match="^top_k"):
        torch.ops.dsmath.route_topk(X, 17, "softmax", None, 8, 2, True, 1.0)
    with pytest.raises(ValueError, match="^n_group"):
        torch.ops.dsmath.route_topk(X, 2, "softmax", None, 6, 1, True, 1.0)
    with pytest.raises(ValueError, match="^routed_scaling_factor"):
        torch.ops.dsmath.route_topk(X, 2, "softmax", None, 1, 1, True, float("nan"))


def test_documented_edge_behaviour():
    # empty batch: empty outputs
    w, i = dk.route_topk(torch.randn(0, 64), 4)
    assert w.shape == (0, 4) and i.shape == (0, 4)
    # strided (non-contiguous) and expanded logits work and match contiguous ones
    big = torch.randn(4, 128)
    assert torch.equal(dk.route_topk(big[:, ::2], 3)[1], dk.route_topk(big[:, ::2].contiguous(), 3)[1])
    row = torch.randn(1, 64).expand(5, 64)
    w, i = dk.route_topk(row, 3)
    assert (i == i[:1]).all()
    # K = 1 with renormalize: the weight is exactly the scale
    w, _ = dk.route_topk(torch.randn(8, 64), 1, renormalize=True, routed_scaling_factor=2.5)
    assert torch.equal(w, torch.full_like(w, 2.5))
    w, _ = dk.route_topk(torch.randn(8, 64), 1, scoring="sigmoid", renormalize=True, routed_scaling_factor=0.75)
    assert torch.equal(w, torch.full_like(w, 0.75))


def test_cpu_launcher_refuses_top_k_beyond_kept_experts():
    from dsmath_kernels import _ext

    if _ext.C() is None:
        pytest.skip("compiled module not built")
    w = torch.empty(4, 17)
    i = torch.empty(4, 17, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bad argument"):
        _ext.C().route_topk_cpu(X.data_ptr(), 0, 4, 64, 64, 0, 17, 8, 2, 0, True, 1.0, w.data_ptr(), i.data_ptr(), 1)


IDS = torch.randint(0, 64, (4, 6))
REPLAY = {
    "logits int": lambda: dk.route_topk_weights(torch.zeros(4, 64, dtype=torch.int32), IDS),
    "ids float": lambda: dk.route_topk_weights(X, IDS.float()),
    "ids rows differ": lambda: dk.route_topk_weights(X, IDS[:3]),
    "ids 1-D": lambda: dk.route_topk_weights(X, IDS[0]),
    "ids = E": lambda: dk.route_topk_weights(X, torch.full((4, 2), 64)),
    "ids = -1": lambda: dk.route_topk_weights(X, torch.full((4, 2), -1)),
    "ids = -2**40": lambda: dk.route_topk_weights(X, torch.full((4, 2), -(2**40))),
    "too many ids": lambda: dk.route_topk_weights(X, torch.zeros(4, 65, dtype=torch.int64)),
    "scoring unknown": lambda: dk.route_topk_weights(X, IDS, scoring="tanh"),
    "scale nan": lambda: dk.route_topk_weights(X, IDS, routed_scaling_factor=float("nan")),
    "scale inf": lambda: dk.route_topk_weights(X, IDS, routed_scaling_factor=float("inf")),
}


@pytest.mark.parametrize("name", list(REPLAY))
def test_route_topk_weights_bad_input_names_the_argument(name):
    with pytest.raises((TypeError, ValueError)) as e:
        REPLAY[name]()
    assert_names_argument(e.value, dk.route_topk_weights, extra=("ids.shape[1]",))
