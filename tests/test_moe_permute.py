"""moe_permute: the contiguous-segment layout (order / expert_offsets / inverse) from every backend equals the
reference exactly, on odd shapes, empty experts, one hot expert, padding to block_m; bad ids raise ValueError."""

import pytest
import torch

from dsmath_kernels import moe as moe_mod
from dsmath_kernels import moe_permute
from dsmath_kernels.reference.moe import moe_permute_ref


def _ids(T, K, E, kind="uniform"):
    if T == 0:
        return torch.zeros(0, K, dtype=torch.int32)
    if kind == "hot":  # every pair on expert E-1
        return torch.full((T, K), E - 1, dtype=torch.int32)
    if kind == "skew":  # Zipf-like, repeats allowed: many empty experts
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, T * K, replacement=True).view(T, K).int()
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int()


def _check_layout(ids, E, block_m, perm):
    order, off, inv = perm
    T, K = ids.shape
    P = T * K
    assert order.dtype == off.dtype == inv.dtype == torch.int32
    assert order.shape == (P + min(E, P) * (block_m - 1),) and off.shape == (E + 1,) and inv.shape == (T, K)
    assert int(off[0]) == 0 and bool((off[1:] >= off[:-1]).all()) and bool((off % block_m == 0).all())
    flat = ids.reshape(-1).long()
    rows = inv.reshape(-1).long()
    assert torch.equal(order[rows].long(), torch.arange(P))  # inverse really inverts order
    seg = torch.searchsorted(off.long(), rows, right=True) - 1
    assert torch.equal(seg, flat)  # each pair sits in its expert's segment
    assert int((order >= 0).sum()) == P


CASES = [(0, 2, 4), (1, 1, 1), (1, 6, 8), (7, 3, 5), (131, 4, 16), (64, 8, 256), (33, 2, 3)]


@pytest.mark.parametrize("T,K,E", CASES)
@pytest.mark.parametrize("kind", ["uniform", "skew", "hot"])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_permute_matches_reference(T, K, E, kind, block_m):
    if kind == "uniform" and K > E:
        pytest.skip("uniform routing needs K <= E")
    ids = _ids(T, K, E, kind)
    got = moe_permute(ids, E, block_m=block_m)
    want = moe_permute_ref(ids, E, block_m)
    _check_layout(ids, E, block_m, want)
    for name, a, b in zip(("order", "expert_offsets", "inverse"), got, want):
        assert torch.equal(a, b), name


def test_permute_backend_is_cpp_when_built():
    from dsmath_kernels import _ext

    if _ext.C() is not None and hasattr(_ext.C(), "moe_permute_cpu"):
        assert moe_mod._permute_backend(torch.device("cpu")) == "cpu"


def test_permute_int64_ids_and_fake():
    ids = _ids(9, 2, 6).long()
    got = moe_permute(ids, 6, block_m=8)
    want = moe_permute_ref(ids, 6, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f = torch.ops.dsmath.moe_permute(torch.empty(9, 2, dtype=torch.int32), 6, 8)
    assert [tuple(t.shape) for t in f] == [tuple(t.shape) for t in want]


@pytest.mark.parametrize("bad", [-1, 6, 100])
def test_permute_rejects_out_of_range_ids(bad):
    ids = _ids(5, 2, 6)
    ids[3, 1] = bad
    with pytest.raises(ValueError, match="ids"):
        moe_permute(ids, 6)


def test_permute_rejects_bad_arguments():
    with pytest.raises(TypeError, match="ids"):
        moe_permute(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="ids"):
        moe_permute(torch.zeros(6, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="block_m"):
        moe_permute(torch.zeros(3, 2, dtype=torch.int32), 4, block_m=0)
    with pytest.raises(ValueError, match="num_experts"):
        moe_permute(torch.zeros(3, 2, dtype=torch.int32), 0)


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E", [(1, 8, 256), (16, 6, 64), (32768, 8, 256), (8192, 6, 64), (300, 4, 1024)])
@pytest.mark.parametrize("block_m", [1, 128])
def test_permute_cuda_matches_reference(T, K, E, block_m, launches):
    for kind in ("uniform", "skew", "hot"):
        ids = _ids(T, K, E, kind).cuda()
        got = moe_permute(ids, E, block_m=block_m)
        launches.assert_ran("moe_permute", "cuda")
        want = moe_permute_ref(ids, E, block_m)
        for name, a, b in zip(("order", "expert_offsets", "inverse"), got, want):
            assert torch.equal(a, b), f"{kind} {name}"


@pytest.mark.gpu
def test_permute_cuda_graph_capture():
    E, T, K = 64, 32, 6
    ids = _ids(T, K, E).cuda()
    moe_permute(ids, E)  # warm-up outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        perm = moe_permute(ids, E, block_m=16)
    ids.copy_(_ids(T, K, E, "skew").cuda())
    g.replay()
    want = moe_permute_ref(ids, E, 16)
    assert all(torch.equal(a, b) for a, b in zip(perm, want))


@pytest.mark.gpu
def test_permute_cuda_checks_ids_only_in_debug_mode(monkeypatch):
    ids = _ids(8, 2, 6).cuda()
    ids[1, 1] = 6
    monkeypatch.setenv("DSMATH_CHECK_IDS", "1")
    with pytest.raises(ValueError, match="ids"):
        moe_permute(ids, 6)
    monkeypatch.setenv("DSMATH_CHECK_IDS", "0")
    perm = moe_permute(ids, 6)  # no sync, no check: the bad pair is skipped, never written out of bounds
    torch.cuda.synchronize()
    assert int(perm.inverse[1, 1]) == -1 and int(perm.expert_offsets[-1]) == 15


def _emulate_cuda_permute(ids, E, block_m, threads=256, items=4):
    """Step-by-step model of csrc/moe_permute.cu (chunk histogram, last-block scan over chunks, per-item warp
    ranks via match_any and per-warp counts), so its index arithmetic is checked here where no GPU runs it."""
    flat = ids.reshape(-1).tolist()
    P, chunk = len(flat), threads * items
    chunks = (P + chunk - 1) // chunk
    counts = [[0] * E for _ in range(chunks)]
    for f, e in enumerate(flat):
        if 0 <= e < E:
            counts[f // chunk][e] += 1
    total = [0] * E
    for e in range(E):  # last block: exclusive scan over chunks
        for c in range(chunks):
            counts[c][e], total[e] = total[e], total[e] + counts[c][e]
    offsets, run = [], 0
    for e in range(E):
        offsets.append(run)
        run += (total[e] + block_m - 1) // block_m * block_m
    offsets.append(run)
    order = [-1] * (P + min(E, P) * (block_m - 1))
    inverse = [-1] * P
    for c in range(chunks):  # scatter kernel, block c
        base = [offsets[e] + counts[c][e] for e in range(E)]
        for i in range(items):
            lanes = [[] for _ in range(threads // 32)]
            for t in range(threads):
                f = c * chunk + i * threads + t
                e = flat[f] if f < P and 0 <= flat[f] < E else -1
                lanes[t // 32].append((f, e))
            wcount = [[sum(1 for _, x in lanes[w] if x == e) for e in range(E)] for w in range(len(lanes))]
            for w, warp in enumerate(lanes):
                for lane, (f, e) in enumerate(warp):
                    if e < 0:
                        continue
                    rank = sum(1 for _, x in warp[:lane] if x == e)
                    pos = base[e] + sum(wcount[v][e] for v in range(w)) + rank
                    order[pos], inverse[f] = f, pos
            for e in range(E):
                base[e] += sum(wc[e] for wc in wcount)
    return order, offsets, inverse


@pytest.mark.parametrize("T,K,E,kind,block_m", [(300, 8, 16, "skew", 1), (700, 6, 64, "uniform", 16),
                                               (129, 4, 8, "hot", 4)])
def test_cuda_algorithm_model_matches_reference(T, K, E, kind, block_m):
    ids = _ids(T, K, E, kind)
    order, offsets, inverse = _emulate_cuda_permute(ids, E, block_m)
    want = moe_permute_ref(ids, E, block_m)
    assert order == want[0].tolist()
    assert offsets == want[1].tolist()
    assert inverse == want[2].reshape(-1).tolist()
