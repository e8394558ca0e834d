"""Bad inputs to the FP8 block-scaled ops (quantize_fp8_groups, quantize_fp8_blocks, dequantize_fp8_blocks, fp8_gemm,
fp8_linear, grouped_gemm_fp8, moe_experts_fp8): each raises TypeError / ValueError naming the argument (dtypes,
shapes, a missing scale block row, a block size other than 128, K mismatches, out-of-range ids, bad offsets)."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.reference.fp8 import quantize_blocks_ref, quantize_fp8_groups_ref
from dsmath_kernels.testing import assert_names_argument

T, K, E, H, I = 4, 2, 4, 128, 128  # noqa: E741
W, WS = quantize_blocks_ref(torch.randn(256, 128) * 0.1)  # [256, 128] e4m3, [2, 1]
A = torch.randn(3, 128)
AQ, AS = quantize_fp8_groups_ref(A)  # e4m3 [3, 128], [3, 1]
GW, GS = quantize_blocks_ref(torch.randn(E, 256, 128) * 0.1)  # [E, 256, 128], [E, 2, 1]
OFF = torch.tensor([0, 1, 1, 3, 3], dtype=torch.int32)
X = torch.randn(T, H)
W13, S13 = quantize_blocks_ref(torch.randn(E, 2 * I, H) * 0.1)  # gate rows then up rows: [E, 2, 1] scales
W2, S2 = quantize_blocks_ref(torch.randn(E, H, I) * 0.1)
WTS = torch.full((T, K), 0.5)
IDS = torch.randint(0, E, (T, K), dtype=torch.int32)

GROUPS = {
    "x int": lambda: dk.quantize_fp8_groups(A.int()),
    "x 3-D": lambda: dk.quantize_fp8_groups(A[None]),
    "x e4m3": lambda: dk.quantize_fp8_groups(AQ),
}

BLOCKS = {
    "w int": lambda: dk.quantize_fp8_blocks(torch.ones(4, 4, dtype=torch.int32)),
    "w 1-D": lambda: dk.quantize_fp8_blocks(torch.randn(8)),
    "block 64": lambda: dk.quantize_fp8_blocks(torch.randn(4, 4), block=64),
}

DEQUANT = {
    "q float": lambda: dk.dequantize_fp8_blocks(W.float(), WS),
    "scale_inv missing a block row": lambda: dk.dequantize_fp8_blocks(W, WS[:1]),
    "scale_inv bf16": lambda: dk.dequantize_fp8_blocks(W, WS.bfloat16()),
}

GEMM = {
    "w float": lambda: dk.fp8_gemm(A, W.float(), WS),
    "w 3-D": lambda: dk.fp8_gemm(A, W[None], WS),
    "w_scale missing a block row": lambda: dk.fp8_gemm(A, W, WS[:1]),
    "w_scale 64 x 64 blocks": lambda: dk.fp8_gemm(A, W, torch.ones(4, 2)),
    "a K mismatch": lambda: dk.fp8_gemm(torch.randn(3, 64), W, WS),
    "a int": lambda: dk.fp8_gemm(A.int(), W, WS),
    "a e4m3 without a_scale": lambda: dk.fp8_gemm(AQ, W, WS),
    "a_scale no columns": lambda: dk.fp8_gemm(AQ, W, WS, a_scale=AS[:, :0]),
    "a_scale rows differ": lambda: dk.fp8_gemm(AQ, W, WS, a_scale=AS[:1]),
    "a_scale with a float a": lambda: dk.fp8_gemm(A, W, WS, a_scale=AS),
    "out_dtype int": lambda: dk.fp8_gemm(A, W, WS, out_dtype=torch.int32),
}

LINEAR = {
    "x int": lambda: dk.fp8_linear(A.int(), W, WS),
    "activation int8": lambda: dk.fp8_linear(A, W, WS, activation="int8"),
    "w_scale missing": lambda: dk.fp8_linear(A, W, WS[:1]),
}

GROUPED = {
    "w 2-D": lambda: dk.grouped_gemm_fp8(A, W, WS, OFF),
    "w_scale per tensor": lambda: dk.grouped_gemm_fp8(A, GW, GS[:, :1], OFF),
    "expert_offsets wrong length": lambda: dk.grouped_gemm_fp8(A, GW, GS, OFF[:-1]),
    "expert_offsets decreasing": lambda: dk.grouped_gemm_fp8(A, GW, GS, torch.tensor([0, 2, 1, 3, 3])),
    "expert_offsets past M": lambda: dk.grouped_gemm_fp8(A, GW, GS, torch.tensor([0, 1, 1, 3, 4])),
    "a K mismatch": lambda: dk.grouped_gemm_fp8(torch.randn(3, 64), GW, GS, OFF),
}

EXPERTS = {
    "x int": lambda: dk.moe_experts_fp8(X.int(), W13, S13, W2, S2, WTS, IDS),
    "w_gate_up float": lambda: dk.moe_experts_fp8(X, W13.float(), S13, W2, S2, WTS, IDS),
    "w_gate_up odd rows": lambda: dk.moe_experts_fp8(X, W13[:, 1:], S13, W2, S2, WTS, IDS),
    "s_gate_up one projection's blocks": lambda: dk.moe_experts_fp8(X, W13, S13[:, :1], W2, S2, WTS, IDS),
    "w_down wrong shape": lambda: dk.moe_experts_fp8(X, W13, S13, W2[:, :, :64], S2, WTS, IDS),
    "s_down missing": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2[:, :0], WTS, IDS),
    "ids = E": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2, WTS, IDS + E),
    "ids = -1": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2, WTS, IDS - E),
    "ids rows differ": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2, WTS, IDS[:-1]),
    "weights bf16": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2, WTS.bfloat16(), IDS),
    "activation int8": lambda: dk.moe_experts_fp8(X, W13, S13, W2, S2, WTS, IDS, activation="int8"),
}

CASES = [(dk.quantize_fp8_groups, GROUPS, ()), (dk.quantize_fp8_blocks, BLOCKS, ()),
         (dk.dequantize_fp8_blocks, DEQUANT, ()), (dk.fp8_gemm, GEMM, ()), (dk.fp8_linear, LINEAR, ()),
         (dk.grouped_gemm_fp8, GROUPED, ()), (dk.moe_experts_fp8, EXPERTS, ())]


@pytest.mark.parametrize("fn,name", [(fn, name) for fn, table, _ in CASES for name in table],
                         ids=lambda v: getattr(v, "__name__", v))
def test_fp8_bad_input(fn, name):
    table = next(t for f, t, _ in CASES if f is fn)
    with pytest.raises((TypeError, ValueError)) as e:
        table[name]()
    assert_names_argument(e.value, fn)


def test_edge_shapes():
    """Zero tokens and a K that is not a multiple of 128 (a partial last block) are valid."""
    assert dk.fp8_gemm(A[:0], W, WS).shape == (0, 256)
    assert dk.moe_experts_fp8(X[:0], W13, S13, W2, S2, WTS[:0], IDS[:0]).shape == (0, H)
    w, ws = dk.quantize_fp8_blocks(torch.randn(130, 200))
    assert ws.shape == (2, 2)
    y = dk.fp8_gemm(torch.randn(2, 200), w, ws)
    assert y.shape == (2, 130) and torch.isfinite(y).all()
