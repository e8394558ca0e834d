"""Shared-prefix (cascade) decode and the tiled decode kernels (C++ on CPU; the Triton kernel in the interpreter),
against float64 dense attention on the un-paged KV: n-way forks of a prompt (groups of 1, 2, 16, 64), prompts
ending mid-block, mixed batches (groups + loners + empty sequences), GQA and MLA, KV splits, fp8 caches with
per-token scales, invalid block-table reads; group detection from block tables; padded (graph) metadata."""

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels import cascade as cas
from dsmath_kernels.reference.attention import (
    cascade_decode_ref,
    dequantize_fp8,
    fork_tables,
    paged_decode_ref,
    paginate_like,
)
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def dense(q, ks, vs, scale):
    """float64 attention of q [B, Hq, D] over per-sequence ks[b] [L, Hkv, D], vs[b] [L, Hkv, Dv]."""
    out = torch.zeros(q.shape[0], q.shape[1], vs[0].shape[-1], dtype=torch.float64)
    for b, (k, v) in enumerate(zip(ks, vs)):
        if k.shape[0]:
            g = q.shape[1] // k.shape[1]
            p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), k.double().repeat_interleave(g, 1)) * scale,
                              -1)
            out[b] = torch.einsum("hl,lhd->hd", p, v.double().repeat_interleave(g, 1))
    return out


def forked_batch(n, prompt, suffix, bs, row, dtype, *, loners=(), vrow=None):
    """n samples of one `prompt`-token prompt with suffix[i] own tokens, then loner sequences of the given
    lengths (own prompts): rows [L, *row] (values [L, *vrow] when given), caches filled through the tables."""
    lens = [prompt + s for s in suffix]
    tables, nb = fork_tables(prompt, lens, bs)
    p = torch.randn(prompt, *row)
    ks = [torch.cat([p, torch.randn(s, *row)]) for s in suffix]
    pv = torch.randn(prompt, *vrow) if vrow else None
    vs = [torch.cat([pv, torch.randn(s, *vrow)]) for s in suffix] if vrow else None
    for L in loners:  # own blocks after the group's
        extra = torch.arange(nb, nb + max(1, -(-L // bs)), dtype=torch.int32)
        nb += extra.shape[0]
        t = torch.full((1, max(tables.shape[1], extra.shape[0])), 2**30, dtype=torch.int32)
        t[0, :extra.shape[0]] = extra
        tables = torch.cat([torch.nn.functional.pad(tables, (0, t.shape[1] - tables.shape[1]), value=2**30), t])
        ks.append(torch.randn(L, *row))
        if vrow:
            vs.append(torch.randn(L, *vrow))
        lens.append(L)
    kc = paginate_like([k.to(dtype) for k in ks], tables, nb, bs)
    vc = paginate_like([v.to(dtype) for v in vs], tables, nb, bs) if vrow else None
    ks = [k.to(dtype) for k in ks]
    vs = [v.to(dtype) for v in vs] if vrow else None
    return ks, vs, kc, vc, tables, torch.tensor(lens, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- group detection
def test_find_shared_prefixes_forks_and_system_prompts():
    # rows 0-2 fork one prompt (3 full blocks), rows 3-4 another (2 blocks); rows 0-4 share block 7 (a system
    # prompt); row 5 shares nothing; row 6 repeats row 0's blocks but holds only 1 full block (tokens 0..5)
    tables = [[7, 1, 2, 10], [7, 1, 2, 11], [7, 1, 2, 12], [7, 3, 13], [7, 3, 14], [9, 15], [7, 1]]
    lens = [16, 15, 13, 10, 9, 5, 6]
    groups = {tuple(sorted(r)): b for r, b in dk.find_shared_prefixes(tables, lens, 4)}
    # row 2 holds 13 tokens (3 full blocks), row 6 only 1 full block -> row 6 joins only at block 0
    assert groups == {(0, 1, 2): 3, (3, 4): 2}
    assert dk.find_shared_prefixes([[1, 2], [3, 4]], [8, 8], 4) == []
    assert dk.find_shared_prefixes([[1, 2]], [8], 4) == []
    # partial blocks are never shared: a 7-token prompt in blocks of 4 shares one block
    assert dk.find_shared_prefixes([[5, 6], [5, 6]], [7, 7], 4) == [([0, 1], 1)]
    t = torch.tensor(tables[:3])
    assert dk.find_shared_prefixes(t, torch.tensor(lens[:3]), 4) == [([0, 1, 2], 3)]


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
@pytest.mark.parametrize("Hq,Hkv", [(16, 1), (128, 1), (8, 2)])
def test_shared_prefix_tiles_cover_every_member_head_once(kernel, Hq, Hkv):
    tables, _ = fork_tables(70, [80] * 9 + [75], 16)
    lens = [80] * 9 + [75]
    sp = dk.shared_prefix(tables, lens, 16, num_q_heads=Hq, num_kv_heads=Hkv, kernel=kernel)
    assert sp.num_groups == 1 and sp.saved_tokens == 9 * 64
    assert sp.prefix_lens.tolist() == [64] * 10
    seen = torch.zeros(10, Hq, dtype=torch.int64)
    G = Hq // Hkv
    for row, m0, m1, h0, n in sp.tiles.tolist():
        assert n == 64 and row in sp.members.tolist()  # a member of the group: its table holds the prefix
        nh = min(sp.heads_per_tile, G - h0 % G)
        for m in sp.members[m0:m1].tolist():
            seen[m, h0:h0 + nh] += 1
    assert (seen == 1).all()
    padded = dk.shared_prefix(tables, lens, 16, num_q_heads=Hq, num_kv_heads=Hkv, kernel=kernel, pad_to=16)
    assert padded.prefix_lens.shape == (16,) and padded.members.shape == (16,)
    assert padded.tiles.shape[0] == cas.max_tiles(16, Hq, Hkv, kernel) >= sp.tiles.shape[0]
    assert (padded.tiles[sp.tiles.shape[0]:, 1] == padded.tiles[sp.tiles.shape[0]:, 2]).all()  # empty padding


def test_shared_prefix_thresholds_and_errors():
    tables, _ = fork_tables(64, [65, 66], 16)
    assert dk.shared_prefix(tables, [65, 66], 16, num_q_heads=4) is not None
    assert dk.shared_prefix(tables, [65, 66], 16, num_q_heads=4, min_saving=0.9) is None
    with pytest.raises(ValueError, match="groups: row 1 does not hold"):
        dk.shared_prefix(tables, [65, 30], 16, num_q_heads=4, groups=[([0, 1], 4)])
    bad = tables.clone()
    bad[1, 2] = 999
    with pytest.raises(ValueError, match="groups: row 1"):
        dk.shared_prefix(bad, [65, 66], 16, num_q_heads=4, groups=[([0, 1], 4)])
    with pytest.raises(ValueError, match="num_q_heads"):
        dk.shared_prefix(tables, [65, 66], 16, num_q_heads=6, num_kv_heads=4)
    q = torch.randn(2, 4, 24)
    kv = torch.randn(20, 16, 24)
    with pytest.raises(TypeError, match="cascade: expected a SharedPrefix"):
        dk.mla_decode(q, kv, tables, torch.tensor([65, 66], dtype=torch.int32), 0.1, v_head_dim=16,
                      cascade="yes")
    sl = torch.tensor([65, 66], dtype=torch.int32)
    sp = dk.shared_prefix(tables, [65, 66], 16, num_q_heads=4, pad_to=3)
    with pytest.raises(ValueError, match=r"cascade.prefix_lens: expected shape \[2\]"):
        dk.mla_decode(q, kv, tables, sl, 0.1, v_head_dim=16, cascade=sp)
    sp = dk.shared_prefix(tables, [65, 66], 16, num_q_heads=4)
    odd = cas.SharedPrefix(sp.prefix_lens - 3, sp.members, sp.tiles, sp.heads_per_tile, 1, 0)
    with pytest.raises(ValueError, match="cascade.prefix_lens: sequence 0 has 61, not whole blocks"):
        dk.mla_decode(q, kv, tables, sl, 0.1, v_head_dim=16, cascade=odd, check_bounds=True)
    tiles = sp.tiles.clone()
    tiles[0, 2] = 7
    with pytest.raises(ValueError, match="cascade.tiles: tile 0"):
        dk.mla_decode(q, kv, tables, sl, 0.1, v_head_dim=16, check_bounds=True,
                      cascade=cas.SharedPrefix(sp.prefix_lens, sp.members, tiles, sp.heads_per_tile, 1, 0))


# ---------------------------------------------------------------------------------------------- cascade == plain
CASES = [  # group size, prompt tokens, block size, suffix lengths pattern, loner lengths
    (1, 64, 16, [5], [9]),
    (2, 70, 16, [1, 30], []),
    (16, 200, 64, [1, 2, 70, 0] * 4, [300, 0]),
    (64, 33, 8, [3, 0, 9, 1] * 16, [40]),
]


@pytest.mark.parametrize("mla", [True, False], ids=["mla", "gqa"])
@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-P{c[1]}-bs{c[2]}" for c in CASES])
def test_cascade_equals_plain_cpu(case, mla):
    n, prompt, bs, suffix, loners = case
    dtype = torch.float32
    if mla:
        H, Dc, Dr = 16, 32, 16
        ks, _, kc, _, bt, sl = forked_batch(n, prompt, suffix, bs, (Dc + Dr,), dtype, loners=loners)
        q = torch.randn(len(ks), H, Dc + Dr)
        expect = dense(q, [k[:, None] for k in ks], [k[:, None, :Dc] for k in ks], 0.3)
    else:
        Hq, Hkv, D, Dv = 8, 2, 16, 24
        ks, vs, kc, vc, bt, sl = forked_batch(n, prompt, suffix, bs, (Hkv, D), dtype, loners=loners, vrow=(Hkv, Dv))
        q = torch.randn(len(ks), Hq, D)
        expect = dense(q, ks, vs, 0.3)
    groups = dk.find_shared_prefixes(bt, sl, bs) if n > 1 else [([0], prompt // bs)]
    assert groups and groups[0][1] == prompt // bs and sorted(groups[0][0]) == list(range(n))
    sp = dk.shared_prefix(bt, sl, bs, num_q_heads=q.shape[1], num_kv_heads=1 if mla else 2, groups=groups,
                          min_saving=0)
    for plan in (dk.DecodePlan(1, 1 << 20, 0), dk.DecodePlan(3, 64, 0)):
        if mla:
            out = dk.mla_decode(q, kc, bt, sl, 0.3, v_head_dim=Dc, cascade=sp, plan=plan)
            plain = dk.mla_decode(q, kc, bt, sl, 0.3, v_head_dim=Dc, plan=plan)
        else:
            out = dk.paged_decode(q, kc, vc, bt, sl, 0.3, cascade=sp, plan=plan)
            plain = dk.paged_decode(q, kc, vc, bt, sl, 0.3, plan=plan)
        assert_close(out, expect, atol=2e-5, rtol=2e-5, name=f"cascade {plan.num_splits} splits")
        assert_close(out, plain, atol=2e-5, rtol=2e-5, name="cascade vs plain")


ENGINE_CASES = [  # members, prompt, block size, heads (Hq, Hkv), dims (D, Dv) or MLA (Dc, Dr), cache dtype
    # 1 sample: 20 rows (not a multiple of 16 lanes or 6-row micro-tiles); prompt ends mid-block; 2 KV tiles of 96
    (1, 150, 16, (20, 1), ("mla", 40, 8), torch.float32),
    # 3 samples x 5 heads = 15 shared rows, 5 rows per sequence (< 16 lanes: row-block kernel unless 4 lanes);
    # Dv 18 padded to the vector width past D 20: V gets its own padded panel
    (3, 100, 8, (5, 1), ("mla", 18, 2), torch.float32),
    # 5 samples x 20 heads = 100 rows: a 64-row item (4 vectors) and a 36-row item (3 vectors, 6-row tail 0)
    (5, 97, 32, (20, 1), ("mla", 24, 8), torch.bfloat16),
    # 64 samples x 4 GQA heads = 256 rows per kv head, V separate and 24 wide (not a multiple of 16)
    (64, 40, 8, (8, 2), ("gqa", 16, 24), torch.float32),
]


@pytest.mark.parametrize("engine", ["auto", "avx2", "portable", "rows"])
@pytest.mark.parametrize("case", ENGINE_CASES, ids=[f"n{c[0]}-P{c[1]}-H{c[3][0]}-{c[4][0]}" for c in ENGINE_CASES])
def test_cpu_gemm_engine_blocking_edges(case, engine, monkeypatch):
    """The C++ GEMM engine (every vector width; rows: the per-sequence pass on the row-block kernel) on micro-tile and
    tile edges: row counts that are not multiples of
    the lanes / micro-tile rows, shared prefixes ending mid-block and spanning partial 96-token tiles, suffixes of
    0..130 tokens, padded V widths, 16-bit caches; cascade and plain against float64 dense attention."""
    monkeypatch.setenv(cas.CPU_ENGINE_ENV, engine)
    n, prompt, bs, (Hq, Hkv), (kind, a, b), dtype = case
    suffix = [0, 1, 130, 7, 50][:n] + [3] * max(0, n - 5)
    if kind == "mla":
        ks, _, kc, _, bt, sl = forked_batch(n, prompt, suffix, bs, (a + b,), dtype, loners=[11])
        q = torch.randn(len(ks), Hq, a + b).to(dtype)
        expect = dense(q, [k[:, None] for k in ks], [k[:, None, :a] for k in ks], 0.3)
    else:
        ks, vs, kc, vc, bt, sl = forked_batch(n, prompt, suffix, bs, (Hkv, a), dtype, loners=[11], vrow=(Hkv, b))
        q = torch.randn(len(ks), Hq, a).to(dtype)
        expect = dense(q, ks, vs, 0.3)
    groups = [(list(range(n)), prompt // bs)]
    sp = dk.shared_prefix(bt, sl, bs, num_q_heads=Hq, num_kv_heads=Hkv, groups=groups, min_saving=0)
    atol, rtol = TOL[dtype] if dtype != torch.float32 else (2e-5, 2e-5)
    for plan in (dk.DecodePlan(1, 1 << 20, 0), dk.DecodePlan(3, 64, 0)):
        for c in (sp, None):
            if kind == "mla":
                out = dk.mla_decode(q, kc, bt, sl, 0.3, v_head_dim=a, cascade=c, plan=plan)
            else:
                out = dk.paged_decode(q, kc, vc, bt, sl, 0.3, cascade=c, plan=plan)
            assert_close(out, expect, atol=atol, rtol=rtol,
                         name=f"{engine} {'cascade' if c else 'plain'} {plan.num_splits} splits")


def test_cpu_engine_choice_by_name(monkeypatch):
    monkeypatch.setenv(cas.CPU_ENGINE_ENV, "portable")
    assert cas.cpu_isa() == "portable"
    monkeypatch.setenv(cas.CPU_ENGINE_ENV, "auto")
    assert cas.cpu_isa() in ("avx512", "avx2", "portable")
    monkeypatch.setenv(cas.CPU_ENGINE_ENV, "avx1024")
    with pytest.raises(ValueError, match="DSMATH_CPU_ATTN_KERNEL: expected one of"):
        cas.cpu_engine()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_16bit_cpu(dtype):
    ks, _, kc, _, bt, sl = forked_batch(6, 100, [4, 1, 20, 0, 7, 3], 16, (48,), dtype, loners=[17])
    q = torch.randn(len(ks), 16, 48).to(dtype)
    sp = dk.shared_prefix(bt, sl, 16, num_q_heads=16)
    out = dk.mla_decode(q, kc, bt, sl, 0.2, v_head_dim=32, cascade=sp)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    assert_close(out, dense(q, [k[:, None] for k in ks], [k[:, None, :32] for k in ks], 0.2), atol=atol, rtol=rtol)


def test_reference_cascade_is_plain_attention():
    ks, _, kc, _, bt, sl = forked_batch(5, 50, [2, 9, 0, 4, 1], 8, (2, 12), torch.float64)
    q = torch.randn(5, 4, 12, dtype=torch.float64)
    sp = dk.shared_prefix(bt, sl, 8, num_q_heads=4, num_kv_heads=2)
    ref = cascade_decode_ref(q, kc, kc, bt, sl, 0.4, sp.prefix_lens, cas.prefix_rows(sp, 5))
    assert_close(ref, paged_decode_ref(q, kc, kc, bt, sl, 0.4), atol=1e-12, rtol=1e-12)
    assert_close(ref, dense(q, ks, ks, 0.4), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- Triton kernel
TRITON_CASES = [  # mla, heads (Hq, Hkv), group size, prompt, block size, splits
    (True, (16, 1), 5, 40, 16, 1),
    (True, (128, 1), 2, 17, 8, 2),
    (True, (128, 1), 2, 9, 8, 1),  # one split, plain: 64-row tiles still write partials and merge (no direct store)
    (False, (8, 2), 6, 20, 4, 3),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"{'mla' if c[0] else 'gqa'}-H{c[1][0]}-n{c[2]}" for c in
                                                    TRITON_CASES])
def test_triton_kernel_plain_and_cascade(case):
    """The GPU kernel in the interpreter: transposed tiles (16 heads, GQA), 64-head tiles (128 heads), shared
    tiles of members x heads, per-sequence splits, a loner and an empty sequence."""
    mla, (Hq, Hkv), n, prompt, bs, splits = case
    suffix = [3, 0, 11, 1, 6, 2][:n]
    if mla:
        Dc = 32
        ks, _, kc, _, bt, sl = forked_batch(n, prompt, suffix, bs, (Dc + 16,), torch.float32,
                                            loners=[7, 0] if Hq <= 32 else [0])
        k4 = kc.unsqueeze(2)
        v4 = k4[..., :Dc]
        q = torch.randn(len(ks), Hq, Dc + 16)
        expect = dense(q, [k[:, None] for k in ks], [k[:, None, :Dc] for k in ks], 0.3)
    else:
        ks, vs, k4, v4, bt, sl = forked_batch(n, prompt, suffix, bs, (Hkv, 16), torch.float32, loners=[7, 0],
                                              vrow=(Hkv, 24))
        q = torch.randn(len(ks), Hq, 16)
        expect = dense(q, ks, vs, 0.3)
    sp = dk.shared_prefix(bt, sl, bs, num_q_heads=Hq, num_kv_heads=Hkv, kernel="triton")
    assert sp is not None and sp.heads_per_tile == min(Hq // Hkv, 64)
    assert (bt[-1, 1:] == 2**30).all()  # bad ids past every length (the empty loner's row): never flagged
    for c in (None, sp):
        out = torch.full((len(ks), Hq, v4.shape[-1]), 7.0)
        flags = torch.zeros(1, dtype=torch.int32)
        cas._run_gpu(q, k4, v4, bt, sl, 0.3, splits, None, c, out, flags=flags)
        assert_close(out, expect, atol=2e-5, rtol=2e-5, name=f"triton {'cascade' if c else 'plain'}")
        assert int(flags) == 0


def test_triton_direct_store_only_from_transposed_tiles():
    """64-row tiles (128 heads) never store `out` directly (that epilogue spills at sm_90): attend says so."""
    from dsmath_kernels import mla_decode_triton as tk

    ks, _, kc, _, bt, sl = forked_batch(1, 0, [9], 8, (48,), torch.float32, loners=[9])
    k4 = kc.unsqueeze(2)
    q = torch.randn(2, 128, 48)
    tiles = cas._plain_tiles(2, 128, 1, 64, q.device)
    with pytest.raises(ValueError, match="out: a pass on 64-row tiles writes fp32 partials"):
        tk.attend(q, k4, k4[..., :32], bt, sl, 0.3, tiles=tiles, heads_per_tile=64, out=torch.empty(2, 128, 32))


def test_triton_bad_block_ids_read_nothing():
    """An id outside [0, NB) or a table read past its width makes those tokens empty, never an OOB read."""
    ks, _, kc, _, bt, _ = forked_batch(1, 0, [40], 8, (24,), torch.float32, loners=[40])
    k4 = kc.unsqueeze(2)
    q = torch.randn(2, 16, 24)
    bt = bt[:, :4].contiguous()
    bt[0, 2] = kc.shape[0] + 5  # sequence 0: tokens 16..23 unreadable
    sl = torch.tensor([32, 40], dtype=torch.int32)  # sequence 1: tokens 32..39 lie past its 4-entry table row
    keep = [torch.cat([torch.arange(16), torch.arange(24, 32)]), torch.arange(32)]
    kept = [k[i, None] for k, i in zip(ks, keep)]
    expect = dense(q, kept, [k[..., :16] for k in kept], 0.3)
    for splits in (1, 2):
        out = torch.empty(2, 16, 16)
        cas._run_gpu(q, k4, k4[..., :16], bt, sl, 0.3, splits, None, None, out)
        assert_close(out, expect, atol=2e-5, rtol=2e-5, name=f"invalid reads, {splits} splits")


def _flags_of(q, k4, bt, sl, splits, cascade=None, Dv=16):
    """The bounds bits one Triton decode (both passes with a cascade) ORs into a fresh int32 [1] word."""
    flags = torch.zeros(1, dtype=torch.int32)
    cas._run_gpu(q, k4, k4[..., :Dv], bt, sl, 0.3, splits, None, cascade,
                 torch.empty(q.shape[0], q.shape[1], Dv), flags=flags)
    return int(flags)


@pytest.mark.parametrize("bs", [8, 16])  # per-token table reads / one read per 16-token interpreter tile
def test_triton_flags_bad_ids_and_lengths(bs):
    """Principle 4 on the GPU kernel (as raise_device_errors reads it): a bad block id a sequence uses sets bit 1,
    a length past its table row or a negative one bit 2, on the direct (1 split) and partials (2 splits) paths;
    a bad id past seq_len (the loner's padding, also inside a tile the sequence reads) sets nothing."""
    ks, _, kc, _, bt, sl = forked_batch(1, 0, [40], bs, (24,), torch.float32, loners=[20])
    k4, NB = kc.unsqueeze(2), kc.shape[0]
    q = torch.randn(2, 16, 24)
    assert bt[1, -1] == 2**30 and int(sl[1]) == 20  # row 1: padding ids past its 20 tokens
    expect = dense(q, [k[:, None] for k in ks], [k[:, None, :16] for k in ks], 0.3)
    bad = bt.clone()
    bad[0, 1] = NB + 5
    neg = bt.clone()
    neg[1, 0] = -1
    past = torch.tensor([bt.shape[1] * bs + 1, 20], dtype=torch.int32)  # row 0 holds bt.shape[1] * bs tokens
    for splits in (1, 2):
        flags = torch.zeros(1, dtype=torch.int32)
        out = torch.empty(2, 16, 16)
        cas._run_gpu(q, k4, k4[..., :16], bt, sl, 0.3, splits, None, None, out, flags=flags)
        assert int(flags) == 0
        assert_close(out, expect, atol=2e-5, rtol=2e-5, name=f"valid call, {splits} splits")
        assert _flags_of(q, k4, bad, sl, splits) == 1
        assert _flags_of(q, k4, neg, sl, splits) == 1
        assert _flags_of(q, k4, bt, past, splits) == 2
        assert _flags_of(q, k4, bt, torch.tensor([-3, 20], dtype=torch.int32), splits) == 2
        assert _flags_of(q, k4, bad, past, splits) == 3


def test_triton_flags_shared_prefix_pass():
    """A bad id in a group's shared blocks is read only by the cascade's shared pass (the suffix pass starts after
    the prefix): that pass flags it; 64-row tiles (128 heads) flag too."""
    ks, _, kc, _, bt, sl = forked_batch(3, 16, [3, 5, 1], 8, (24,), torch.float32)
    k4 = kc.unsqueeze(2)
    for Hq in (16, 128):
        q = torch.randn(3, Hq, 24)
        sp = dk.shared_prefix(bt, sl, 8, num_q_heads=Hq, kernel="triton")
        assert sp is not None and int(sp.prefix_lens.min()) == 16
        bad = bt.clone()
        bad[int(sp.tiles[0, 0]), 1] = kc.shape[0]  # the prefix's second block, in the table row the tiles read
        assert _flags_of(q, k4, bad, sl, 1, sp) == 1
        assert _flags_of(q, k4, bt, sl, 1, sp) == 0


def test_cpu_bad_block_ids_raise_by_name():
    ks, _, kc, _, bt, sl = forked_batch(1, 0, [40], 8, (24,), torch.float32, loners=[20])
    q = torch.randn(2, 4, 24)
    bad = bt.clone()
    bad[0, 2] = kc.shape[0] + 5
    with pytest.raises(ValueError, match=r"block_tables: entry \[0, 2\] = " + str(kc.shape[0] + 5)):
        dk.mla_decode(q, kc, bad, sl, 0.3, v_head_dim=16)
    short = torch.tensor([16, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens: sequence 1 has 20 tokens, outside \[0, 16\]"):
        dk.mla_decode(q, kc, bt[:, :2], short, 0.3, v_head_dim=16)  # the op's vectorised check, every CPU call
    # the C++ kernel's own guard, behind that check (the custom op called directly)
    with pytest.raises(ValueError, match=r"block_tables: entry \[0, 2\] = " + str(kc.shape[0] + 5)):
        torch.ops.dsmath.mla_tiled_decode(q, kc, bad, sl, 0.3, 16, 1, None, None, None, None, 1)
    with pytest.raises(ValueError, match="seq_lens: sequence 1 reads block-table entry"):
        torch.ops.dsmath.mla_tiled_decode(q, kc, bt[:, :2], short, 0.3, 16, 1, None, None, None, None, 1)


# ---------------------------------------------------------------------------------------------- fp8 cache
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp8_cache_with_token_scales(backend):
    ks, _, kc, _, bt, sl = forked_batch(3, 24, [5, 0, 9], 8, (48,), torch.float32, loners=[13])
    rows = kc.reshape(-1, 48).nan_to_num()
    q8, s = dk.quantize_fp8(rows)
    assert q8.dtype == torch.float8_e4m3fn and s.shape == (rows.shape[0],)
    assert_close(q8.float() * s[:, None], rows, atol=0, rtol=0.07, name="fp8 round trip")
    cache = q8.view(kc.shape)
    kv_scale = s.view(kc.shape[:2]).contiguous()
    q = torch.randn(4, 16, 48)
    deq = dequantize_fp8(cache, kv_scale)
    expect = paged_decode_ref(q.double(), deq.double().unsqueeze(2), deq.double().unsqueeze(2)[..., :32], bt, sl, 0.3)
    sp = dk.shared_prefix(bt, sl, 8, num_q_heads=16, kernel="cpu" if backend == "cpu" else "triton")
    for c in (None, sp):
        if backend == "cpu":
            out = dk.mla_decode(q, cache, bt, sl, 0.3, v_head_dim=32, kv_scale=kv_scale, cascade=c)
        else:
            out = torch.empty(4, 16, 32)
            k4 = cache.unsqueeze(2)
            cas._run_gpu(q, k4, k4[..., :32], bt, sl, 0.3, 2, kv_scale, c, out)
        assert_close(out, expect, atol=1e-4, rtol=1e-4, name=f"fp8 {backend}")
    with pytest.raises(ValueError, match="kv_scale: an fp8-e4m3 kv_cache needs"):
        dk.mla_decode(q, cache, bt, sl, 0.3, v_head_dim=32)


def test_mla_cache_write_fp8_round_trip():
    cache = torch.zeros(4, 8, 24, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(4, 8)
    kv = torch.randn(5, 24) * torch.tensor([1.0, 10, 0.01, 300, 0])[:, None]
    slots = torch.tensor([3, 9, -1, 31, 0])
    dk.mla_cache_write_fp8(kv, cache, scale, slots)
    deq = dequantize_fp8(cache, scale).view(32, 24)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert_close(deq[s], kv[i], atol=1e-6, rtol=0.07, name=f"row {i}")
    assert scale.view(-1)[[1, 2]].eq(0).all()  # untouched slots
    with pytest.raises(ValueError, match="kv_scale: expected shape"):
        dk.mla_cache_write_fp8(kv, cache, scale[:2], slots)


def test_tiled_decode_opcheck():
    _, _, kc, _, bt, sl = forked_batch(3, 20, [2, 0, 5], 8, (24,), torch.float32)
    kc = kc.nan_to_num()
    q = torch.randn(3, 4, 24)
    sp = dk.shared_prefix(bt, sl, 8, num_q_heads=4)
    torch.library.opcheck(torch.ops.dsmath.mla_tiled_decode.default,
                          (q, kc, bt, sl, 0.3, 16, 2, None, sp.prefix_lens, sp.members, sp.tiles, sp.heads_per_tile),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
