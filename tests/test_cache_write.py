"""cache_write / mla_cache_write: rows land at slot // BS, slot % BS; -1 skips; int32 and int64 slot mappings;
values cast to the cache dtype; nothing else in the cache changes; bounds checks; a write-then-decode round trip;
the CUDA kernel (and graph capture) on GPU."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.reference.attention import gather_kv
from dsmath_kernels.testing import assert_close


def expected_after(cache, rows, slots):
    out = cache.clone()
    flat = out.view(-1, *out.shape[2:])
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            flat[s] = rows[i].to(out.dtype)
    return out


def run_write(device, dtype, slot_dtype, bs=5):
    NB, Hkv, D, Dv = 7, 2, 16, 8
    kc = torch.randn(NB, bs, Hkv, D, device=device).to(dtype)
    vc = torch.randn(NB, bs, Hkv, Dv, device=device).to(dtype)
    slots = torch.randperm(NB * bs)[:9].to(slot_dtype)
    slots[[2, 6]] = -1
    k = torch.randn(9, Hkv, D, device=device)  # float32 rows into a dtype cache: cast
    v = torch.randn(9, Hkv, Dv, device=device)
    ek, ev = expected_after(kc.cpu(), k.cpu(), slots), expected_after(vc.cpu(), v.cpu(), slots)
    dk.cache_write(k, v, kc, vc, slots.to(device))
    assert torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_write(dtype, slot_dtype):
    run_write("cpu", dtype, slot_dtype)


@pytest.mark.parametrize("bs", [1, 16, 17])
def test_mla_cache_write(bs):
    kv_cache = torch.randn(4, bs, 24)
    slots = torch.tensor([3, -1, 4 * bs - 1, 0])
    kv = torch.randn(4, 24)
    expect = expected_after(kv_cache, kv, slots)
    dk.mla_cache_write(kv, kv_cache, slots)
    assert torch.equal(kv_cache, expect)


def test_empty_and_all_skipped():
    kc, vc = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    before = kc.clone(), vc.clone()
    dk.cache_write(torch.zeros(0, 1, 8), torch.zeros(0, 1, 8), kc, vc, torch.zeros(0, dtype=torch.int32))
    dk.cache_write(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), kc, vc, torch.tensor([-1, -1]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_write_then_decode_round_trip():
    """Prefill a sequence token by token through cache_write, then decode sees exactly those tokens."""
    bs, L, Hkv, D = 4, 11, 2, 8
    kc, vc = torch.full((6, bs, Hkv, D), float("nan")), torch.full((6, bs, Hkv, D), float("nan"))
    table = torch.tensor([[5, 0, 3]], dtype=torch.int32)
    k, v = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    pos = torch.arange(L)
    slots = table[0].long()[pos // bs] * bs + pos % bs
    dk.cache_write(k, v, kc, vc, slots, check_bounds=True)
    assert torch.equal(gather_kv(kc, table[0], L), k) and torch.equal(gather_kv(vc, table[0], L), v)
    q = torch.randn(1, 4, D)
    out = dk.paged_decode(q, kc, vc, table, torch.tensor([L], dtype=torch.int32), 0.5)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q[0], k.repeat_interleave(2, 1)) * 0.5, -1)
    assert_close(out[0], torch.einsum("hl,lhd->hd", p, v.repeat_interleave(2, 1)), atol=2e-5, rtol=2e-5)


def test_bounds_and_argument_errors(monkeypatch):
    kc, vc = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    k = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="slot_mapping: entry 1 = 8"):
        dk.cache_write(k, k, kc, vc, torch.tensor([0, 8]), check_bounds=True)
    monkeypatch.setenv("DSMATH_CHECK_BOUNDS", "1")
    with pytest.raises(ValueError, match="slot_mapping: entry 0 = -2"):
        dk.cache_write(k, k, kc, vc, torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="slot_mapping: entry 0"):
        dk.mla_cache_write(torch.randn(1, 8), torch.randn(2, 4, 8), torch.tensor([100]))
    with pytest.raises(ValueError, match="k_cache: expected"):
        dk.cache_write(k, k, torch.randn(2, 4, 2, 8), vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slot_mapping: expected shape"):
        dk.cache_write(k, k, kc, vc, torch.tensor([0]))
    with pytest.raises(TypeError, match="slot_mapping"):
        dk.cache_write(k, k, kc, vc, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="kv_cache: row width"):
        dk.mla_cache_write(torch.randn(1, 9), torch.randn(2, 4, 8), torch.tensor([1]))


def test_opcheck():
    kc, vc = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    k = torch.randn(2, 1, 8)
    torch.library.opcheck(torch.ops.dsmath.cache_write.default, (k, k, kc, vc, torch.tensor([3, -1])),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_write_cuda(dtype, slot_dtype, launches):
    run_write("cuda", dtype, slot_dtype, bs=17)
    launches.assert_ran("cache_write", "cuda")


@pytest.mark.gpu
def test_cache_write_cuda_graph():
    kv_cache = torch.zeros(8, 64, 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(3, 576, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([5, -1, 300], device="cuda")
    dk.mla_cache_write(kv, kv_cache, slots)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dk.mla_cache_write(kv, kv_cache, slots)
    kv.copy_(torch.randn(3, 576, device="cuda").to(torch.bfloat16))
    slots.copy_(torch.tensor([7, 8, -1], device="cuda"))
    g.replay()
    flat = kv_cache.view(-1, 576)
    assert torch.equal(flat[7], kv[0]) and torch.equal(flat[8], kv[1])


def test_strided_caches():
    """Caches that are views (one layer of a stacked cache, a strided last-dim slice) are written in place."""
    stacked = torch.zeros(2, 3, 4, 1, 16)  # [layers, NB, BS, Hkv, D]
    wide = torch.zeros(3, 4, 1, 24)
    kc, vc = stacked[1], wide[..., 4:12]  # contiguous view; non-contiguous view
    k, v = torch.randn(2, 1, 16), torch.randn(2, 1, 8)
    dk.cache_write(k, v, kc, vc, torch.tensor([5, 11]))
    assert torch.equal(stacked[1, 1, 1], k[0]) and torch.equal(stacked[1, 2, 3], k[1]) and stacked[0].eq(0).all()
    assert torch.equal(wide[1, 1, :, 4:12], v[0]) and wide[..., :4].eq(0).all() and wide[..., 12:].eq(0).all()
