"""BlockManager: reference counts, shared prompt blocks of forked samples, copy-on-write, prefix caching."""

import pytest

from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.sequence import Sequence


def seq(n_tokens: int, start: int = 0, n: int = 1, rid: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n_tokens)), SamplingParams(n=n))


def computed(bm: BlockManager, s: Sequence, k: int) -> None:
    """What the engine does after a step: k tokens are in the cache now."""
    s.num_computed += k
    bm.seal(s)


@pytest.mark.parametrize("n_tokens,bs", [(1, 4), (7, 4), (8, 4), (19, 16), (131, 16)])
def test_allocate_and_free_round_trip(n_tokens, bs):
    bm = BlockManager(64, bs)
    s = seq(n_tokens)
    got = bm.allocate(s, budget=1000)
    assert got == (n_tokens, [])
    assert len(s.block_table) == -(-n_tokens // bs) == 64 - bm.num_free
    assert len(set(s.block_table)) == len(s.block_table)
    bm.free_seq(s)
    assert bm.check_all_free() and s.block_table == []


def test_budget_chunks_and_growth():
    bm = BlockManager(16, 4)
    s = seq(10)
    assert bm.allocate(s, budget=3) == (3, []) and len(s.block_table) == 1
    computed(bm, s, 3)
    assert bm.allocate(s, budget=5) == (5, []) and len(s.block_table) == 2
    computed(bm, s, 5)
    assert bm.allocate(s, budget=5) == (2, []) and len(s.block_table) == 3
    computed(bm, s, 2)
    s.token_ids += [1, 2]                       # two decode steps: 11th and 12th tokens stay in block 2
    assert bm.allocate(s, 1) == (1, []) and len(s.block_table) == 3
    computed(bm, s, 1)
    assert bm.allocate(s, 1) == (1, []) and len(s.block_table) == 3
    computed(bm, s, 1)
    s.token_ids.append(3)                       # 13th token opens block 3
    assert bm.allocate(s, 1) == (1, []) and len(s.block_table) == 4


def test_not_enough_blocks_changes_nothing():
    bm = BlockManager(3, 4)
    a, b = seq(8), seq(8, start=100, rid=1)
    assert bm.allocate(a, 100) == (8, [])
    table, free = list(b.block_table), bm.num_free
    assert bm.allocate(b, 100) is None
    assert b.block_table == table and bm.num_free == free == 1 and b.num_computed == 0


@pytest.mark.parametrize("n_tokens,partial", [(10, True), (8, False)])
def test_fork_shares_prompt_blocks_and_copies_on_write(n_tokens, partial):
    bm, n = BlockManager(32, 4), 4
    parent = seq(n_tokens, n=n)
    bm.allocate(parent, 100)
    computed(bm, parent, n_tokens)
    children = [parent.fork(i) for i in range(1, n)]
    for c in children:
        bm.fork(c)
    prompt_blocks = -(-n_tokens // 4)
    assert 32 - bm.num_free == prompt_blocks                     # prefilled once, shared n ways
    assert all(bm.blocks[b].ref == n for b in parent.block_table)
    copies = []
    for i, s in enumerate([parent] + children):
        s.token_ids.append(50 + i)                               # each sample's first token
        num_new, cp = bm.allocate(s, 1)
        assert num_new == 1
        copies += cp
    if partial:  # the last prompt block is written by every sample: n-1 copies, the last writer keeps it
        assert len(copies) == n - 1
        last = parent.block_table[-1]
        assert all(src == copies[0][0] for src, _ in copies)
        assert len({s.block_table[-1] for s in [parent] + children}) == n
        assert bm.blocks[copies[0][0]].ref == 1 and last in {s.block_table[-1] for s in [parent] + children}
        assert 32 - bm.num_free == prompt_blocks + n - 1
    else:        # prompt ends on a block boundary: shared blocks stay read-only, each sample opens a new block
        assert copies == []
        assert 32 - bm.num_free == prompt_blocks + n
    shared = parent.block_table[: n_tokens // 4]
    assert all(s.block_table[: n_tokens // 4] == shared for s in children)
    for s in [parent] + children:
        bm.free_seq(s)
    assert bm.check_all_free()


def test_prefix_cache_reuses_full_blocks():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = seq(10)
    bm.allocate(a, 100)
    computed(bm, a, 10)
    b = Sequence(1, list(range(9)) + [77, 78], SamplingParams())  # shares 2 full blocks (8 tokens) with a
    num_new, _ = bm.allocate(b, 100)
    assert b.num_computed == 8 and num_new == 3 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref == 2 and bm.num_prefix_hits == 2
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.check_all_free()
    c = seq(9)                                  # blocks are cached after free, until handed out again
    bm.allocate(c, 100)
    assert c.num_computed == 8


def test_prefix_cache_keeps_one_token_to_compute_and_evicts():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq(8)
    bm.allocate(a, 100)
    computed(bm, a, 8)
    bm.free_seq(a)
    b = seq(8)                                  # whole prompt cached: last block is recomputed (logits needed)
    assert bm.allocate(b, 100) == (4, []) and b.num_computed == 4
    bm.free_seq(b)
    c, d = seq(16, start=500), seq(8)           # c takes every block: a's cached blocks are evicted
    bm.allocate(c, 100)
    bm.free_seq(c)
    assert bm.allocate(d, 100) == (8, []) and d.num_computed == 0


def test_free_twice_is_caught():
    bm = BlockManager(4, 4)
    s = seq(4)
    bm.allocate(s, 10)
    table = list(s.block_table)
    bm.free_seq(s)
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free_seq(s)


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
