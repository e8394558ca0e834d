"""paged_decode against float64 dense attention on the un-paged KV (randomly permuted block tables, NaN in unused
slots): block sizes 1 / 15 / 16 / 17 / 64, seq lens 0 / 1 / ragged, GQA 1 / 4 / 8, Dv != D, explicit plans,
one 131072-token sequence, debug bounds checks, argument errors; CUDA kernel and graph capture on GPU."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.attention import _decode_backend
from dsmath_kernels.attention_triton import paged_decode_triton
from dsmath_kernels.reference.attention import paged_decode_ref, paginate, paginate_like
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def dense_decode(q, ks, vs, scale):
    """float64 attention of q [B, Hq, D] over dense per-sequence ks[b] [L, Hkv, D], vs[b] [L, Hkv, Dv]."""
    B, Hq, _ = q.shape
    out = torch.zeros(B, Hq, vs[0].shape[-1], dtype=torch.float64)
    for b in range(B):
        if ks[b].shape[0] == 0:
            continue
        g = Hq // ks[b].shape[1]
        k = ks[b].double().repeat_interleave(g, 1)  # [L, Hq, D]
        v = vs[b].double().repeat_interleave(g, 1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), k) * scale, -1)
        out[b] = torch.einsum("hl,lhd->hd", p, v)
    return out


def make_case(lens, Hq, Hkv, D, Dv, bs, dtype, device="cpu"):
    ks = [torch.randn(n, Hkv, D).to(dtype) for n in lens]
    vs = [torch.randn(n, Hkv, Dv).to(dtype) for n in lens]
    k_cache, tables = paginate(ks, bs)
    v_cache = paginate_like(vs, tables, k_cache.shape[0], bs)
    q = torch.randn(len(lens), Hq, D).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    to = lambda t: t.to(device)
    return to(q), ks, vs, to(k_cache), to(v_cache), to(tables), to(seq_lens)


CASES = [  # lens, Hq, Hkv, D, Dv, block size
    ([1], 1, 1, 16, 16, 1),
    ([0, 1, 2], 4, 1, 16, 8, 16),
    ([37, 5, 100], 8, 2, 32, 32, 15),
    ([37, 5, 100], 8, 1, 32, 24, 17),
    ([64, 65, 63, 1], 8, 8, 16, 16, 16),
    ([300], 16, 2, 64, 64, 64),
    ([17, 250], 4, 4, 24, 40, 255),
]


@pytest.mark.parametrize("case", CASES, ids=[f"L{c[0]}-Hq{c[1]}-Hkv{c[2]}-D{c[3]}-Dv{c[4]}-bs{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_matches_dense(case, dtype):
    lens, Hq, Hkv, D, Dv, bs = case
    q, ks, vs, kc, vc, bt, sl = make_case(lens, Hq, Hkv, D, Dv, bs, dtype)
    scale = D**-0.5
    out = dk.paged_decode(q, kc, vc, bt, sl, scale)
    assert out.dtype == dtype and out.shape == (len(lens), Hq, Dv)
    atol, rtol = TOL[dtype]
    assert_close(out, dense_decode(q, ks, vs, scale), atol=atol, rtol=rtol, name="paged_decode")


def test_reference_matches_dense():
    q, ks, vs, kc, vc, bt, sl = make_case([7, 0, 40], 8, 2, 16, 12, 5, torch.float64)
    assert_close(paged_decode_ref(q, kc, vc, bt, sl, 0.7), dense_decode(q, ks, vs, 0.7), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("splits,chunk", [(1, 64), (2, 64), (7, 64), (256, 64), (3, 1)])
def test_plans_give_same_answer(splits, chunk):
    """Any plan is correct (the last split runs to the end of the sequence); only the work split changes."""
    q, ks, vs, kc, vc, bt, sl = make_case([200, 3, 129], 4, 2, 16, 16, 7, torch.float32)
    plan = dk.DecodePlan(num_splits=splits, chunk=chunk, max_seq_len=200)
    out = dk.paged_decode(q, kc, vc, bt, sl, 0.25, plan=plan)
    assert_close(out, dense_decode(q, ks, vs, 0.25), atol=2e-5, rtol=2e-5)


TRITON_CASES = [([0, 1, 70], 8, 2, 24, 16, 5), ([33, 16], 4, 4, 16, 32, 16)]  # lens, Hq, Hkv, D, Dv, bs


@pytest.mark.parametrize("case", TRITON_CASES, ids=["gqa4-D24-Dv16-bs5", "mha-D16-Dv32-bs16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_decode(case, dtype):
    """The tensor-core Triton decode kernel (interpreter on CPU), one split and several."""
    lens, Hq, Hkv, D, Dv, bs = case
    q, ks, vs, kc, vc, bt, sl = make_case(lens, Hq, Hkv, D, Dv, bs, dtype)
    expect = dense_decode(q, ks, vs, 0.3)
    atol, rtol = TOL[dtype]
    for splits, chunk in ((1, 1024), (3, 16)):
        out = paged_decode_triton(q, kc, vc, bt, sl, 0.3, splits, chunk)
        assert_close(out, expect, atol=atol, rtol=rtol, name=f"triton decode splits={splits}")


def test_plan_decode_shapes():
    p = dk.plan_decode(1, 131072, num_kv_heads=8, device="cpu")
    assert p.num_splits >= 1 and p.num_splits * p.chunk >= 131072 and p.chunk % 64 == 0
    assert dk.plan_decode(0, 0).num_splits == 1
    import dsmath_kernels.attention as attention  # GPU-sized plans (H200: 132 SMs), computed without a GPU

    workers = attention._num_workers
    attention._num_workers = lambda device: 4 * 132
    try:
        gqa = dk.plan_decode(1, 131072, num_kv_heads=8, num_q_heads=32, device="cuda")
        v3 = dk.plan_decode(1, 131072, num_kv_heads=1, num_q_heads=128, device="cuda")
    finally:
        attention._num_workers = workers
    assert gqa.num_splits * 8 >= 132 and gqa.num_splits * gqa.chunk >= 131072  # one sequence fills the GPU
    assert v3.num_splits * 32 >= 132 and v3.chunk >= 256 * 32  # 128 heads: few, long splits (small partials)
    with pytest.raises(ValueError, match="max_seq_len"):
        dk.plan_decode(1, -1)


def test_long_sequence_131072():
    """One 128K-token sequence (1 head, D 16) through many splits: 64-bit offsets and the LSE merge at length."""
    L, bs = 131072, 64
    k = torch.randn(L, 1, 16)
    v = torch.randn(L, 1, 16)
    kc, bt = paginate([k], bs)
    vc = paginate_like([v], bt, kc.shape[0], bs)
    q = torch.randn(1, 2, 16) * 2
    sl = torch.tensor([L], dtype=torch.int32)
    plan = dk.DecodePlan(num_splits=16, chunk=L // 16, max_seq_len=L)
    for p in (None, plan):
        out = dk.paged_decode(q, kc, vc, bt, sl, 0.25, plan=p)
        assert_close(out, dense_decode(q, [k], [v], 0.25), atol=1e-5, rtol=1e-4)


def test_cpu_backend_is_compiled():
    from dsmath_kernels import _ext

    if not _ext.has_cpu_kernels():
        pytest.skip("compiled module not built")
    assert _decode_backend(torch.device("cpu")) == "cpu"


def test_noncontiguous_q():
    _q, ks, vs, kc, vc, bt, sl = make_case([9, 30], 4, 2, 16, 16, 4, torch.float32)
    for qt in (torch.randn(2, 16, 4).transpose(1, 2), torch.randn(2, 4, 40)[..., 3:19]):
        out = dk.paged_decode(qt, kc, vc, bt, sl, 0.3)
        assert_close(out, dense_decode(qt, ks, vs, 0.3), atol=2e-5, rtol=2e-5)


def test_bounds_check_raises(monkeypatch):
    q, _ks, _vs, kc, vc, bt, sl = make_case([9, 30], 4, 2, 16, 16, 4, torch.float32)
    bad = bt.clone()
    bad[1, 2] = kc.shape[0]  # used by sequence 1 (30 tokens = 8 blocks)
    with pytest.raises(ValueError, match=r"block_tables: entry \[1, 2\]"):
        dk.paged_decode(q, kc, vc, bad, sl, 0.3, check_bounds=True)
    monkeypatch.setenv("DSMATH_CHECK_BOUNDS", "1")
    with pytest.raises(ValueError, match="block_tables"):
        dk.paged_decode(q, kc, vc, bad, sl, 0.3)
    with pytest.raises(ValueError, match="seq_lens"):
        dk.paged_decode(q, kc, vc, bt, torch.tensor([9, 10**6], dtype=torch.int32), 0.3)
    dk.paged_decode(q, kc, vc, bt, sl, 0.3)  # valid input passes the check; unused entries (2**30) ignored


def test_argument_errors():
    q, _ks, _vs, kc, vc, bt, sl = make_case([9, 30], 4, 2, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="q: 3 query heads"):
        dk.paged_decode(q[:, :3], kc, vc, bt, sl, 0.3)
    with pytest.raises(TypeError, match="block_tables"):
        dk.paged_decode(q, kc, vc, bt.long(), sl, 0.3)
    with pytest.raises(ValueError, match="seq_lens"):
        dk.paged_decode(q, kc, vc, bt, sl[:1], 0.3)
    with pytest.raises(ValueError, match="k_cache: head dim"):
        dk.paged_decode(q[..., :8], kc, vc, bt, sl, 0.3)
    with pytest.raises(ValueError, match="block size"):
        dk.paged_decode(q, torch.zeros(2, 257, 2, 16), torch.zeros(2, 257, 2, 16), bt, sl, 0.3)
    with pytest.raises(TypeError, match="scale"):
        dk.paged_decode(q, kc, vc, bt, sl, float("nan"))
    with pytest.raises(TypeError, match="plan"):
        dk.paged_decode(q, kc, vc, bt, sl, 0.3, plan=(1, 64))


def test_opcheck():
    """Schema, fake (meta) implementation and dispatch of the custom op agree (torch.compile-ready)."""
    q, _ks, _vs, kc, vc, bt, sl = make_case([9, 30], 4, 2, 16, 16, 4, torch.float32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    torch.library.opcheck(torch.ops.dsmath.paged_decode.default, (q, kc, vc, bt, sl, 0.3, 2, 64),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = [  # lens, Hq, Hkv, D, Dv, bs
    ([1, 0, 4097], 32, 8, 128, 128, 16),
    ([3000, 17], 8, 8, 64, 64, 1),
    ([513, 1000, 2], 16, 2, 256, 256, 17),
    ([700], 8, 1, 128, 64, 255),
    ([129, 64], 4, 4, 64, 128, 64),
]


# the CUDA kernel in every dtype; the Triton kernel (one compile per shape) in bf16
GPU_KINDS = [("cuda", torch.float32), ("cuda", torch.float16), ("cuda", torch.bfloat16), ("triton", torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", GPU_KINDS, ids=[f"{b}-{str(d)[6:]}" for b, d in GPU_KINDS])
@pytest.mark.parametrize("case", GPU_CASES)
def test_decode_cuda(case, dtype, backend, monkeypatch, launches):
    monkeypatch.setenv("DSMATH_DECODE_BACKEND", backend)
    lens, Hq, Hkv, D, Dv, bs = case
    q, ks, vs, kc, vc, bt, sl = make_case(lens, Hq, Hkv, D, Dv, bs, dtype, device="cuda")
    assert _decode_backend(q.device) == backend
    expect = dense_decode(q.cpu(), ks, vs, D**-0.5)
    atol, rtol = TOL[dtype]
    for plan in (None, dk.DecodePlan(1, 1 << 20, max(lens)), dk.DecodePlan(5, 256, max(lens))):
        out = dk.paged_decode(q, kc, vc, bt, sl, D**-0.5, plan=plan)
        assert_close(out, expect, atol=atol, rtol=rtol, name=f"paged_decode cuda plan={plan}")
    launches.assert_ran("paged_decode", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_cuda_long_and_graph(backend, monkeypatch):
    """131072 tokens at D 128 on GPU, and replay of a captured CUDA graph after the cache and lengths change."""
    monkeypatch.setenv("DSMATH_DECODE_BACKEND", backend)
    L = 131072
    q, ks, vs, kc, vc, bt, sl = make_case([L, 4000], 8, 2, 128, 128, 64, torch.bfloat16, device="cuda")
    plan = dk.plan_decode(2, L, num_kv_heads=2, num_q_heads=8, device=q.device)
    out = dk.paged_decode(q, kc, vc, bt, sl, 0.088, plan=plan)
    assert_close(out, dense_decode(q.cpu(), ks, vs, 0.088), atol=1.6e-2, rtol=1.6e-2)
    static_out = dk.paged_decode(q, kc, vc, bt, sl, 0.088, plan=plan)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = dk.paged_decode(q, kc, vc, bt, sl, 0.088, plan=plan)
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([L - 5, 3999], dtype=torch.int32))
    graph.replay()
    ks2 = [ks[0][: L - 5], ks[1][:3999]]
    vs2 = [vs[0][: L - 5], vs[1][:3999]]
    assert_close(static_out, dense_decode(q.cpu(), ks2, vs2, 0.088), atol=1.6e-2, rtol=1.6e-2)


def test_empty_batch():
    kc, vc = torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    none = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    assert dk.paged_decode(torch.randn(0, 4, 8), kc, vc, *none, 0.3).shape == (0, 4, 8)
    assert paged_decode_triton(torch.randn(0, 4, 8), kc, vc, *none, 0.3, 1, 64).shape == (0, 4, 8)
    assert dk.mla_decode(torch.randn(0, 4, 16), torch.randn(3, 4, 16), *none, 0.3, v_head_dim=8).shape == (0, 4, 8)
