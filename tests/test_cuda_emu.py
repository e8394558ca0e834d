"""Every CUDA file in csrc/ executed on the CPU: tools/cuda_emu compiles each .cu with the host compiler under
emulation shims (threads as fibers, warp collectives completed per warp, poisoned shared memory, launch limits) and
its kernels are compared with the C++ CPU kernels (route_topk, moe_permute, paged decode) or the reference (cache
writes) on edge cases. Known-bad cases prove the emulation fails loudly and catches a broken kernel."""

import os
import shutil

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels import _ext
from dsmath_kernels.attention import DecodePlan
from dsmath_kernels.reference.attention import cache_write_ref, paginate, paginate_like
from dsmath_kernels.testing import assert_close

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++")

emu = pytest.importorskip("tools.cuda_emu.emu")


@pytest.fixture(scope="module", autouse=True)
def lib():
    if _ext.C() is None:
        pytest.skip("the C++ CPU kernels (the comparison) are not built")
    lib = emu.library()
    emu.configure(reverse_threads=False, reverse_blocks=False)
    yield lib
    emu.configure(reverse_threads=False, reverse_blocks=False)


# ---------------------------------------------------------------------------------------------- route_topk.cu
def _route_case(name):
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    if name == "v3":  # DeepSeek-V3: 256 experts, 8 groups keep 4, sigmoid + bias, top-8, renormalize, * 2.5
        x = torch.randn(37, 256, generator=g)
        return x, dict(top_k=8, scoring="sigmoid", bias=torch.randn(256, generator=g) * 0.1, n_group=8,
                       topk_group=4, renormalize=True, routed_scaling_factor=2.5)
    if name == "v2_groups":  # DeepSeek-V2 group-limited greedy, softmax
        return torch.randn(21, 160, generator=g), dict(top_k=6, n_group=8, topk_group=3, renormalize=False)
    if name == "e512":  # the kernel's largest E and top-k, 32 groups
        return torch.randn(9, 512, generator=g) * 3, dict(top_k=16, n_group=32, topk_group=5)
    if name == "ties":  # many exact ties: integer logits
        return torch.randint(-2, 3, (33, 64), generator=g).float(), dict(top_k=8, renormalize=True)
    if name == "nan_inf":  # a NaN row, an all -inf row, -inf entries, a NaN entry with sigmoid
        x = torch.randn(6, 48, generator=g)
        x[1] = float("nan")
        x[2] = float("-inf")
        x[3, ::3] = float("-inf")
        x[4, 5] = float("nan")
        return x, dict(top_k=4)
    if name == "nan_sigmoid":
        x = torch.randn(5, 64, generator=g)
        x[0, 3] = float("nan")
        x[2] = float("nan")
        return x, dict(top_k=6, scoring="sigmoid", bias=torch.randn(64, generator=g), n_group=4, topk_group=2)
    if name == "small_e":  # fewer experts than lanes
        return torch.randn(7, 8, generator=g), dict(top_k=2)
    if name == "k1":
        return torch.randn(10, 64, generator=g), dict(top_k=1, renormalize=True, routed_scaling_factor=2.5)
    raise KeyError(name)


ROUTE_CASES = ["v3", "v2_groups", "e512", "ties", "nan_inf", "nan_sigmoid", "small_e", "k1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ROUTE_CASES)
def test_route_topk_cu_matches_cpu_kernel(name, dtype):
    x, kw = _route_case(name)
    x = x.to(dtype)
    w, i = emu.route_topk(x, **kw)
    w_cpu, i_cpu = dk.route_topk(x, **kw)
    assert torch.equal(i, i_cpu), f"{name}: ids differ\n{i}\n{i_cpu}"
    assert_close(w, w_cpu, atol=1e-7, rtol=1e-6, name=f"{name} weights")
    if name == "k1":  # renormalized single expert: exactly the scale
        assert torch.equal(w, torch.full_like(w, 2.5))


def assert_same_bits(a, b, what=""):
    """Bit-identical fp32 tensors: the same NaN positions, every other value the same bit pattern (so -0.0 != 0.0;
    NaN payloads may differ, as a GPU's canonical NaN does)."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaN positions differ"
    av, bv = a.masked_fill(nan, 0).view(torch.int32), b.masked_fill(nan, 0).view(torch.int32)
    assert torch.equal(av, bv), f"{what}: {(av != bv).sum()} values differ\n{a}\n{b}"


def _like_cpu(emulated, cpu, scoring, what):
    """Emulated CUDA vs C++ CPU kernel: sigmoid scores are elementwise, so bit-identical; softmax sums its row (up to
    512 terms) with a warp reduction on CUDA and serially on CPU, so its scores are a few ulp apart (1.3e-6 relative
    seen at E = 512; renormalized weights are closer, the route_topk test above asks 1e-6)."""
    if scoring == "sigmoid":
        assert_same_bits(emulated, cpu, what)
    else:
        assert_close(emulated, cpu, atol=1e-7, rtol=4e-6, name=what)


def _finalize_model(raw, ids, renormalize, scale):
    """route_topk's finalisation in fp32, bit for bit, from the raw scores [T, K] at ids [T, K]: / (sum + 1e-20)
    with the sum taken serially in descending-score order (NaN lowest, ties lower id, repeats as given), then
    * scale."""
    if not renormalize:
        return raw * scale
    key = raw.nan_to_num(nan=float("-inf"))
    by_id = ids.argsort(dim=1, stable=True)
    order = by_id.gather(1, key.gather(1, by_id).argsort(dim=1, descending=True, stable=True))
    sorted_w = raw.gather(1, order)
    s = torch.zeros(raw.shape[0])
    for k in range(raw.shape[1]):
        s = s + sorted_w[:, k]
    return raw / (s + 1e-20)[:, None] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ROUTE_CASES)
def test_route_topk_weights_cu_matches_cpu_kernel(name, dtype):
    """Replay (route_weights_kernel) on every route_topk case, renormalized or not, ids in any order per row:
    bit-identical to the emulated route_topk's own weights for its ids; for arbitrary ids (distinct, and with a
    repeated expert) bit-identical to route_topk's finalisation of the kernel's raw scores; raw scores as the C++
    CPU kernel's."""
    x, kw = _route_case(name)
    x = x.to(dtype)
    T, E = x.shape
    K, scoring, scale = kw["top_k"], kw.get("scoring", "softmax"), kw.get("routed_scaling_factor", 1.0)
    g = torch.Generator().manual_seed(len(name) * 7 + E)
    for renorm in (True, False):
        kw = {**kw, "renormalize": renorm}
        rkw = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
        w_sel, i_sel = emu.route_topk(x, **kw)
        perm = torch.rand(T, K, generator=g).argsort(dim=1)
        ids = i_sel.gather(1, perm)
        w = emu.route_topk_weights(x, ids, **rkw)
        assert_same_bits(w, w_sel.gather(1, perm), f"{name} renorm={renorm}: replay vs route_topk")
        _like_cpu(w, dk.route_topk_weights(x, ids, **rkw), scoring, f"{name} renorm={renorm}: vs CPU kernel")
        if name == "k1" and renorm:  # renormalized single expert: exactly the scale
            assert torch.equal(w, torch.full_like(w, 2.5))

    other = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].int()
    if K > 1:
        other[::2, 1] = other[::2, 0]  # the same expert twice
    raw = emu.route_topk_weights(x, other, scoring=scoring, renormalize=False)
    _like_cpu(raw, dk.route_topk_weights(x, other, scoring=scoring, renormalize=False), scoring, f"{name} raw")
    for renorm in (True, False):
        w = emu.route_topk_weights(x, other, scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
        assert_same_bits(w, _finalize_model(raw, other, renorm, scale), f"{name} renorm={renorm}: arbitrary ids")


def test_route_topk_weights_cu_bad_ids_and_limits():
    """An id outside [0, E) makes its row NaN, other rows are untouched (the op refuses such ids before a kernel
    runs; the kernel must still never read past the scores). E = 1,024 (beyond the kernels' 512): both launchers
    refuse and the op takes the reference, saying why."""
    x = torch.randn(4, 64)
    ids = torch.tensor([[0, 5, 9], [63, 64, 1], [-1, 2, 3], [7, 7, 8]], dtype=torch.int32)
    w = emu.route_topk_weights(x, ids)
    assert w[1].isnan().all() and w[2].isnan().all()
    assert_close(w[[0, 3]], dk.route_topk_weights(x[[0, 3]], ids[[0, 3]]), atol=1e-7, rtol=1e-6)
    big = torch.randn(3, 1024)
    with pytest.raises(emu.EmuError, match="bad argument"):
        emu.route_topk_weights(big, torch.zeros(3, 8, dtype=torch.int32))
    with pytest.raises(emu.EmuError, match="bad argument"):
        emu.route_topk(big, 8)
    assert dk.explain("route_topk_weights", big, torch.zeros(3, 8, dtype=torch.int32)).backend == "reference"


def test_route_topk_cu_zero_tokens_and_schedule():
    x, kw = _route_case("v3")
    w, i = emu.route_topk(x[:0], **kw)
    assert w.shape == (0, 8)
    emu.configure(reverse_threads=True, reverse_blocks=True)
    try:
        w, i = emu.route_topk(x, **kw)
    finally:
        emu.configure()
    w_cpu, i_cpu = dk.route_topk(x, **kw)
    assert torch.equal(i, i_cpu)
    assert_close(w, w_cpu, atol=1e-7, rtol=1e-6)


def test_route_topk_launcher_refuses_top_k_beyond_kept_experts():
    """top_k larger than the experts of the kept groups would index past them: the launcher refuses."""
    x = torch.randn(4, 64)
    with pytest.raises(emu.EmuError, match="bad argument"):
        emu.route_topk(x, 17, n_group=8, topk_group=2)  # 2 groups x 8 experts = 16 eligible
    with pytest.raises(emu.EmuError, match="bad argument"):
        emu.route_topk(x, 4, n_group=6)  # 64 experts not divisible into 6 groups


# ---------------------------------------------------------------------------------------------- moe_permute.cu
@pytest.mark.parametrize("T,K,E,block_m", [(700, 8, 1024, 4), (300, 6, 64, 1), (129, 8, 256, 128), (1, 1, 8, 16),
                                           (0, 8, 16, 1), (2000, 2, 3, 16)])
def test_moe_permute_cu_matches_cpu_kernel(T, K, E, block_m):
    g = torch.Generator().manual_seed(T * 31 + E)
    ids = torch.randint(0, max(1, E // 3 if E > 8 else E), (T, K), generator=g, dtype=torch.int32)  # empty experts
    for reverse in (False, True):  # the last-arriving block does the scan whatever the order
        emu.configure(reverse_threads=reverse, reverse_blocks=reverse)
        try:
            order, offsets, inverse, flags = emu.moe_permute(ids, E, block_m)
        finally:
            emu.configure()
        p = dk.moe_permute(ids, E, block_m=block_m)
        assert flags == 0
        assert torch.equal(offsets, p.expert_offsets)
        assert torch.equal(order, p.order)
        assert torch.equal(inverse, p.inverse)


def test_moe_permute_cu_bad_ids_flagged_and_skipped():
    ids = torch.tensor([[0, 3], [5, -1], [2, 2]], dtype=torch.int32)
    order, offsets, inverse, flags = emu.moe_permute(ids, 4, 1)
    assert flags == 8  # kBadExpertId
    assert inverse[1, 0] == -1 and inverse[1, 1] == -1
    good = ids.clone()
    good[1] = 1  # rows of the good pairs: compare with the CPU kernel on the good pairs only
    assert int(offsets[-1]) == 4  # the two bad pairs own no row
    assert sorted(order[order >= 0].tolist()) == [0, 1, 4, 5]


# ---------------------------------------------------------------------------------------------- attn_cache.cu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cache_write_cu_matches_reference(dtype, slot_dtype):
    NB, BS, H, D, N = 5, 3, 2, 40, 7
    k = torch.randn(N, H, D).to(dtype)
    slots = torch.tensor([14, -1, 0, 5, -1, 9, 7], dtype=slot_dtype)
    cache = torch.full((NB, BS, H, D), 7.0, dtype=dtype)
    expect = cache.clone()
    cache_write_ref(k, k, expect, expect.clone(), slots)
    assert emu.cache_write(k, cache, slots) == 0
    assert torch.equal(cache, expect)


def test_cache_write_cu_bad_slots_flagged_never_written():
    NB, BS, row = 2, 4, 16
    src = torch.randn(4, row)
    cache = torch.zeros(NB, BS, row)
    flags = emu.cache_write(src, cache, torch.tensor([3, -2, NB * BS, 0], dtype=torch.int32))
    assert flags == 4  # kBadSlot
    expect = torch.zeros(NB, BS, row)
    expect[0, 3], expect[0, 0] = src[0], src[3]
    assert torch.equal(cache, expect)


# ---------------------------------------------------------------------------------------------- attn_decode.cu
# (B lens, Hq, Hkv, D, Dv, block size, splits, chunk, kind): every tile shape of launch_dtype / launch_gqa —
# W 64 / 128 / 256 x (MHA: 1 head per CTA, GQA: 4, with partial head tiles), MLA with shared and separate V —
# ragged and empty sequences, block sizes 1 / 16 / 64 / 128, one split and split + merge.
DECODE_CASES = {
    "w64_mha": ([0, 1, 37], 2, 2, 64, 64, 16, 1, 64, "gqa"),
    "w64_gqa": ([5, 20], 8, 2, 48, 64, 1, 2, 8, "gqa"),
    "w128_mha": ([130], 1, 1, 128, 128, 64, 3, 64, "gqa"),
    "w128_gqa": ([0, 77, 33], 12, 2, 96, 128, 16, 1, 64, "gqa"),
    "w256_mha": ([200], 1, 1, 256, 256, 128, 2, 128, "gqa"),
    "w256_gqa": ([9, 40], 8, 1, 192, 256, 16, 2, 32, "gqa"),
    "mla_shared_v": ([50, 0], 3, 1, 576, 512, 16, 2, 32, "mla"),
    "mla_separate_v": ([40, 3], 6, 2, 576, 512, 16, 1, 64, "gqa"),
}


def _decode_inputs(lens, Hq, Hkv, D, Dv, bs, kind, dtype, seed=0):
    """q [B, Hq, D] and a paged cache with randomly permuted blocks: (q, k_cache, v_cache, block_tables, latent)
    (MLA: k_cache / v_cache are views of the latent cache [NB, BS, D], returned too)."""
    g = torch.Generator().manual_seed(seed + D + bs)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    if kind == "mla":
        kv, bt = paginate([torch.randn(L, D, generator=g).to(dtype) for L in lens], bs, generator=g, fill=0.0)
        kc = kv.unsqueeze(2)
        return q, kc, kc[..., :Dv], bt, kv
    ks = [torch.randn(L, Hkv, D, generator=g).to(dtype) for L in lens]
    vs = [torch.randn(L, Hkv, Dv, generator=g).to(dtype) for L in lens]
    kc, bt = paginate(ks, bs, generator=g, fill=0.0)
    return q, kc, paginate_like(vs, bt, kc.shape[0], bs, fill=0.0), bt, None


TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-3, 1 / 128), torch.float16: (2e-4, 1 / 1024)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_attn_decode_cu_matches_cpu_kernel(case, dtype, monkeypatch):
    # the .cu decode kernel's CPU twin is the per-token C++ kernel (attention.h); plain mla_decode on CPU now runs
    # the tiled kernel (cascade.py), so name the twin
    monkeypatch.setenv("DSMATH_DECODE_BACKEND", "cpu")
    lens, Hq, Hkv, D, Dv, bs, splits, chunk, kind = DECODE_CASES[case]
    q, kc, vc, bt, kv = _decode_inputs(lens, Hq, Hkv, D, Dv, bs, kind, dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    out, flags = emu.paged_decode(q, kc, vc, bt, sl, 0.1, splits, chunk)
    plan = DecodePlan(splits, chunk, max(lens))
    if kind == "mla":
        cpu = dk.mla_decode(q, kv, bt, sl, 0.1, v_head_dim=Dv, plan=plan)
    else:
        cpu = dk.paged_decode(q, kc, vc, bt, sl, 0.1, plan=plan)
    assert flags == 0
    atol, rtol = TOL[dtype]
    assert_close(out, cpu, atol=atol, rtol=rtol, name=f"{case} {dtype}")
    assert (out[torch.tensor(lens) == 0] == 0).all()  # empty sequences give zeros


def test_attn_decode_cu_batch_beyond_grid_limit():
    """More sequences than grid.z allows (lowered to 4 in the emulation) run as several launches."""
    assert emu.library().emu_max_grid_yz() == emu.MAX_GRID_YZ == 4
    lens = [3, 0, 17, 64, 1, 30, 9, 2, 41]
    q, kc, vc, bt, _ = _decode_inputs(lens, 4, 2, 64, 64, 16, "gqa", torch.float32)
    sl = torch.tensor(lens, dtype=torch.int32)
    for splits, chunk in ((1, 64), (3, 16)):
        out, flags = emu.paged_decode(q, kc, vc, bt, sl, 0.2, splits, chunk)
        cpu = dk.paged_decode(q, kc, vc, bt, sl, 0.2, plan=DecodePlan(splits, chunk, 64))
        assert flags == 0
        assert_close(out, cpu, atol=2e-6, rtol=1e-5)


def test_attn_decode_cu_bad_block_ids_and_lengths_are_flagged_not_read():
    lens = [20, 20, 20, 20]
    q, kc, vc, bt, _ = _decode_inputs(lens, 4, 1, 64, 64, 16, "gqa", torch.float32)
    NB = kc.shape[0]
    sl = torch.tensor(lens, dtype=torch.int32)
    bad = bt.clone()
    bad[1, 1] = 10**6  # tokens 16..19 of sequence 1
    bad[2, 0] = -(10**6)
    out, flags = emu.paged_decode(q, kc, vc, bad, sl, 0.2, 1, 64)
    assert flags == 1  # kBadBlockId
    assert out.isfinite().all()
    good = dk.paged_decode(q, kc, vc, bt, sl, 0.2)
    assert_close(out[[0, 3]], good[[0, 3]], atol=2e-6, rtol=1e-5)  # other sequences untouched
    # sequence 1 attends to its first 16 tokens only (the bad block is absent)
    part = dk.paged_decode(q[1:2], kc, vc, bt[1:2], torch.tensor([16], dtype=torch.int32), 0.2)
    assert_close(out[1:2], part, atol=2e-6, rtol=1e-5)
    # lengths beyond the table or negative: that sequence is empty (zeros), flag 2
    sl_bad = torch.tensor([20, 2**30, -5, bt.shape[1] * 16 + 1], dtype=torch.int32)
    out, flags = emu.paged_decode(q, kc, vc, bt, sl_bad, 0.2, 2, 16)
    assert flags == 2  # kBadSeqLen
    assert (out[1:] == 0).all() and NB > 0
    assert_close(out[:1], good[:1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attn_decode_cu_rounds_half_to_even(dtype):
    """16-bit output = the fp32 result rounded by torch (round half to even), bit for bit, with forced ties: two
    equal keys average their values exactly; column 0 averages 1 and 1 + ulp (the midpoint must round down to the
    even 1, a round-half-up gives 1 + ulp), column 1 averages 1 + ulp and 1 + 2 ulp (rounds up to the even one)."""
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    D = 64
    q = torch.zeros(1, 1, D, dtype=dtype)  # every score 0: the two tokens weigh the same
    k = torch.randn(2, 1, D).to(dtype)
    v = torch.randn(2, 1, D).to(dtype)
    v[0, 0, 0], v[1, 0, 0] = 1.0, 1.0 + ulp
    v[0, 0, 1], v[1, 0, 1] = 1.0 + ulp, 1.0 + 2 * ulp
    kc, bt = paginate([k], 16, fill=0.0)
    vc = paginate_like([v], bt, kc.shape[0], 16, fill=0.0)
    sl = torch.tensor([2], dtype=torch.int32)
    out16, _ = emu.paged_decode(q, kc, vc, bt, sl, 1.0, 1, 64)
    out32, _ = emu.paged_decode(q.float(), kc.float(), vc.float(), bt, sl, 1.0, 1, 64)
    assert out32[0, 0, 0] == 1.0 + ulp / 2 and out32[0, 0, 1] == 1.0 + 1.5 * ulp  # exact midpoints
    assert torch.equal(out16, out32.to(dtype))
    assert out16[0, 0, 0] == 1.0 and out16[0, 0, 1] == 1.0 + 2 * ulp
    cpu16 = dk.paged_decode(q, kc, vc, bt, sl, 1.0)  # the C++ CPU kernel: same rounding
    assert torch.equal(cpu16, out32.to(dtype))


def test_attn_decode_cu_misaligned_vector_load_fails_loudly():
    """The kernel's 16-byte loads need aligned rows: a cache view one element off is refused by the emulation as it
    would fault on a GPU (the Python layer sends such calls to the Triton kernel instead)."""
    q, kc, vc, bt, _ = _decode_inputs([8], 1, 1, 64, 64, 16, "gqa", torch.float32)
    big = torch.zeros(kc.numel() + 1)
    off = big[1:].view(kc.shape)
    off.copy_(kc)
    with pytest.raises(emu.EmuError, match="misaligned"):
        emu.paged_decode(q, off, vc, bt, torch.tensor([8], dtype=torch.int32), 0.2, 1, 64)


# ---------------------------------------------------------------------------------------------- the emulation itself
SELFTEST = r"""
#include <cuda_runtime.h>
namespace {
__global__ void diverge(int* out) {  // half the warp shuffles, the other half ballots: undefined on a GPU
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = (int)__ballot_sync(0xffffffffu, 1);
  out[threadIdx.x] = v;
}
__global__ void deadlock(int* out) {  // __syncthreads in divergent code
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void racy(int* out) {  // reads shared memory another thread wrote, without __syncthreads
  __shared__ int s[64];
  s[threadIdx.x] = (int)threadIdx.x;
  out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void partial_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0); }
__global__ void shuffles(int* out) {  // every collective, checked against its definition
  const int l = threadIdx.x & 31;
  out[threadIdx.x * 6 + 0] = __shfl_xor_sync(0xffffffffu, l, 5);
  out[threadIdx.x * 6 + 1] = __shfl_down_sync(0xffffffffu, l, 3, 8);
  out[threadIdx.x * 6 + 2] = __shfl_up_sync(0xffffffffu, l, 2);
  out[threadIdx.x * 6 + 3] = __shfl_sync(0xffffffffu, l, 7, 16);
  out[threadIdx.x * 6 + 4] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
  out[threadIdx.x * 6 + 5] = (int)__match_any_sync(0xffffffffu, l / 4);
}
}  // namespace
extern "C" int emu_selftest(int which, int* out) {
  if (which == 0) diverge<<<1, 32>>>(out);
  if (which == 1) deadlock<<<1, 64>>>(out);
  if (which == 2) racy<<<1, 64>>>(out);
  if (which == 3) partial_mask<<<1, 32>>>(out);
  if (which == 4) shuffles<<<1, 64>>>(out);
  if (which == 5) shuffles<<<dim3(1, 5, 1), 32>>>(out);
  return (int)cudaGetLastError();
}
"""


@pytest.fixture(scope="module")
def selftest():
    import ctypes

    lib = emu.load(emu.build({"selftest.cu": SELFTEST}))
    lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return lib


def _self(lib, which, n=64 * 6):
    """Run self-test kernel `which`: (status, launch message, out)."""
    out = torch.full((n,), -99, dtype=torch.int32)
    status = lib.emu_selftest(which, out.data_ptr())
    return status, lib.emu_launch_message().decode(), out


def test_emulation_warp_collectives_follow_their_definitions(selftest):
    status, msg, out = _self(selftest, 4)
    assert status == 0, msg
    out = out.view(64, 6)
    as_i32 = lambda m: m - 2**32 if m >= 2**31 else m  # noqa: E731
    for t in range(64):
        lane = t % 32
        assert out[t, 0] == lane ^ 5
        assert out[t, 1] == (lane + 3 if lane % 8 + 3 < 8 else lane)
        assert out[t, 2] == (lane - 2 if lane >= 2 else lane)
        assert out[t, 3] == (lane // 16) * 16 + 7
        assert out[t, 4] == as_i32(sum(1 << m for m in range(32) if m % 3 == 0))
        assert out[t, 5] == as_i32(0xF << (4 * (lane // 4)))


@pytest.mark.parametrize("which,what", [(0, "diverge"), (1, "__syncthreads"), (3, "partial mask"),
                                        (5, "invalid configuration")])
def test_emulation_fails_loudly_on_undefined_behaviour(selftest, which, what):
    status, msg, _ = _self(selftest, which)
    assert status != 0
    assert what in msg, msg


def test_emulation_thread_order_exposes_a_missing_syncthreads(selftest):
    """A race gives different answers under the two valid schedules the emulation can run."""
    results = []
    for rev in (False, True):
        emu.configure(reverse_threads=rev, lib=selftest)
        status, msg, out = _self(selftest, 2)
        assert status == 0, msg
        results.append(out[:64].clone())
    emu.configure(lib=selftest)
    assert not torch.equal(results[0], results[1])


def test_emulation_catches_a_broken_kernel():
    """A mutant of route_topk.cu (warp argmax reduces over half the warp) built and run under the emulation is
    caught: an out-of-bounds shared-memory index faults (reported as an illegal memory access, as on a GPU) or the
    ids disagree with the CPU kernel. The CUDA emulation in CI fails on a known-bad kernel."""
    src = emu.cuda_sources()
    path = os.path.join(emu.CSRC, "route_topk.cu")
    good = src[path]
    site = "for (int off = 16; off > 0; off >>= 1) {\n    float ov"
    bad = good.replace(site, site.replace("16", "8"))
    assert bad != good, "mutation site not found"
    lib = emu.load(emu.build({path: bad}))
    x, kw = _route_case("v3")
    _, i_cpu = dk.route_topk(x, **kw)
    try:
        _, i = emu.route_topk(x, lib=lib, **kw)
    except emu.EmuError as e:
        assert "illegal memory access" in str(e)
    else:
        assert not torch.equal(i, i_cpu)
