"""mla_decode (absorbed DeepSeek MLA) against (1) float64 dense MQA on the un-paged latent rows and (2) the
unabsorbed MLA it stands for: per-head keys [c W_UK^T ; k_rope], values c W_UV^T, output mapped back through
W_UV. Small (Dc, Dr) pairs on CPU; DeepSeek-V2-Lite / V3 shapes (Dc 512, Dr 64, 16 / 128 heads) on GPU."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.attention_triton import paged_decode_triton
from dsmath_kernels.reference.attention import mla_decode_ref, paginate
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def dense_mqa(q, rows, Dc, scale):
    """float64: q [B, H, Dc + Dr] over rows[b] [L, Dc + Dr]; values = first Dc columns -> [B, H, Dc]."""
    out = torch.zeros(q.shape[0], q.shape[1], Dc, dtype=torch.float64)
    for b, r in enumerate(rows):
        if r.shape[0]:
            p = torch.softmax(q[b].double() @ r.double().T * scale, -1)  # [H, L]
            out[b] = p @ r.double()[:, :Dc]
    return out


def make_case(lens, H, Dc, Dr, bs, dtype, device="cpu"):
    rows = [torch.randn(n, Dc + Dr).to(dtype) for n in lens]
    kv_cache, bt = paginate(rows, bs)
    q = torch.randn(len(lens), H, Dc + Dr).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    return q.to(device), rows, kv_cache.to(device), bt.to(device), sl.to(device)


CASES = [  # lens, H, Dc, Dr, block size
    ([1], 1, 16, 8, 1),
    ([0, 33, 7], 4, 32, 16, 16),
    ([100, 64], 16, 64, 8, 15),
    ([129], 8, 24, 8, 17),
]


@pytest.mark.parametrize("case", CASES, ids=[f"L{c[0]}-H{c[1]}-Dc{c[2]}-Dr{c[3]}-bs{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mla_matches_dense(case, dtype):
    lens, H, Dc, Dr, bs = case
    q, rows, kv, bt, sl = make_case(lens, H, Dc, Dr, bs, dtype)
    scale = 0.3
    out = dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc)
    assert out.shape == (len(lens), H, Dc) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    assert_close(out, dense_mqa(q, rows, Dc, scale), atol=atol, rtol=rtol, name="mla_decode")


def test_mla_equals_unabsorbed_attention():
    """Absorbed MLA decode + W_UV == standard multi-head attention with the decompressed keys and values."""
    H, Dn, Dr, Dc, Dvh, lens = 4, 16, 8, 32, 12, [50, 9]
    W_UK = torch.randn(H, Dn, Dc, dtype=torch.float64) / Dc**0.5  # k_nope[h] = c @ W_UK[h].T
    W_UV = torch.randn(H, Dvh, Dc, dtype=torch.float64) / Dc**0.5  # v[h] = c @ W_UV[h].T
    scale = (Dn + Dr) ** -0.5
    q_nope = torch.randn(len(lens), H, Dn, dtype=torch.float64)
    q_rope = torch.randn(len(lens), H, Dr, dtype=torch.float64)
    cs = [torch.randn(n, Dc, dtype=torch.float64) for n in lens]
    kr = [torch.randn(n, Dr, dtype=torch.float64) for n in lens]
    expect = torch.zeros(len(lens), H, Dvh, dtype=torch.float64)
    for b in range(len(lens)):
        k = torch.cat([torch.einsum("lc,hnc->hln", cs[b], W_UK), kr[b].expand(H, -1, -1)], -1)  # [H, L, Dn + Dr]
        v = torch.einsum("lc,hvc->hlv", cs[b], W_UV)  # [H, L, Dvh]
        qh = torch.cat([q_nope[b], q_rope[b]], -1)  # [H, Dn + Dr]
        p = torch.softmax(torch.einsum("hd,hld->hl", qh, k) * scale, -1)
        expect[b] = torch.einsum("hl,hlv->hv", p, v)
    q_abs = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, W_UK), q_rope], -1)  # [B, H, Dc + Dr]
    rows = [torch.cat([c, r], -1) for c, r in zip(cs, kr, strict=True)]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        kv, bt = paginate([r.to(dtype) for r in rows], 16)
        lat = dk.mla_decode(q_abs.to(dtype), kv, bt, torch.tensor(lens, dtype=torch.int32), scale, v_head_dim=Dc)
        out = torch.einsum("bhc,hvc->bhv", lat.double(), W_UV)
        assert_close(out, expect, atol=tol, rtol=tol, name=f"absorbed MLA {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mla_decode(dtype):
    """Triton decode with V a view of K's first Dc columns (values reuse the loaded key tile): interpreter."""
    q, rows, kv, bt, sl = make_case([0, 40, 7], 16, 32, 8, 5, dtype)
    kv4 = kv.unsqueeze(2)
    atol, rtol = TOL[dtype]
    for splits, chunk in ((1, 1024), (3, 16)):
        out = paged_decode_triton(q, kv4, kv4[..., :32], bt, sl, 0.3, splits, chunk)
        assert_close(out, dense_mqa(q, rows, 32, 0.3), atol=atol, rtol=rtol, name="triton mla decode")


def test_mla_plans_and_reference():
    q, rows, kv, bt, sl = make_case([300, 2, 77], 8, 32, 16, 7, torch.float32)
    expect = dense_mqa(q, rows, 32, 0.2)
    assert_close(mla_decode_ref(q, kv, bt, sl, 0.2, v_head_dim=32), expect, atol=2e-5, rtol=2e-5)
    for plan in (dk.DecodePlan(4, 64, 300), dk.DecodePlan(200, 2, 300)):
        out = dk.mla_decode(q, kv, bt, sl, 0.2, v_head_dim=32, plan=plan)
        assert_close(out, expect, atol=2e-5, rtol=2e-5)


def test_mla_argument_errors():
    q, _rows, kv, bt, sl = make_case([9, 3], 4, 16, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="kv_cache: row width"):
        dk.mla_decode(q[..., :20], kv, bt, sl, 0.3, v_head_dim=16)
    with pytest.raises(ValueError, match="v_head_dim"):
        dk.mla_decode(q, kv, bt, sl, 0.3, v_head_dim=25)
    with pytest.raises(ValueError, match="kv_cache: expected a 3-D"):
        dk.mla_decode(q, kv.unsqueeze(2), bt, sl, 0.3, v_head_dim=16)
    bad = bt.clone()
    bad[0, 0] = -3
    with pytest.raises(ValueError, match=r"block_tables: entry \[0, 0\]"):
        dk.mla_decode(q, kv, bad, sl, 0.3, v_head_dim=16, check_bounds=True)


def test_mla_opcheck():
    q, _rows, kv, bt, sl = make_case([9, 3], 4, 16, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.dsmath.mla_decode.default, (q, kv.nan_to_num(), bt, sl, 0.3, 16, 2, 64),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("cuda", torch.bfloat16), ("cuda", torch.float16),
                                           ("triton", torch.bfloat16)])
@pytest.mark.parametrize("H", [16, 128])
def test_mla_cuda_deepseek_shapes(H, dtype, backend, monkeypatch, launches):
    monkeypatch.setenv("DSMATH_DECODE_BACKEND", backend)
    lens = [1, 4097, 300]
    q, rows, kv, bt, sl = make_case(lens, H, 512, 64, 64, dtype, device="cuda")
    expect = dense_mqa(q.cpu(), rows, 512, 576**-0.5)
    atol, rtol = TOL[dtype]
    for plan in (None, dk.DecodePlan(1, 1 << 20, 4097), dk.DecodePlan(9, 512, 4097)):
        out = dk.mla_decode(q, kv, bt, sl, 576**-0.5, v_head_dim=512, plan=plan)
        assert_close(out, expect, atol=atol, rtol=rtol, name=f"mla_decode cuda H={H}")
    launches.assert_ran("mla_decode", backend)
