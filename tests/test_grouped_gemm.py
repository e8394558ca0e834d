"""grouped_gemm: CPU path and the Triton kernels (interpreter without a GPU) vs the reference on odd shapes
(M in {0, 1, 7, 131}, K/N in {40, 96, 200}), empty experts, one hot expert; gradients vs an fp64 reference."""

import pytest
import torch
from dsmath_kernels import grouped_gemm
from dsmath_kernels.reference.moe import grouped_gemm_ref
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 3e-2),
       torch.float64: (1e-10, 1e-10)}


def _offsets(M, E, kind="random", dtype=torch.int32):
    if kind == "hot":  # all rows on one expert in the middle
        counts = torch.zeros(E, dtype=torch.long)
        counts[E // 2] = M
    elif kind == "tail":  # rows past off[E] belong to no expert (padding)
        counts = torch.randint(0, E, (max(M - 3, 0),)).bincount(minlength=E)
    else:  # random split, some experts empty
        cuts = torch.sort(torch.randint(0, M + 1, (E - 1,))).values
        counts = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([M])]))
    off = torch.zeros(E + 1, dtype=torch.long)
    off[1:] = torch.cumsum(counts, 0)
    return off.to(dtype)


def _data(M, N, K, E, dtype, device="cpu"):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = (torch.randn(E, N, K, dtype=dtype, device=device) / K**0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("M", [0, 1, 7, 131])
@pytest.mark.parametrize("N,K", [(40, 96), (200, 40), (96, 200)])
@pytest.mark.parametrize("kind", ["random", "hot", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_reference(M, N, K, kind, dtype):
    E = 5
    x, w = _data(M, N, K, E, dtype)
    off = _offsets(M, E, kind, dtype=torch.int64 if kind == "hot" else torch.int32)
    atol, rtol = TOL[dtype]
    assert_close(grouped_gemm(x, w, off), grouped_gemm_ref(x, w, off), atol=atol, rtol=rtol, name="y")


@pytest.mark.parametrize("M,N,K,E", [(0, 8, 8, 3), (1, 8, 12, 2), (13, 7, 9, 4)])
def test_cpu_gradients_vs_fp64(M, N, K, E):
    x, w = _data(M, N, K, E, torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    off = _offsets(M, E)
    assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, off), (x, w))


def test_fake_and_compile_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.dsmath.grouped_gemm(torch.empty(10, 16), torch.empty(3, 24, 16), torch.zeros(4, dtype=torch.int32))
    assert tuple(y.shape) == (10, 24)


def test_rejects_bad_inputs():
    x, w = _data(10, 8, 16, 3, torch.float32)
    off = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="w"):
        grouped_gemm(x, w.half(), off)
    with pytest.raises(ValueError, match="w"):
        grouped_gemm(x, w[:, :, :8], off)
    with pytest.raises(ValueError, match="expert_offsets"):
        grouped_gemm(x, w, off[:3])
    with pytest.raises(TypeError, match="expert_offsets"):
        grouped_gemm(x, w, off.float())
    for bad in ([1, 3, 3, 10], [0, 5, 3, 10], [0, 3, 3, 11]):
        with pytest.raises(ValueError, match="expert_offsets"):
            grouped_gemm(x, w, torch.tensor(bad, dtype=torch.int32))
