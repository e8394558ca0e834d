"""paged_prefill / mla_prefill: the reference against torch SDPA (causal, on the un-paged KV), and the Triton
kernel (interpreter on CPU: tiny fp32 / fp16 / bf16 shapes) against the reference: chunked prefill (queries are
the last n of L cached tokens), block sizes 1 / 5 / 16 / 17, GQA, Dv != D, head dims with a remainder
(24 = 16 + 8), sequences with no new query, non-causal; argument and bounds errors; CUDA cases on GPU."""

import pytest
import torch
import torch.nn.functional as F

import dsmath_kernels as dk
from dsmath_kernels.attention_triton import paged_prefill_triton
from dsmath_kernels.reference.attention import mla_prefill_ref, paged_prefill_ref, paginate, paginate_like
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_case(lens, nq, Hq, Hkv, D, Dv, bs, dtype, device="cpu"):
    """Sequences of lens[b] cached tokens whose last nq[b] are the new queries."""
    ks = [torch.randn(n, Hkv, D).to(dtype) for n in lens]
    vs = [torch.randn(n, Hkv, Dv).to(dtype) for n in lens]
    kc, bt = paginate(ks, bs)
    vc = paginate_like(vs, bt, kc.shape[0], bs)
    cu = torch.tensor([0, *torch.tensor(nq).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    dev = lambda t: t.to(device)  # noqa: E731
    return dev(q), ks, vs, dev(kc), dev(vc), dev(bt), dev(cu), dev(sl)


def sdpa_reference(q, ks, vs, cu, scale, causal=True):
    """float64 SDPA per sequence with a bottom-right causal mask (queries are the last n positions)."""
    out = torch.zeros(q.shape[0], q.shape[1], vs[0].shape[-1], dtype=torch.float64)
    for b in range(len(ks)):
        q0, q1 = int(cu[b]), int(cu[b + 1])
        n, L = q1 - q0, ks[b].shape[0]
        if n == 0:
            continue
        g = q.shape[1] // ks[b].shape[1]
        k = ks[b].double().repeat_interleave(g, 1).transpose(0, 1)  # [Hq, L, D]
        v = vs[b].double().repeat_interleave(g, 1).transpose(0, 1)
        qq = q[q0:q1].double().transpose(0, 1)  # [Hq, n, D]
        if causal and n == L:
            o = F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=scale)
        else:
            mask = torch.ones(n, L, dtype=torch.bool).tril(L - n) if causal else None
            o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_sdpa(causal):
    q, ks, vs, kc, vc, bt, cu, sl = make_case([12, 30, 5, 9], [12, 7, 0, 1], 8, 2, 16, 12, 5, torch.float64)
    out = paged_prefill_ref(q, kc, vc, bt, cu, sl, 0.4, causal)
    assert_close(out, sdpa_reference(q, ks, vs, cu, 0.4, causal), atol=1e-12, rtol=1e-12)
    out = dk.paged_prefill(q, kc, vc, bt, cu, sl, 0.4, causal)  # CPU op = reference
    assert_close(out, sdpa_reference(q, ks, vs, cu, 0.4, causal), atol=1e-12, rtol=1e-12)


TRITON_CASES = [  # lens, nq, Hq, Hkv, D, Dv, bs, causal
    ([20, 37, 3], [20, 5, 0], 2, 1, 16, 16, 5, True),
    ([40], [33], 4, 4, 24, 8, 1, True),
    ([18, 17], [1, 17], 4, 1, 16, 32, 17, False),
    ([16, 50], [16, 18], 2, 2, 16, 16, 16, True),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"c{i}" for i in range(len(TRITON_CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_prefill(case, dtype):
    lens, nq, Hq, Hkv, D, Dv, bs, causal = case
    q, ks, vs, kc, vc, bt, cu, sl = make_case(lens, nq, Hq, Hkv, D, Dv, bs, dtype)
    out = paged_prefill_triton(q, kc, vc, bt, cu, sl, D**-0.5, causal, max(nq))
    atol, rtol = TOL[dtype]
    assert_close(out, sdpa_reference(q, ks, vs, cu, D**-0.5, causal), atol=atol, rtol=rtol, name="triton prefill")


def test_triton_prefill_bf16():
    q, ks, vs, kc, vc, bt, cu, sl = make_case([20, 9], [20, 4], 4, 2, 16, 16, 3, torch.bfloat16)
    out = paged_prefill_triton(q, kc, vc, bt, cu, sl, 0.25, True, 20)
    assert out.dtype == torch.bfloat16
    assert_close(out, sdpa_reference(q, ks, vs, cu, 0.25), atol=1.6e-2, rtol=1.6e-2)


def test_triton_mla_prefill():
    """MLA prefill through the same kernel: one latent head, V a strided view of the first Dc columns."""
    Dc, Dr, H, lens = 32, 8, 4, [21, 6]
    rows = [torch.randn(n, Dc + Dr) for n in lens]
    kv, bt = paginate(rows, 4)
    cu = torch.tensor([0, 5, 11], dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(11, H, Dc + Dr)
    kv4 = kv.unsqueeze(2)
    out = paged_prefill_triton(q, kv4, kv4[..., :Dc], bt, cu, sl, 0.2, True, 6)
    ks = [r.unsqueeze(1) for r in rows]
    expect = sdpa_reference(q, ks, [k[..., :Dc] for k in ks], cu, 0.2)
    assert_close(out, expect, atol=2e-5, rtol=2e-5, name="triton mla prefill")
    assert_close(dk.mla_prefill(q, kv, bt, cu, sl, 0.2, v_head_dim=Dc), expect, atol=2e-5, rtol=2e-5)
    assert_close(mla_prefill_ref(q, kv, bt, cu, sl, 0.2, v_head_dim=Dc), expect, atol=2e-5, rtol=2e-5)


def test_prefill_errors():
    q, _ks, _vs, kc, vc, bt, cu, sl = make_case([12, 30], [12, 7], 4, 2, 16, 16, 5, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        dk.paged_prefill(q, kc, vc, bt, torch.tensor([0, 12, 20], dtype=torch.int32), sl, 0.3, check_bounds=True)
    with pytest.raises(ValueError, match="seq_lens: sequence 0"):
        dk.paged_prefill(q, kc, vc, bt, cu, torch.tensor([10, 30], dtype=torch.int32), 0.3, check_bounds=True)
    with pytest.raises(ValueError, match="block_tables: expected 2 rows"):
        dk.paged_prefill(q, kc, vc, bt[:1], cu, sl, 0.3)
    with pytest.raises(ValueError, match="q: 3 query heads"):
        dk.paged_prefill(q[:, :3], kc, vc, bt, cu, sl, 0.3)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        dk.paged_prefill(q, kc, vc, bt, cu.long(), sl, 0.3)
    out = dk.paged_prefill(q, kc, vc, bt, cu, sl, 0.3, max_seqlen_q=12, check_bounds=True)
    assert out.shape == (19, 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 8, 128, 128, 16), (8, 8, 64, 64, 1), (16, 2, 256, 256, 17), (4, 1, 96, 64, 64)])
def test_prefill_cuda(dtype, shape, launches):
    Hq, Hkv, D, Dv, bs = shape
    lens, nq = [1000, 70, 5, 300], [1000, 33, 0, 1]
    q, ks, vs, kc, vc, bt, cu, sl = make_case(lens, nq, Hq, Hkv, D, Dv, bs, dtype, device="cuda")
    expect = sdpa_reference(q.cpu(), ks, vs, cu.cpu(), D**-0.5)
    atol, rtol = TOL[dtype]
    out = dk.paged_prefill(q, kc, vc, bt, cu, sl, D**-0.5)
    launches.assert_ran("paged_prefill", "triton")
    assert_close(out, expect, atol=atol, rtol=rtol, name="paged_prefill cuda")


@pytest.mark.gpu
def test_mla_prefill_cuda():
    Dc, Dr, H, lens = 512, 64, 16, [700, 40]
    rows = [torch.randn(n, Dc + Dr).to(torch.bfloat16) for n in lens]
    kv, bt = paginate(rows, 64)
    cu = torch.tensor([0, 300, 340], dtype=torch.int32)
    q = torch.randn(340, H, Dc + Dr).to(torch.bfloat16)
    ks = [r.unsqueeze(1) for r in rows]
    expect = sdpa_reference(q, ks, [k[..., :Dc] for k in ks], cu, 576**-0.5)
    out = dk.mla_prefill(q.cuda(), kv.cuda(), bt.cuda(), cu.cuda(), torch.tensor(lens, dtype=torch.int32).cuda(),
                         576**-0.5, v_head_dim=Dc)
    assert_close(out, expect, atol=1.6e-2, rtol=1.6e-2, name="mla_prefill cuda")
