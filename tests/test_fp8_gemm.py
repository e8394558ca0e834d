"""FP8 block-scaled ops vs the reference (reference/fp8.py): the CPU (torch) path and the Triton kernels under the
interpreter (DSMATH_FP8_GEMM=triton), W8A8 (native fp8 dot and the sm_80 bf16-convert variant) and weight-only,
dense and grouped (empty experts, one hot expert, tail rows), the fused expert layer (gather + SwiGLU + epilogue
re-quantisation + routing weight), the quantiser's rounding, and bad input refused by name."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels import fp8_gemm_triton
from dsmath_kernels.reference.fp8 import (
    FP8,
    dequantize_blocks_ref,
    fp8_gemm_ref,
    grouped_gemm_fp8_ref,
    moe_experts_fp8_ref,
    quantize_blocks_ref,
    quantize_fp8_groups_ref,
)
from dsmath_kernels.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and not (torch.cuda.is_available() or fp8_gemm_triton.INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("DSMATH_FP8_GEMM", request.param)
    return request.param


def _weights(*shape):
    w = torch.randn(*shape) / shape[-1] ** 0.5
    return quantize_blocks_ref(w)


def _bits(t):
    return t.view(torch.uint8)


def test_block_quantisation_round_trip():
    """Each 128 x 128 block's largest |value| maps to 448; edge blocks are partial; the round trip error is e4m3's
    (relative <= 2^-4 per element for normal values)."""
    w = torch.randn(300, 200) * torch.logspace(-3, 3, 300)[:, None]  # blocks of very different magnitude
    q, s = dk.quantize_fp8_blocks(w)
    assert q.dtype == FP8 and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            blk = q[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].float()
            assert blk.abs().max().item() == 448.0
    back = dk.dequantize_fp8_blocks(q, s)
    normal = w.abs() >= s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 2**-6
    rel = ((back - w).abs() / w.abs())[normal]
    assert rel.max().item() <= 2**-4 * (1 + 1e-5)  # half a unit in the last of 3 mantissa bits (+ fp32 division)


def test_quantize_fp8_groups(backend):
    x = torch.randn(37, 300) * 40
    x[3] = 0  # an all-zero row: scale eps / 448, zeros
    x[5, :128] = 1e-3
    q, s = dk.quantize_fp8_groups(x)
    qr, sr = quantize_fp8_groups_ref(x)
    assert torch.equal(s, sr)
    assert torch.equal(_bits(q), _bits(qr)), "rounding differs from torch's e4m3 round-to-nearest-even"
    assert q[3].float().abs().sum() == 0


@pytest.mark.parametrize("M,N,K", [(0, 128, 128), (1, 256, 128), (37, 200, 300)])
@pytest.mark.parametrize("w8a8", [True, False])
def test_dense_gemm(backend, M, N, K, w8a8):
    a = torch.randn(M, K)
    w, ws = _weights(N, K)
    if w8a8:
        aq, as_ = dk.quantize_fp8_groups(a)
        y = dk.fp8_gemm(aq, w, ws, a_scale=as_)
        ref = fp8_gemm_ref(aq, w, ws, as_, out_dtype=torch.float32)
        assert y.dtype == torch.bfloat16
        atol, rtol = 1e-2, 1e-2  # bf16 output rounding
    else:
        y = dk.fp8_gemm(a, w, ws)
        ref = fp8_gemm_ref(a, w, ws)
        atol, rtol = 1e-5, 1e-5
    assert_close(y.float(), ref.float(), atol=atol, rtol=rtol, name="y")


@pytest.mark.skipif(not fp8_gemm_triton.INTERPRET and not torch.cuda.is_available(), reason="needs triton")
@pytest.mark.parametrize("w_bits", [True, False])
def test_kernel_weight_only_variants(w_bits):
    """Weight-only with the e4m3 weight converted in registers (sm_89+) or decoded from its bytes (sm_80, where
    Triton has no e4m3 type): every code, subnormals and both signs included, decodes exactly."""
    w, ws = _weights(160, 256)
    w[0] = torch.arange(256, dtype=torch.uint8).view(FP8)  # all 256 codes (0x7f / 0xff are NaN: zero those)
    w[0, 127] = w[0, 255] = 0
    eye = torch.eye(256, dtype=torch.bfloat16)  # y[i, n] = W[n, i]: every decoded weight on its own
    y = fp8_gemm_triton.gemm(eye, w[None], ws[None], out_dtype=torch.float32, w_bits=w_bits)
    assert_close(y, fp8_gemm_ref(eye, w, ws, out_dtype=torch.float32), atol=0, rtol=1e-6, name="y")
    a = torch.randn(19, 256).bfloat16()
    y = fp8_gemm_triton.gemm(a, w[None], ws[None], out_dtype=torch.float32, w_bits=w_bits)
    assert_close(y, fp8_gemm_ref(a, w, ws, out_dtype=torch.float32), atol=1e-4, rtol=1e-5, name="y")


def test_w8a8_error_bound(backend):
    """The rigorous per-GEMM bound of FP8 activations: each activation rounds to e4m3 with error <= 2^-4 |a|
    (normal range) or <= 2^-10 scale (subnormal range), so |y8 - y| <= err(a) @ |W|.T (+ fp32 rounding)."""
    a = torch.randn(21, 256) * torch.logspace(-2, 2, 256)  # channels of very different magnitude
    w, ws = _weights(96, 256)
    q, s = dk.quantize_fp8_groups(a)
    y8 = dk.fp8_gemm(q, w, ws, a_scale=s, out_dtype=torch.float32)
    W = dequantize_blocks_ref(w, ws)
    y = a @ W.T
    err = torch.maximum(a.abs() * 2**-4, s.repeat_interleave(128, 1) * 2**-10)
    bound = err @ W.abs().T
    assert ((y8 - y).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    assert ((y8 - y).abs() > bound * 0.01).any()  # and the bound is not vacuous


def _offsets(M, E, kind):
    if kind == "hot":
        counts = torch.zeros(E, dtype=torch.long)
        counts[E // 2] = M
    else:
        cuts = torch.sort(torch.randint(0, M + 1, (E - 1,))).values
        counts = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([M])]))
    if kind == "tail":
        counts[-1] = max(0, counts[-1] - 3)  # rows past off[E]: zeros
    off = torch.zeros(E + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(counts, 0)
    return off


@pytest.mark.parametrize("M", [0, 1, 45])
@pytest.mark.parametrize("kind", ["random", "hot", "tail"])
def test_grouped_gemm(backend, M, kind):
    E, N, K = 4, 160, 256
    a = torch.randn(M, K)
    w, ws = _weights(E, N, K)
    off = _offsets(M, E, kind)
    aq, as_ = dk.quantize_fp8_groups(a)
    y = dk.grouped_gemm_fp8(aq, w, ws, off, a_scale=as_)
    assert_close(y.float(), grouped_gemm_fp8_ref(aq, w, ws, off, as_, out_dtype=torch.float32), atol=1e-2,
                 rtol=1e-2, name="y")
    y = dk.grouped_gemm_fp8(a, w, ws, off)
    assert_close(y, grouped_gemm_fp8_ref(a, w, ws, off), atol=1e-5, rtol=1e-5, name="y")


def _moe_data(T, E, H, inter, K, hot=False):
    x = torch.randn(T, H)
    g, gs = _weights(E, inter, H)
    u, us = _weights(E, inter, H)
    w13, s13 = torch.cat([g, u], 1), torch.cat([gs, us], 1)  # per-projection blocks, as checkpoints hold them
    w2, s2 = _weights(E, H, inter)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int() if T else torch.zeros(0, K, dtype=torch.int32)
    if hot:
        ids[:, 0] = 1
    weights = torch.rand(T, K)
    return x, w13, s13, w2, s2, weights, ids


@pytest.mark.parametrize("T,inter,hot", [(0, 128, False), (1, 128, False), (23, 160, False), (23, 128, True)])
@pytest.mark.parametrize("activation", ["fp8", "native"])
def test_moe_experts_fp8(backend, T, inter, hot, activation):
    """inter = 160: gate and up each have a partial last block (2 * ceil(160/128) = 4 scale rows, not 3)."""
    args = _moe_data(T, 6, 256, inter, 2, hot)
    out = dk.moe_experts_fp8(*args, activation=activation)
    ref = moe_experts_fp8_ref(*args, quantize_activations=activation == "fp8")
    # fp8: the Triton epilogue re-quantises from its own fp32 accumulator, whose summation order differs from the
    # reference's; a value that lands next to an e4m3 rounding boundary can round the other way (one e4m3 step,
    # 2^-3 relative, of one element of the 160-256 summed) -> a few 1e-3 absolute on outputs of size ~1
    tol = 2e-2 if activation == "fp8" else 1e-5
    assert_close(out, ref, atol=tol, rtol=tol, name="out")


def test_skipped_slots_contribute_nothing():
    """experts_forward's -1 slots (expert parallelism: expert on another rank) are not computed."""
    x, w13, s13, w2, s2, weights, ids = _moe_data(9, 4, 128, 128, 2)
    masked = ids.clone()
    masked[:, 1] = -1
    out = dk.fp8.experts_forward(x, w13, s13, w2, s2, weights, masked, "native")
    ref = moe_experts_fp8_ref(x, w13, s13, w2, s2, weights[:, :1].contiguous(), ids[:, :1].contiguous(), False)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="out")


def test_backend_choice_is_told(monkeypatch):
    """No silent fallback (dsmath_kernels._dispatch): explain names each FP8 op's backend and why; a call that cannot
    take its kernel warns once with the reason and the fix and runs the torch path; DSMATH_STRICT=1 raises instead
    (also in experts_forward, the expert-parallel layer's entry); DSMATH_FORCE_REFERENCE=1 runs the reference."""
    from dsmath_kernels import _dispatch, fp8

    for var in ("DSMATH_STRICT", "DSMATH_FORCE_REFERENCE", "DSMATH_FP8_GEMM", "DSMATH_FP8_ACT"):
        monkeypatch.delenv(var, raising=False)
    _dispatch.reset()
    w, ws = _weights(256, 128)
    a = torch.randn(3, 128)
    moe = _moe_data(5, 4, 128, 128, 2)
    c = dk.explain("fp8_gemm", a, w, ws)
    assert (c.backend, c.fallback) == ("torch", False) and "CPU design" in c.reason
    assert dk.explain("fp8_linear", a, w, ws).backend == "torch"
    assert dk.explain("moe_experts_fp8", *moe).backend == "torch"
    # a GPU without FP8 MMA (sm_80) asked for W8A8, and a GPU without Triton: told fallbacks (decided from the device)
    monkeypatch.setattr(fp8, "_fp8_dot", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(fp8, "_triton_ok", lambda: True)
    c = fp8._choose("fp8_gemm", torch.device("cuda"), "fp8")
    assert c.fallback and c.backend == "torch" and "sm_80" in c.reason and "native" in c.fix
    assert not fp8._choose("fp8_gemm", torch.device("cuda"), "native").fallback  # weight-only: the sm_80 kernel
    assert fp8._choose("quantize_fp8_groups", torch.device("cuda"), "fp8").fallback  # e4m3 output: sm_89+
    assert fp8.resolve_activation("auto", torch.device("cuda")) == "native"
    monkeypatch.setattr(fp8, "_triton_ok", lambda: False)
    monkeypatch.setattr(dk.moe, "_triton_ok", lambda: False)  # the DSMATH_FP8_GEMM override is checked there
    assert fp8._choose("moe_experts_fp8", torch.device("cuda"), "native").fallback
    # a real call that falls back (DSMATH_FP8_GEMM=triton without triton): warns once, runs torch, strict raises
    monkeypatch.setenv("DSMATH_FP8_GEMM", "triton")
    with pytest.warns(dk.FallbackWarning, match="fp8_gemm fell back to torch: DSMATH_FP8_GEMM=triton but triton"):
        y = dk.fp8_gemm(a, w, ws)
    assert_close(y, fp8_gemm_ref(a, w, ws), atol=1e-5, rtol=1e-5, name="y")
    assert _dispatch.launch_counts()[("fp8_gemm", "torch")] == 1
    monkeypatch.setenv("DSMATH_STRICT", "1")
    for call in (lambda: dk.fp8_gemm(a, w, ws), lambda: dk.quantize_fp8_groups(a),
                 lambda: dk.grouped_gemm_fp8(a, *_weights(2, 256, 128), torch.tensor([0, 1, 3], dtype=torch.int32)),
                 lambda: dk.moe_experts_fp8(*moe), lambda: fp8.experts_forward(*moe, "auto")):
        with pytest.raises(dk.FallbackError, match="triton is not installed"):
            call()
    monkeypatch.delenv("DSMATH_STRICT")
    monkeypatch.setenv("DSMATH_FORCE_REFERENCE", "1")  # a choice, not a fallback: no warning, the reference runs
    _dispatch.reset()
    out = dk.moe_experts_fp8(*moe)
    assert_close(out, moe_experts_fp8_ref(*moe, quantize_activations=False), atol=1e-6, rtol=1e-6, name="out")
    assert _dispatch.launch_counts() == {("moe_experts_fp8", "reference"): 1}
    _dispatch.reset()


def test_custom_op_opcheck(monkeypatch):
    """torch.library.opcheck on every FP8 op (fake impl vs real, autograd registration, AOT dispatch) on the CPU
    path. Its schema test is left out: it compares e4m3 tensors with arithmetic torch does not have for e4m3 on
    CPU."""
    monkeypatch.setenv("DSMATH_FP8_GEMM", "torch")
    checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    w, ws = _weights(256, 128)
    a = torch.randn(5, 128)
    q, s = dk.quantize_fp8_groups(a)
    off = torch.tensor([0, 2, 5], dtype=torch.int32)
    g, gs = _weights(2, 256, 128)
    x, w13, s13, w2, s2, weights, ids = _moe_data(4, 4, 128, 128, 2)
    for op, args in ((torch.ops.dsmath.quantize_fp8_groups.default, (a,)),
                     (torch.ops.dsmath.fp8_gemm.default, (q, s, w, ws, torch.bfloat16)),
                     (torch.ops.dsmath.fp8_gemm.default, (a, None, w, ws, torch.float32)),
                     (torch.ops.dsmath.grouped_gemm_fp8.default, (a, None, g, gs, off)),
                     (torch.ops.dsmath.moe_experts_fp8.default, (x, w13, s13, w2, s2, weights, ids, "native"))):
        torch.library.opcheck(op, args, test_utils=checks)


def test_fake_impls_trace():
    """Every FP8 op has a fake implementation: shapes propagate on the meta device."""
    w, ws = _weights(256, 128)
    a = torch.randn(5, 128)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fa, fw, fs = mode.from_tensor(a), mode.from_tensor(w), mode.from_tensor(ws)
        q, s = torch.ops.dsmath.quantize_fp8_groups(fa)
        assert q.shape == (5, 128) and q.dtype == FP8 and s.shape == (5, 1)
        assert torch.ops.dsmath.fp8_gemm(q, s, fw, fs, torch.bfloat16).shape == (5, 256)
        assert torch.ops.dsmath.fp8_gemm(fa, None, fw, fs, torch.float32).dtype == torch.float32



# ---------------------------------------------------------------- GPU (sm_89+ for W8A8; any CUDA for weight-only)

def _cuda_fp8():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 300])
def test_gpu_dense_gemm_v3_shapes(M):
    """W8A8 at DeepSeek-V3 shapes (K = 7168, o_proj / q_a_proj-like N) vs the fp32 reference; bf16 output."""
    if not _cuda_fp8():
        pytest.skip("W8A8 needs sm_89+")
    a = torch.randn(M, 7168, device="cuda", dtype=torch.bfloat16)
    w, ws = quantize_blocks_ref(torch.randn(1536, 7168, device="cuda") / 7168**0.5)
    q, s = dk.quantize_fp8_groups(a)
    assert_close(dk.fp8_gemm(q, w, ws, a_scale=s).float(), fp8_gemm_ref(q, w, ws, s, out_dtype=torch.float32),
                 atol=2e-2, rtol=2e-2, name="y")
    y16 = fp8_gemm_triton.gemm(a, w[None], ws[None], out_dtype=torch.float32, w_bits=True)  # the sm_80 path
    assert_close(y16, fp8_gemm_ref(a, w, ws, out_dtype=torch.float32), atol=1e-3, rtol=1e-3, name="y")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 256])
@pytest.mark.parametrize("activation", ["fp8", "native"])
def test_gpu_moe_experts_fp8(T, activation):
    if activation == "fp8" and not _cuda_fp8():
        pytest.skip("W8A8 needs sm_89+")
    torch.manual_seed(0)
    x, w13, s13, w2, s2, weights, ids = (t.cuda() for t in _moe_data(T, 16, 2048, 512, 8))
    x = x.bfloat16()
    out = dk.moe_experts_fp8(x, w13, s13, w2, s2, weights, ids, activation=activation)
    ref = moe_experts_fp8_ref(x.float(), w13, s13, w2, s2, weights, ids, activation == "fp8")
    assert_close(out.float(), ref, atol=3e-2, rtol=3e-2, name="out", max_global_rel=2e-2)
