"""Bad inputs to the paged-attention ops: each raises TypeError / ValueError naming the argument, on every call on
CPU (block ids, lengths, slots, cu_seqlens_q and max_seqlen_q are validated vectorised), never a segfault or a
silent wrong answer: the inputs that crashed or returned garbage before (block ids 10**6 / -10**6 / NB / -1,
seq_len 2**30 / capacity + 1, an empty cache with tokens, slots < -1, expanded caches, zero heads), dtypes, shapes,
mismatched sizes, NaN / inf scalars, empty batches, strided views. Also: the reference refuses negative ids, the
Triton launchers address block tables in int64 and split batches beyond the 65,535 grid limit."""

import os
import tempfile

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels import attention_triton
from dsmath_kernels.reference.attention import paged_decode_ref, paged_prefill_ref
from dsmath_kernels.testing import assert_close, assert_names_argument

NB, BS, HKV, D = 4, 16, 2, 32
KC, VC = torch.randn(NB, BS, HKV, D), torch.randn(NB, BS, HKV, D)
KV = torch.randn(NB, BS, 24)
Q = torch.randn(2, 4, D)
QM = torch.randn(2, 4, 24)
BT = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
SL = torch.tensor([20, 5], dtype=torch.int32)
CU = torch.tensor([0, 3, 5], dtype=torch.int32)
QP, QPM = torch.randn(5, 4, D), torch.randn(5, 4, 24)


def _bt(i, j, v):
    t = BT.clone()
    t[i, j] = v
    return t


def _sl(*v):
    return torch.tensor(v, dtype=torch.int32)


# table problems shared by decode and prefill: (block_tables, seq_lens)
TABLES = {
    "block id 10**6": (_bt(1, 0, 10**6), SL),
    "block id -10**6": (_bt(0, 1, -(10**6)), SL),
    "block id = NB": (_bt(0, 1, NB), SL),
    "block id -1": (_bt(0, 0, -1), SL),
    "seq_len 2**30": (BT, _sl(2**30, 5)),
    "seq_len capacity + 1": (BT, _sl(2 * BS + 1, 5)),
    "seq_len negative": (BT, _sl(-1, 5)),
    "block_tables int64": (BT.long(), SL),
    "seq_lens int64": (BT, SL.long()),
    "block_tables rows": (BT[:1], SL),
    "seq_lens length": (BT, SL[:1]),
    "block_tables 1-D": (BT.view(-1), SL),
}

DECODE = {f"decode {k}": (lambda bt=bt, sl=sl: dk.paged_decode(Q, KC, VC, bt, sl, 0.2))
          for k, (bt, sl) in TABLES.items()}
DECODE.update({f"mla {k}": (lambda bt=bt, sl=sl: dk.mla_decode(QM, KV, bt, sl, 0.2, v_head_dim=16))
               for k, (bt, sl) in TABLES.items()})
DECODE.update({
    "empty cache with tokens": lambda: dk.paged_decode(Q, KC[:0], VC[:0], BT, SL, 0.2),
    "mla empty cache with tokens": lambda: dk.mla_decode(QM, KV[:0], BT, SL, 0.2, v_head_dim=16),
    "q int": lambda: dk.paged_decode(Q.int(), KC, VC, BT, SL, 0.2),
    "q 2-D": lambda: dk.paged_decode(Q[0], KC, VC, BT, SL, 0.2),
    "q zero heads": lambda: dk.paged_decode(Q[:, :0], KC, VC, BT, SL, 0.2),
    "q head dim mismatch": lambda: dk.paged_decode(torch.randn(2, 4, D + 8), KC, VC, BT, SL, 0.2),
    "q heads not a multiple": lambda: dk.paged_decode(torch.randn(2, 3, D), KC, VC, BT, SL, 0.2),
    "k_cache zero kv heads": lambda: dk.paged_decode(Q, KC[:, :, :0], VC[:, :, :0], BT, SL, 0.2),
    "k_cache block size 0": lambda: dk.paged_decode(Q, KC[:, :0], VC[:, :0], BT, SL, 0.2),
    "k_cache block size 257": lambda: dk.paged_decode(Q, torch.randn(2, 257, HKV, D), torch.randn(2, 257, HKV, D),
                                                      BT, SL, 0.2),
    "k_cache expanded": lambda: dk.paged_decode(Q, KC[:1].expand(NB, BS, HKV, D), VC, BT, SL, 0.2),
    "k_cache last dim strided": lambda: dk.paged_decode(Q, torch.randn(NB, BS, HKV, 2 * D)[..., ::2], VC, BT, SL,
                                                        0.2),
    "v_cache dtype": lambda: dk.paged_decode(Q, KC, VC.double(), BT, SL, 0.2),
    "v_cache blocks differ": lambda: dk.paged_decode(Q, KC, VC[:2], BT, SL, 0.2),
    "scale nan": lambda: dk.paged_decode(Q, KC, VC, BT, SL, float("nan")),
    "scale inf": lambda: dk.paged_decode(Q, KC, VC, BT, SL, float("inf")),
    "scale string": lambda: dk.paged_decode(Q, KC, VC, BT, SL, "0.2"),
    "plan wrong type": lambda: dk.paged_decode(Q, KC, VC, BT, SL, 0.2, plan=(1, 64)),
    "plan zero splits": lambda: dk.paged_decode(Q, KC, VC, BT, SL, 0.2, plan=dk.DecodePlan(0, 64, 20)),
    "plan huge chunk": lambda: dk.paged_decode(Q, KC, VC, BT, SL, 0.2, plan=dk.DecodePlan(2, 2**31, 20)),
    "mla v_head_dim too big": lambda: dk.mla_decode(QM, KV, BT, SL, 0.2, v_head_dim=25),
    "mla v_head_dim 0": lambda: dk.mla_decode(QM, KV, BT, SL, 0.2, v_head_dim=0),
    "mla row width": lambda: dk.mla_decode(torch.randn(2, 4, 32), KV, BT, SL, 0.2, v_head_dim=16),
    "mla kv dtype": lambda: dk.mla_decode(QM, KV.half(), BT, SL, 0.2, v_head_dim=16),
    "mla zero heads": lambda: dk.mla_decode(QM[:, :0], KV, BT, SL, 0.2, v_head_dim=16),
    "mla kv expanded": lambda: dk.mla_decode(QM, KV[:1].expand(NB, BS, 24), BT, SL, 0.2, v_head_dim=16),
})

PREFILL = {f"prefill {k}": (lambda bt=bt, sl=sl: dk.paged_prefill(QP, KC, VC, bt, CU, sl, 0.2))
           for k, (bt, sl) in TABLES.items()}
PREFILL.update({f"mla prefill {k}": (lambda bt=bt, sl=sl: dk.mla_prefill(QPM, KV, bt, CU, sl, 0.2, v_head_dim=16))
                for k, (bt, sl) in TABLES.items()})
PREFILL.update({
    "cu_seqlens_q not from 0": lambda: dk.paged_prefill(QP, KC, VC, BT, _sl(1, 3, 5), SL, 0.2),
    "cu_seqlens_q not to Nq": lambda: dk.paged_prefill(QP, KC, VC, BT, _sl(0, 3, 4), SL, 0.2),
    "cu_seqlens_q decreasing": lambda: dk.paged_prefill(QP, KC, VC, BT, _sl(0, 6, 5), SL, 0.2),
    "cu_seqlens_q empty": lambda: dk.paged_prefill(QP, KC, VC, BT, _sl(), SL, 0.2),
    "cu_seqlens_q int64": lambda: dk.paged_prefill(QP, KC, VC, BT, CU.long(), SL, 0.2),
    "more queries than tokens": lambda: dk.paged_prefill(QP, KC, VC, BT, CU, _sl(2, 5), 0.2),
    "max_seqlen_q too small": lambda: dk.paged_prefill(QP, KC, VC, BT, CU, SL, 0.2, max_seqlen_q=2),
    "max_seqlen_q negative": lambda: dk.paged_prefill(QP, KC, VC, BT, CU, SL, 0.2, max_seqlen_q=-1),
    "max_seqlen_q float": lambda: dk.paged_prefill(QP, KC, VC, BT, CU, SL, 0.2, max_seqlen_q=3.0),
    "prefill scale nan": lambda: dk.paged_prefill(QP, KC, VC, BT, CU, SL, float("nan")),
    "prefill k_cache expanded": lambda: dk.paged_prefill(QP, KC[:1].expand(NB, BS, HKV, D), VC, BT, CU, SL, 0.2),
    "prefill empty cache with tokens": lambda: dk.paged_prefill(QP, KC[:0], VC[:0], BT, CU, SL, 0.2),
    "mla prefill zero heads": lambda: dk.mla_prefill(QPM[:, :0], KV, BT, CU, SL, 0.2, v_head_dim=16),
})

WRITES = {
    "slot -2": lambda: dk.cache_write(Q, Q, KC.clone(), VC.clone(), torch.tensor([-2, 3])),
    "slot -10**6": lambda: dk.cache_write(Q, Q, KC.clone(), VC.clone(), torch.tensor([-(10**6), 3])),
    "slot = NB * BS": lambda: dk.cache_write(Q[:, :2], Q[:, :2], KC.clone(), VC.clone(),
                                             torch.tensor([NB * BS, 3])),
    "slot float": lambda: dk.cache_write(Q[:, :2], Q[:, :2], KC.clone(), VC.clone(), torch.tensor([1.0, 3.0])),
    "slots length": lambda: dk.cache_write(Q[:, :2], Q[:, :2], KC.clone(), VC.clone(), torch.tensor([1, 2, 3])),
    "k shape": lambda: dk.cache_write(Q, Q[:, :2], KC.clone(), VC.clone(), torch.tensor([1, 2])),
    "k int": lambda: dk.cache_write(Q[:, :2].int(), Q[:, :2], KC.clone(), VC.clone(), torch.tensor([1, 2])),
    "k_cache expanded": lambda: dk.cache_write(Q[:, :2], Q[:, :2], KC[:1].expand(NB, BS, HKV, D), VC.clone(),
                                               torch.tensor([1, 2])),
    "v_cache blocks differ": lambda: dk.cache_write(Q[:, :2], Q[:, :2], KC.clone(), VC[:2].clone(),
                                                    torch.tensor([1, 2])),
    "mla slot -2": lambda: dk.mla_cache_write(torch.randn(2, 24), KV.clone(), torch.tensor([-2, 1])),
    "mla slot = NB * BS": lambda: dk.mla_cache_write(torch.randn(2, 24), KV.clone(), torch.tensor([0, NB * BS])),
    "mla width": lambda: dk.mla_cache_write(torch.randn(2, 25), KV.clone(), torch.tensor([0, 1])),
    "mla kv_cache expanded": lambda: dk.mla_cache_write(torch.randn(2, 24), KV[:1].expand(NB, BS, 24),
                                                        torch.tensor([0, 1])),
}

PLAN = {
    "q heads not a multiple": lambda: dk.plan_decode(4, 1000, num_kv_heads=3, num_q_heads=8),
    "q heads below kv heads": lambda: dk.plan_decode(4, 1000, num_kv_heads=8, num_q_heads=4),
    "zero kv heads": lambda: dk.plan_decode(4, 1000, num_kv_heads=0),
    "negative batch": lambda: dk.plan_decode(-1, 1000),
    "negative length": lambda: dk.plan_decode(4, -5),
    "float length": lambda: dk.plan_decode(4, 100.0),
}



@pytest.mark.parametrize("name", list(DECODE))
def test_decode_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        DECODE[name]()
    fn = dk.mla_decode if name.startswith("mla") else dk.paged_decode
    assert_names_argument(e.value, fn, extra=("num_splits",) if "plan" in name else ())


@pytest.mark.parametrize("name", list(PREFILL))
def test_prefill_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        PREFILL[name]()
    assert_names_argument(e.value, dk.mla_prefill if name.startswith("mla") else dk.paged_prefill)


@pytest.mark.parametrize("name", list(WRITES))
def test_cache_write_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        WRITES[name]()
    fn = dk.mla_cache_write if name.startswith("mla") else dk.cache_write
    assert_names_argument(e.value, fn, extra=("v / v_cache",))


@pytest.mark.parametrize("name", list(PLAN))
def test_plan_decode_bad_input(name):
    with pytest.raises((TypeError, ValueError)) as e:
        PLAN[name]()
    assert_names_argument(e.value, dk.plan_decode)


def test_bad_slot_leaves_the_cache_untouched():
    kc, vc = KC.clone(), VC.clone()
    with pytest.raises(ValueError, match="^slot_mapping"):
        dk.cache_write(Q[:, :2], Q[:, :2], kc, vc, torch.tensor([5, -3]))
    assert torch.equal(kc, KC) and torch.equal(vc, VC)


def test_reference_refuses_negative_ids_instead_of_indexing_from_the_end():
    with pytest.raises(ValueError, match="^block_tables"):
        paged_decode_ref(Q, KC, VC, _bt(0, 0, -1), SL, 0.2)
    with pytest.raises(ValueError, match="^block_tables"):
        paged_prefill_ref(QP, KC, VC, _bt(0, 0, -1), CU, SL, 0.2)
    with pytest.raises(ValueError, match="^seq_lens"):
        paged_decode_ref(Q, KC, VC, BT, _sl(33, 5), 0.2)


def test_documented_edge_behaviour():
    # empty batch, zero-length sequences
    assert dk.paged_decode(Q[:0], KC, VC, BT[:0], SL[:0], 0.2).shape == (0, 4, D)
    out = dk.paged_decode(Q, KC, VC, BT, _sl(0, 5), 0.2)
    assert (out[0] == 0).all()
    # unused block-table entries may hold anything (only the entries a sequence uses are checked)
    dk.paged_decode(Q, KC, VC, _bt(1, 1, 10**6), _sl(20, 5), 0.2)
    # strided q and caches (a view of a bigger cache) work
    big = torch.randn(NB, BS, HKV, 2 * D)
    torch.testing.assert_close(dk.paged_decode(Q, big[..., :D], VC, BT, SL, 0.2),
                               dk.paged_decode(Q, big[..., :D].contiguous(), VC, BT, SL, 0.2))


# ---------------------------------------------------------------------------------------------- Triton launchers
class _GridRecorder:
    def __init__(self):
        self.grids, self.calls = [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
            self.calls.append(args)
        return launch


def test_prefill_and_decode_grids_respect_the_65535_limit(monkeypatch):
    """grid.y (prefill) and grid.z (decode) hold the batch: beyond 65,535 sequences the launchers split it."""
    B = 65535 * 2 + 7
    cu = torch.zeros(B + 1, dtype=torch.int32)
    sl = torch.zeros(B, dtype=torch.int32)
    bt = torch.zeros(B, 1, dtype=torch.int32)
    rec = _GridRecorder()
    monkeypatch.setattr(attention_triton, "_prefill_fwd_kernel", rec)
    attention_triton.paged_prefill_triton(torch.zeros(1, 2, 16), torch.zeros(1, 16, 1, 16), torch.zeros(1, 16, 1, 16),
                                          bt, cu, sl, 0.5, True, 1)
    assert [g[1] for g in rec.grids] == [65535, 65535, 7] and all(max(g[1:]) <= 65535 for g in rec.grids)
    assert [c[6].shape[0] for c in rec.calls] == [65535, 65535, 7]  # seq_lens slices
    rec = _GridRecorder()
    monkeypatch.setattr(attention_triton, "_decode_fwd_kernel", rec)
    attention_triton.paged_decode_triton(torch.zeros(B, 2, 16), torch.zeros(1, 16, 1, 16), torch.zeros(1, 16, 1, 16),
                                         bt, sl, 0.5, 1, 64)
    assert [g[2] for g in rec.grids] == [65535, 65535, 7] and all(max(g[1:]) <= 65535 for g in rec.grids)


def _sparse_int32(n: int) -> torch.Tensor:
    """n int32 zeros backed by a sparse temporary file: gigabytes of address space, kilobytes of memory."""
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.truncate(path, 4 * n)
    t = torch.from_file(path, shared=True, size=n, dtype=torch.int32)
    os.unlink(path)
    return t


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the Triton kernels in the interpreter")
def test_triton_block_table_addressing_is_int64():
    """B x max_blocks beyond 2**31 (a strided view of a sparse block table): b * stride must not wrap in int32."""
    stride = 2**30 + 16
    B = 3  # sequence 2 starts at element 2 * stride > 2**31
    store = _sparse_int32(stride * (B - 1) + 4)
    bt = store.as_strided((B, 2), (stride, 1))
    ks = [torch.randn(L, 1, 16) for L in (5, 9, 17)]
    vs = [torch.randn(L, 1, 16) for L in (5, 9, 17)]
    kc = torch.randn(6, 16, 1, 16)
    vc = torch.randn(6, 16, 1, 16)
    for b, L in enumerate((5, 9, 17)):
        blocks = [2 * b, 2 * b + 1]
        bt[b, 0], bt[b, 1] = blocks[0], blocks[1]
        for p in range(L):
            kc[blocks[p // 16], p % 16] = ks[b][p]
            vc[blocks[p // 16], p % 16] = vs[b][p]
    sl = torch.tensor([5, 9, 17], dtype=torch.int32)
    q = torch.randn(B, 2, 16)
    expect = paged_decode_ref(q, kc, vc, bt.contiguous(), sl, 0.3)
    out = attention_triton.paged_decode_triton(q, kc, vc, bt, sl, 0.3, 1, 64)
    assert_close(out, expect, atol=1e-5, rtol=1e-5, name="decode, int64 block-table rows")
    cu = torch.tensor([0, 1, 3, 6], dtype=torch.int32)
    qp = torch.randn(6, 2, 16)
    expect = paged_prefill_ref(qp, kc, vc, bt.contiguous(), cu, sl, 0.3)
    out = attention_triton.paged_prefill_triton(qp, kc, vc, bt, cu, sl, 0.3, True, 3)
    assert_close(out, expect, atol=1e-5, rtol=1e-5, name="prefill, int64 block-table rows")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the Triton kernels in the interpreter")
def test_triton_kernels_flag_bad_tables_without_reading_them():
    kc, vc = torch.randn(4, 16, 1, 16), torch.randn(4, 16, 1, 16)
    q = torch.randn(2, 2, 16)
    flags = torch.zeros(1, dtype=torch.int32)
    bt = torch.tensor([[0, 10**6], [2, 3]], dtype=torch.int32)
    out = attention_triton.paged_decode_triton(q, kc, vc, bt, _sl(20, 5), 0.3, 1, 64, flags)
    assert int(flags) & 1 and out.isfinite().all()
    good = paged_decode_ref(q[1:], kc, vc, bt[1:], _sl(5), 0.3)
    assert_close(out[1:], good, atol=1e-5, rtol=1e-5)
    flags.zero_()
    attention_triton.paged_decode_triton(q, kc, vc, bt, _sl(2**30, 5), 0.3, 1, 64, flags)
    assert int(flags) & 2
    flags.zero_()
    cu = torch.tensor([0, 20, 25], dtype=torch.int32)  # 20 queries: more than one 16-row tile of the interpreter
    attention_triton.paged_prefill_triton(torch.randn(25, 2, 16), kc, vc, bt, cu, _sl(20, 5), 0.3, False, 1, flags)
    assert int(flags) == 1 | 16  # a bad block id, and max_seqlen_q = 1 below the 20 queries


# ---------------------------------------------------------------------------------------------- GPU: device flags
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_bad_tables_set_the_device_flag_and_debug_mode_raises(backend, monkeypatch):
    monkeypatch.setenv("DSMATH_DECODE_BACKEND", backend)
    dev = "cuda"
    q, kc, vc = Q.to(dev), KC.to(dev), VC.to(dev)
    bt, sl = _bt(1, 0, 10**6).to(dev), SL.to(dev)
    dk.raise_device_errors()  # start clean
    out = dk.paged_decode(q, kc, vc, bt, sl, 0.2)  # no sync: the bad block is absent, the flag is set
    assert out.isfinite().all()
    with pytest.raises(ValueError, match="^block_tables"):
        dk.raise_device_errors()
    dk.raise_device_errors()  # cleared
    with pytest.raises(ValueError, match="^block_tables"):
        dk.paged_decode(q, kc, vc, bt, sl, 0.2, check_bounds=True)
    with pytest.raises(ValueError, match="^seq_lens"):
        dk.paged_decode(q, kc, vc, BT.to(dev), _sl(2**30, 5).to(dev), 0.2, check_bounds=True)


@pytest.mark.gpu
def test_gpu_bad_slots_and_ids_set_the_device_flag():
    kc, vc = KC.cuda(), VC.cuda()
    dk.raise_device_errors()
    dk.cache_write(Q[:, :2].cuda(), Q[:, :2].cuda(), kc, vc, torch.tensor([-2, NB * BS], device="cuda"))
    assert torch.equal(kc.cpu(), KC) and torch.equal(vc.cpu(), VC)  # nothing written
    with pytest.raises(ValueError, match="^slot_mapping"):
        dk.raise_device_errors()
    with pytest.raises(ValueError, match="^slot_mapping"):
        dk.cache_write(Q[:, :2].cuda(), Q[:, :2].cuda(), kc, vc, torch.tensor([3, -5], device="cuda"),
                       check_bounds=True)
