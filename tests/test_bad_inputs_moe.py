"""Bad inputs to moe_permute, grouped_gemm and moe_experts: each raises TypeError / ValueError naming the argument
(dtypes, shapes, mismatched sizes, out-of-range ids both ways, empty, huge sizes, strided / expanded views)."""

import time

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.testing import assert_names_argument

T, K, E, H, I = 6, 2, 8, 16, 8  # noqa: E741
IDS = torch.randint(0, E, (T, K), dtype=torch.int32)
X = torch.randn(T, H)
WGU = torch.randn(E, 2 * I, H)
WDN = torch.randn(E, H, I)
WTS = torch.full((T, K), 0.5)
OFF = torch.tensor([0, 2, 2, 5, 5, 5, 8, 10, 12], dtype=torch.int32)
XS = torch.randn(12, H)

PERMUTE = {
    "ids float": lambda: dk.moe_permute(IDS.float(), E),
    "ids 1-D": lambda: dk.moe_permute(IDS.view(-1), E),
    "ids id = E": lambda: dk.moe_permute(torch.tensor([[0, E]], dtype=torch.int32), E),
    "ids id = -1": lambda: dk.moe_permute(torch.tensor([[-1, 0]], dtype=torch.int32), E),
    "ids id = 2**31-1": lambda: dk.moe_permute(torch.tensor([[2**31 - 1]], dtype=torch.int64), E),
    "ids id = -2**40": lambda: dk.moe_permute(torch.tensor([[-(2**40)]], dtype=torch.int64), E),
    "num_experts 0": lambda: dk.moe_permute(IDS, 0),
    "num_experts 2**31-1": lambda: dk.moe_permute(IDS, 2**31 - 1),
    "num_experts float": lambda: dk.moe_permute(IDS, 8.0),
    "block_m 0": lambda: dk.moe_permute(IDS, E, block_m=0),
    "block_m huge": lambda: dk.moe_permute(IDS, E, block_m=2**20),
}

GEMM = {
    "x int": lambda: dk.grouped_gemm(XS.int(), WGU, OFF),
    "x 3-D": lambda: dk.grouped_gemm(XS[None], WGU, OFF),
    "w dtype differs": lambda: dk.grouped_gemm(XS, WGU.double(), OFF),
    "w 2-D": lambda: dk.grouped_gemm(XS, WGU[0], OFF),
    "w K mismatch": lambda: dk.grouped_gemm(XS, torch.randn(E, 2 * I, H + 1), OFF),
    "offsets wrong length": lambda: dk.grouped_gemm(XS, WGU, OFF[:-1]),
    "offsets float": lambda: dk.grouped_gemm(XS, WGU, OFF.float()),
    "offsets decreasing": lambda: dk.grouped_gemm(XS, WGU, torch.tensor([0, 5, 2, 5, 5, 5, 8, 10, 12])),
    "offsets past M": lambda: dk.grouped_gemm(XS, WGU, torch.tensor([0, 2, 2, 5, 5, 5, 8, 10, 13])),
    "offsets not from 0": lambda: dk.grouped_gemm(XS, WGU, torch.tensor([1, 2, 2, 5, 5, 5, 8, 10, 12])),
    "offsets negative": lambda: dk.grouped_gemm(XS, WGU, torch.tensor([-4, 2, 2, 5, 5, 5, 8, 10, 12])),
    "offsets on meta": lambda: dk.grouped_gemm(XS, WGU, OFF.to("meta")),
}

EXPERTS = {
    "x int": lambda: dk.moe_experts(X.int(), WGU, WDN, WTS, IDS),
    "x 3-D": lambda: dk.moe_experts(X[None], WGU, WDN, WTS, IDS),
    "w_gate_up odd rows": lambda: dk.moe_experts(X, torch.randn(E, 2 * I + 1, H), WDN, WTS, IDS),
    "w_gate_up wrong H": lambda: dk.moe_experts(X, torch.randn(E, 2 * I, H + 1), WDN, WTS, IDS),
    "w_gate_up dtype": lambda: dk.moe_experts(X, WGU.half(), WDN, WTS, IDS),
    "w_down wrong shape": lambda: dk.moe_experts(X, WGU, torch.randn(E, H, I + 1), WTS, IDS),
    "w_down fewer experts": lambda: dk.moe_experts(X, WGU, WDN[:-1], WTS, IDS),
    "ids rows differ": lambda: dk.moe_experts(X, WGU, WDN, WTS, IDS[:-1]),
    "ids float": lambda: dk.moe_experts(X, WGU, WDN, WTS, IDS.float()),
    "ids = E": lambda: dk.moe_experts(X, WGU, WDN, WTS, torch.full((T, K), E, dtype=torch.int32)),
    "ids = -1": lambda: dk.moe_experts(X, WGU, WDN, WTS, torch.full((T, K), -1, dtype=torch.int32)),
    "weights shape": lambda: dk.moe_experts(X, WGU, WDN, WTS[:, :1], IDS),
    "weights bf16": lambda: dk.moe_experts(X, WGU, WDN, WTS.bfloat16(), IDS),
}


@pytest.mark.parametrize("name", list(PERMUTE))
def test_moe_permute_bad_input(name):
    t0 = time.perf_counter()
    with pytest.raises((TypeError, ValueError)) as e:
        PERMUTE[name]()
    assert_names_argument(e.value, dk.moe_permute)
    assert time.perf_counter() - t0 < 5  # never a huge allocation first (num_experts = 2**31 - 1 tried 24 GB)


@pytest.mark.parametrize("name", list(GEMM))
def test_grouped_gemm_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        GEMM[name]()
    assert_names_argument(e.value, dk.grouped_gemm, extra=("expert_offsets",))


@pytest.mark.parametrize("name", list(EXPERTS))
def test_moe_experts_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        EXPERTS[name]()
    assert_names_argument(e.value, dk.moe_experts)


def test_documented_edge_behaviour():
    # zero tokens: empty permutation, zero output rows
    p = dk.moe_permute(torch.zeros(0, K, dtype=torch.int32), E)
    assert p.order.numel() == 0 and p.expert_offsets.tolist() == [0] * (E + 1)
    assert dk.moe_experts(X[:0], WGU, WDN, WTS[:0], IDS[:0]).shape == (0, H)
    # strided and expanded weights / inputs compute the same as contiguous ones
    w_t = torch.randn(E, H, 2 * I).transpose(1, 2)  # [E, 2I, H], strided
    torch.testing.assert_close(dk.grouped_gemm(XS, w_t, OFF), dk.grouped_gemm(XS, w_t.contiguous(), OFF))
    x_exp = torch.randn(1, H).expand(T, H)
    torch.testing.assert_close(dk.moe_experts(x_exp, WGU, WDN, WTS, IDS),
                               dk.moe_experts(x_exp.contiguous(), WGU, WDN, WTS, IDS))
