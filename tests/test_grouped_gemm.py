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
        off = torch.zeros(4, dtype=torch.int32)
        y = torch.ops.dsmath.grouped_gemm(torch.empty(10, 16), torch.empty(3, 24, 16), off)
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


# ---------------------------------------------------------------- Triton kernels (interpreter without a GPU)

TRITON_SHAPES = [(0, 40, 96), (1, 40, 96), (7, 200, 40), (45, 40, 200)]
TRITON_FWD = [(*s, kind, torch.float32) for s in TRITON_SHAPES for kind in ("random", "hot", "tail")]
TRITON_FWD += [(*s, "random", torch.float16) for s in TRITON_SHAPES[1:]]


@pytest.mark.parametrize("M,N,K,kind,dtype", TRITON_FWD)
def test_triton_forward_matches_reference(M, N, K, kind, dtype, monkeypatch):
    monkeypatch.setenv("DSMATH_GROUPED_GEMM", "triton")
    E = 4
    x, w = _data(M, N, K, E, dtype)
    off = _offsets(M, E, kind)
    atol, rtol = TOL[dtype]
    assert_close(grouped_gemm(x, w, off), grouped_gemm_ref(x, w, off), atol=atol, rtol=rtol, name="y")


def test_triton_many_experts_scheduler(monkeypatch):
    """70 experts (most empty or tiny, a tail past off[E]): the vectorised tile scheduler over 4 programs."""
    monkeypatch.setenv("DSMATH_GROUPED_GEMM", "triton")
    E, M = 70, 45
    x, w = _data(M, 24, 16, E, torch.float32)
    counts = torch.zeros(E, dtype=torch.long)
    counts.index_add_(0, torch.randint(0, E, (M - 5,)), torch.ones(M - 5, dtype=torch.long))
    off = torch.zeros(E + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(counts, 0)
    assert_close(grouped_gemm(x, w, off), grouped_gemm_ref(x, w, off), atol=1e-4, rtol=1e-4, name="y")


@pytest.mark.parametrize("M,N,K,kind", [(23, 40, 24, "random"), (9, 24, 40, "hot"), (0, 16, 16, "random")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_backward_matches_fp64(M, N, K, kind, dtype, monkeypatch):
    monkeypatch.setenv("DSMATH_GROUPED_GEMM", "triton")
    E = 3
    x, w = _data(M, N, K, E, dtype)
    off = _offsets(M, E, kind, dtype=torch.int64)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = grouped_gemm(xg, wg, off)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (xg, wg), dy)
    if M == 0:  # nothing flows: dx is empty, dw is zero
        assert dx.shape == (0, K) and not dw.any()
        return
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    dx64, dw64 = torch.autograd.grad(grouped_gemm_ref(x64, w64, off), (x64, w64), dy.double())
    atol, rtol = TOL[dtype]
    scale = max(1.0, dw64.abs().max().item())
    assert_close(dx, dx64, atol=atol, rtol=rtol, name="dx")
    assert_close(dw, dw64, atol=atol * scale, rtol=rtol, name="dw")


def test_triton_gather_act_scale_switches(monkeypatch):
    """The fused switches of the forward kernel: gathered A rows x[rows // topk] (-1 = zero rows), the SwiGLU
    epilogue, the row scale scale[rows[r]]; and the combine kernel."""
    from dsmath_kernels import grouped_gemm_triton as gt

    E, N, K, topk = 3, 24, 40, 2
    x, w = _data(7, 2 * N, K, E, torch.float32)
    rows = torch.tensor([7, 0, -1, 13, 12, 3, 5, -1, 10, 9, 1], dtype=torch.int32)  # pair f -> token f // 2
    off = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    scale = torch.rand(14)
    got = gt._gemm(x, w, off, rows=rows, topk=topk, act=True)
    xs = torch.where(rows[:, None] >= 0, x[rows.clamp_min(0).long() // topk], 0.0)
    g, u = grouped_gemm_ref(xs, w, off).chunk(2, dim=-1)
    want = torch.nn.functional.silu(g) * u
    want[10:] = 0  # past off[E]
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="gather+act")
    got = gt._gemm(xs, w, off, rows=rows, gather=False, scale=scale)
    s_rows = torch.where(rows >= 0, scale[rows.clamp_min(0).long()], 0.0)
    want = grouped_gemm_ref(xs, w, off) * s_rows[:, None]
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="scale")
    inverse = torch.tensor([[3, 10], [-1, 0], [5, 5]], dtype=torch.int32)
    wts = torch.rand(3, 2)
    ys = torch.randn(11, 200)
    want = torch.stack([sum(wts[t, j] * ys[r] for j, r in enumerate(inverse[t].tolist()) if r >= 0) for t in range(3)])
    assert_close(gt.combine(ys, inverse, wts), want, atol=1e-5, rtol=1e-5, name="combine")


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,N,Kd", [(1, 8, 256, 4096, 7168), (128, 6, 64, 2816, 2048), (4096, 8, 256, 7168, 2048),
                                        (8192, 6, 64, 2048, 1408)])
def test_gpu_bf16_real_shapes(T, K, E, N, Kd, launches):
    M = T * K
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(min(E, 64), N, Kd, device="cuda", dtype=torch.bfloat16) / Kd**0.5
    E = w.shape[0]
    counts = torch.randint(0, E, (M,), device="cuda").bincount(minlength=E)
    off = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    off[1:] = torch.cumsum(counts, 0)
    y = grouped_gemm(x, w, off)
    launches.assert_ran("grouped_gemm", "triton")
    assert_close(y, grouped_gemm_ref(x, w, off), atol=3e-2, rtol=3e-2, name="y", max_global_rel=1e-2)
    xg, wg = x[:512].clone().requires_grad_(True), w.clone().requires_grad_(True)
    off2 = off.clamp(max=512)
    y2 = grouped_gemm(xg, wg, off2)
    dy = torch.randn_like(y2)
    dx, dw = torch.autograd.grad(y2, (xg, wg), dy)
    x32, w32 = xg.detach().float().requires_grad_(True), wg.detach().float().requires_grad_(True)
    dx32, dw32 = torch.autograd.grad(grouped_gemm_ref(x32, w32, off2), (x32, w32), dy.float())
    assert_close(dx, dx32, atol=5e-2, rtol=5e-2, name="dx", max_global_rel=1e-2)
    assert_close(dw, dw32, atol=5e-1, rtol=5e-2, name="dw", max_global_rel=1e-2)
